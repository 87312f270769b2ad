r"""The GPU check: what a short GPU slot should measure first, in one command (at most 8 minutes on an H200).

    python benchmarks/gpu_check.py                    # on a GPU: writes benchmarks/results/<gpu>/
    python benchmarks/gpu_check.py --budget 300       # seconds for the whole check (default 420)
    python benchmarks/gpu_check.py --sections kernels-rest,step-B64   # a second command: the rest
    python benchmarks/gpu_check.py --smoke --out DIR  # on a CPU: every section at tiny sizes (CI)

On a lent machine whose files come back only from one folder, and only a few of them, --archive keeps
a .tar.gz of the results folder up to date after every section, so that a command stopped at its time
limit still returns everything measured before. There the tree is a copy without .git: GPT2_COMMIT
names the commit in the results. A 15-minute H200 slot's first command (.cache/test_data: see below):

    GPT2_COMMIT=<sha> GPT2_TEST_DATA=.cache/test_data timeout 570 python3 benchmarks/gpu_check.py \
        --budget 540 --out gpu_results --archive $OUT/gpu_check.tar.gz

and, if device time is left, one short second command for the sections the first skipped or did not
finish (gpu_check.md says which), with a budget S of the device seconds left less a minute's margin,
and an archive of its own (a machine that went back in between starts bare, without the first's folder):

    GPT2_COMMIT=<sha> timeout <S + 30> python3 benchmarks/gpu_check.py --sections kernels-rest,step-B64 \
        --budget <S> --out gpu_results --archive $OUT/gpu_check2.tar.gz

A run into a folder that holds an earlier run's gpu_check.json adds to its report: the sections it runs
replace theirs, the others are kept (a section skipped for time replaces nothing), each section with
the environment (commit, date, command) it was measured in, named in gpu_check.md where it is not the
latest run's. The device's ceilings (ceilings.json) are kept until a kernel section measures them again.

The children run with whichever Python started the check (there python3). The GPU tests read two files
of the tests' data folder (conftest's GPT2_TEST_DATA): HellaSwag's validation set and the GPT-2 BPE. A
machine that gets no copy of that folder skips the compiled HellaSwag test; to run it, copy them into
an ignored folder of the checkout, carry it, and name it:

    mkdir -p .cache/test_data && cp -r <tests' data>/hellaswag_val.jsonl <tests' data>/tiktoken_cache .cache/test_data/
    # carry [".cache/test_data"], as the command above names it

A SIGTERM (the outer timeout's) or Ctrl-C kills the running child's process group and writes what was
measured before the check ends; a check killed outright (SIGKILL) leaves no child running: each kills
its own group when its parent is gone.

Sections, most important first; each runs in child processes of their own process groups (a crash is a
finding, not the end of the check; at its time limit the whole group is killed, pytest included).
A section is skipped when the time left is below its estimate: at a budget of 540 s, expect the first
three, and kernels-rest if the first ones are quick; --sections runs the others in a later command.
A child reports each row (a provider's step, a kernel's config, provider and mode) as it is measured,
so a section stopped at its limit keeps the rows it finished, and gpu_check.md (tables) and
gpu_check.json are written as each section ends:

  tests         the GPU-marked tests (pytest -m gpu), autotuning off (GPT2_AUTOTUNE=0); output in
                tests.log, written as they run, with the slowest tests' durations
  step-B16      the GPT-2 124M training step (bench_train's: bf16 autocast, clip, AdamW) for torch and
                triton, eager and torch.compile'd, and triton+compile with attention's atomic dq backward
                (--no-deterministic): ms, tokens/s, MFU (datasheet bf16 peak), peak memory of the timed
                steps, and the seconds to build and run the first steps (compilation and autotuning
                included; the later providers of a child find the kernels the earlier ones compiled)
  kernels       the LayerNorm benchmarks at the four GPT-2 widths (64K rows) against torch.compile: all
                bf16 (layernorm, add_layernorm) and the model's mixed path (fp32 residual + bf16 delta under
                autocast, add_layernorm_model), then attention at T = 1024 and 4096 against the fastest
                SDPA backend, the atomic dq backward included, with every autotuning candidate's time
  kernels-rest  gelu, adamw, adamw_clip and cross_entropy at their first config
  step-B64      the same providers as step-B16 at the micro-batch of GPT-2 124M's real run
  ablation      torch+compile, and each op alone on Triton, compiled, B=16: what each kernel buys or costs
  restart       triton+compile and torch+compile again in a new process: the start-up with the caches
                the earlier sections filled (compiled kernels, tuning results), a run's second start; its
                rows say whether Triton's and Inductor's caches held anything when it began

Each kernel benchmark runs in a child of its own, so that a CUDA error that poisons its process (an
illegal address) costs that benchmark only; the first measures the device's ceilings (copy GB/s, bf16
matmul TFLOP/s) into ceilings.json for the others. Each writes its <name>.json, .md and .png as
benchmarks/run.py does.
"""
import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import threading
import time
import types

