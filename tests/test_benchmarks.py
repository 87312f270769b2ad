"""The benchmark harness and the GPU check on the CPU: every entry's smoke pass, that a wrong provider is caught,
and what a GPU slot relies on (rows kept as measured, static compiles, children killed, sections in order)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from conftest import running, wait_for

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402


def test_smoke_pass_runs_every_benchmark():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the smoke path, even on a GPU machine
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("attention", "layernorm", "add_layernorm", "add_layernorm_model", "gelu", "adamw", "adamw_clip",
                 "cross_entropy", "train"):
        assert f"## {name} (smoke)" in result.stdout


def test_gpu_check_smoke_runs_every_section(tmp_path):
    """The one command a GPU slot runs first, at tiny sizes on the CPU: it must not rot between slots."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    order = [report.index(f"## {name}  (") for name in SECTIONS]
    assert order == sorted(order), order
    for name in (*gpu_check_module().KERNELS, *gpu_check_module().KERNELS_REST):  # one child each, all tabled
        assert f"### {name}\n\n| config |" in report
    assert "| triton | 2 |" in report and "error" not in report.lower()
    assert "nothing to run here" in report.split("## ablation")[1]  # compiled providers only: none in smoke mode
    assert (tmp_path / "tests.log").exists()


SECTIONS = ("tests", "step-B16", "kernels", "kernels-rest", "step-B64", "ablation", "restart")


def gpu_check_module():
    import gpu_check

    return gpu_check


def test_gpu_check_sections_put_issue_14_first():
    """The order a short slot runs them in: the LayerNorm benchmarks (bf16 and the model's mixed path), then
    attention, before the other kernels; every kernel benchmark in one section; the ablation has its
    baseline; the kernels start within the first command's 540 s."""
    from run import discover

    gpu_check = gpu_check_module()
    found = {name: (estimate, most, children) for name, estimate, most, children in gpu_check.sections(False)}
    assert tuple(found) == SECTIONS
    kernels = [args[1] for args in found["kernels"][2]]
    assert kernels == ["layernorm", "add_layernorm", "add_layernorm_model", "attention"]
    rest = [args[1] for args in found["kernels-rest"][2]]
    assert sorted(kernels + rest) == sorted(name for name in discover() if name != "train")
    assert [gpu_check.TARGET_CONFIGS[name] for name in kernels] == [4, 4, 4, 2]  # the four widths; T = 1024, 4096
    assert "torch+compile" in found["ablation"][2][0]
    # reached at the first command's budget of 540 s, even after slow ones, with time to start them
    assert found["tests"][1] + found["step-B16"][1] + found["kernels"][0] <= 540 - 20
    assert all(estimate <= most for estimate, most, _ in found.values())


def test_gpu_check_section_out_of_time_keeps_its_rows(tmp_path, monkeypatch):
    """A section stopped at its time limit: the rows it reported before are kept, and everything it started
    (pytest, in the tests section) is killed with it, not left running beside the next section."""
    import gpu_check

    pid_file = tmp_path / "grandchild.pid"
    script = (f"import json, subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              f"print({gpu_check.ROW!r} + json.dumps({{'provider': 'torch', 'B': 2, 'ms': 1.0}}), flush=True)\n"
              f"time.sleep(120)\n")
    monkeypatch.setattr(gpu_check, "child_command", lambda *args: [sys.executable, "-c", script])
    start = time.perf_counter()
    record = gpu_check.run_section("step-B16", [["steps"]], tmp_path, False, timeout=5)
    assert time.perf_counter() - start < 60, "waited for the section's grandchild to end on its own"
    assert record["result"] == [{"provider": "torch", "B": 2, "ms": 1.0}]
    assert record["error"].startswith("timed out after 5 s; 1 rows"), record
    grandchild = int(pid_file.read_text())  # killed at once; reaped by init a moment later
    wait_for(lambda: not running(grandchild), f"the section's grandchild {grandchild} to end", timeout=5)


def _fake_children(scripts: dict):
    """child_command for run_section: each child runs scripts[its last argument] instead of a measurement."""
    return lambda args, out_dir, smoke: [sys.executable, "-c", scripts[args[-1]]]


