"""Host time of each op's forward + backward: our Triton ops against the PyTorch ops they replace.

    python benchmarks/host_overhead.py            # the table; written to benchmarks/results/cpu-host/
    python benchmarks/host_overhead.py --smoke    # 5 calls of each, one round, nothing written (CI)

An op is called hundreds of times a training step. When its host path (checks, allocations, autograd,
Triton's launch) takes longer than its kernel's GPU time, eager training waits on the CPU: the first
GPU run measured 300 to 500 us of CPU per call of our ops, tens of us per aten op. This measures the
host path alone, on any machine: the tensors are tiny CPU tensors, so the PyTorch ops' own compute
is negligible, and our kernels go through Triton's real launch path via stub_gpu (compiled for sm_90,
never launched): the eager path's `kernels.launch.direct`, down to the compiled kernel's launcher call.
What a GPU adds on both sides (the CUDA launch, the caching allocator) is not here.

Each case is timed in thread CPU time (other processes on the machine do not count), PyTorch and ours
alternating over several rounds; the table gives the median microseconds per call, and the median over
the rounds of ours / PyTorch (a round's pair ran back to back, so a slow spell of a shared machine
touches both). On a shared 2-core VM, reruns still differ by about 0.2 in the ratio.
Target: at most 1.5 for each op. Attention's autotuner is off (GPT2_AUTOTUNE=0): nothing can be timed.

One row is not an op: "layernorm floor" is the least any op of ours can cost, an autograd.Function whose
forward and backward each allocate one output and launch one kernel (LayerNorm's), against F.layer_norm.
What an op spends above it is its own host work (more outputs, a reduction of partial sums, checks).
The column "ours, no launch" times each op again with every kernel launch returning at once (the
launcher's key, cache look-up and call skipped): the rest of its host path, the autograd.Function,
allocations and checks. Where that alone is above 1.5, no cheaper launch can meet the target.
"""
import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import stub_gpu  # noqa: E402

TARGET = 1.5


def fwd_bwd(fn, *shapes, dtype=torch.float32):
    """A call of fn on fresh leaves of these shapes, then backward of every output."""
    leaves = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in shapes]

    def call():
        outs = fn(*leaves)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return call


def cases():
    """name -> (PyTorch's call, ours): each a zero-argument function doing one forward + backward."""
    from gpt2.ops import torch_attention, torch_cross_entropy, torch_gelu, torch_layernorm
    from kernels import add_layer_norm, flash_attention_qkv, gelu, layer_norm, linear_cross_entropy

    rows, C, V = 8, 64, 256
    targets = torch.randint(0, V, (rows,))
    return {
        "layernorm": (fwd_bwd(lambda x, w, b: torch_layernorm(x, None, w, b)[1], (rows, C), (C,), (C,)),
                      fwd_bwd(layer_norm, (rows, C), (C,), (C,))),
        "add_layernorm": (fwd_bwd(torch_layernorm, (rows, C), (rows, C), (C,), (C,)),
                          fwd_bwd(add_layer_norm, (rows, C), (rows, C), (C,), (C,))),
        "gelu": (fwd_bwd(torch_gelu, (rows, C)), fwd_bwd(gelu, (rows, C))),
        "attention": (fwd_bwd(lambda qkv: torch_attention(qkv, 2), (1, 16, 3 * 2 * 64)),  # 2 heads of 64
                      fwd_bwd(lambda qkv: flash_attention_qkv(qkv, 2), (1, 16, 3 * 2 * 64))),
        "cross_entropy": (fwd_bwd(lambda h, w: torch_cross_entropy(h, w, targets), (rows, C), (V, C)),
                          fwd_bwd(lambda h, w: linear_cross_entropy(h, w, targets), (rows, C), (V, C))),
        "layernorm floor": (fwd_bwd(lambda x, w, b: torch_layernorm(x, None, w, b)[1], (rows, C), (C,), (C,)),
                            fwd_bwd(floor_function(rows, C), (rows, C), (C,), (C,))),
        "adamw step": (optimizer_step("torch"), optimizer_step("triton")),
        "GPT step (2 layers)": (train_step("torch"), train_step("triton")),
    }


def floor_function(rows: int, C: int):
    """The least host work of an op of ours: one output allocated and one kernel launched each way."""
    from kernels.launch import direct
    from kernels.layernorm import _layer_norm_bwd_kernel, _layer_norm_fwd_kernel
    from kernels.rowwise import persistent_programs, row_config

    cfg, programs = row_config(C), persistent_programs(torch.device("cpu"))
    stats, partial = torch.empty(2, rows), torch.empty(2, programs, C)
    sizes = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y = torch.empty_like(x)
            direct(_layer_norm_fwd_kernel)[(-(-rows // cfg.block_m),)](
                x, x, y, y, w, b, stats, rows, C, 1e-5, HAS_DELTA=False, HAS_BIAS=True, **sizes)
            ctx.save_for_backward(x, w)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            dx = torch.empty_like(x)
            direct(_layer_norm_bwd_kernel)[(programs,)](
                x, dy, dy, dx, dx, w, stats, partial, rows, C, HAS_DS=False, HAS_DDELTA=False, **sizes)
            return dx, w, w  # gradients for w and b that cost nothing to make

    return Floor.apply


def optimizer_step(kernels):
    """Clip the grad norm and step AdamW over GPT-2's parameter shapes, shrunk."""
    from gpt2.ops import resolve

    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(64, 192), (192,), (64, 64), (64,)] * 2]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = resolve(kernels, "cuda").adamw(params, lr=1e-3, weight_decay=0.1)

    def call():
        if hasattr(optimizer, "clip_grad_norm_"):
            optimizer.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return call


