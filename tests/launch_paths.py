"""kernels.launch.direct launches exactly what Triton's own `kernel[grid](...)` launches, call by call.

    python tests/launch_paths.py                      # exit 0: every launch matched (tests/test_launch.py)
    python tests/launch_paths.py --weaken alignment   # a launcher keyed without alignment: must fail

Runs on a stub GPU (benchmarks/stub_gpu.py: Triton's real binding, compiling and launcher call, for
sm_90, with nothing launched), so it needs its own process: TRITON_INTERPRET must be unset before the
kernels are imported. Every DirectLauncher launch is followed by Triton's launch of the same call, and
the two launches the stub records must be the same compiled kernel, grid and arguments. Driven by
training steps of a small GPT on every Triton op (fp32 and bf16 autocast, two sequence lengths, the
attention autotuners' full config lists, attention's atomic backward too) and by a probe kernel at the edges of Triton's specialization:
misaligned tensors, ints equal to 1, divisible by 16 or past 2**31, floats, bools, dtypes.
"""
import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("GPT2_AUTOTUNE", None)  # the autotuned kernels with all their configs

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import stub_gpu  # noqa: E402


@triton.jit
def _probe_kernel(X, Y, n, scale, flag, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    if flag:
        x = x * tl.cast(scale, tl.float32)
    tl.store(Y + offsets, x.to(Y.dtype.element_ty), mask=offsets < n)


class Mismatch(AssertionError):
    pass


def check_every_launch(launches: list, counts: dict) -> None:
    """Wraps DirectLauncher.launch: its launch, then Triton's of the same call, must be recorded alike."""
    from kernels import launch as launch_module

    fast_launch, through_triton = launch_module.DirectLauncher.launch, launch_module.DirectLauncher._launch_through_triton

    def counted_through_triton(self, *args):
        counts["through Triton"] += 1
        return through_triton(self, *args)

    def checked_launch(self, grid, args, constexprs):
        start = len(launches)
        fast_launch(self, grid, args, constexprs)
        self.kernel[grid](*args, **constexprs)
        ours, triton_own = launches[start:start + 1], launches[start + 1:]
        del launches[start:]
        if len(ours) != 1 or len(triton_own) != 1 or not _same(ours[0], triton_own[0]):
            raise Mismatch(f"{self.jit.__name__}: the launcher launched {_describe(ours)}, "
                           f"Triton {_describe(triton_own)}")
        counts["launches"] += 1

    launch_module.DirectLauncher.launch = checked_launch
    launch_module.DirectLauncher._launch_through_triton = counted_through_triton


def _same(a, b) -> bool:
    (hash_a, grid_a, args_a), (hash_b, grid_b, args_b) = a, b
    return (hash_a == hash_b and grid_a == grid_b and len(args_a) == len(args_b)
            and all(x is y or (not isinstance(x, torch.Tensor) and type(x) is type(y) and x == y)
                    for x, y in zip(args_a, args_b)))


def _describe(records) -> str:
    return "; ".join(f"kernel {h[:12]} grid {g} args {[type(a).__name__ if isinstance(a, torch.Tensor) else a for a in args]}"
                     for h, g, args in records) or "nothing"


def train_steps(dtype: str, seq_len: int, deterministic: bool = True) -> None:
    from gpt2.model import GPT, GPTConfig
    from gpt2.ops import resolve
    from gpt2.trainer import accumulate_gradients, clip_and_step

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=96), resolve("triton", "cuda", deterministic))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, 96, (2, seq_len + 1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):  # the first binds and compiles; the others take the launcher's own path
        accumulate_gradients(model, [(tokens[:, :-1], tokens[:, 1:])], torch.device("cpu"), dtype, scaler)
        clip_and_step(optimizer, model, 1.0, scaler)


def probe_specializations() -> None:
    from kernels.launch import direct

    for dtype in (torch.float32, torch.float16):
        buffer = torch.zeros(4096 + 8, dtype=dtype)
        for x in (buffer[:4096], buffer[1:4097], buffer[8:4104]):  # aligned, misaligned, aligned again
            y = torch.empty_like(x)
            for n in (1, 16, 17, 4000, 2**31 + 16, 2**40 + 3):
                for scale, flag in ((0.5, True), (2.0, False)):
                    for _ in range(2):
                        direct(_probe_kernel)[(4,)](x, y, n, scale, flag, BLOCK=1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weaken", choices=["alignment"], help="key the launcher's cache without tensor alignment")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_gpu.install(90)
    from kernels import launch as launch_module

    if args.weaken == "alignment":
        strong = launch_module._specialization
        launch_module._specialization = lambda call_args: strong(
            [a.new_empty(0) if isinstance(a, torch.Tensor) else a for a in call_args])  # an aligned stand-in
    counts = {"launches": 0, "through Triton": 0}
    check_every_launch(stub_gpu.record_launches(), counts)
    try:
        for dtype, seq_len in (("float32", 16), ("bfloat16", 16), ("float32", 40)):
            train_steps(dtype, seq_len)
        train_steps("bfloat16", 40, deterministic=False)  # attention's atomic backward
        probe_specializations()
    except Mismatch as error:
        print(f"MISMATCH: {error}")
        return 1
    fast = counts["launches"] - counts["through Triton"]
    print(f"{counts['launches']} launches matched Triton's, {fast} of them on the launcher's own path")
    return 0 if fast > counts["launches"] // 2 else 1


if __name__ == "__main__":
    sys.exit(main())
