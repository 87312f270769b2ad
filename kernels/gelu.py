"""GELU with the tanh approximation GPT-2 uses (F.gelu(x, approximate="tanh")), forward and backward.

    y = gelu(x)          # any shape, fp32 / fp16 / bf16; math in fp32

With u = k0 * (x + k1 * x^3), k0 = sqrt(2 / pi), k1 = 0.044715:
    y = 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u)          (0.5 * (1 + tanh(u)) = sigmoid(2u))
    dy/dx = s + x * s * (1 - s) * 2 * du/dx,  s = sigmoid(2u),  du/dx = k0 * (1 + 3 * k1 * x^2)
The sigmoid form has no cancellation near x = 0 and saturates cleanly for large |x|. With e = exp(-2|u|),
s * (1 - s) = e / (1 + e)^2 whatever the sign of u: 1 - s, where s is near 1, would keep only the
rounding of s (twice the error of torch's fp32 backward).

Design: elementwise over the flattened tensor, BLOCK elements per program, int64 offsets (a tensor
may pass 2**31 elements). The backward keeps x (not y) and recomputes s: one read of x and dy, one
write of dx. Non-contiguous inputs are copied to contiguous first. No double backward.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels.launch import cdiv, check_float_inputs, direct, no_double_backward, traced

__all__ = ["gelu"]

# 16 elements a thread: two 16-byte loads of bf16 per input. ptxas for sm_90: 32-38 registers a thread
# (allocated as 32 or 40), so 16 or 12 programs share a multiprocessor, with 64 or 48 KB of loads of x in
# flight. Not yet timed on a GPU.
BLOCK = 2048
NUM_WARPS = 4
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)   # constexpr: a jit function may read only constexpr globals
COEFF = tl.constexpr(0.044715)


@triton.jit
def _sigmoid_2u(x):
    """(s, e): s = sigmoid(2u), with u the tanh argument of GELU, and e = exp(-2|u|); x in fp32."""
    u = SQRT_2_OVER_PI * (x + COEFF * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow for large |x|
    return tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), e


@triton.jit
def _gelu_fwd_kernel(X, Y, n_elements, BLOCK: tl.constexpr):   # X, Y: (n_elements,) contiguous
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_2u(x)
    tl.store(Y + offsets, (x * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, DY, DX, n_elements, BLOCK: tl.constexpr):   # X, DY, DX: (n_elements,) contiguous
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    s, e = _sigmoid_2u(x)
    du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * COEFF * x * x)
    dx = dy * (s + 2.0 * x * (e / ((1.0 + e) * (1.0 + e))) * du_dx)  # s * (1 - s), for either sign of u
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _elementwise(kernel, out_like: torch.Tensor, inputs, launch) -> torch.Tensor:
    """Runs an elementwise kernel over contiguous copies of inputs; the result is shaped like out_like."""
    out = torch.empty_like(out_like, memory_format=torch.contiguous_format)
    n = out.numel()
    if n > 0:
        launch(kernel)[(cdiv(n, BLOCK),)](*[t.contiguous() for t in inputs], out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# ---------------------------------------------------------------------------------------------
# the torch.compile path: custom ops that launch through wrap_triton


@triton_op("gpt2::gelu_fwd", mutates_args={})
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    return _elementwise(_gelu_fwd_kernel, x, (x,), traced)


@triton_op("gpt2::gelu_bwd", mutates_args={})
def _gelu_bwd_op(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return _elementwise(_gelu_bwd_kernel, x, (x, dy), traced)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _op_backward(ctx, dy):
    return _gelu_bwd_op(ctx.saved_tensors[0], dy)


_gelu_op.register_autograd(_op_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# the eager path: an autograd.Function that launches directly


class _GeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _elementwise(_gelu_fwd_kernel, x, (x,), direct)

    @staticmethod
    def backward(ctx, dy):
        no_double_backward("gelu")
        x, = ctx.saved_tensors
        return _elementwise(_gelu_bwd_kernel, x, (x, dy), direct)


# ---------------------------------------------------------------------------------------------
# public


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation; y has x's shape and dtype."""
    check_float_inputs("gelu", x=x)
    if torch.compiler.is_compiling():
        return _gelu_op(x)
    return _GeluFunction.apply(x)