def train_step(kernels):
    """Forward, backward, clip and optimizer step of a 2-layer GPT (B=2, T=16, C=64)."""
    from gpt2.model import GPT, GPTConfig
    from gpt2.ops import resolve
    from gpt2.trainer import accumulate_gradients, clip_and_step

    model = GPT(GPTConfig(n_layer=2, n_head=1, n_embd=64, block_size=16, vocab_size=128), resolve(kernels, "cuda"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, 128, (2, 17))
    batches, scaler, device = [(tokens[:, :-1], tokens[:, 1:])], torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu")

    def call():
        accumulate_gradients(model, batches, device, "float32", scaler)
        clip_and_step(optimizer, model, 1.0, scaler)
    return call


@contextlib.contextmanager
def launches_skipped():
    """Every launch through kernels.launch.direct returns at once, doing nothing."""
    from kernels.launch import DirectLauncher

    launch = DirectLauncher.launch
    DirectLauncher.launch = lambda self, grid, args, constexprs: None
    try:
        yield
    finally:
        DirectLauncher.launch = launch


def per_call_us(call, n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        call()
    return (time.thread_time() - start) / n * 1e6


def measure(calls: int, rounds: int) -> list[dict]:
    rows = []
    for name, (theirs, ours) in cases().items():
        theirs(), ours()  # compile and warm up
        variants = {"torch": theirs, "triton": ours}
        if is_op(name):
            variants["no_launch"] = ours  # timed with launches skipped, around the whole round
        times = {variant: [] for variant in variants}
        for _ in range(rounds):
            for variant, call in variants.items():
                with launches_skipped() if variant == "no_launch" else contextlib.nullcontext():
                    times[variant].append(per_call_us(call, calls))
        row = {"case": name, **{f"{variant}_us": statistics.median(t) for variant, t in times.items()}}
        # each round's calls ran back to back: their ratio cancels the machine's slow spells
        row["ratio"] = statistics.median(ours / theirs for ours, theirs in zip(times["triton"], times["torch"]))
        if is_op(name):
            row["no_launch_ratio"] = statistics.median(a / b for a, b in zip(times["no_launch"], times["torch"]))
        rows.append(row)
    return rows


def is_op(case: str) -> bool:
    return "step" not in case and "floor" not in case


def markdown(rows) -> str:
    lines = ["| forward + backward of | PyTorch us | ours us | ours / PyTorch | ours, no launch, us | ... / PyTorch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        flag = f" (target {TARGET})" if is_op(r["case"]) and r["ratio"] > TARGET else ""
        no_launch = f"{r['no_launch_us']:.1f} | {r['no_launch_ratio']:.2f}" if "no_launch_us" in r else "- | -"
        lines.append(f"| {r['case']} | {r['torch_us']:.1f} | {r['triton_us']:.1f} | {r['ratio']:.2f}{flag} | {no_launch} |")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """--calls and --rounds: a whole number above zero (a median of no times is no measurement)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above zero")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, with --calls and --rounds filled in: those given, else the smoke or the full defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a quick pass: fewer calls and rounds, nothing written")
    parser.add_argument("--calls", type=positive_int, help="calls of each case per round (default 150; 5 with --smoke)")
    parser.add_argument("--rounds", type=positive_int, help="rounds, PyTorch's calls and ours alternating; the "
                                                            "table gives their medians (default 15; 1 with --smoke)")
    args = parser.parse_args(argv)
    args.calls = args.calls or (5 if args.smoke else 150)
    args.rounds = args.rounds or (1 if args.smoke else 15)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # Triton's real launch path, before a kernel module is imported
    os.environ["GPT2_AUTOTUNE"] = "0"
    torch.set_num_threads(1)  # the host path, not intra-op parallelism of tiny CPU ops
    stub_gpu.install(90)
    rows = measure(args.calls, args.rounds)
    table = markdown(rows)
    print(table)
    if not args.smoke:
        import harness

        env = harness.environment(torch.device("cpu"))
        out = HERE / "results" / "cpu-host"
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_overhead.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        header = "\n".join(f"- {k}: {v}" for k, v in env.items())
        (out / "host_overhead.md").write_text(f"# Host time per call, ours vs PyTorch\n\n{header}\n\n{table}\n")
        print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
