"""The benchmark harness on the CPU: every entry's smoke pass, and that a wrong provider is caught."""
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import torch

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
    for section in ("## tests", "## step-B16", "## kernels", "## step-B64"):
        assert section in report
    assert "| triton | 2 |" in report and "error" not in report.lower()
    assert (tmp_path / "tests.log").exists()


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
    record = gpu_check.run_section("step-B16", ["steps"], tmp_path, False, timeout=5)
    assert time.perf_counter() - start < 60, "waited for the section's grandchild to end on its own"
    assert record["result"] == [{"provider": "torch", "B": 2, "ms": 1.0}]
    assert record["error"].startswith("timed out after 5 s; 1 rows"), record
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed at once; reaped by init a moment later
        if not pathlib.Path(f"/proc/{grandchild}").exists() or "Z" in _proc_state(grandchild):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the section's grandchild {grandchild} is still running")


def _proc_state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_gpu_check_archive_and_sections(tmp_path):
    """--sections runs the named sections only; --archive holds the results folder after each one."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out, archive = tmp_path / "results", tmp_path / "check.tar.gz"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--sections",
                             "tests", "--archive", str(archive)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert "## tests" in report and "## step-B16" not in report
    with tarfile.open(archive) as tar:
        assert {"results/gpu_check.md", "results/tests.log"} <= set(tar.getnames())
    bad = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--sections", "steps"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--sections: unknown steps" in bad.stderr


def test_gpu_check_tables_each_autotuners_choice(monkeypatch):
    """The kernels section's autotuning table: every key an autotuner chose a config for, and the times of
    the candidates it tried (here a tuning made up on the attention's atomic dk/dv autotuner)."""
    import gpu_check
    import kernels.attention as attention

    tuner = attention._dkdv_dq_kernel
    key = (1024, 64, True, "torch.bfloat16")
    monkeypatch.setattr(tuner, "cache", {key: tuner.configs[0]})
    monkeypatch.setattr(tuner, "configs_timings", {c: [0.25 + i, 0.2, 0.3] for i, c in enumerate(tuner.configs)},
                        raising=False)
    table = gpu_check.tuning_table()
    row = next(line for line in table.splitlines() if "_dkdv_dq_kernel" in line)
    assert str(key) in row and "0.250" in row and row.count(": ") == len(tuner.configs), table


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


def test_smoke_catches_a_provider_that_disagrees():
    bench = harness.OpBench(
        name="tanh", unit="GB/s",
        make_inputs=lambda config, device, dtype: (torch.randn(config["n"], device=device, dtype=dtype,
                                                               requires_grad=True),),
        providers={"torch": torch.tanh, "wrong_grad": lambda x: torch.tanh(x.detach()) + 0.0 * x},
        work=lambda config, mode: 8.0 * config["n"], configs=[], smoke_configs=[{"n": 33}])
    rows = harness.smoke_op(bench, torch.device("cpu"))
    assert {r["provider"]: r["ok"] for r in rows} == {"torch": True, "wrong_grad": False}