STARTED = time.perf_counter()  # --budget counts from here: torch's import and CUDA's start are in it

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from gpt2.files import write_atomic  # noqa: E402  (no torch: the parent stays light)

CORE = ("torch", "torch+compile", "triton", "triton+compile")
ATOMIC = "triton+compile+atomic"
KERNELS = ("layernorm", "add_layernorm", "add_layernorm_model", "attention")  # the LN and attention targets first
KERNELS_REST = ("gelu", "adamw", "adamw_clip", "cross_entropy")

# how many of a kernel benchmark's first configs the kernel sections time: those its targets are set at
# (attention: T = 1024 and 4096; LayerNorm: the four GPT-2 widths at 64K rows); one for the others
TARGET_CONFIGS = {"attention": 2, "layernorm": 4, "add_layernorm": 4, "add_layernorm_model": 4}


def sections(smoke: bool) -> list:
    """(name, estimated seconds, most seconds, the arguments of each of its children, run in turn). The
    estimates are guesses for an H200 with a 16-core host (each child a few seconds' start-up, each
    torch.compile of the model about a minute cold), to be replaced by the first run's measured seconds;
    at the first command's budget of 540 s, the kernels section starts even after the two before it have
    run to their limits."""
    from gpt2.ops import OP_NAMES

    batch = 2 if smoke else 16
    core = ("torch", "triton") if smoke else (*CORE, ATOMIC)  # torch.compile cannot trace the interpreter
    ablation = [] if smoke else ["torch+compile", *(f"{op}+compile" for op in OP_NAMES)]
    return [
        ("tests", 90, 180, [["tests"]]),
        ("step-B16", 180, 240, [["steps", str(batch), *core]]),
        # about 150 s (LayerNorm ~90, attention ~60); started with 100 s left, its rows being kept one by one
        ("kernels", 100, 210, [["kernel", name] for name in KERNELS]),
        ("kernels-rest", 60, 120, [["kernel", name] for name in KERNELS_REST]),
        ("step-B64", 150, 210, [["steps", str(batch if smoke else 64), *core]]),
        ("ablation", 240, 300, [["steps", str(batch), *ablation]]),
        ("restart", 60, 120, [["steps", str(batch), *([] if smoke else ["triton+compile", "torch+compile"])]]),
    ]


# ---------------------------------------------------------------------------------------------
# the children: each measures one part of a section and reports each row as one line of JSON as it is done

ROW = "gpu_check row: "


def report_row(row) -> None:
    print(ROW + json.dumps(row, default=str), flush=True)


def _device(smoke: bool):
    import torch

    return torch.device("cpu" if smoke else "cuda")


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

    from gpt2.runtime import peak_bf16_flops

    device = _device(smoke)
    caches = cache_state()  # before this child compiles anything
    config = {"model": "tiny" if smoke else "124M", "B": batch, "T": 32 if smoke else 1024}
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for provider in providers:
        row = {"provider": provider, **config, "caches_at_start": caches}
        try:
            row.update(_time_training_step(provider, config, device, peak, smoke))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # in here: after a sticky CUDA error it raises too
        except Exception as err:  # a provider that crashes is a result
            lines = str(err).strip().splitlines()
            row["error"] = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
        report_row(row)


