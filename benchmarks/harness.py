"""The one harness every benchmark uses: device ceilings, timing, tables, JSON and plots.

A benchmark file `benchmarks/bench_<name>.py` defines `BENCHMARKS = [OpBench(...) | StepBench(...)]`;
`benchmarks/run.py` finds it. Two kinds:

- OpBench: an autograd op timed in the modes forward / backward / full for each provider
  (`triton`, `torch`, ... and `torch.compile` of the torch provider, added here, as are the benchmark's
  other compiled providers: once per run of a benchmark, each config compiled for its static shapes).
- StepBench: a whole step (an optimizer step, a training step) timed per provider.

Each reports time (median of triton.testing.do_bench), a rate from an explicit work formula
(bytes -> GB/s, FLOPs -> TFLOP/s), the fraction of the device's measured ceiling (copy bandwidth,
bf16 matmul), peak memory, and the speedup against the baseline provider (or the fastest of several).
Each row can be handed to a callback as soon as it is measured, so that a caller stopped halfway keeps
what was measured.

Without CUDA, `smoke()` runs tiny sizes on CPU tensors in the Triton interpreter and checks that every
provider agrees with the baseline: it catches a broken entry, it measures nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from gpt2.runtime import peak_bf16_flops

MODES = ("forward", "backward", "full")
COMPILED = "torch.compile"


@dataclass
class OpBench:
    """An autograd op, timed forward, backward and forward+backward."""

    name: str
    unit: str                              # "GB/s" (work in bytes) or "TFLOP/s" (work in FLOPs)
    make_inputs: Callable[..., tuple]      # (config, device, dtype) -> fresh inputs; float ones require grad
    providers: dict[str, Callable]         # name -> fn(*inputs) -> Tensor or tuple of Tensors
    work: Callable[[dict, str], float]     # (config, mode) -> bytes or FLOPs of one call
    configs: list[dict]                    # sizes timed on the GPU, a table row each
    smoke_configs: list[dict]              # tiny sizes checked in the CPU interpreter
    modes: tuple = MODES
    # speedups are against this provider, or against the fastest of these (per config and mode) that ran
    baseline: str | tuple[str, ...] = "torch"
    compile_baseline: bool = True          # also time torch.compile(providers["torch"]), as COMPILED
    # name -> fn timed as torch.compile(fn), built by the harness like COMPILED (the smoke pass runs fn eagerly)
    compiled: dict[str, Callable] = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16
    smoke_tol: float = 1e-3                # max abs difference allowed in smoke mode (fp32)
    smoke_baseline: str = "torch"          # the provider the smoke pass compares the others with
    cuda_only: tuple = ()                  # providers the smoke pass on a CPU lists as n/a (CUDA only)


@dataclass
class StepBench:
    """A whole step timed per provider, e.g. an optimizer step."""

    name: str
    unit: str
    providers: dict[str, Callable[..., Callable[[], Any]]]  # name -> (config, device, dtype) -> step()
    work: Callable[[dict], float]          # config -> bytes or FLOPs of one step
    configs: list[dict]
    smoke_configs: list[dict]
    baseline: str = "torch"
    dtype: torch.dtype = torch.float32
    tokens: Callable[[dict], int] | None = None  # tokens per step, for a tokens/s column
    warmup_ms: int = 25
    rep_ms: int = 100
    # smoke mode: step() returns tensors (or a list of them) compared with smoke_baseline's; providers
    # named "...compile..." are left out there (torch.compile cannot trace kernels in the interpreter)
    smoke_tol: float = 1e-4
    smoke_baseline: str | None = None


# ---------------------------------------------------------------------------------------------
# measuring


def do_bench(fn, grad_to_none=None, warmup=25, rep=100) -> float:
    """Median milliseconds of fn() on the GPU (runs for about warmup + rep milliseconds)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def measure_ceilings(device) -> dict:
    """What this device can do at best: device-to-device copy GB/s and bf16 matmul TFLOP/s."""
    n_bytes = 1 << 30
    buffers = torch.empty(2, n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    copy_ms = do_bench(lambda: buffers[1].copy_(buffers[0]))
    buffers = None
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    matmul_ms = do_bench(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / copy_ms / 1e6,
        "matmul_bf16_TFLOPs": 2 * n**3 / matmul_ms / 1e9,
    }


def rate(unit: str, work: float, ms: float) -> float:
    scale = 1e6 if unit == "GB/s" else 1e9  # work per ms -> GB/s or TFLOP/s
    return work / ms / scale


def ceiling_of(unit: str, ceilings: dict) -> float:
    return ceilings["copy_GBps"] if unit == "GB/s" else ceilings["matmul_bf16_TFLOPs"]


def _as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _leaves(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _op_step(fn, inputs, mode):
    """A zero-argument callable that runs one `mode` of fn on inputs. The gradients are returned by
    autograd.grad, as the op made them, not added into .grad: that copies a gradient whose strides differ
    from its input's (attention's dq, dk, dv are views of one d(qkv) buffer), which is no cost of the op."""
    if mode == "forward":
        return lambda: fn(*inputs)
    leaves = _leaves(inputs)
    outs = [o for o in _as_tuple(fn(*inputs)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]
    if mode == "backward":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad([o for o in _as_tuple(fn(*inputs)) if o.requires_grad], leaves, grads,
                                       allow_unused=True)


def _peak_mb(step, device) -> float:
    """Peak MiB allocated while one step() runs, from what is held before it (the inputs)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _error(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


@contextlib.contextmanager
def compile_scope():
    """One benchmark's torch.compile state: Dynamo's caches emptied, so that nothing compiled before counts
    towards its limits, and room for a static compile per config (8 at most by default, after which Dynamo
    would run the function eagerly and the 'compiled' rows would time PyTorch eager)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def _op_providers(bench: OpBench) -> dict:
    """bench's providers, and its compiled ones built here, once per run of the benchmark: dynamic=False
    compiles each config for its static shapes, as the model's are (by default the second shape a
    compiled function meets is compiled again with symbolic sizes, and timed as such)."""
    compiled = dict(bench.compiled)
    if bench.compile_baseline and "torch" in bench.providers:
        compiled = {COMPILED: bench.providers["torch"], **compiled}
    return {**bench.providers, **{name: torch.compile(fn, dynamic=False) for name, fn in compiled.items()}}


def time_op(bench: OpBench, device, ceilings, report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every config, provider and mode of bench; report(row) gets each row as soon as it is measured."""
    rows = []
    with compile_scope():
        providers = _op_providers(bench)
        for config in bench.configs:
            for provider, fn in providers.items():
                for mode in bench.modes:
                    _measure({"config": config, "provider": provider, "mode": mode}, rows, report,
                             lambda: _time_op_mode(bench, fn, config, mode, device, ceilings))
    return add_speedups(rows, bench.baseline)


def _measure(row: dict, rows: list, report, measurements: Callable[[], dict]) -> None:
    """row with measurements() added, or the error they raised (a provider the machine lacks, a cuDNN
    backend say): appended to rows and reported at once."""
    try:
        row.update(measurements())
        torch.cuda.empty_cache()  # in here: after a sticky CUDA error it raises too
    except Exception as err:
        row["error"] = _error(err)
    rows.append(row)
    report(row)


def _time_op_mode(bench: OpBench, fn, config, mode, device, ceilings) -> dict:
    """One row's measurements; its inputs are freed when it returns, or raises."""
    inputs = bench.make_inputs(config, device, bench.dtype)
    step = _op_step(fn, inputs, mode)
    ms = do_bench(step)
    work_rate = rate(bench.unit, bench.work(config, mode), ms)
    return {"ms": ms, "peak_MB": _peak_mb(step, device), "rate": work_rate,
            "of_ceiling": work_rate / ceiling_of(bench.unit, ceilings)}


def time_step(bench: StepBench, device, ceilings, report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every config and provider of bench; report(row) gets each row as soon as it is measured."""
    rows = []
    with compile_scope():
        for config in bench.configs:
            for provider, factory in bench.providers.items():
                _measure({"config": config, "provider": provider, "mode": "step"}, rows, report,
                         lambda: _time_one_step(bench, factory, config, device, ceilings))
    return add_speedups(rows, bench.baseline)


def _time_one_step(bench: StepBench, factory, config, device, ceilings) -> dict:
    """One provider's measurements; its model and optimizer are freed when it returns, or raises."""
    step = factory(config, device, bench.dtype)
    ms = do_bench(step, warmup=bench.warmup_ms, rep=bench.rep_ms)
    row = {"ms": ms, "peak_MB": _peak_mb(step, device), "rate": rate(bench.unit, bench.work(config), ms)}
    row["of_ceiling"] = row["rate"] / ceiling_of(bench.unit, ceilings)
    if bench.tokens:
        row["tokens_per_s"] = bench.tokens(config) / ms * 1e3
    peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    if bench.unit == "TFLOP/s" and peak:
        row["of_datasheet"] = row["rate"] * 1e12 / peak
    return row


def baselines(baseline) -> tuple:
    return (baseline,) if isinstance(baseline, str) else tuple(baseline)


def add_speedups(rows, baseline) -> list[dict]:
    """Each timed row's speedup against the baseline's row of its config and mode; with several baselines,
    against the fastest of them there (named in "vs"): one that failed on this machine leaves the others."""
    fastest = {}
    for r in rows:
        key = (json.dumps(r["config"], sort_keys=True), r["mode"])
        if r["provider"] in baselines(baseline) and r.get("ms"):
            if key not in fastest or r["ms"] < fastest[key]["ms"]:
                fastest[key] = r
    for row in rows:
        base = fastest.get((json.dumps(row["config"], sort_keys=True), row["mode"]))
        if base and row.get("ms"):
            row.update(speedup=base["ms"] / row["ms"], vs=base["provider"])
    return rows


# ---------------------------------------------------------------------------------------------
# smoke mode: tiny sizes, CPU interpreter, agreement only


def _max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def smoke_op(bench: OpBench, device) -> list[dict]:
    """Forward outputs and input gradients of every provider (the compiled ones run eagerly) against the
    smoke baseline, in fp32; off CUDA, a row without "ok" for each CUDA-only provider, which did not run."""
    absent = bench.cuda_only if device.type != "cuda" else ()
    rows = []
    for config in bench.smoke_configs:
        results = {}
        for provider, fn in {**bench.providers, **bench.compiled}.items():
            if provider in absent:
                continue
            torch.manual_seed(0)
            inputs = bench.make_inputs(config, device, torch.float32)
            outs = _as_tuple(fn(*inputs))
            differentiable = [o for o in outs if o.requires_grad]
            torch.manual_seed(1)  # randn_like would follow each output's memory layout; the shape is what counts
            grads = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in differentiable]
            if "backward" in bench.modes and differentiable:
                torch.autograd.backward(differentiable, grads)
            results[provider] = [*outs, *(t.grad for t in _leaves(inputs))]
        rows += _compare(bench, config, results, bench.smoke_baseline)
        rows += [{"config": config, "provider": provider, "mode": "smoke", "not_run": "CUDA only"} for provider in absent]
    return rows


def smoke_step(bench: StepBench, device) -> list[dict]:
    rows = []
    for config in bench.smoke_configs:
        results = {}
        for provider, factory in bench.providers.items():
            if "compile" in provider:
                continue
            torch.manual_seed(0)
            step = factory(config, device, torch.float32)
            results[provider] = list(_as_tuple(step()))
        rows += _compare(bench, config, results, bench.smoke_baseline or bench.baseline)
    return rows


def _compare(bench, config, results, baseline) -> list[dict]:
    reference = results[baseline]
    rows = []
    for provider, tensors in results.items():
        if len(tensors) != len(reference):
            err = math.inf
        else:
            err = max((_max_diff(a, b) for a, b in zip(tensors, reference) if a is not None), default=0.0)
        rows.append({"config": config, "provider": provider, "mode": "smoke", "max_abs_diff": err,
                     "ok": err <= bench.smoke_tol})
    return rows


# ---------------------------------------------------------------------------------------------
# reporting


def autotuners() -> list:
    """(qualified name, Autotuner) of every autotuned kernel in the loaded modules of the kernels package."""
    from triton.runtime.autotuner import Autotuner

    return [(f"{module_name}.{name}", obj) for module_name, module in sorted(sys.modules.items())
            if module_name.startswith("kernels.") for name, obj in sorted(vars(module).items())
            if isinstance(obj, Autotuner)]


def environment(device) -> dict:
    """What a result was measured on and with. The command is the one a person typed: a child process of
    gpu_check finds its parent's in GPT2_BENCH_COMMAND."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
        "command": os.environ.get("GPT2_BENCH_COMMAND") or " ".join(["python", *sys.argv]),
    }


def commit() -> str | None:
    """The checkout's commit (+ uncommitted changes), or where there is no git checkout (a copy of the tree
    on a lent GPU machine), the GPT2_COMMIT environment variable that the command was started with."""
    here = pathlib.Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here).stdout.strip() or None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here).stdout.strip()
    except OSError:  # no git
        sha = None
    if sha:
        return sha + " + uncommitted changes" if changed else sha  # what ran is not what the commit holds
    given = os.environ.get("GPT2_COMMIT")
    return f"{given} (GPT2_COMMIT; no git checkout to compare the files with)" if given else None


def results_dir(device_name: str) -> pathlib.Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return pathlib.Path(__file__).parent / "results" / slug


def _config_label(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def baseline_label(baseline) -> str:
    names = baselines(baseline)
    return names[0] if len(names) == 1 else "fastest of " + ", ".join(names)


def markdown_table(bench, rows) -> str:
    """rows as a table; bench: the benchmark, or anything with its unit and baseline (smoke_baseline
    optional). Speedups are worked out here, so that rows reported one by one can be tabled as they are."""
    if rows and rows[0]["mode"] == "smoke":
        baseline = getattr(bench, "smoke_baseline", None) or bench.baseline
        lines = ["| config | provider | max abs diff vs " + baseline + " | ok |", "|---|---|---|---|"]
        for r in rows:
            if "not_run" in r:
                lines.append(f"| {_config_label(r['config'])} | {r['provider']} | n/a ({r['not_run']}) | |")
                continue
            lines.append(f"| {_config_label(r['config'])} | {r['provider']} | {r['max_abs_diff']:.2e} | "
                         f"{'yes' if r['ok'] else 'NO'} |")
        return "\n".join(lines)
    rows = add_speedups([dict(r) for r in rows], bench.baseline)
    several = len(baselines(bench.baseline)) > 1  # then each speedup names the provider it is against
    ceiling = "copy" if bench.unit == "GB/s" else "matmul"
    extra = [(key, title) for key, title in (("tokens_per_s", "tokens/s"), ("of_datasheet", "% of datasheet"))
             if any(key in r for r in rows)]
    head = [f"config | mode | provider | ms | {bench.unit} | % of {ceiling}", *(t for _, t in extra), "peak MiB",
            f"vs {baseline_label(bench.baseline)}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 5)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {_config_label(r['config'])} | {r['mode']} | {r['provider']} | n/a ({r['error']}) |")
            continue
        cells = [_config_label(r["config"]), r["mode"], r["provider"], f"{r['ms']:.4f}", f"{r['rate']:.1f}",
                 f"{100 * r['of_ceiling']:.1f}"]
        for key, _ in extra:
            value = r.get(key)
            cells.append("" if value is None else f"{100 * value:.1f}" if key == "of_datasheet" else f"{value:,.0f}")
        speedup = f"{r['speedup']:.2f}x" + (f" ({r['vs']})" if several else "") if "speedup" in r else ""
        cells += [f"{r['peak_MB']:.0f}", speedup]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(bench, rows, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "rate" in r]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    if not modes:
        return
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    labels = list(dict.fromkeys(_config_label(r["config"]) for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[0], modes):
        for i, provider in enumerate(providers):
            values = {(_config_label(r["config"])): r["rate"] for r in rows if r["mode"] == mode and r["provider"] == provider}
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [values.get(label, 0) for label in labels], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{bench.name} {mode}")
        ax.set_ylabel(bench.unit)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(bench, rows, env: dict, ceilings: dict, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(bench, rows)
    (out_dir / f"{bench.name}.json").write_text(json.dumps(
        {"benchmark": bench.name, "unit": bench.unit, "environment": env, "ceilings": ceilings, "rows": rows},
        indent=1, default=str))
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    ceil = "\n".join(f"- {k}: {v:.1f}" for k, v in ceilings.items())
    (out_dir / f"{bench.name}.md").write_text(f"# {bench.name}\n\n{header}\n\nMeasured ceilings:\n{ceil}\n\n{table}\n")
    plot(bench, rows, out_dir / f"{bench.name}.png")