def _row_script(gpu_check, rows, end="") -> str:
    return ("import json, os, signal, sys, time\n" + "".join(
        f"print({gpu_check.ROW!r} + json.dumps({row!r}), flush=True)\n" for row in rows) + end)


def test_gpu_check_kernel_crash_costs_only_its_benchmark(tmp_path, monkeypatch):
    """A kernel benchmark whose process dies (a sticky CUDA error, say) keeps the rows it reported, and the
    next benchmark still runs; each child is told the check's own command line, not its --child one."""
    gpu_check = gpu_check_module()
    spec = {"unit": "GB/s", "baseline": "torch.compile", "smoke_baseline": "torch", "ceilings": {"copy_GBps": 4000.0}}
    row = {"config": {"C": 768}, "mode": "forward", "provider": "triton", "ms": 1.0, "rate": 2.0, "of_ceiling": 0.5,
           "peak_MB": 3.0}
    crash = _row_script(gpu_check, [{"benchmark": "first", **spec}, {"benchmark": "first", **row}],
                        "print('illegal address', file=sys.stderr); os.kill(os.getpid(), signal.SIGSEGV)\n")
    fine = _row_script(gpu_check, [{"benchmark": "second", **spec}, {"benchmark": "second", **row}],
                       f"print({gpu_check.ROW!r} + json.dumps({{'benchmark': 'second', "
                       f"'command': os.environ['GPT2_BENCH_COMMAND']}}))\n")
    monkeypatch.setattr(gpu_check, "child_command", _fake_children({"first": crash, "second": fine}))
    record = gpu_check.run_section("kernels", [["kernel", "first"], ["kernel", "second"]], tmp_path, False, 60)
    assert record["error"].startswith("first: killed by SIGSEGV"), record
    assert "illegal address" in record["stderr"]
    measured = [r["benchmark"] for r in record["result"] if "provider" in r]
    assert measured == ["first", "second"]
    assert next(r["command"] for r in record["result"] if "command" in r) == " ".join(["python", *sys.argv])
    report = gpu_check.markdown({}, [record])
    assert report.count("| C=768 | forward | triton | 1.0000 | 2.0 | 50.0 | 3 |") == 2, report
    assert "### second" in report and "**killed by SIGSEGV**" in report.split("### second")[0]


def start_check_with_a_sleeping_child(tmp_path, child_prelude: str = ""):
    """A check of two step sections whose child reports a row, starts a grandchild, and sleeps: (the
    check's process, the pid of the grandchild once started, the results folder)."""
    pid_file, out = tmp_path / "pids", tmp_path / "out"
    sleeper = (f"{child_prelude}import json, subprocess, sys, time\n"
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               "print('gpu_check row: ' + json.dumps({'provider': 'torch', 'B': 2, 'ms': 1.0, 'tokens_per_s': 1.0, "
               "'first_steps_s': 1.0}), flush=True)\n"
               f"open({str(pid_file)!r}, 'w').write(f'{{p.pid}}')\n"
               "time.sleep(120)\n")
    check = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gpu_check\n"
             f"gpu_check.child_command = lambda *args: [sys.executable, '-c', {sleeper!r}]\n"
             f"sys.exit(gpu_check.main(['--smoke', '--out', {str(out)!r}, '--sections', 'step-B16,step-B64']))\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    parent = subprocess.Popen([sys.executable, "-c", check], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    else:
        parent.kill()
        raise AssertionError(parent.communicate()[0][-3000:])
    return parent, int(pid_file.read_text()), out


def test_gpu_check_sigterm_kills_the_running_child(tmp_path):
    """The outer `timeout` signals the check alone (its children run in sessions of their own): the check
    kills the running child's process group, and writes the rows measured before it stops."""
    parent, grandchild, out = start_check_with_a_sleeping_child(tmp_path)
    parent.send_signal(signal.SIGTERM)
    output = parent.communicate(timeout=60)[0]
    assert parent.returncode == 1, output[-3000:]
    wait_for(lambda: not running(grandchild), f"the running section's grandchild {grandchild} to end", timeout=5)
    report = (out / "gpu_check.md").read_text()
    assert "stopped by SIGTERM" in report and "| torch | 2 | 1.0 |" in report, report
    assert "## step-B64" not in report


