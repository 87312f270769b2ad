"""The GPU check: what a short GPU slot should measure first, in one command (at most 8 minutes on an H200).

    python benchmarks/gpu_check.py                    # on a GPU: writes benchmarks/results/<gpu>/
    python benchmarks/gpu_check.py --budget 300       # seconds for all sections together (default 420)
    python benchmarks/gpu_check.py --sections step-B64,ablation,restart   # a second command: the rest
    python benchmarks/gpu_check.py --smoke --out DIR  # on a CPU: every section at tiny sizes (CI)

On a lent machine whose files come back only from one folder, and only a few of them, --archive keeps
a .tar.gz of the results folder up to date after every section, so that a command stopped at its time
limit still returns everything measured before:

    timeout 570 python3 benchmarks/gpu_check.py --out gpu_results --archive $OUT/gpu_check.tar.gz

(nothing to carry: the GPU tests and the step need no data files, and the children run with whichever
Python started the check, there python3).

Sections, most important first; each runs in a child process of its own process group (a crash is a
finding, not the end of the check; at its time limit the whole group is killed, pytest included).
A section is skipped when the time left is below its estimate: at the default budget, expect the first
three; --sections runs the others in a later command. A child reports each row (a provider's step, a
kernel's table) as it is measured, so a section stopped at its limit keeps the rows it finished, and
gpu_check.md (tables) and gpu_check.json are written as each section ends:

  tests      the GPU-marked tests (pytest -m gpu), autotuning off (GPT2_AUTOTUNE=0); output in tests.log,
             written as they run, with the slowest tests' durations
  step-B16   the GPT-2 124M training step (bench_train's: bf16 autocast, clip, AdamW) for torch and
             triton, eager and torch.compile'd, and triton+compile with attention's atomic dq backward
             (--no-deterministic): ms, tokens/s, MFU (datasheet bf16 peak), peak memory, and the
             seconds to the first step (compilation and autotuning included)
  kernels    every kernel benchmark at GPT-2 shapes (the configs its targets are set at, else one;
             benchmarks/run.py's tables and plots), and each autotuned kernel's choice with every
             candidate's time
  step-B64   the same providers again at the micro-batch of GPT-2 124M's real run
  ablation   each op alone on Triton, compiled, B=16: what each kernel buys or costs end to end
  restart    triton+compile and torch+compile again in a new process: the start-up with warm caches
             (compiled kernels, tuning results), the second start of a run or a second rank
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

CORE = ("torch", "torch+compile", "triton", "triton+compile")
ATOMIC = "triton+compile+atomic"


def sections(smoke: bool) -> list:
    """(name, estimated seconds, most seconds, child arguments); the estimates are guesses for an H200
    with a 16-core host, to be replaced by the first run's measured seconds."""
    from gpt2.ops import OP_NAMES

    batch = 2 if smoke else 16
    core = ("torch", "triton") if smoke else (*CORE, ATOMIC)  # torch.compile cannot trace the interpreter
    return [
        ("tests", 90, 180, ["tests"]),
        ("step-B16", 180, 270, ["steps", str(batch), *core]),
        ("kernels", 100, 180, ["kernels"]),
        ("step-B64", 150, 210, ["steps", str(batch if smoke else 64), *core]),
        ("ablation", 200, 240, ["steps", str(batch), *([] if smoke else [f"{op}+compile" for op in OP_NAMES])]),
        ("restart", 60, 120, ["steps", str(batch), *([] if smoke else ["triton+compile", "torch+compile"])]),
    ]


# ---------------------------------------------------------------------------------------------
# the children: each measures one section and reports each row as one line of JSON as it is done

ROW = "gpu_check row: "


def report_row(row) -> None:
    print(ROW + json.dumps(row), flush=True)