def _time_training_step(provider: str, config: dict, device, peak, smoke: bool) -> dict:
    """One provider's step: seconds to the first steps, then the median of timed steps, and their peak
    memory (the build, compilation and autotuning excluded). Its model is freed when this returns (a
    compiled one, which Dynamo's caches hold, when the next provider's factory resets them)."""
    import torch

    import bench_train

    start = time.perf_counter()
    step = bench_train.PROVIDERS[provider](config, device, torch.float32 if smoke else torch.bfloat16)
    if smoke:
        step()
    _sync(device)
    row = {"first_steps_s": time.perf_counter() - start}  # build, compile, tune, 3 steps on a GPU
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["ms"] = _median_ms(step, device, 2 if smoke else 10)
    row["tokens_per_s"] = config["B"] * config["T"] / row["ms"] * 1e3
    if peak:
        row["mfu"] = bench_train.flops_per_step(config) / (row["ms"] / 1e3) / peak
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def cache_state() -> dict:
    """Whether Triton's and Inductor's on-disk caches held anything: a 'restart' on a fresh machine (or
    after a second command's cold start) is a cold start, whatever the section is called."""
    return {"triton": _holds_files(_triton_cache_dir()), "inductor": _holds_files(_inductor_cache_dir())}


def _triton_cache_dir() -> pathlib.Path:
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; before, the variable or its default
    default = os.environ.get("TRITON_CACHE_DIR") or pathlib.Path.home() / ".triton" / "cache"
    return pathlib.Path(knobs.cache.dir if knobs is not None else default)


def _inductor_cache_dir() -> pathlib.Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return pathlib.Path(cache_dir())


