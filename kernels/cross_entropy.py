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
For mean and sum, s_i = 1 in the kernel and g / n_valid (or g) multiplies dh and dW afterwards.

Chunking: the rows go through in chunks of M rows, M chosen so that a chunk's logits take at most
CHUNK_BYTES (256 MiB) in the compute dtype, balanced over the chunks (GPT-2's V = 50304 in bf16: at most
2668 rows, so 16K rows go as 7 chunks of 2341). Per chunk: logits = h_chunk @ W^T by cuBLAS, then one
Triton program per row walks the vocabulary in blocks of BLOCK_V with an online max / sum-exp in fp32,
writes the row's loss and lse, and, when gradients are wanted, a second walk overwrites the logits in
place with dz (the logits are dead by then: nothing else reads them); then dh_chunk = dz @ W and
dW += dz^T h_chunk by cuBLAS.
- mean and sum compute the gradients in the forward (as Liger-Kernel's fused linear cross-entropy
  does) whenever grad mode is on and h or W requires grad: those of the summed loss, whose dz and dh
  are of order 1, so that fp16 does not underflow before a GradScaler's scale arrives in g (1/n_valid
  first, at N = 16K rows, would push softmax probabilities of 1e-5 below fp16's smallest subnormal).
  The backward multiplies them by g / n_valid, n_valid counted on the device (no host sync).
- none saves h, W, targets and the per-row lse; its backward recomputes each chunk's logits and
  writes dz from the saved lse in a single walk, row i scaled by g_i.