def test_gpu_check_killed_outright_leaves_no_child_running(tmp_path):
    """SIGKILL gives the check no chance to kill its child's group: the child does, when its parent is gone
    (here the fake child calls what gpu_check.child() calls first)."""
    prelude = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import gpu_check; gpu_check._die_with_parent()\n"
    parent, grandchild, _ = start_check_with_a_sleeping_child(tmp_path, prelude)
    parent.kill()
    parent.communicate(timeout=60)
    wait_for(lambda: not running(grandchild), f"the child's grandchild {grandchild} to end", timeout=5)


def test_gpu_check_archive_and_sections(tmp_path):
    """--sections runs the named sections only; --archive holds the results folder after each one; a second
    run into the same folder adds its sections to the report, and keeps the device's measured ceilings."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out, archive = tmp_path / "results", tmp_path / "check.tar.gz"
    first_args = ["--smoke", "--out", str(out), "--sections", "tests", "--archive", str(archive)]
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", *first_args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert "## tests" in report and "## step-B16" not in report
    with tarfile.open(archive) as tar:
        assert {"results/gpu_check.md", "results/tests.log"} <= set(tar.getnames())
    (out / "ceilings.json").write_text('{"copy_GBps": 4000.0}')  # as the first run's kernels would have left it
    ablation = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out),
                               "--sections", "ablation"], cwd=REPO, env={**env, "GPT2_BENCH_COMMAND": "second"},
                              capture_output=True, text=True, timeout=300)
    assert ablation.returncode == 0 and "nothing to run here" in ablation.stdout, ablation.stderr[-3000:]
    assert json.loads((out / "ceilings.json").read_text()) == {"copy_GBps": 4000.0}
    report = (out / "gpu_check.md").read_text()
    assert report.index("## tests") < report.index("## ablation"), report
    assert "_kept from an earlier run: date " in report.split("## ablation")[0], report  # the tests section's
    assert "kept from" not in report.split("## ablation")[1] and "- command: second" in report
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert [(s["section"], s["environment"]["command"]) for s in sections] == [
        ("tests", " ".join(["python", "benchmarks/gpu_check.py", *first_args])), ("ablation", "second")]
    bad = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--sections", "steps"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--sections: unknown steps" in bad.stderr


def test_gpu_check_discards_the_ceilings_only_before_a_section_that_measures_them(tmp_path, monkeypatch):
    """ceilings.json (the device's copy and matmul ceilings) outlives a run without kernel sections, and a
    run that has some measures it again once, in its first kernel section; a stop during a section says
    the sections after it did not run."""
    import argparse

    gpu_check = gpu_check_module()
    stub = [("steps", 1, 10, [["steps", "16", "torch"]]), ("kernels", 1, 10, [["kernel", "layernorm"]]),
            ("kernels-rest", 1, 10, [["kernel", "gelu"]]), ("last", 1, 10, [["steps", "16", "torch"]])]
    monkeypatch.setattr(gpu_check, "sections", lambda smoke: stub)
    ceilings, seen = tmp_path / gpu_check.CEILINGS, []

    def run_section(name, children, out_dir, smoke, timeout):
        seen.append((name, ceilings.exists()))
        ceilings.write_text("{}")  # what a kernel section's first benchmark leaves
        return {"section": name, "result": [], **({"stopped": "SIGTERM"} if name == "kernels-rest" else {})}

    monkeypatch.setattr(gpu_check, "run_section", run_section)
    args = argparse.Namespace(smoke=False, budget=100.0, archive=None)
    ceilings.write_text("{}")
    gpu_check.run_sections(args, ["steps"], tmp_path, {}, [])
    assert seen == [("steps", True)]
    seen.clear()
    with pytest.raises(gpu_check.Stopped, match="SIGTERM during kernels-rest"):
        gpu_check.run_sections(args, [name for name, *_ in stub], tmp_path, {}, [])
    assert seen == [("steps", True), ("kernels", False), ("kernels-rest", True)]


def test_gpu_check_merge_keeps_measurements_a_skip_would_replace():
    """Merging a run into an earlier one's report: sections rerun are replaced, the others kept, in the
    sections' order; a section this run only skipped (out of time) does not replace a measured one."""
    gpu_check = gpu_check_module()
    earlier = [{"section": "tests", "result": [1]}, {"section": "kernels", "result": [2]},
               {"section": "step-B64", "skipped": "skipped: 3 s left"}]
    records = [{"section": "step-B16", "result": [3]}, {"section": "kernels", "skipped": "skipped: 9 s left"},
               {"section": "step-B64", "result": [4]}, {"section": "tests", "result": [5]},
               {"section": "the rest", "skipped": "not run: the check was stopped by SIGTERM"}]
    got = gpu_check.merged(earlier, records, list(SECTIONS))
    assert got == [records[3], records[0], earlier[1], records[2], records[4]], got


def test_gpu_check_refuses_bad_paths_and_budgets_before_any_section(tmp_path, capsys):
    """A wrong --archive, --out or --budget is a one-line error before the first section runs, not a
    traceback after it, with the slot's minutes spent."""
    gpu_check = gpu_check_module()
    a_file, out = tmp_path / "file", tmp_path / "out"
    a_file.write_text("")
    for args, message in ((["--archive", "/nonexist/x.tar.gz"], "its folder /nonexist is missing"),
                          (["--archive", str(tmp_path)], "is a folder"),
                          (["--out", str(a_file)], "is a file"),
                          (["--out", str(a_file / "sub")], "cannot create it")):
        assert gpu_check.main(["--smoke", "--sections", "tests", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --") and message in err and err.count("\n") == 1, err
    assert not out.exists(), "a section ran before the paths were checked"
    for budget in ("0", "-5", "nan", "inf", "x"):
        with pytest.raises(SystemExit) as exit:
            gpu_check.main(["--smoke", "--budget", budget, "--sections", "ablation", "--out", str(out)])
        assert exit.value.code == 2 and "is not a positive number of seconds" in capsys.readouterr().err


def test_gpu_check_tuning_table_keeps_every_keys_timings():
    """The kernels section's autotuning table: every key an autotuner chose a config for, each with the times
    of the candidates it tried (Triton itself keeps the last key's only), here on a stand-in for Triton's
    Autotuner.run."""
    import triton

    gpu_check = gpu_check_module()
    configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
               triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)]

    class Tuner:  # what Autotuner.run does with a key: a new one is benchmarked, its timings kept until the next
        def __init__(self):
            self.configs, self.cache, self.cache_results = configs, {}, True

        def run(self, key, base_ms):
            if key not in self.cache:
                self.configs_timings = {c: [base_ms + i, base_ms, base_ms + 2] for i, c in enumerate(configs)}
                self.cache[key] = configs[0]

    tuners = [("kernels.attention._dkdv_dq_kernel", Tuner())]
    gpu_check._tune_afresh(tuners)
    assert tuners[0][1].cache_results is False
    for key, base_ms in (((1024, 64, True, "torch.bfloat16"), 0.25), ((4096, 64, True, "torch.bfloat16"), 3.5),
                         ((1024, 64, True, "torch.bfloat16"), 9.0)):
        tuners[0][1].run(key, base_ms)
    lines = gpu_check.tuning_table(tuners).splitlines()[2:]
    assert len(lines) == 2 and "(1024," in lines[0] and "(4096," in lines[1], lines
    assert "0.250" in lines[0] and "1.250" in lines[0] and "3.500" in lines[1] and "4.500" in lines[1], lines
    assert "BLOCK_M=64 BLOCK_N=32 w4 s3" in lines[0]
    assert gpu_check.tuning_table([]) is None


def test_host_overhead_smoke_times_every_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for case in ("layernorm", "add_layernorm", "gelu", "attention", "cross_entropy", "adamw step", "GPT step"):
        assert f"| {case}" in result.stdout
    for op in ("layernorm", "add_layernorm", "gelu", "attention", "cross_entropy"):  # timed without launches too
        cells = next(line for line in result.stdout.splitlines() if line.startswith(f"| {op} |")).split("|")[1:-1]
        assert len(cells) == 6 and float(cells[4]) > 0, cells


def test_host_overhead_arguments(capsys):
    """--calls and --rounds: refused below one (a median of nothing), honoured with --smoke too."""
    import host_overhead

    for args in (["--calls", "0"], ["--rounds", "0"], ["--rounds", "-3", "--smoke"], ["--calls", "1.5"]):
        with pytest.raises(SystemExit) as exit:
            host_overhead.parse_args(args)
        assert exit.value.code == 2 and "is not a whole number above zero" in capsys.readouterr().err
    assert vars(host_overhead.parse_args(["--smoke", "--rounds", "3"])) == {"smoke": True, "calls": 5, "rounds": 3}
    assert vars(host_overhead.parse_args([])) == {"smoke": False, "calls": 150, "rounds": 15}


def test_run_lists_and_checks_names_before_anything_else(capsys):
    """--list only lists; --only with no valid name (`,`) is an error naming the benchmarks, not all of them."""
    import run

    assert run.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == list(run.discover()) and {"adamw", "attention", "layernorm"} <= set(listed)
    assert run.main(["--only", ","]) == 2
    assert "choose from adamw, " in capsys.readouterr().err


def test_smoke_lists_cuda_only_attention_backends_as_not_run():
    """On a CPU the forced SDPA backends cannot run: their smoke rows say so, instead of agreeing at 0.0."""
    import bench_attention

    bench = bench_attention.BENCHMARKS[0]
    rows = harness.smoke_op(bench, torch.device("cpu"))
    not_run = {r["provider"] for r in rows if "ok" not in r}
    assert not_run == {"torch-flash", "torch-cudnn", "torch-efficient"}, rows
    assert all(r["ok"] for r in rows if "ok" in r)
    assert "| torch-flash | n/a (CUDA only) |" in harness.markdown_table(bench, rows)


def test_smoke_catches_a_provider_that_disagrees():
    bench = harness.OpBench(
        name="tanh", unit="GB/s",
        make_inputs=lambda config, device, dtype: (torch.randn(config["n"], device=device, dtype=dtype,
                                                               requires_grad=True),),
        providers={"torch": torch.tanh, "wrong_grad": lambda x: torch.tanh(x.detach()) + 0.0 * x},
        work=lambda config, mode: 8.0 * config["n"], configs=[], smoke_configs=[{"n": 33}])
    rows = harness.smoke_op(bench, torch.device("cpu"))
    assert {r["provider"]: r["ok"] for r in rows} == {"torch": True, "wrong_grad": False}


def test_time_op_reports_each_row_and_compiles_each_config_static(monkeypatch):
    """Each row goes to report() before the next is measured (a caller cut off keeps them), a provider that
    fails is a row, and the compiled baseline is compiled once per config with static shapes, past
    Dynamo's default limit of 8 recompiles."""
    events, graphs = [], []
    compile_ = torch.compile

    def backend(gm, example_inputs):
        graphs.append(any(isinstance(e, torch.SymInt) for e in example_inputs))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend=backend, **kwargs))
    def do_bench(step, **kwargs):
        events.append("timed")
        step()
        return 1.0

    monkeypatch.setattr(harness, "do_bench", do_bench)
    monkeypatch.setattr(harness, "_peak_mb", lambda *args: 1.0)

    def broken(x):
        if x.shape[0] == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return torch.tanh(x)

    bench = harness.OpBench(
        name="tanh", unit="GB/s", providers={"torch": lambda x: torch.tanh(x) * 2, "broken": broken},
        make_inputs=lambda config, device, dtype: (torch.randn(config["n"], dtype=dtype, requires_grad=True),),
        work=lambda config, mode: 8.0 * config["n"], configs=[{"n": n} for n in range(3, 13)], smoke_configs=[],
        modes=("forward", "full"), baseline=harness.COMPILED, dtype=torch.float32)
    rows = harness.time_op(bench, torch.device("cpu"), {"copy_GBps": 1.0},
                           report=lambda row: events.append(f"{row['provider']} {row['config']['n']} {row['mode']}"))
    assert events[:4] == ["timed", "torch 3 forward", "timed", "torch 3 full"], events[:4]
    assert len(rows) == 10 * 3 * 2 and len([e for e in events if e != "timed"]) == 60
    errors = [r for r in rows if "error" in r]
    assert [(r["provider"], r["config"]["n"]) for r in errors] == [("broken", 5)] * 2
    assert errors[0]["error"].startswith("RuntimeError: CUDA error")
    assert graphs == [False] * 10, graphs  # one static graph per config, none beyond the limit run eagerly
    assert all(r["speedup"] == 1.0 and r["vs"] == harness.COMPILED for r in rows if "ms" in r)


