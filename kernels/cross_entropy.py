"""The language-model head and its cross-entropy in one op, without ever forming the full logits.

    loss = linear_cross_entropy(h, weight, targets)                     # mean over targets != -1
    losses = linear_cross_entropy(h, weight, targets, reduction="none")  # (...,) fp32, 0 where ignored

equals F.cross_entropy(h @ weight.T, targets, ignore_index=-1, reduction=...) with the softmax in fp32,
for h (..., C), weight (V, C) (all V rows: the model's tied wte / lm_head weight) and targets h.shape[:-1].

Forward, per row i with logits z = h_i W^T (V values) and target t_i:
    m = max_j z_j,  lse = m + log sum_j exp(z_j - m),  loss_i = lse - z_t      (0 where t_i is ignored)
    mean: loss = sum_i loss_i / n_valid,  n_valid = #{i: t_i != ignore_index};  sum: sum_i loss_i
Backward, with p = exp(z - lse) = softmax(z) and s_i the scale of row i:
    dz_i = (p - onehot(t_i)) * s_i  (0 for ignored rows),   dh = dz W,   dW = dz^T h
    mean: s_i = g / n_valid; sum: s_i = g (g the 0-d gradient of the loss); none: s_i = g_i.

Chunking: the rows go through in chunks of M rows, M chosen so that a chunk's logits take at most
CHUNK_BYTES (256 MiB) in the compute dtype, balanced over the chunks (GPT-2's V = 50304 in bf16: at most
2668 rows a chunk). Per chunk: logits = h_chunk @ W^T by cuBLAS, then one Triton program per row walks
the vocabulary in blocks of BLOCK_V with an online max / sum-exp in fp32, writes the row's loss and lse,
and, when gradients are wanted, a second walk overwrites the logits in place with dz (the logits are
dead by then: nothing else reads them); then dh_chunk = dz @ W and dW += dz^T h_chunk by cuBLAS.
- mean and sum compute the gradients in the forward (as Liger-Kernel's fused linear cross-entropy
  does) whenever grad mode is on and h or W requires grad, scaled by 1/n_valid read from a device
  tensor (no host sync); the backward only multiplies them by g.
- none saves h, W, targets and the per-row lse; its backward recomputes each chunk's logits and
  writes dz from the saved lse in a single walk, row i scaled by g_i.

Dtypes: the matmuls run in the compute dtype, autocast's when autocast is on (W is cast once per call,
not per chunk), else h's; the softmax statistics, the losses and the dW accumulator are fp32 (each
chunk's dz^T h is one cuBLAS matmul in the compute dtype, accumulated in fp32 inside it, added to the
fp32 total: one rounding per chunk, where the unfused op rounds the whole dW once). dh comes back in h's
dtype, dW in W's (the fp32 master weight); the loss is fp32.

Memory beyond the inputs, N rows, e bytes per element of the compute dtype: one logits chunk
(<= CHUNK_BYTES), W and h in the compute dtype if they differ from it (V*C*e, N*C*e), 8N for the
fp32 loss and lse; with gradients dh (N*C in h's dtype), the fp32 dW (4*V*C) and one V*C*e chunk
product. GPT-2 124M at N = 16K rows under bf16 autocast: about 0.7 GB, where the unfused head holds
bf16 logits, their fp32 copy and the fp32 softmax gradient, 10*N*V = 8.2 GB.

Design limits: targets outside [0, V) other than ignore_index are not checked (that would need a host
sync) and give garbage; a row whose logits are all -inf gives nan, as PyTorch does. Rows are
processed independently, so every output is deterministic. No label smoothing, no z-loss, no double
backward. Under torch.compile the chunk count is fixed at trace time: a new N means a new graph.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from kernels.launch import autocast_dtype, direct, traced

__all__ = ["linear_cross_entropy"]

CHUNK_BYTES = 256 << 20  # logits of one chunk, in the compute dtype
MAX_BLOCK_V = 4096       # vocabulary columns a program holds at once: 16 elements a thread with 8 warps
REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _cross_entropy_kernel(
    LOGITS,                  # (rows, V) contiguous, compute dtype: read, then overwritten with dz if WRITE_GRAD
    TARGETS,                 # (rows,) integer
    LOSS, LSE,               # (rows,) fp32: loss_i = lse_i - z_t (0 if ignored) and lse_i
    SCALE,                   # fp32: row i's gradient is multiplied by SCALE[i * scale_stride]
    n_cols, scale_stride, ignore_index,
    HAS_LSE: tl.constexpr,   # LSE holds the statistics already (a backward): read them, write no loss
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * n_cols
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(TARGETS + row).to(tl.int64)
    valid = target != ignore_index
    if HAS_LSE:
        lse = tl.load(LSE + row)
    else:
        # online log-sum-exp: the running sum is rescaled whenever the running max grows
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            z = tl.load(z_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_target = tl.load(z_row + target, mask=valid, other=0.0).to(tl.float32)  # before dz overwrites it
        tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))
        tl.store(LSE + row, lse)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(SCALE + row * scale_stride), 0.0)  # ignored rows: dz = 0 exactly
        for start in range(0, n_cols, BLOCK_V):
            offsets = start + cols
            mask = offsets < n_cols
            z = tl.load(z_row + offsets, mask=mask, other=0.0).to(tl.float32)
            dz = (tl.exp(z - lse) - tl.where(offsets == target, 1.0, 0.0)) * scale
            tl.store(z_row + offsets, dz.to(LOGITS.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers


def default_chunk_rows(n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    """Rows a chunk, so that its (rows, n_cols) logits take at most CHUNK_BYTES, balanced over the chunks:
    16K rows of GPT-2 in bf16 go as 7 chunks of 2341 rows rather than 6 of 2668 and one of 376."""
    most = max(1, CHUNK_BYTES // (n_cols * dtype.itemsize))
    n_chunks = max(1, triton.cdiv(n_rows, most))
    return max(1, triton.cdiv(n_rows, n_chunks))


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: weight must be (V >= 1, C={h.shape[-1]}), got {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1] or targets.is_floating_point():
        raise ValueError(f"linear_cross_entropy: targets must be integers of shape {tuple(h.shape[:-1])}, "
                         f"got {targets.dtype} {tuple(targets.shape)}")


def _launch_rows(logits, targets, loss, lse, scale, scale_stride, ignore_index, launch):
    """The kernel over the rows of one chunk: logits (M, V) contiguous, the rest sliced to the chunk.
    loss None: lse holds the rows' statistics already (a backward). scale None: no gradient."""
    n_rows, n_cols = logits.shape
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    has_lse, write_grad = loss is None, scale is not None
    launch(_cross_entropy_kernel)[(n_rows,)](
        logits, targets, lse if has_lse else loss, lse, scale if write_grad else lse,  # lse: an unused stand-in
        n_cols, scale_stride, ignore_index,
        HAS_LSE=has_lse, WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=max(4, min(8, block_v // 512)),
    )


def _accumulate(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw (fp32) += a @ b; a 16-bit product is rounded once to its dtype, then added in fp32."""
    if a.dtype == dw.dtype:
        dw.addmm_(a, b)
    else:
        dw.add_(a @ b)


def _sweep(h, weight, targets, ignore_index, compute_dtype, chunk_rows, launch, scale=None, lse=None):
    """One pass over the row chunks of h (N, C), weight (V, C), targets (N,).

    scale given: the gradients too, row i's scaled by scale[i] (scale (N,)) or scale[0] (scale (1,)).
    lse given (N,): the statistics of a forward; no losses are computed.
    Returns losses (N,) fp32 (None when lse is given), lse (N,) fp32, dh (N, C) in h's dtype and dw (V, C)
    fp32, both None without scale."""
    n_rows, (n_cols, width) = h.shape[0], weight.shape
    hc, wc = h.to(compute_dtype), weight.to(compute_dtype)  # once per call, not per chunk
    has_lse, with_grads = lse is not None, scale is not None
    losses = None if has_lse else torch.empty(n_rows, dtype=torch.float32, device=h.device)
    lse = lse if has_lse else torch.empty(n_rows, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if with_grads else None
    dw = torch.zeros((n_cols, width), dtype=torch.float32, device=h.device) if with_grads else None
    per_row = with_grads and scale.shape[0] == n_rows and n_rows > 1
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(n_rows, start + chunk_rows))
        logits = hc[rows] @ wc.T                                                   # (M, V)
        _launch_rows(logits, targets[rows], None if has_lse else losses[rows], lse[rows],
                     (scale[rows] if per_row else scale) if with_grads else None, int(per_row), ignore_index, launch)
        if with_grads:                                                             # logits now hold dz
            dh[rows] = logits @ wc                                                 # (M, C)
            _accumulate(dw, logits.T, hc[rows])                                    # (V, C)
    return losses, lse, dh, dw


def _reduced(h, weight, targets, ignore_index, mean, compute_dtype, with_grads, chunk_rows, launch):
    """Reduction mean or sum: the 0-d fp32 loss, and dh, dW of that loss (empty without with_grads)."""
    if mean:
        n_valid = (targets != ignore_index).sum().to(torch.float32).reshape(1)   # on the device: no sync
        scale = 1.0 / n_valid                           # all ignored: inf, but ignored rows take scale 0
    else:
        scale = torch.ones(1, dtype=torch.float32, device=h.device)
    losses, _, dh, dw = _sweep(h, weight, targets, ignore_index, compute_dtype, chunk_rows, launch,
                               scale=scale if with_grads else None)
    loss = losses.sum() * scale[0] if mean else losses.sum()  # all ignored with mean: 0 * inf = nan, as PyTorch
    if not with_grads:
        return loss, h.new_empty(0), weight.new_empty(0)
    return loss, dh, dw.to(weight.dtype)


def _per_token(h, weight, targets, ignore_index, compute_dtype, chunk_rows, launch):
    """Reduction none: (losses, lse), each (N,) fp32."""
    losses, lse, _, _ = _sweep(h, weight, targets, ignore_index, compute_dtype, chunk_rows, launch)
    return losses, lse


def _per_token_backward(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows, launch):
    """dh, dW of sum_i dlosses_i * loss_i, from the saved lse."""
    scale = dlosses.to(torch.float32).contiguous()
    _, _, dh, dw = _sweep(h, weight, targets, ignore_index, compute_dtype, chunk_rows, launch, scale=scale, lse=lse)
    return dh, dw.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# the torch.compile path: custom ops that launch through wrap_triton


@triton_op("gpt2::linear_cross_entropy_reduced", mutates_args={})
def _reduced_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool,
                compute_dtype: torch.dtype, with_grads: bool,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _reduced(h, weight, targets, ignore_index, mean, compute_dtype, with_grads, chunk_rows, traced)


@triton_op("gpt2::linear_cross_entropy_none", mutates_args={})
def _per_token_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  compute_dtype: torch.dtype, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token(h, weight, targets, ignore_index, compute_dtype, chunk_rows, traced)


@triton_op("gpt2::linear_cross_entropy_none_bwd", mutates_args={})
def _per_token_bwd_op(dlosses: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, ignore_index: int, compute_dtype: torch.dtype,
                      chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token_backward(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows, traced)


def _reduced_op_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _reduced_op_backward(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    return dh * dloss, dw * dloss, None, None, None, None, None, None


def _per_token_op_setup(ctx, inputs, output):
    h, weight, targets, ctx.ignore_index, ctx.compute_dtype, ctx.chunk_rows = inputs
    ctx.save_for_backward(h, weight, targets, output[1])


def _per_token_op_backward(ctx, dlosses, _dlse):
    dh, dw = _per_token_bwd_op(dlosses, *ctx.saved_tensors, ctx.ignore_index, ctx.compute_dtype, ctx.chunk_rows)
    return dh, dw, None, None, None, None


_reduced_op.register_autograd(_reduced_op_backward, setup_context=_reduced_op_setup)
_per_token_op.register_autograd(_per_token_op_backward, setup_context=_per_token_op_setup)


# ---------------------------------------------------------------------------------------------
# the eager path: autograd.Functions that launch directly


class _ReducedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, mean, compute_dtype, with_grads, chunk_rows):
        loss, dh, dw = _reduced(h, weight, targets, ignore_index, mean, compute_dtype, with_grads, chunk_rows,
                                direct)
        ctx.save_for_backward(dh, dw)  # gradients of the forward, not inputs: never modified afterwards
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        return dh * dloss, dw * dloss, None, None, None, None, None, None


class _PerTokenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, compute_dtype, chunk_rows):
        losses, lse = _per_token(h, weight, targets, ignore_index, compute_dtype, chunk_rows, direct)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.ignore_index, ctx.compute_dtype, ctx.chunk_rows = ignore_index, compute_dtype, chunk_rows
        return losses

    @staticmethod
    def backward(ctx, dlosses):
        dh, dw = _per_token_backward(dlosses, *ctx.saved_tensors, ctx.ignore_index, ctx.compute_dtype,
                                     ctx.chunk_rows, direct)
        return dh, dw, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public function and the PyTorch reference


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         ignore_index: int = -1, chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index, reduction) without the full logits; see the module
    docstring. h (..., C), weight (V, C), targets h.shape[:-1]. Returns a 0-d fp32 loss ("mean", "sum") or
    fp32 losses shaped like targets ("none"). chunk_rows: rows a chunk (default: default_chunk_rows)."""
    _check(h, weight, targets, reduction)
    compute_dtype = autocast_dtype(h.device) or h.dtype
    flat_h, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk_rows = int(chunk_rows or default_chunk_rows(flat_h.shape[0], weight.shape[0], compute_dtype))
    if reduction == "none":
        args = (flat_h, weight, flat_targets, ignore_index, compute_dtype, chunk_rows)
        losses = _per_token_op(*args)[0] if torch.compiler.is_compiling() else _PerTokenFunction.apply(*args)
        return losses.view(targets.shape)
    with_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    args = (flat_h, weight, flat_targets, ignore_index, reduction == "mean", compute_dtype, with_grads, chunk_rows)
    if torch.compiler.is_compiling():
        return _reduced_op(*args)[0]
    return _ReducedFunction.apply(*args)


def linear_cross_entropy_ref(h, weight, targets, reduction="mean", ignore_index=-1):
    """The unfused op: the full logits, the softmax in fp32 (fp64 for fp64 inputs)."""
    logits = h @ weight.T
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction).view(targets.shape if reduction == "none" else ())
