"""LayerNorm and the fused residual add + LayerNorm vs PyTorch, at GPT-2 124M training shapes.

    python benchmarks/run.py --only layernorm,add_layernorm

Rows = N x 1024 tokens (N = 16, 32, 64 sequences of 1024), C = 768. Unit GB/s, from the bytes one call
must move at least (e = bytes per element of the dtype, M rows, mean and rstd in fp32):
    layernorm      forward:  read x, w, b; write y, mean, rstd        (2MC + 2C) e + 8M
                   backward: read x, dy, w, mean, rstd; write dx, dw, db   (3MC + 3C) e + 8M
    add_layernorm  forward:  read x, delta, w, b; write x + delta, y, mean, rstd   (4MC + 2C) e + 8M
                   backward: read s, dy, ds, w, mean, rstd; write dx (= ddelta)    (4MC + 3C) e + 8M
    full = forward + backward. The per-program fp32 partial sums of dw, db are not counted.
PyTorch's add_layernorm is `x + delta` then F.layer_norm: three passes over the rows instead of one.
"""
import torch

from gpt2.ops import torch_layernorm
from harness import OpBench
from kernels.layernorm import add_layer_norm, layer_norm

DTYPE = torch.bfloat16
CONFIGS = [{"rows": n * 1024, "C": 768} for n in (16, 32, 64)]
SMOKE_CONFIGS = [{"rows": 37, "C": 100}, {"rows": 5, "C": 768}]


def make_inputs(n_inputs):
    def make(config, device, dtype):
        rows, C = config["rows"], config["C"]
        xs = [torch.randn(rows, C, device=device) * 2 + 1 for _ in range(n_inputs)]
        weight = torch.randn(C, device=device) * 0.5 + 1
        bias = torch.randn(C, device=device) * 0.5
        return tuple(t.to(dtype).requires_grad_() for t in (*xs, weight, bias))
    return make


def bytes_moved(row_tensors_fwd, row_tensors_bwd):
    """Bytes of one call: row_tensors_* (M, C) tensors read or written, plus weights and the fp32 statistics."""
    def work(config, mode, e=DTYPE.itemsize):
        M, C = config["rows"], config["C"]
        forward = (row_tensors_fwd * M * C + 2 * C) * e + 8 * M
        backward = (row_tensors_bwd * M * C + 3 * C) * e + 8 * M
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]
    return work


BENCHMARKS = [
    OpBench(
        name="layernorm",
        unit="GB/s",
        dtype=DTYPE,
        make_inputs=make_inputs(1),
        providers={"triton": layer_norm, "torch": lambda x, w, b: torch_layernorm(x, None, w, b)[1]},
        work=bytes_moved(2, 3),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
    ),
    OpBench(
        name="add_layernorm",
        unit="GB/s",
        dtype=DTYPE,
        make_inputs=make_inputs(2),
        providers={"triton": add_layer_norm, "torch": torch_layernorm},
        work=bytes_moved(4, 4),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
    ),
]