def run_tests(smoke: bool, out_dir: pathlib.Path) -> None:
    env = {**os.environ, "GPT2_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "--durations=15"]
    if smoke:
        args.append("--collect-only")  # no GPU: check that the GPU tests are found
    log = out_dir / "tests.log"
    with open(log, "w") as f:  # written as pytest goes: a section killed at its limit leaves what ran
        result = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    summary = (log.read_text().strip().splitlines() or [""])[-1]
    report_row({"returncode": result.returncode, "summary": summary})


def run_steps(batch: int, providers: list, smoke: bool) -> None:
    import torch

    import bench_train
    from gpt2.runtime import peak_bf16_flops

    device = torch.device("cpu" if smoke else "cuda")
    config = {"model": "tiny" if smoke else "124M", "B": batch, "T": 32 if smoke else 1024}
    flops_per_step = bench_train.flops_per_step(config)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for provider in providers:
        row = {"provider": provider, **config}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step = bench_train.PROVIDERS[provider](config, device, torch.float32 if smoke else torch.bfloat16)
            if smoke:
                step()
            _sync(device)
            row["first_steps_s"] = time.perf_counter() - start  # build, compile, tune, 3 steps on a GPU
            row["ms"] = _median_ms(step, device, 2 if smoke else 10)
            row["tokens_per_s"] = batch * config["T"] / row["ms"] * 1e3
            if peak:
                row["mfu"] = flops_per_step / (row["ms"] / 1e3) / peak
                row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as err:  # a provider that crashes is a result
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        report_row(row)
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(step, device, n: int) -> float:
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


# how many of a kernel benchmark's first configs this section times: those its targets are set at
# (attention: T = 1024 and 4096; LayerNorm: the four GPT-2 widths at 64K rows); one for the others
TARGET_CONFIGS = {"attention": 2, "layernorm": 4}


def run_kernels(smoke: bool, out_dir: pathlib.Path) -> None:
    """Each kernel benchmark at its first configs (TARGET_CONFIGS), tables written."""
    import dataclasses

    import torch

    import harness
    from run import discover

    device = torch.device("cpu" if smoke else "cuda")
    env = harness.environment(device)
    ceilings = {} if smoke else harness.measure_ceilings(device)
    benchmarks = discover()
    if not smoke:
        _tune_afresh()
    for name, bench in benchmarks.items():
        if name == "train":
            continue  # the step sections time it
        if smoke:
            rows = (harness.smoke_op if isinstance(bench, harness.OpBench) else harness.smoke_step)(bench, device)
        else:
            bench = dataclasses.replace(bench, configs=bench.configs[:TARGET_CONFIGS.get(name, 1)])
            rows = (harness.time_op if isinstance(bench, harness.OpBench) else harness.time_step)(bench, device, ceilings)
            harness.write_results(bench, rows, env, ceilings, out_dir)
        report_row({"benchmark": name, "table": harness.markdown_table(bench, rows)})
    report_row({"benchmark": "autotuning: the config each autotuned kernel chose", "table": tuning_table()})


def _tune_afresh() -> None:
    """The step sections have stored their tuning choices in Triton's disk cache; this section's
    autotuners benchmark their candidates again, so that tuning_table() has every candidate's time."""
    import harness

    for _, tuner in harness.autotuners():
        tuner.cache_results = False


def tuning_table() -> str:
    """Every autotuned kernel's choice per tuning key in this process (the candidates' timings where it
    benchmarked them, rather than reading Triton's disk cache): which candidates win at GPT-2 shapes, and
    which are never chosen and could be dropped from the start-up's tuning."""
    import harness

    lines = ["| kernel | tuning key | chosen | ms of each candidate, as tried (median) |", "|---|---|---|---|"]
    for name, tuner in harness.autotuners():
        last_key = list(tuner.cache)[-1] if tuner.cache else None
        for key, config in tuner.cache.items():
            timings = getattr(tuner, "configs_timings", None) if key == last_key else None
            tried = ", ".join(f"{_label(c)}: {t[0] if isinstance(t, list) else t:.3f}"
                              for c, t in (timings or {}).items())
            if not tried:
                tried = "from Triton's disk cache" if key == last_key else "timings kept for the last key only"
            lines.append(f"| {name} | {key} | {_label(config)} | {tried} |")
    return "\n".join(lines) if len(lines) > 2 else "no kernel was autotuned (one config each)"


def _label(config) -> str:
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def child(argv) -> None:
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    kind, out_dir = argv[0], pathlib.Path(argv[1])
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if kind == "tests":
        run_tests(smoke, out_dir)
    elif kind == "steps":
        run_steps(int(argv[2]), argv[3:], smoke)
    else:
        run_kernels(smoke, out_dir)


# ---------------------------------------------------------------------------------------------
# the parent: sections under a deadline, results written as they come


def child_command(args, out_dir, smoke) -> list:
    return [sys.executable, __file__, "--child", args[0], str(out_dir), *args[1:], *(["--smoke"] if smoke else [])]


def run_section(name, args, out_dir, smoke, timeout) -> dict:
    """Runs a child in a process group of its own; its rows, with an error when it failed or ran out of time."""
    start = time.perf_counter()
    child = subprocess.Popen(child_command(args, out_dir, smoke), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        error = f"exit code {child.returncode}" if child.returncode else None
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and whatever it started (pytest), not the child alone
        stdout, stderr = child.communicate()
        error = f"timed out after {timeout:.0f} s"
    rows = [json.loads(line[len(ROW):]) for line in stdout.splitlines() if line.startswith(ROW)]
    record = {"section": name, "seconds": round(time.perf_counter() - start, 1), "result": rows}
    if error:
        record.update(error=f"{error}; {len(rows)} rows measured before", stderr=stderr[-3000:])
    return record


def markdown(env: dict, records: list) -> str:
    lines = ["# GPU check", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    for record in records:
        lines += [f"## {record['section']}  ({record.get('seconds', '-')} s)", ""]
        if "skipped" in record:
            lines += [record["skipped"], ""]
            continue
        if "error" in record:
            lines += [f"**{record['error']}**", "", "```", record.get("stderr", "")[-1500:], "```", ""]
        rows = record["result"]
        if record["section"] == "tests":
            lines += [f"exit code {r['returncode']}: {r['summary']} (full output: tests.log)" for r in rows] + [""]
        elif record["section"] == "kernels":
            for entry in rows:
                lines += [f"### {entry['benchmark']}", "", entry["table"], ""]
        elif rows:
            lines += [step_table(rows), ""]
    return "\n".join(lines)


def step_table(rows) -> str:
    baseline = next((r["ms"] for r in rows if r["provider"] == "torch+compile" and "ms" in r), None)
    lines = ["| provider | B | ms / step | tokens/s | MFU | peak GiB | first steps s | vs torch+compile |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['B']} | **{r['error']}** | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        peak = f"{r['peak_GiB']:.1f}" if "peak_GiB" in r else ""
        speed = f"{baseline / r['ms']:.2f}x" if baseline else ""
        lines.append(f"| {r['provider']} | {r['B']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | "
                     f"{r['first_steps_s']:.1f} | {speed} |")
    return "\n".join(lines)


def archive(folder: pathlib.Path, path: pathlib.Path) -> None:
    """folder as a .tar.gz at path, replaced whole (written beside it, then renamed): never half written."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    partial.replace(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter), for CI")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all sections together")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--sections", help=f"comma list of the sections to run, in their order (default all: "
                                           f"{','.join(name for name, *_ in sections(False))})")
    parser.add_argument("--archive", help="a .tar.gz of the results folder, rewritten after every section")
    args = parser.parse_args(argv)
    names = [name for name, *_ in sections(args.smoke)]
    chosen = args.sections.split(",") if args.sections else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; the sections are {','.join(names)}")

    import torch

    import harness

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; on a CPU run the smoke mode: python benchmarks/gpu_check.py --smoke --out DIR",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    env = harness.environment(device)
    out_dir = pathlib.Path(args.out) if args.out else harness.results_dir(env["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    records = []
    for name, estimate, most, child_args in sections(args.smoke):
        left = deadline - time.perf_counter()
        if name not in chosen or (child_args[0] == "steps" and len(child_args) == 2):  # no providers: nothing to do
            continue
        if left < estimate and not args.smoke:
            records.append({"section": name, "skipped": f"skipped: {left:.0f} s left, it takes about {estimate} s"})
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            timeout = None if args.smoke else min(left, most)
            records.append(run_section(name, child_args, out_dir, args.smoke, timeout))
        (out_dir / "gpu_check.json").write_text(json.dumps({"environment": env, "sections": records}, indent=1))
        (out_dir / "gpu_check.md").write_text(markdown(env, records))
        if args.archive:
            archive(out_dir, pathlib.Path(args.archive))
    print((out_dir / "gpu_check.md").read_text())
    failed = [r["section"] for r in records if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
