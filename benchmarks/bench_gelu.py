"""GELU (tanh approximation) vs PyTorch, at the MLP shape of GPT-2 124M training.

    python benchmarks/run.py --only gelu

Input (N x 1024, 3072) for N = 16, 32, 64. Unit GB/s, from the bytes one call must move
(n elements, e bytes each): forward reads x, writes y: 2ne; backward reads x, dy, writes dx: 3ne;
full = 5ne.
"""
import torch

from gpt2.ops import torch_gelu
from harness import OpBench
from kernels.gelu import gelu

DTYPE = torch.bfloat16
PASSES = {"forward": 2, "backward": 3, "full": 5}


def make_inputs(config, device, dtype):
    x = torch.randn(config["rows"], config["C"], device=device) * 3 + 0.5
    return (x.to(dtype).requires_grad_(),)


def bytes_moved(config, mode, e=DTYPE.itemsize):
    return PASSES[mode] * config["rows"] * config["C"] * e


BENCHMARKS = [
    OpBench(
        name="gelu",
        unit="GB/s",
        dtype=DTYPE,
        make_inputs=make_inputs,
        providers={"triton": gelu, "torch": torch_gelu},
        work=bytes_moved,
        configs=[{"rows": n * 1024, "C": 3072} for n in (16, 32, 64)],
        smoke_configs=[{"rows": 37, "C": 100}, {"rows": 3, "C": 3072}],
    ),
]
