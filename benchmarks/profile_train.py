"""Where a training step's time goes: torch.profiler kernels grouped by family.

    python benchmarks/profile_train.py                         # GPT-2 124M, B=64, torch+compile and triton+compile
    python benchmarks/profile_train.py --providers triton --batch 16
    python benchmarks/profile_train.py --smoke                 # tiny model on the CPU: checks the script runs

Families: matmul, attention, norm, elementwise (GELU, residual adds, inductor's fused pointwise),
loss (softmax / cross-entropy), optimizer, communication, other. Each provider's table (ms per step
and share) and its 15 longest kernels go to stdout and to benchmarks/results/<gpu>/profile_train.md.
"""
import argparse
import pathlib
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile, schedule

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

FAMILIES = [  # first match wins; names of cuBLAS/CUTLASS, SDPA, inductor and our kernels
    ("attention", r"flash|fmha|attn|attention|sdpa|_fwd_kernel|_bwd_kernel"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("norm", r"layer_?norm|_ln_|native_layer_norm"),
    ("optimizer", r"adam|multi_tensor|foreach|_fused_adamw|clip|norm_kernel|lpnorm"),
    ("loss", r"softmax|cross_entropy|nll|log_softmax"),
    ("communication", r"nccl|all_?reduce|gloo"),
    ("elementwise", r"gelu|elementwise|vectorized|triton_poi|triton_per|triton_red|add|mul|copy|fill|cat|where|embedding"),
]


def family_of(name: str) -> str:
    lowered = name.lower()
    return next((family for family, pattern in FAMILIES if re.search(pattern, lowered)), "other")


def profile_provider(provider: str, config: dict, device, steps: int = 3) -> list[tuple]:
    """[(kernel name, ms per step)] for `steps` profiled steps after warm-up."""
    import bench_train

    step = bench_train.PROVIDERS[provider](config, device, torch.bfloat16)
    step()
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps)) as prof:
        for _ in range(steps + 2):
            step()
            prof.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for event in prof.key_averages():
        if device.type == "cuda":
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if us > 0 and not event.key.startswith("ProfilerStep"):
            times.append((event.key, us / 1000 / steps))
    return sorted(times, key=lambda item: -item[1])


def report(provider: str, config: dict, times: list[tuple]) -> str:
    total = sum(ms for _, ms in times)
    families = {}
    for name, ms in times:
        families[family_of(name)] = families.get(family_of(name), 0.0) + ms
    lines = [f"## {provider}  ({' '.join(f'{k}={v}' for k, v in config.items())})", "",
             "| family | ms / step | share |", "|---|---|---|"]
    for family, ms in sorted(families.items(), key=lambda item: -item[1]):
        lines.append(f"| {family} | {ms:.2f} | {100 * ms / total:.1f}% |")
    lines += [f"| total (kernel time) | {total:.2f} | |", "", "| kernel | family | ms / step |", "|---|---|---|"]
    for name, ms in times[:15]:
        lines.append(f"| `{name[:90]}` | {family_of(name)} | {ms:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default="torch+compile,triton+compile")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU ops, eager providers only")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    import harness

    device = torch.device("cpu" if smoke else "cuda")
    config = {"model": "tiny", "B": 2, "T": 32} if smoke else {"model": "124M", "B": args.batch, "T": 1024}
    providers = ["torch", "triton"] if smoke else args.providers.split(",")
    env = harness.environment(device)
    text = "# Training step profile\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
    for provider in providers:
        section = report(provider, config, profile_provider(provider, config, device))
        print(section)
        text += section + "\n"
    if not smoke:
        out = harness.results_dir(env["device"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_train.md").write_text(text)
        print(f"written to {out / 'profile_train.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
