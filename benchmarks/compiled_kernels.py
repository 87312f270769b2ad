"""Every kernel of a training step, compiled ahead of time for Hopper and Ampere on this CPU, as
torch.compile would type its arguments: registers, spills, shared memory, tensor-core instructions, fp64.

    python benchmarks/compiled_kernels.py               # the table (sm_90 and sm_80)
    python benchmarks/compiled_kernels.py --configs     # also every autotuning candidate, on sm_90
    python benchmarks/compiled_kernels.py --check       # exit 1 on a compile error, fp64 math or a spill
    python benchmarks/compiled_kernels.py --configs --out benchmarks/results/compiled   # keep the table

No GPU is needed: Triton ships ptxas. stub_gpu runs one training step of a small GPT (every op on
Triton, bf16 autocast, GPT-2 124M widths: C = 768, head dim 64, vocabulary 50304) through Triton's real
launch path, then its forward and backward under torch.compile(fullgraph=True) (which must trace without a
graph break), then attention with its atomic backward (deterministic=False) both ways and LayerNorm at the
other GPT-2 widths, and records each kernel compiled. Each is then compiled again per target with its
scalars at their widest: floats fp64, as torch.compile's inductor hands Python floats to user kernels, and
integers i64, as it types an int it cannot prove fits 32 bits (those it can, it types i32, as Triton
does). A kernel must compute the same fp32 math whatever width its scalars arrive in (fp64 arithmetic runs at 1/64 of the fp32 rate on
most GPUs, and an fp64 accumulator crashed tl.dot outright). The PTX is scanned for fp64 arithmetic
(conversions of an fp64 argument are fine); cuobjdump gives registers per thread and local memory
(spills). Autotuning candidates that spill cannot win and should not be tuned. The LayerNorm backward's
persistent grid (kernels/rowwise.py) must fit on the multiprocessors in one wave: its registers are
checked against the programs it launches on each, at the four GPT-2 widths.
"""
import argparse
import functools
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import stub_gpu  # noqa: E402

TARGETS = {"sm_90": 90, "sm_80": 80}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")  # not the target's own
# an instruction on fp64 values that computes (ld/st/mov/cvt only move or convert them)
_FP64_MATH = re.compile(r"^\s*(?!cvt|mov|ld|st)[a-z]+[a-z0-9.]*\.f64\b", re.MULTILINE)


def record_step() -> list:
    """(ASTSource, options) of every kernel one training step of a small all-Triton GPT compiles: the
    eager step, then forward and backward under torch.compile(fullgraph=True), which must trace every
    op without a graph break (backend aot_eager: dynamo and AOTAutograd trace the custom ops with fake
    tensors as inductor's would, then the graph runs eagerly; inductor itself needs a GPU)."""
    from gpt2.model import GPT, GPTConfig
    from gpt2.ops import resolve
    from gpt2.trainer import accumulate_gradients, clip_and_step

    stub_gpu.install(90)
    torch.manual_seed(0)
    ops = resolve("triton", "cuda")  # compiled for a CUDA target; the tensors stay on the CPU
    model = GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768, block_size=64), ops)  # GPT-2 widths and vocabulary
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, 50257, (2, 65))
    batches, device = [(tokens[:, :-1], tokens[:, 1:])], torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulate_gradients(model, batches, device, "bfloat16", scaler)
    clip_and_step(optimizer, model, 1.0, scaler)
    accumulate_gradients(torch.compile(model, backend="aot_eager", fullgraph=True), batches, device, "bfloat16", scaler)
    record_atomic_attention()
    record_layer_norm_widths()
    unique = {}
    for src, options in stub_gpu.compiled():
        options = {key: options[key] for key in LAUNCH_OPTIONS if key in options}
        unique.setdefault(_identity(src, options), (src, options))
    return list(unique.values())


