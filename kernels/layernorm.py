"""LayerNorm over the last dimension, and the fused residual add + LayerNorm of a transformer block.

    y = layer_norm(x, weight, bias, eps)                 # x: (..., C)
    s, y = add_layer_norm(x, delta, weight, bias, eps)   # s = x + delta, y = layer_norm(s)

Forward, per row of C elements (statistics in fp32 whatever the input dtype):
    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  xhat = (x - mean) * rstd
    y = xhat * w + b
Backward, with g = w * dy:
    dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))        (+ ds, the gradient of s, when fused)
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)
The fused add returns s too: the residual stream goes on, so s gets its own gradient ds, and
dx = ddelta = ds + dLN/ds. The sum s is rounded to its dtype before the statistics are taken, as
`x + delta` followed by `F.layer_norm` would do, so the backward recomputes xhat from s exactly.

Design: one program holds a (BLOCK_M, BLOCK_N >= C) tile of whole rows in registers (kernels/rowwise.py
picks the tile), so x is read once forward and (x, dy) once backward. dw and db are summed over rows in
fp32 by a fixed grid of persistent programs, one partial row per program, then the partials are added
by torch.sum: parallel, and deterministic run to run (no atomics). Fast up to C = 8192; C is limited to
rowwise.MAX_COLS (16384). Inputs may be non-contiguous (rows are copied to unit column stride when
needed); weight and bias are 1-D of length C, bias may be None. No double backward.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels.rowwise import persistent_programs, row_config


@triton.jit
def _layer_norm_fwd_kernel(
    X, DELTA, S, Y, W, B, MEAN, RSTD,    # X, DELTA, S, Y: (rows, C) with row strides; W, B: (C,); MEAN, RSTD: (rows,) fp32
    stride_x, stride_delta, stride_s, stride_y,
    n_rows, n_cols, eps,
    HAS_DELTA: tl.constexpr,             # fused residual add: s = x + delta is stored and normalized
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(DELTA + rows64 * stride_delta + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalize what was stored, as the unfused ops would
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, DY, DS, DX, W, MEAN, RSTD,        # X, DY, DS, DX: (rows, C) with row strides; W: (C,); MEAN, RSTD: (rows,)
    PARTIAL,                             # (2, programs, C) fp32: each program's sums over its rows of dw, db
    stride_x, stride_dy, stride_ds, stride_dx,
    n_rows, n_cols,
    HAS_DS: tl.constexpr,                # fused residual add: the sum's own gradient is added to dx
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # each program walks the row tiles pid, pid + programs, ...: a fixed order, so dw, db are reproducible
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c_xhat = tl.sum(g * xhat, axis=1) / n_cols
        c_one = tl.sum(g, axis=1) / n_cols
        dx = (g - c_one[:, None] - xhat * c_xhat[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(PARTIAL + pid * n_cols + cols, dw, mask=col_mask)
    tl.store(PARTIAL + (n_programs + pid) * n_cols + cols, db, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C) with unit column stride, a view where possible."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: torch.Tensor, delta, weight: torch.Tensor, bias) -> None:
    n_cols = x.shape[-1]
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_layer_norm: delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if weight.shape != (n_cols,) or (bias is not None and bias.shape != (n_cols,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({n_cols},), got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")


def _forward(x, delta, weight, bias, eps):
    """Launches the forward kernel; returns (s or None, y, mean, rstd), s and y shaped like x."""
    _check(x, delta, weight, bias)
    n_cols = x.shape[-1]
    x2 = _rows(x)
    n_rows = x2.shape[0]
    has_bias = bias is not None
    weight = weight.contiguous()
    bias = bias.contiguous() if has_bias else weight  # a placeholder pointer when HAS_BIAS is off
    out_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    # without delta, x and y stand in for delta and s: HAS_DELTA=False never touches them
    d2 = x2 if delta is None else _rows(delta)
    s = y if delta is None else torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    if n_rows > 0:
        cfg = row_config(n_cols)
        wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(n_rows, cfg.block_m),)](
            x2, d2, s, y, weight, bias, mean, rstd,
            x2.stride(0), d2.stride(0), s.stride(0), y.stride(0),
            n_rows, n_cols, eps,
            HAS_DELTA=delta is not None, HAS_BIAS=has_bias,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    shape = (*x.shape[:-1], n_cols)
    return (None if delta is None else s.view(shape)), y.view(shape), mean, rstd


def _backward(dy, ds, x, weight, mean, rstd):
    """Launches the backward kernel; returns dx and (dweight, dbias) stacked as (2, C) in weight's dtype.

    x is the normalized input (s when fused). A custom op's outputs may not alias one another, so the
    two weight gradients leave as one tensor and are split by the caller.

    dbias is computed whether or not there is a bias: one more fp32 accumulator, no extra traffic.
    """
    n_cols = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = dy2 if ds is None else _rows(ds)  # a placeholder when HAS_DS is off
    weight = weight.contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    cfg = row_config(n_cols)
    programs = persistent_programs(x.device)
    partial = torch.empty((2, programs, n_cols), dtype=torch.float32, device=x.device)
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        x2, dy2, ds2, dx, weight, mean, rstd, partial,
        x2.stride(0), dy2.stride(0), ds2.stride(0), dx.stride(0),
        n_rows, n_cols,
        HAS_DS=ds is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    return dx.view(x.shape), partial.sum(1).to(weight.dtype)  # one launch for both


# ---------------------------------------------------------------------------------------------
# custom ops, so that torch.compile traces the kernels without a graph break


@triton_op("gpt2::layer_norm_fwd", mutates_args={})
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@triton_op("gpt2::add_layer_norm_fwd", mutates_args={})
def _add_layer_norm_fwd(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, delta, weight, bias, eps)


@triton_op("gpt2::layer_norm_bwd", mutates_args={})
def _layer_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, ds, x, weight, mean, rstd)


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, (dweight, dbias) = _layer_norm_bwd(_grad_or_zeros(dy, x), None, x, weight, mean, rstd)
    return dx, dweight, dbias if ctx.has_bias else None, None


def _add_layer_norm_setup(ctx, inputs, output):
    x, delta, weight, bias, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.x_dtype, ctx.delta_dtype = x.dtype, delta.dtype


def _add_layer_norm_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dsum, (dweight, dbias) = _layer_norm_bwd(_grad_or_zeros(dy, s), ds, s, weight, mean, rstd)
    return dsum.to(ctx.x_dtype), dsum.to(ctx.delta_dtype), dweight, dbias if ctx.has_bias else None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
_add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


# ---------------------------------------------------------------------------------------------
# public functions and the PyTorch reference


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., C); y has x's dtype and shape."""
    y, _, _ = _layer_norm_fwd(x, weight, bias, eps)
    return y


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, layer_norm(x + delta)) in one pass: the residual stream and the next sublayer's input."""
    s, y, _, _ = _add_layer_norm_fwd(x, delta, weight, bias, eps)
    return s, y


def layer_norm_ref(x, weight, bias, eps=1e-5, upcast=True):
    """PyTorch's LayerNorm, computed in fp32 (or in fp64 when x is fp64) if upcast, else in x's dtype."""
    dtype = x.dtype
    if upcast:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        x, weight = x.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y.to(dtype)