def _holds_files(folder: pathlib.Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


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


def run_kernel(name: str, smoke: bool, out_dir: pathlib.Path) -> None:
    """One kernel benchmark at its first configs (TARGET_CONFIGS): what it is measured against, then each
    row as it is measured, then its autotuners' choices; its tables and plot written as run.py writes them."""
    import dataclasses

    import harness
    from run import discover

    bench = discover()[name]
    device = _device(smoke)
    ceilings = {} if smoke else device_ceilings(device, out_dir)
    report_row({"benchmark": name, "unit": bench.unit, "baseline": bench.baseline,
                "smoke_baseline": bench.smoke_baseline, "ceilings": ceilings})

    def report(row):
        report_row({"benchmark": name, **row})

    if smoke:
        for row in (harness.smoke_op if isinstance(bench, harness.OpBench) else harness.smoke_step)(bench, device):
            report(row)
        return
    tuners = harness.autotuners()
    _tune_afresh(tuners)
    bench = dataclasses.replace(bench, configs=bench.configs[:TARGET_CONFIGS.get(name, 1)])
    time_bench = harness.time_op if isinstance(bench, harness.OpBench) else harness.time_step
    rows = time_bench(bench, device, ceilings, report)
    harness.write_results(bench, rows, harness.environment(device), ceilings, out_dir)
    table = tuning_table(tuners)
    if table:
        report({"tuning": table})


CEILINGS = "ceilings.json"


def device_ceilings(device, out_dir: pathlib.Path) -> dict:
    """The device's copy and matmul ceilings: measured by the check's first kernel benchmark, read from
    out_dir/ceilings.json by the others (each runs in a process of its own; the parent removes the file
    before the check's first kernel section, see run_sections)."""
    import harness

    path = out_dir / CEILINGS
    if path.exists():
        return json.loads(path.read_text())
    ceilings = harness.measure_ceilings(device)
    write_whole(path, json.dumps(ceilings))
    return ceilings


def write_whole(path: pathlib.Path, text: str) -> None:
    """text at path, never half written, should the time run out."""
    write_atomic(path, lambda f: f.write(text.encode()))


def _tune_afresh(tuners) -> None:
    """The step sections have stored their tuning choices in Triton's disk cache; here the autotuners
    benchmark their candidates again, so that tuning_table() has every candidate's time, for every tuning
    key (Triton keeps the timings of the last key it tuned only)."""
    for _, tuner in tuners:
        tuner.cache_results = False
        tuner.timings_by_key = {}
        tuner.run = _keeping_timings(tuner, tuner.run)  # kernel[grid](...) calls tuner.run


def _keeping_timings(tuner, run):
    def run_and_keep(*args, **kwargs):
        keys, timings = set(tuner.cache), getattr(tuner, "configs_timings", None)
        result = run(*args, **kwargs)
        new_timings = getattr(tuner, "configs_timings", None)
        for key in set(tuner.cache) - keys:  # a key tuned just now; no new timings: one candidate was left
            if new_timings is not timings:
                tuner.timings_by_key[key] = new_timings
        return result

    return run_and_keep


def tuning_table(tuners) -> str | None:
    """Every autotuned kernel's choice per tuning key in this process, with the candidates' timings where
    it benchmarked them (after _tune_afresh): which candidates win at GPT-2 shapes, and which are never
    chosen and could be dropped from the start-up's tuning. None when no kernel was autotuned."""
    lines = ["| kernel | tuning key | chosen | ms of each candidate, as tried (median) |", "|---|---|---|---|"]
    for name, tuner in tuners:
        for key, config in tuner.cache.items():
            timings = getattr(tuner, "timings_by_key", {}).get(key)
            tried = ", ".join(f"{_label(c)}: {t[0] if isinstance(t, list) else t:.3f}"
                              for c, t in (timings or {}).items())
            lines.append(f"| {name} | {key} | {_label(config)} | {tried or 'not timed: one candidate was left'} |")
    return "\n".join(lines) if len(lines) > 2 else None


def _label(config) -> str:
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def child(argv) -> None:
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    kind, out_dir = argv[0], pathlib.Path(argv[1])
    _die_with_parent()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if kind == "tests":
        run_tests(smoke, out_dir)
    elif kind == "steps":
        run_steps(int(argv[2]), argv[3:], smoke)
    else:
        run_kernel(argv[2], smoke, out_dir)


def _die_with_parent() -> None:
    """The parent kills a child's process group when it stops or times the child out; a parent killed
    outright (SIGKILL: a tool's time limit, memory) cannot. Then the child does, so that nothing it
    started (pytest, inductor's compile workers) goes on using the GPU beside a later command."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)  # this child's own group: it leads a session of its own

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# the parent: sections under a deadline, results written as they come


class Stopped(Exception):
    """The check itself was told to stop: SIGTERM (an outer `timeout`) or SIGINT (Ctrl-C)."""


def _stop(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the check at once
    raise Stopped(signal.Signals(signum).name)


def child_command(args, out_dir, smoke) -> list:
    return [sys.executable, __file__, "--child", args[0], str(out_dir), *args[1:], *(["--smoke"] if smoke else [])]


def run_child(args, out_dir, smoke, timeout) -> dict:
    """One child in a process group of its own (its session: the outer `timeout` does not reach it, so the
    parent kills it when it is stopped): its rows, its error (None if it succeeded), the end of its stderr,
    and whether the check was stopped."""
    command = os.environ.get("GPT2_BENCH_COMMAND") or " ".join(["python", *sys.argv])  # the check's, for its results
    env = {**os.environ, "GPT2_BENCH_COMMAND": command}
    child = subprocess.Popen(child_command(args, out_dir, smoke), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped = None
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        error = _exit_error(child.returncode)
    except (subprocess.TimeoutExpired, Stopped) as end:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child and whatever it started (pytest), not the child alone
        except ProcessLookupError:  # the signal came as communicate() had reaped it
            pass
        stdout, stderr = child.communicate()
        stopped = None if isinstance(end, subprocess.TimeoutExpired) else str(end)
        error = f"stopped by {stopped}" if stopped else f"timed out after {timeout:.0f} s"
    rows = [json.loads(line[len(ROW):]) for line in stdout.splitlines() if line.startswith(ROW)]
    return {"rows": rows, "error": error, "stderr": stderr[-3000:], "stopped": stopped}


def _exit_error(returncode: int) -> str | None:
    if returncode < 0:  # a signal: SIGSEGV, SIGABRT (a CUDA error can end in either), SIGKILL (out of memory)
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}" if returncode else None


def run_section(name, children, out_dir, smoke, timeout) -> dict:
    """Runs the section's children in turn within timeout seconds together: its rows, with an error when a
    child failed or the time ran out. A kernel benchmark that fails leaves the next one its turn."""
    start = time.perf_counter()
    record = {"section": name, "result": []}
    errors, stderrs, reported = [], [], 0
    for args in children:
        label = args[1] if args[0] == "kernel" else None  # the benchmark's name
        left = None if timeout is None else timeout - (time.perf_counter() - start)
        run = None
        if "stopped" in record or (left is not None and left < 1):
            error = f"not started: the section was {'stopped' if 'stopped' in record else 'out of time'}"
        else:
            try:
                run = run_child(args, out_dir, smoke, left)
            except Stopped as stop:  # between two children: the rows of those before are kept
                record["stopped"], error = str(stop), f"stopped by {stop}"
            else:
                record["result"] += run["rows"]
                reported += len(run["rows"])
                error = run["error"]
                if run["stopped"]:
                    record["stopped"] = run["stopped"]
        if error and label:
            record["result"].append({"benchmark": label, "error": error})
        if error:
            errors.append(f"{label}: {error}" if label else error)
            stderrs.append(f"--- {label or name}\n{run['stderr']}" if run and run["stderr"] else "")
    record["seconds"] = round(time.perf_counter() - start, 1)
    if errors:
        record.update(error=f"{'; '.join(errors)}; {reported} rows reported",
                      stderr="\n".join(s for s in stderrs if s)[-3000:])
    return record


def markdown(env: dict, records: list) -> str:
    """The report: the latest run's environment, then each section (one kept from an earlier run says so)."""
    lines = ["# GPU check", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    for record in records:
        lines += [f"## {record['section']}  ({record.get('seconds', '-')} s)", ""]
        lines += earlier_run_line(record.get("environment"), env)
        if "skipped" in record:
            lines += [record["skipped"], ""]
            continue
        if "error" in record:
            lines += [f"**{record['error']}**", "", "```", record.get("stderr", "")[-1500:], "```", ""]
        rows = record["result"]
        if record["section"] == "tests":
            lines += [f"exit code {r['returncode']}: {r['summary']} (full output: tests.log)" for r in rows] + [""]
        elif any("benchmark" in r for r in rows):
            lines += kernel_tables(rows)
        elif rows:
            lines += [caches_line(rows[0]), "", step_table(rows), ""]
    return "\n".join(lines)


def kernel_tables(rows) -> list:
    """Each kernel benchmark's rows, in the order they came: what it is measured against, its table, its
    error if its child failed, its autotuners' choices."""
    import harness

    lines = []
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        own = [r for r in rows if r["benchmark"] == name]
        spec = next((r for r in own if "unit" in r), None)
        measured = [r for r in own if "provider" in r]
        lines += [f"### {name}", ""]
        if spec and spec["ceilings"]:
            lines += ["measured ceilings: " + ", ".join(f"{k} {v:,.0f}" for k, v in spec["ceilings"].items()), ""]
        if spec and measured:
            lines += [harness.markdown_table(types.SimpleNamespace(**spec), measured), ""]
        lines += [item for r in own if "error" in r and "provider" not in r for item in (f"**{r['error']}**", "")]
        lines += [item for r in own if "tuning" in r for item in ("autotuning: the config each autotuned kernel "
                                                                  "chose", "", r["tuning"], "")]
    return lines


def earlier_run_line(section_env, env: dict) -> list:
    """Where a section kept from an earlier run into the same folder was measured: its date and commit,
    and whatever else differs from the latest run's environment (the command, the device)."""
    if not section_env or section_env == env:
        return []
    what = ", ".join(f"{k} {v}" for k, v in section_env.items() if k in ("date", "commit") or v != env.get(k))
    return [f"_kept from an earlier run: {what}_", ""]


def caches_line(row) -> str:
    caches = row.get("caches_at_start", {})
    state = ", ".join(f"{name.capitalize()}'s {'held files' if full else 'was empty'}" for name, full in caches.items())
    return f"on-disk caches when the section began: {state}" if state else ""


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
    """folder as a .tar.gz at path, replaced whole: never half written."""
    def write(f):
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    write_atomic(path, write)


REPORT = "gpu_check.json"


def write_report(out_dir: pathlib.Path, env: dict, records: list, archive_path) -> None:
    """records (this run's and those kept from earlier ones) as gpu_check.json and .md; each section in the
    JSON with the environment it was measured in."""
    with_environment = [{"environment": env, **record} for record in records]  # a kept section has its own
    write_whole(out_dir / REPORT, json.dumps({"environment": env, "sections": with_environment}, indent=1))
    write_whole(out_dir / "gpu_check.md", markdown(env, records))
    if archive_path:
        archive(out_dir, pathlib.Path(archive_path))


def earlier_records(out_dir: pathlib.Path, names: list) -> list:
    """The sections an earlier run wrote into out_dir, each with the environment it was measured in: a
    second command into the same folder adds to the first one's report instead of replacing it."""
    path = out_dir / REPORT
    if not path.exists():
        return []
    try:
        earlier = json.loads(path.read_text())
        return [{"environment": earlier["environment"], **record} for record in earlier["sections"]
                if record["section"] in names]  # not 'the rest', the note of a run that was stopped
    except (ValueError, KeyError, TypeError) as err:
        aside = path.with_name(path.name + ".unreadable")
        path.replace(aside)  # kept for a person to read, not merged
        print(f"warning: {path} is not a gpu_check report ({err!r}); moved to {aside.name}, not merged",
              file=sys.stderr)
        return []


def merged(earlier: list, records: list, names: list) -> list:
    """This run's sections and the earlier ones it has no record of, in the sections' order ('the rest'
    last). A section this run only skipped (out of time, nothing to run) replaces no earlier measurement."""
    mine = {r["section"]: r for r in records}

    def keep(old) -> bool:
        new = mine.get(old["section"])
        return new is None or ("skipped" in new and "skipped" not in old)

    kept = [r for r in earlier if keep(r)]
    replaced = {r["section"] for r in kept}
    order = {name: i for i, name in enumerate(names)}
    return sorted(kept + [r for r in records if r["section"] not in replaced],
                  key=lambda r: order.get(r["section"], len(order)))


def seconds(text: str) -> float:
    """--budget: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def path_problem(out_dir: pathlib.Path, archive_path) -> str | None:
    """Why the results could not be written, found before the first section runs rather than after it;
    None when the archive's folder exists and is writable and out_dir is (now) a writable folder."""
    if archive_path:
        target = pathlib.Path(archive_path)
        if target.is_dir():
            return f"--archive {target}: is a folder; name a .tar.gz file"
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
            return f"--archive {target}: its folder {target.parent} is missing or not writable; create it or name another"
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir}: is a file; name a folder, existing or new"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--out {out_dir}: cannot create it ({err.strerror}); name a folder, existing or new"
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return f"--out {out_dir}: not writable; name a folder this user can write"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter), for CI")
    parser.add_argument("--budget", type=seconds, default=420,
                        help="seconds for the check, from its start: its sections start within them")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<gpu>); an earlier run's "
                                      "sections there are kept unless this run measures them again")
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
    device = _device(args.smoke)
    env = harness.environment(device)
    # absolute: the children run in the repository's root, wherever the check was started
    out_dir = pathlib.Path(args.out).resolve() if args.out else harness.results_dir(env["device"])
    problem = path_problem(out_dir, args.archive)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    earlier = earlier_records(out_dir, names)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    records = []
    try:
        run_sections(args, chosen, out_dir, env, records, earlier)
    except Stopped as stop:  # between two sections
        records.append({"section": "the rest", "skipped": f"not run: the check was stopped by {stop}"})
    write_report(out_dir, env, merged(earlier, records, names), args.archive)
    print((out_dir / "gpu_check.md").read_text())
    failed = [r["section"] for r in records if "error" in r or "stopped" in r]  # this run's
    return 1 if failed else 0