def record_atomic_attention() -> None:
    """Attention with deterministic=False (train.py --no-deterministic), at the same widths: the dk/dv
    kernel that adds dq up with atomics, eager and traced by torch.compile(fullgraph=True)."""
    from kernels.attention import flash_attention

    q, k, v = (torch.randn(2, 12, 64, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attention = functools.partial(flash_attention, deterministic=False)
    for run in (attention, torch.compile(attention, backend="aot_eager", fullgraph=True)):
        run(q, k, v).sum().backward()


def record_layer_norm_widths() -> None:
    """The fused add + LayerNorm at the other GPT-2 widths (C = 1024, 1280, 1600; the step has 768) with
    the model's dtypes: fp32 residual, bf16 sublayer output, bf16 autocast; as a block calls it (the sum
    goes on) and as the final LayerNorm does (its sum is discarded: a backward without ds)."""
    from kernels import add_layer_norm

    for C, sum_used in itertools.product((1024, 1280, 1600), (True, False)):
        x = torch.randn(8, C, requires_grad=True)
        delta = torch.randn(8, C, dtype=torch.bfloat16, requires_grad=True)
        weight, bias = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, y = add_layer_norm(x, delta, weight, bias)
        (y.float().sum() + (s.sum() if sum_used else 0)).backward()


def autotuning_candidates(src, options) -> list:
    """The same kernel once per config of its autotuner (none if it is not autotuned)."""
    import harness

    fn = src.fn
    tuners = [tuner for _, tuner in harness.autotuners() if tuner.fn is fn]
    if not tuners:
        return []
    names = fn.arg_names
    out = []
    for config in tuners[0].configs:
        constexprs = dict(src.constants)
        for name, value in config.kwargs.items():
            constexprs[(names.index(name),)] = value
        out.append((ASTSource(fn, src.signature, constexprs, src.attrs),
                    {**options, "num_warps": config.num_warps, "num_stages": config.num_stages}))
    return out


def as_inductor_types(src):
    """src with float scalars typed fp64 and integer scalars i64."""
    widened = {"fp32": "fp64", "i32": "i64"}
    signature = {name: widened.get(ty, ty) for name, ty in src.signature.items()}
    return ASTSource(src.fn, signature, src.constants, src.attrs)


def compile_and_inspect(src, options, arch: int) -> dict:
    row = {"kernel": src.fn.__name__, "config": _config_label(src, options), "target": f"sm_{arch}",
           "types": "fp64/i64" if "fp64" in src.signature.values() or "i64" in src.signature.values() else "as launched"}
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # a compile error is a finding, not a crash of the report
        cause = err.__cause__ or err
        row["error"] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    ptx = compiled.asm["ptx"]
    row["fp64_math"] = [line.strip() for line in _FP64_MATH.findall(ptx)][:5]
    row["fp64_count"] = len(_FP64_MATH.findall(ptx))
    row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))    # Hopper's tensor-core instruction
    row["mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))       # Ampere's: on sm_90, the slower fallback
    row["atomics"] = len(re.findall(r"^\s*(?:@!?%p\d+\s+)?(?:red|atom)\.", ptx, re.MULTILINE))
    row["tma"] = "cp.async.bulk.tensor" in ptx
    row["shared_KB"] = round(compiled.metadata.shared / 1024, 1)
    row.update(_resource_usage(compiled.asm["cubin"]))
    if src.fn.__name__ == "_layer_norm_bwd_kernel" and row["registers"]:
        row.update(_persistent_fit(src, options, row["registers"]))
    return row


def _persistent_fit(src, options, registers: int) -> dict:
    """The LayerNorm backward's persistent grid: programs launched per multiprocessor, and how many its
    registers let one hold at once."""
    from kernels.rowwise import REGISTERS_PER_SM, backward_programs_per_sm

    warps = options["num_warps"]
    return {"programs_per_sm": backward_programs_per_sm(warps),
            "fit_per_sm": REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * warps)}  # allocated 8 at a time


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread, and local memory (spills) per thread, from cuobjdump."""
    tool = pathlib.Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if not found:
        return {"registers": None, "spill_bytes": None}
    registers, stack, local = map(int, found.groups())
    return {"registers": registers, "spill_bytes": stack + local}


def _identity(src, options) -> str:
    return f"{src.fn.__name__}|{sorted(src.signature.items())}|{sorted(src.constants.items())}|{sorted(options.items())}"


def _config_label(src, options) -> str:
    names = src.fn.arg_names
    constexprs = [f"{names[path[0]]}={value}" for path, value in sorted(src.constants.items())
                  if not isinstance(value, str)]  # not PRECISION and other strings
    return " ".join(constexprs + [f"w{options.get('num_warps')}", f"s{options.get('num_stages')}"])


def problems(row) -> list:
    found = []
    if "error" in row:
        found.append(f"does not compile: {row['error']}")
    if row.get("fp64_count"):
        found.append(f"{row['fp64_count']} fp64 instructions, e.g. {row['fp64_math'][0]}")
    if row.get("spill_bytes"):
        found.append(f"spills {row['spill_bytes']} bytes a thread")
    if row.get("fit_per_sm", 99) < row.get("programs_per_sm", 0):
        found.append(f"launches {row['programs_per_sm']} programs a multiprocessor, {row['fit_per_sm']} fit: two waves")
    return found


def report(with_configs: bool) -> list:
    rows = []
    try:
        recorded = record_step()
    except Exception as err:  # torch.compile could not trace the step: the finding of this run
        return [{"kernel": "the training step", "config": "eager, then torch.compile(fullgraph=True)", "target": "",
                 "types": "", "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"}]
    for src, options in recorded:
        for arch in TARGETS.values():
            if arch == 90:
                rows.append(compile_and_inspect(src, options, arch))
            rows.append(compile_and_inspect(as_inductor_types(src), options, arch))
        if with_configs:
            for candidate, candidate_options in autotuning_candidates(src, options):
                row = compile_and_inspect(as_inductor_types(candidate), candidate_options, 90)
                rows.append({**row, "candidate": True})
    return rows


def markdown(rows) -> str:
    lines = ["| kernel | config | target | scalars | regs | spill B | smem KB | wgmma | mma.sync | atomics | fp64 ops "
             "| problems |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = ("candidate " if r.get("candidate") else "") + r["config"]
        if "programs_per_sm" in r:
            config += f" (grid: {r['programs_per_sm']} a multiprocessor, {r['fit_per_sm']} fit)"
        counts = " | ".join(str(r.get(key) or "") for key in ("wgmma", "mma_sync", "atomics"))
        lines.append(f"| {r['kernel']} | {config} | {r['target']} | {r['types']} | {r.get('registers', '')} | "
                     f"{r.get('spill_bytes', '')} | {r.get('shared_KB', '')} | {counts} | "
                     f"{r.get('fp64_count', '')} | {'; '.join(problems(r))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", action="store_true", help="also compile every autotuning candidate (sm_90)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel has a problem")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--out", help="write compiled_kernels.md (with versions, date, commit) to this folder")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, before a kernel module is imported
    rows = report(args.configs)
    print(markdown(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.out:
        import harness

        env = harness.environment(torch.device("cpu"))
        header = "\n".join(f"- {k}: {v}" for k, v in env.items() if k != "device")
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compiled_kernels.md").write_text(
            f"# Compiled kernels (ahead of time, no GPU)\n\n{header}\n\n{markdown(rows)}\n")
    bad = [f"{r['kernel']} [{r['config']}] {r['target']} {r['types']}: {p}" for r in rows for p in problems(r)]
    if bad:
        print("\nproblems:\n" + "\n".join(bad), file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