def test_op_step_differentiates_every_input_leaf():
    """The backward and full modes timed by the kernel benchmarks: the gradient of every input leaf, returned as
    the op made it (autograd.grad; None for a leaf the op does not use), never added into .grad."""
    x, w, unused = (torch.randn(*shape, requires_grad=True) for shape in ((4, 6), (6,), (3,)))
    def op(x, w, unused):
        return (x * w).sin()

    for mode in ("backward", "full"):
        torch.manual_seed(0)
        step = harness._op_step(op, (x, w, unused), mode)
        torch.manual_seed(0)
        dy = torch.randn(4, 6)  # the output gradient _op_step draws
        want = torch.autograd.grad(op(x, w, unused), (x, w), dy)
        got = step()
        assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1]) and got[2] is None
        assert x.grad is None and w.grad is None


def test_speedups_against_the_fastest_baseline_that_ran():
    config = {"T": 1024}
    rows = [{"config": config, "mode": "forward", "provider": p, **({"ms": ms} if ms else {"error": "n/a"})}
            for p, ms in (("triton", 1.0), ("torch", 3.0), ("torch-flash", 2.0), ("torch-cudnn", None))]
    bench = harness.OpBench(name="attention", unit="TFLOP/s", make_inputs=None, providers={}, work=None, configs=[],
                            smoke_configs=[], baseline=("torch", "torch-flash", "torch-cudnn"))
    harness.add_speedups(rows, bench.baseline)
    assert (rows[0]["speedup"], rows[0]["vs"]) == (2.0, "torch-flash")
    for r in rows:
        r.update(rate=1.0, of_ceiling=0.5, peak_MB=1.0)
    table = harness.markdown_table(bench, rows)
    assert "vs fastest of torch, torch-flash, torch-cudnn |" in table and "| 2.00x (torch-flash) |" in table


