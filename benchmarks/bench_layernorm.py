"""LayerNorm and the fused residual add + LayerNorm vs PyTorch, at GPT-2 training shapes.

    python benchmarks/run.py --only layernorm,add_layernorm,add_layernorm_model

Rows = N x 1024 tokens, C = the four GPT-2 widths (768, 1024, 1280, 1600) at 64K rows, and 16K rows at
768. Unit GB/s, from the bytes one call must move at least (M rows; mean and rstd in fp32):
    layernorm, bf16      forward:  read x, w, b; write y, mean, rstd                     (2MC + 2C) 2 + 8M
                         backward: read x, dy, w, mean, rstd; write dx, dw, db            (3MC + 3C) 2 + 8M
    add_layernorm, bf16  forward:  read x, delta, w, b; write x + delta, y, mean, rstd   (4MC + 2C) 2 + 8M
                         backward: read s, dy, ds, w, mean, rstd; write dx (= ddelta)    (4MC + 3C) 2 + 8M
    add_layernorm_model  as the model runs it under bf16 autocast: x the fp32 residual stream, delta the
                         bf16 sublayer output, y read by a bf16 matmul:
                         forward:  read x (4), delta (2); write s (4), y (2)    12MC + 8C + 8M
                         backward: read s (4), dy (2), ds (4); write dx (4), ddelta (2)   16MC + 12C + 8M
    full = forward + backward. The per-program fp32 partial sums of dw, db are not counted.
PyTorch's add_layernorm is `x + delta` then F.layer_norm: three passes over the rows instead of one; in
the model path autocast also casts y to bf16 for the matmul, and the gradients back (a pass each),
which is what its provider here does. torch.compile fuses those passes; the harness times it too, and it
is the baseline of every speedup: the fused kernel to beat, not PyTorch's eager passes.
"""
import torch

from gpt2.ops import torch_layernorm
from harness import COMPILED, OpBench
from kernels.layernorm import add_layer_norm, layer_norm

DTYPE = torch.bfloat16
CONFIGS = [{"rows": 64 * 1024, "C": C} for C in (768, 1024, 1280, 1600)] + [{"rows": 16 * 1024, "C": 768}]
SMOKE_CONFIGS = [{"rows": 37, "C": 100}, {"rows": 5, "C": 768}]


def make_inputs(n_inputs):
    def make(config, device, dtype):
        rows, C = config["rows"], config["C"]
        xs = [torch.randn(rows, C, device=device) * 2 + 1 for _ in range(n_inputs)]
        weight = torch.randn(C, device=device) * 0.5 + 1
        bias = torch.randn(C, device=device) * 0.5
        return tuple(t.to(dtype).requires_grad_() for t in (*xs, weight, bias))
    return make


def make_model_inputs(config, device, dtype):
    """fp32 residual x, bf16 delta, fp32 weight and bias, whatever dtype the harness asks for."""
    x, delta, weight, bias = make_inputs(2)(config, device, torch.float32)
    return x, delta.detach().bfloat16().requires_grad_(), weight, bias


def under_autocast(fn):
    def run(x, delta, weight, bias):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return fn(x, delta, weight, bias)
    return run


def torch_model_path(x, delta, weight, bias):
    s, y = torch_layernorm(x, delta, weight, bias)
    return s, y.to(torch.bfloat16)  # what autocast does to y before the next matmul


def bytes_moved(row_bytes_fwd, row_bytes_bwd, weight_bytes=2):
    """Bytes of one call: row_bytes_* per element of the (M, C) tensors read or written, plus weights
    (weight_bytes per element) and the fp32 statistics."""
    def work(config, mode):
        M, C = config["rows"], config["C"]
        forward = row_bytes_fwd * M * C + 2 * C * weight_bytes + 8 * M
        backward = row_bytes_bwd * M * C + 3 * C * weight_bytes + 8 * M
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]
    return work


BENCHMARKS = [
    OpBench(
        name="layernorm",
        unit="GB/s",
        dtype=DTYPE,
        make_inputs=make_inputs(1),
        providers={"triton": layer_norm, "torch": lambda x, w, b: torch_layernorm(x, None, w, b)[1]},
        work=bytes_moved(2 * 2, 3 * 2),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
        baseline=COMPILED,
    ),
    OpBench(
        name="add_layernorm",
        unit="GB/s",
        dtype=DTYPE,
        make_inputs=make_inputs(2),
        providers={"triton": add_layer_norm, "torch": torch_layernorm},
        work=bytes_moved(4 * 2, 4 * 2),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
        baseline=COMPILED,
    ),
    OpBench(
        name="add_layernorm_model",
        unit="GB/s",
        make_inputs=make_model_inputs,
        providers={"triton": under_autocast(add_layer_norm), "torch": under_autocast(torch_model_path)},
        work=bytes_moved(4 + 2 + 4 + 2, 4 + 2 + 4 + 4 + 2, weight_bytes=4),
        configs=CONFIGS,
        smoke_configs=SMOKE_CONFIGS,
        baseline=COMPILED,
        smoke_tol=5e-2,  # y in bf16: the interpreter truncates where PyTorch rounds (one bf16 ulp)
    ),
]
