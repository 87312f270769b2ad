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

Output dtypes: s has the promoted dtype of x and delta. y has x's (or s's) dtype, except under autocast,
where it is written in the autocast dtype: y always feeds a matmul, which would cast it anyway. The
gradients leave in their inputs' dtypes. dx and ddelta are the same values: when delta is narrower than
x (as in the model) the kernel writes both, so the narrower one is not a cast kernel of its own; when x
is the narrower one, its dx is a cast of ddelta after the kernel (no GPT-2 path does that). In the model
under bf16 autocast (fp32 residual x, bf16 sublayer output delta) that is 12 bytes an element forward
(read 4 + 2, write 4 + 2) instead of 20 (a 4-byte y, then autocast's cast reading it and writing 2), and
16 backward (read s, ds, a 2-byte dy; write dx, ddelta) instead of 26 (a cast of dy to 4 bytes, and of
dx to ddelta).

Design: one program holds a (BLOCK_M, BLOCK_N >= C) tile of whole rows in registers (kernels/rowwise.py
picks the tile), so x is read once forward and (x, dy) once backward. dw and db are summed over rows in
fp32 by a fixed grid of persistent programs, one partial row per program, then the partials are added
by torch.sum: parallel, and deterministic run to run (no atomics). Fast up to C = 8192; C is limited to
rowwise.MAX_COLS (16384). Rows are read contiguous (a strided input is copied first); weight and bias
are 1-D of length C, bias may be None. No double backward.

Not done, on static evidence (compiled for sm_90, the model's dtypes): software-pipelining the backward's
row loop, `tl.range(..., num_stages=3)`, makes its loads cp.async copies of the next two tiles into
shared memory (25 to 45 KB a program), so that a program's next rows are in flight while it reduces
the current ones. At C = 768 and 1024 it stays at 112 to 128 registers (Triton 3.6 and 3.9): 4 programs
still fit a multiprocessor. At C = 1280 and 1600 it takes 150 to 179, so 3 fit. Whether the prefetch
beats the loop as it is (4 programs a multiprocessor, each waiting on its own loads) is for a GPU to say.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels.launch import autocast_dtype, cdiv, check_float_inputs, direct, no_double_backward, to_dtype, traced
from kernels.rowwise import persistent_programs, row_config

__all__ = ["layer_norm", "add_layer_norm"]


@triton.jit
def _layer_norm_fwd_kernel(
    X, DELTA, S, Y, W, B,                # X, DELTA, S, Y: (rows, C) contiguous; W, B: (C,)
    STATS,                               # (2, rows) fp32: mean, then rstd
    n_rows, n_cols, eps,
    HAS_DELTA: tl.constexpr,             # fused residual add: s = x + delta is stored and normalized
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    n_rows, n_cols = tl.cast(n_rows, tl.int32), tl.cast(n_cols, tl.int32)  # ints may come as i64 (_check: < 2**31)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(DELTA + offsets, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + offsets, s, mask=mask)
        x = s.to(tl.float32)  # normalize what was stored, as the unfused ops would
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(STATS + rows, mean, mask=row_mask)
    tl.store(STATS + n_rows + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, DY, DS, DX, DDELTA, W,            # X, DY, DS, DX, DDELTA: (rows, C) contiguous; W: (C,)
    STATS,                               # (2, rows) fp32: mean, then rstd
    PARTIAL,                             # (2, programs, C) fp32: each program's sums over its rows of dw, db
    n_rows, n_cols,
    HAS_DS: tl.constexpr,                # fused residual add: the sum's own gradient is added to dx
    HAS_DDELTA: tl.constexpr,            # dx is also written in delta's narrower dtype, as ddelta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ints typed i64 (inductor's type for an int it cannot prove fits 32 bits) made 64-bit index math that
    # took 27 more registers a thread at C = 1280: 3 programs a multiprocessor for a grid of 4. _check keeps
    # rows < 2**31, so the kernel indexes in 32 bits whatever the width its ints arrive in.
    n_rows, n_cols = tl.cast(n_rows, tl.int32), tl.cast(n_cols, tl.int32)
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
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(STATS + rows, mask=row_mask, other=0.0)
        rstd = tl.load(STATS + n_rows + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c_xhat = tl.sum(g * xhat, axis=1) / n_cols
        c_one = tl.sum(g, axis=1) / n_cols
        dx = (g - c_one[:, None] - xhat * c_xhat[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + offsets, mask=mask, other=0.0).to(tl.float32)
        # ddelta first: stored after dx, without HAS_DS, Triton 3.6 took 142 registers at C = 1280 and 1600,
        # so 3 programs of the persistent grid's 4 fit a multiprocessor (two waves); this order takes 128
        if HAS_DDELTA:
            tl.store(DDELTA + offsets, dx.to(DDELTA.dtype.element_ty), mask=mask)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(PARTIAL + pid * n_cols + cols, dw, mask=col_mask)
    tl.store(PARTIAL + (n_programs + pid) * n_cols + cols, db, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# launchers


def _check(x: torch.Tensor, delta, weight: torch.Tensor, bias) -> None:
    if weight is None or x.dim() == 0:
        raise ValueError("layer_norm takes x of shape (..., C) and a weight of shape (C,), got "
                         f"{'a 0-d x' if x.dim() == 0 else 'weight None'} (F.layer_norm, --kernels=torch, takes none)")
    check_float_inputs("layer_norm", x=x, delta=delta, weight=weight, bias=bias)
    n_cols = x.shape[-1]
    if x.numel() >= 2**31 * max(n_cols, 1):
        raise ValueError(f"layer_norm takes fewer than 2**31 rows, got {x.numel() // n_cols}: split the batch")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_layer_norm: delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if weight.shape != (n_cols,) or (bias is not None and bias.shape != (n_cols,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({n_cols},), got "
                         f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")


def _forward(x, delta, weight, bias, eps, out_dtype, launch):
    """Returns s (None without delta) and y, shaped like x, and the (2, rows) fp32 mean and rstd."""
    _check(x, delta, weight, bias)
    has_delta = delta is not None
    x, weight = x.contiguous(), weight.contiguous()  # the kernel reads weight and bias as dense rows of C
    bias = bias.contiguous() if bias is not None else None
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    s_dtype = torch.promote_types(x.dtype, delta.dtype) if has_delta else x.dtype
    y = torch.empty_like(x, dtype=out_dtype or s_dtype)
    stats = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)
    # without delta, x and y stand in for delta and s: HAS_DELTA=False never touches them
    delta = delta.contiguous() if has_delta else x
    s = torch.empty_like(x, dtype=s_dtype) if has_delta else y
    cfg = row_config(n_cols)  # a row too long is refused here, not only in the backward, with no rows too
    if n_rows > 0:
        launch(_layer_norm_fwd_kernel)[(cdiv(n_rows, cfg.block_m),)](
            x, delta, s, y, weight, bias if bias is not None else weight, stats, n_rows, n_cols, eps,
            HAS_DELTA=has_delta, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )
    return (s if has_delta else None), y, stats


def _backward(dy, ds, x, weight, stats, delta_dtype, launch):
    """Returns dx, ddelta and (dweight, dbias) stacked as (2, C) in weight's dtype; x is the normalized
    input (s when fused). ddelta is dx in delta_dtype, written by the kernel when that differs from
    x's dtype (fp32 residual, bf16 sublayer output: one 2-byte write instead of a cast kernel's read
    and write), else None. dbias is computed whether or not there is a bias: one more fp32
    accumulator, no extra traffic."""
    has_ds = ds is not None
    x, dy, weight = x.contiguous(), dy.contiguous(), weight.contiguous()
    ds = ds.contiguous() if has_ds else dy  # a placeholder when HAS_DS is off
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    dx = torch.empty_like(x)
    has_ddelta = delta_dtype is not None and delta_dtype != x.dtype
    ddelta = torch.empty_like(x, dtype=delta_dtype) if has_ddelta else None
    cfg = row_config(n_cols)
    programs = persistent_programs(x.device, cfg.programs_per_sm)
    partial = torch.empty((2, programs, n_cols), dtype=torch.float32, device=x.device)
    launch(_layer_norm_bwd_kernel)[(programs,)](
        x, dy, ds, dx, ddelta if has_ddelta else dx, weight, stats, partial, n_rows, n_cols,
        HAS_DS=has_ds, HAS_DDELTA=has_ddelta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    return dx, ddelta, to_dtype(partial.sum(1), weight.dtype)


# ---------------------------------------------------------------------------------------------
# autograd, shared by both paths: what is saved, and the gradients from the backward launcher


def _save(ctx, normalized, weight, bias, stats, x_dtype, delta_dtype):
    ctx.save_for_backward(normalized, weight, stats)
    # an unused output's gradient arrives as None, not as zeros the kernel would read (the model discards
    # the final LayerNorm's sum: B*T*C fp32 zeros written and read back every step)
    ctx.set_materialize_grads(False)
    ctx.has_bias, ctx.x_dtype, ctx.delta_dtype = bias is not None, x_dtype, delta_dtype


def _gradients(ctx, ds, dy, backward):
    """dx, ddelta (None without delta), dweight, dbias, from backward(dy, ds, s, weight, stats, delta_dtype).
    Only s used (dy None): the weight and bias get no gradient, as from F.layer_norm."""
    s, weight, stats = ctx.saved_tensors
    dsum, ddelta, dweight_dbias = backward(torch.zeros_like(s) if dy is None else dy, ds, s, weight, stats,
                                           ctx.delta_dtype)
    if ctx.delta_dtype is None:
        ddelta = None
    elif ddelta is None or ddelta.shape != dsum.shape:  # delta has x's dtype: its gradient is dx itself
        ddelta = dsum
    dweight, dbias = (None, None) if dy is None else dweight_dbias.unbind()  # unbind: one call, not an iteration
    return to_dtype(dsum, ctx.x_dtype), ddelta, dweight, dbias if ctx.has_bias else None


# ---------------------------------------------------------------------------------------------
# the torch.compile path: custom ops that launch through wrap_triton


@triton_op("gpt2::layer_norm_fwd", mutates_args={})
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    _, y, stats = _forward(x, None, weight, bias, eps, out_dtype, traced)
    return y, stats


@triton_op("gpt2::add_layer_norm_fwd", mutates_args={})
def _add_layer_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, delta, weight, bias, eps, out_dtype, traced)


@triton_op("gpt2::layer_norm_bwd", mutates_args={})
def _layer_norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                       stats: torch.Tensor, delta_dtype: torch.dtype | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a custom op's outputs may not alias one another, so dweight and dbias leave as one (2, C) tensor,
    # and returns tensors: a ddelta that dx stands for is an empty one
    dx, ddelta, dweight_dbias = _backward(dy, ds, x, weight, stats, delta_dtype, traced)
    return dx, x.new_empty((0,)) if ddelta is None else ddelta, dweight_dbias


def _layer_norm_op_setup(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _save(ctx, x, weight, bias, output[1], x.dtype, None)


def _layer_norm_op_backward(ctx, dy, _dstats):
    dx, _, dweight, dbias = _gradients(ctx, None, dy, _layer_norm_bwd_op)
    return dx, dweight, dbias, None, None


def _add_layer_norm_op_setup(ctx, inputs, output):
    x, delta, weight, bias, _, _ = inputs
    s, _, stats = output
    _save(ctx, s, weight, bias, stats, x.dtype, delta.dtype)


def _add_layer_norm_op_backward(ctx, ds, dy, _dstats):
    return *_gradients(ctx, ds, dy, _layer_norm_bwd_op), None, None


_layer_norm_op.register_autograd(_layer_norm_op_backward, setup_context=_layer_norm_op_setup)
_add_layer_norm_op.register_autograd(_add_layer_norm_op_backward, setup_context=_add_layer_norm_op_setup)


# ---------------------------------------------------------------------------------------------
# the eager path: an autograd.Function that launches directly


def _backward_direct(dy, ds, x, weight, stats, delta_dtype):
    return _backward(dy, ds, x, weight, stats, delta_dtype, direct)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, out_dtype):
        s, y, stats = _forward(x, delta, weight, bias, eps, out_dtype, direct)
        _save(ctx, x if s is None else s, weight, bias, stats, x.dtype, None if delta is None else delta.dtype)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        no_double_backward("layer_norm")
        return *_gradients(ctx, ds, dy, _backward_direct), None, None


# ---------------------------------------------------------------------------------------------
# public functions and the PyTorch reference


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., C); y has x's shape, and x's dtype outside autocast."""
    out_dtype = autocast_dtype(x.device)
    if torch.compiler.is_compiling():
        return _layer_norm_op(x, weight, bias, eps, out_dtype)[0]
    return _LayerNormFunction.apply(x, None, weight, bias, eps, out_dtype)[1]


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, layer_norm(x + delta)) in one pass: the residual stream and the next sublayer's input.
    delta None: (x, layer_norm(x))."""
    if delta is None:
        return x, layer_norm(x, weight, bias, eps)
    out_dtype = autocast_dtype(x.device)
    if torch.compiler.is_compiling():
        s, y, _ = _add_layer_norm_op(x, delta, weight, bias, eps, out_dtype)
        return s, y
    return _LayerNormFunction.apply(x, delta, weight, bias, eps, out_dtype)


def layer_norm_ref(x, weight, bias, eps=1e-5, upcast=True):
    """PyTorch's LayerNorm, computed in fp32 (or in fp64 when x is fp64) if upcast, else in x's dtype."""
    dtype = x.dtype
    if upcast:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        x, weight = x.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y.to(dtype)