def test_results_name_the_commit_without_a_git_checkout(monkeypatch):
    """On a lent GPU machine the tree is a copy without .git: GPT2_COMMIT names the commit."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(harness.subprocess, "run", no_git)
    monkeypatch.setenv("GPT2_COMMIT", "abc1234")
    monkeypatch.setenv("GPT2_BENCH_COMMAND", "python3 benchmarks/gpu_check.py --budget 540")
    env = harness.environment(torch.device("cpu"))
    assert env["commit"].startswith("abc1234 (GPT2_COMMIT")
    assert env["command"] == "python3 benchmarks/gpu_check.py --budget 540"


def test_datasheet_peaks_tell_the_h200_parts_apart():
    from gpt2.runtime import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA L40") == 181e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("Tesla T4") is None


def test_train_provider_compiles_each_batch_size_static(monkeypatch):
    """run.py --only train times several batch sizes in one process: each provider's model is compiled
    afresh (Dynamo reset), with static shapes, so the second batch size is not a symbolic-batch graph."""
    import bench_train

    graphs = []
    compile_ = torch.compile

    def backend(gm, example_inputs):
        graphs.append(any(isinstance(e, torch.SymInt) for e in example_inputs))
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=backend, **kwargs))
    for batch in (3, 2, 3):
        step = bench_train.PROVIDERS["torch+compile"]({"model": "tiny", "B": batch, "T": 16}, torch.device("cpu"),
                                                      torch.float32)
        step()
    assert graphs and not any(graphs), graphs
    assert len(graphs) >= 3  # the third factory compiled again: nothing kept from the first