Dtypes: the matmuls run in the compute dtype, autocast's when autocast is on (W is cast once per call,
not per chunk), else h's; the softmax statistics, the losses and the dW accumulator are fp32 (each
chunk's dz^T h is one cuBLAS matmul in the compute dtype, accumulated in fp32 inside it, added to the
fp32 total: one rounding per chunk, where the unfused op rounds the whole dW once). dh comes back in h's
dtype, dW in W's (the fp32 master weight); the loss is fp32. In fp16 a chunk's dW row for token j holds
up to (rows whose target is j) * |h|, before a GradScaler's scale: it could pass fp16's 65504 only in a
chunk of thousands of rows with one target and |h| above about 25 (bf16 has fp32's range).

Memory beyond the inputs, N rows, e bytes per element of the compute dtype: one logits chunk
(<= CHUNK_BYTES), W and h in the compute dtype if they differ from it (V*C*e, N*C*e), 8N for the
fp32 loss and lse; with gradients dh (N*C in h's dtype), the fp32 dW (4*V*C) and one V*C*e chunk
product. GPT-2 124M at N = 16K rows under bf16 autocast: about 0.7 GB, where the unfused head peaks at
its bf16 logits, their fp32 copy and the fp32 log-softmax, 10*N*V = 8.2 GB, and keeps the log-softmax
(4*N*V = 3.3 GB) until the backward.

Design limits: targets outside [0, V) other than ignore_index are not refused (that would need a host
sync): their rows' losses are NaN, so the mean and sum are too; a row whose logits are all -inf gives
nan, as PyTorch does. Rows are
processed independently, so every output is deterministic. No label smoothing, no z-loss, no double
backward. Under torch.compile the chunk count is fixed at trace time: a new N means a new graph.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels.launch import (
    autocast_dtype, cdiv, check_float_inputs, direct, next_power_of_2, no_double_backward, to_dtype, traced,
)

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
        # before dz overwrites it; a target outside [0, V) reads nothing and makes the loss NaN (not a host sync)
        in_range = (target >= 0) & (target < n_cols)
        z_target = tl.load(z_row + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
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
    n_chunks = max(1, cdiv(n_rows, most))
    return max(1, cdiv(n_rows, n_chunks))


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check_float_inputs("linear_cross_entropy", h=h, weight=weight)
    if h.dim() == 0:
        raise ValueError("linear_cross_entropy: h must be (..., C), got a 0-d tensor")
    if targets.device != h.device:
        raise ValueError(f"linear_cross_entropy: h is on {h.device} but targets on {targets.device}: "
                         "move them to one device")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: weight must be (V >= 1, C={h.shape[-1]}), got {tuple(weight.shape)}")
    # unsigned targets would hold ignore_index -1 as 255 (uint8), a class the valid-row count would drop
    not_indices = targets.is_floating_point() or targets.is_complex() or not targets.dtype.is_signed
    if targets.shape != h.shape[:-1] or not_indices:
        raise ValueError(f"linear_cross_entropy: targets must be signed integers (int64) of shape "
                         f"{tuple(h.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")


def _launch_rows(logits, targets, loss, lse, scale, scale_stride, ignore_index, launch):
    """The kernel over the rows of one chunk: logits (M, V) contiguous, the rest sliced to the chunk.
    loss None: lse holds the rows' statistics already (a backward). scale None: no gradient."""
    n_rows, n_cols = logits.shape
    block_v = min(MAX_BLOCK_V, next_power_of_2(n_cols))
    has_lse, write_grad = loss is None, scale is not None
    launch(_cross_entropy_kernel)[(n_rows,)](
        logits, targets, lse if has_lse else loss, lse, scale if write_grad else lse,  # lse: an unused stand-in
        n_cols, scale_stride, ignore_index,
        HAS_LSE=has_lse, WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=max(4, min(8, block_v // 512)),
    )


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place when out has the product's dtype (no temporary, no copy kernel)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


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
    hc, wc = to_dtype(h, compute_dtype), to_dtype(weight, compute_dtype)  # once per call, not per chunk
    has_lse, with_grads = lse is not None, scale is not None
    losses = None if has_lse else torch.empty(n_rows, dtype=torch.float32, device=h.device)
    lse = lse if has_lse else torch.empty(n_rows, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if with_grads else None
    dw = torch.zeros((n_cols, width), dtype=torch.float32, device=h.device) if with_grads else None
    per_row = with_grads and scale.shape[0] == n_rows and n_rows > 1
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        h_rows = _rows(hc, start, stop)
        logits = h_rows @ wc.T                                                     # (M, V)
        _launch_rows(logits, _rows(targets, start, stop), None if has_lse else _rows(losses, start, stop),
                     _rows(lse, start, stop), (_rows(scale, start, stop) if per_row else scale) if with_grads else None,
                     int(per_row), ignore_index, launch)
        if with_grads:                                                             # logits now hold dz
            _mm_into(_rows(dh, start, stop), logits, wc)                           # (M, C)
            _accumulate(dw, logits.T, h_rows)                                      # (V, C)
    return losses, lse, dh, dw


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """x[start:stop], without making a view of all of x (a few us of host time a call)."""
    return x if start == 0 and stop == x.shape[0] else x[start:stop]


def _count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-d fp32: how many targets are not ignore_index, counted on the device (no host sync)."""
    return (targets != ignore_index).sum(dtype=torch.float32)


def _forward(h, weight, targets, ignore_index, reduction, compute_dtype, with_grads, chunk_rows, launch):
    """Returns the loss (0-d fp32; fp32 shaped like targets for "none"), the rows' lse (N,) fp32, and
    for "mean" and "sum" with with_grads the gradients of the summed loss, dh (h's shape and dtype) and
    dW (W's dtype), else empty tensors."""
    _check(h, weight, targets)
    flat_h, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1).contiguous()  # the kernel reads rows
    # mean and sum: the gradients of the summed loss; the backward scales them (see the docstring)
    scale = torch.ones(1, dtype=torch.float32, device=h.device) if with_grads and reduction != "none" else None
    losses, lse, dh, dw = _sweep(flat_h, weight, flat_targets, ignore_index, compute_dtype, chunk_rows, launch,
                                 scale=scale)
    if reduction == "none":
        loss = losses.view(targets.shape)
    elif reduction == "sum":
        loss = losses.sum()
    else:  # every target ignored: 0 / 0 = nan, as PyTorch
        loss = losses.sum() / _count_valid(flat_targets, ignore_index)
    if scale is None:
        return loss, lse, h.new_empty(0), weight.new_empty(0)
    return loss, lse, dh.view(h.shape), to_dtype(dw, weight.dtype)


def _backward(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows, launch):
    """dh, dW of sum_i dlosses_i * loss_i (reduction "none"), from the forward's lse; dlosses shaped like targets."""
    scale = dlosses.reshape(-1).to(torch.float32).contiguous()  # the gradient of a sum arrives expanded: stride 0
    flat_h, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1).contiguous()
    _, _, dh, dw = _sweep(flat_h, weight, flat_targets, ignore_index, compute_dtype, chunk_rows, launch,
                          scale=scale, lse=lse)
    return dh.view(h.shape), to_dtype(dw, weight.dtype)


# ---------------------------------------------------------------------------------------------
# autograd, shared by both paths: what is saved, and the gradients


def _save(ctx, inputs, output):
    """mean, sum: the gradients the forward computed; none: what the backward recomputes the logits from."""
    h, weight, targets, ctx.ignore_index, ctx.reduction, ctx.compute_dtype, _, ctx.chunk_rows = inputs
    _, lse, dh, dw = output
    if ctx.reduction == "none":
        ctx.save_for_backward(h, weight, targets, lse)
    else:
        ctx.save_for_backward(dh, dw, targets)  # dh, dw: made by the forward, never modified afterwards


def _gradients(ctx, dloss, backward):
    """dh, dW for the loss's gradient dloss; backward(dlosses, h, weight, targets, lse, ...) for "none"."""
    if ctx.reduction == "none":
        return backward(dloss, *ctx.saved_tensors, ctx.ignore_index, ctx.compute_dtype, ctx.chunk_rows)
    dh, dw, targets = ctx.saved_tensors
    if ctx.reduction == "mean":  # every target ignored: dh, dw are 0, and stay 0
        dloss = dloss / _count_valid(targets.reshape(-1), ctx.ignore_index).clamp(min=1.0)
    return dh * dloss, dw * dloss


# ---------------------------------------------------------------------------------------------
# the torch.compile path: custom ops that launch through wrap_triton


@triton_op("gpt2::linear_cross_entropy_fwd", mutates_args={})
def _linear_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             reduction: str, compute_dtype: torch.dtype, with_grads: bool, chunk_rows: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(h, weight, targets, ignore_index, reduction, compute_dtype, with_grads, chunk_rows, traced)


@triton_op("gpt2::linear_cross_entropy_bwd", mutates_args={})
def _linear_cross_entropy_bwd_op(dlosses: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 lse: torch.Tensor, ignore_index: int, compute_dtype: torch.dtype,
                                 chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows, traced)


def _op_backward(ctx, dloss, _dlse, _ddh, _ddw):
    return *_gradients(ctx, dloss, _linear_cross_entropy_bwd_op), None, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_op_backward, setup_context=_save)


# ---------------------------------------------------------------------------------------------
# the eager path: an autograd.Function that launches directly


def _backward_direct(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows):
    return _backward(dlosses, h, weight, targets, lse, ignore_index, compute_dtype, chunk_rows, direct)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        outputs = _forward(*inputs, direct)
        _save(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, dloss):
        no_double_backward("linear_cross_entropy")
        return *_gradients(ctx, dloss, _backward_direct), None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public function (its PyTorch reference is gpt2.ops.torch_cross_entropy)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         ignore_index: int = -1, chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index, reduction) without the full logits; see the module
    docstring. h (..., C), weight (V, C), targets h.shape[:-1]. Returns a 0-d fp32 loss ("mean", "sum") or
    fp32 losses shaped like targets ("none"). chunk_rows: rows a chunk (default: default_chunk_rows)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be at least 1 (None: the default), got {chunk_rows}")
    compute_dtype = autocast_dtype(h.device) or h.dtype
    chunk_rows = int(chunk_rows or default_chunk_rows(targets.numel(), weight.shape[0], compute_dtype))
    # mean and sum compute their gradients in the forward, but only when a backward can follow
    with_grads = reduction != "none" and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    args = (h, weight, targets, ignore_index, reduction, compute_dtype, with_grads, chunk_rows)
    if torch.compiler.is_compiling():
        return _linear_cross_entropy_op(*args)[0]
    return _LinearCrossEntropyFunction.apply(*args)