def run_sections(args, chosen, out_dir, env, records, earlier=()) -> None:
    """The chosen sections in their order under args.budget, each appended to records as it ends, and the
    report (with the earlier run's sections this one does not replace) written after each."""
    names = [name for name, *_ in sections(args.smoke)]
    deadline = STARTED + args.budget
    ceilings_fresh = False  # an earlier run's ceilings.json is kept until this run can measure them again
    for name, estimate, most, children in sections(args.smoke):
        if name not in chosen:
            continue
        left = deadline - time.perf_counter()
        if not any(child_args[0] != "steps" or child_args[2:] for child_args in children):  # no providers
            records.append({"section": name, "skipped": "nothing to run here: its providers are compiled ones, "
                                                        "and torch.compile cannot trace the Triton interpreter"})
        elif left < estimate and not args.smoke:
            records.append({"section": name, "skipped": f"skipped: {left:.0f} s left, it takes about {estimate} s"})
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            if not (args.smoke or ceilings_fresh) and any(child_args[0] == "kernel" for child_args in children):
                (out_dir / CEILINGS).unlink(missing_ok=True)  # this section's first benchmark measures them
                ceilings_fresh = True
            timeout = None if args.smoke else min(left, most)
            records.append(run_section(name, children, out_dir, args.smoke, timeout))
        write_report(out_dir, env, merged(earlier, records, names), args.archive)
        if "stopped" in records[-1]:  # the sections after it: 'the rest', not the earlier run's alone
            raise Stopped(f"{records[-1]['stopped']} during {name}")


if __name__ == "__main__":
    sys.exit(main())
