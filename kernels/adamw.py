"""Fused AdamW: one pass over all parameters of a param group, gradient clipping folded in.

    opt = FusedAdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss.backward()
    norm = opt.clip_grad_norm_(1.0)   # global grad norm (0-d fp32 tensor); the clip is applied by step()
    opt.step()
    opt.zero_grad(set_to_none=True)

The math is torch.optim.AdamW's, per parameter p with gradient g at its own step count t (a parameter
whose grad is None is skipped, its t included):

    g <- g * min(1, max_norm / (norm + 1e-6))       only after clip_grad_norm_(max_norm)
    p <- p * (1 - lr * weight_decay)                decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g                exp_avg
    v <- beta2 * v + (1 - beta2) * g * g            exp_avg_sq
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Loads in the params' dtype (fp32, bf16 or fp16), computes in fp32, keeps exp_avg, exp_avg_sq and step in
fp32 (step as a 0-d fp32 tensor on the params' device, like torch's fused AdamW), so a state_dict moves
between this class and torch.optim.AdamW both ways. The bias corrections 1 - beta^t are computed in fp32
as -expm1(t * log1p(-(1 - beta))), with log1p and expm1 written to keep full fp32 accuracy: the plain
1 - exp(t * log(beta)) would lose four digits to cancellation at beta = 0.999, and fp64 arithmetic is
slow on most GPUs (no kernel of this project does any).

Design: a table of addresses, not flat buffers. Each step builds (and caches while nothing moved) an
int64 table with one row per tensor -- the addresses of param, grad, exp_avg, exp_avg_sq and step,
and the numel -- and a block table naming, for every program, its tensor and its BLOCK-sized block
there. One launch then covers every full block of a group, a second one the partial last block of each
tensor: the full-block launch runs without a mask (a mask against a numel read from memory would stop
the loads from vectorising), the tail launch is a few hundred programs at most. Flat buffers would save
building the table, but they need the parameters, and the gradients autograd allocates, to be views
into one buffer -- which fights zero_grad(set_to_none=True), DDP's buckets, checkpoint loading and
weight tying. The table leaves every tensor where its owner put it, and it works unchanged under the
Triton interpreter, where a CPU tensor's data_ptr() is a real address. A step is thus one
torch._foreach_add_ on the step counters plus at most two launches per param group and dtype, a launch
with no blocks being skipped (three in all for GPT-2 124M: its decayed matrices are whole multiples of
the block, its undecayed biases and LayerNorm weights are each shorter than one); the host's part is a
tuple of data_ptr() calls compared with the cached key, the tables being rebuilt only when a param or
grad was (re)allocated elsewhere. State tensors are meant to be replaced only through load_state_dict,
which drops the cached tables.

Runtime values, never constexpr: lr, betas, eps, weight_decay, max_norm (floats, which Triton never
specialises) and the step (read from memory), so a learning-rate schedule never recompiles, and no
.item() runs inside step(). No autotuning: the kernel writes through addresses hidden in a table, where
autotune's restore_value cannot see them, so each trial would apply the update again. BLOCK and
num_warps are fixed instead, chosen for a memory-bound kernel on an H100 (16 fp32 per thread per
stream, 128-bit loads).

Clipping: clip_grad_norm_(max_norm) computes the global L2 norm of all gradients in fp32 (per-block
partial sums of squares, then one sum, deterministic) and returns it, like
torch.nn.utils.clip_grad_norm_. It does NOT rewrite the gradients: the next step() multiplies each
gradient by the clip coefficient as it reads it, so p.grad after clip_grad_norm_ still holds the
unclipped values, while the update equals clip-then-step. zero_grad() discards a pending clip.

Design limits: dense, contiguous parameters and gradients on one device; fp32, bf16 and fp16
parameters; no amsgrad, no maximize; a float lr (a CPU tensor works too, a CUDA tensor would
synchronise). Under the Triton 3.9 interpreter the fp32 -> bf16 store truncates instead of rounding
to nearest even (an interpreter gap; the GPU rounds), which the bf16 test accounts for.
"""
import math

import torch
import triton
import triton.language as tl

from kernels.launch import direct

__all__ = ["FusedAdamW"]

BLOCK = 4096       # elements per program
NUM_WARPS = 8      # 16 elements per thread: four 128-bit loads per stream in flight

# columns of the tensor table: addresses of param, grad, exp_avg, exp_avg_sq, step; then numel
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, STEP, NUMEL = (tl.constexpr(i) for i in range(6))
N_COLS = tl.constexpr(6)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _address(table, t, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Row t, column `column` of the tensor table as a pointer to DTYPE."""
    ptr = tl.load(table + t * N_COLS + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of this table is a multiple of 16 bytes: 128-bit loads
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x in fp32 (Goldberg): the rounding of 1 + x cancels out."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate for small x in fp32 (Kahan): the rounding of exp(x) cancels out."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))


@triton.jit
def _block(table, block_tensor, block_index, first_block, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor t, its element offsets there (int64) and their mask."""
    pid = first_block + tl.program_id(0)
    t = tl.load(block_tensor + pid).to(tl.int64)
    offs = tl.load(block_index + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < tl.load(table + t * N_COLS + NUMEL)
    else:  # a constant mask, which the compiler drops: the loads vectorise
        mask = tl.full((BLOCK,), True, tl.int1)
    return t, offs, mask


@triton.jit(do_not_specialize=["first_block"])
def _adamw_kernel(
    table,                       # (n_tensors, 6) int64: see PARAM ... NUMEL
    block_tensor, block_index,   # (n_blocks,) int32: the tensor each program updates, and which block of it
    first_block,                 # row of the block table where this launch starts
    norm_ptr, max_norm,          # clipping (when CLIP): the total grad norm, 0-d fp32 tensor; the threshold
    lr, weight_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,   # fp32 runtime values
    P_DTYPE: tl.constexpr,       # dtype of params and grads; exp_avg, exp_avg_sq and step are fp32
    CLIP: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    lr, weight_decay, eps = tl.cast(lr, tl.float32), tl.cast(weight_decay, tl.float32), tl.cast(eps, tl.float32)
    beta1, beta2 = tl.cast(beta1, tl.float32), tl.cast(beta2, tl.float32)
    one_minus_beta1, one_minus_beta2 = tl.cast(one_minus_beta1, tl.float32), tl.cast(one_minus_beta2, tl.float32)
    t, offs, mask = _block(table, block_tensor, block_index, first_block, MASKED, BLOCK)
    p_ptr = _address(table, t, PARAM, P_DTYPE, ALIGNED) + offs
    g_ptr = _address(table, t, GRAD, P_DTYPE, ALIGNED) + offs
    m_ptr = _address(table, t, EXP_AVG, tl.float32, ALIGNED) + offs
    v_ptr = _address(table, t, EXP_AVG_SQ, tl.float32, ALIGNED) + offs

    # per-tensor scalars: 1 - beta^t = -expm1(t * log1p(-(1 - beta))), without cancellation
    step = tl.load(_address(table, t, STEP, tl.float32, False))  # already incremented
    bias1 = -_expm1(step * _log1p(-one_minus_beta1))
    bias2 = -_expm1(step * _log1p(-one_minus_beta2))
    step_size = lr / bias1
    bias2_sqrt = tl.sqrt_rn(bias2)

    g = tl.load(g_ptr, mask=mask).to(tl.float32)
    if CLIP:
        # a NaN norm makes every gradient NaN, as torch's clip does: tl.minimum would drop it by default
        coefficient = tl.cast(max_norm, tl.float32) / (tl.load(norm_ptr) + 1e-6)
        g = g * tl.minimum(coefficient, 1.0, propagate_nan=tl.PropagateNan.ALL)
    m = tl.load(m_ptr, mask=mask)
    v = tl.load(v_ptr, mask=mask)
    p = tl.load(p_ptr, mask=mask).to(tl.float32)

    # not m + (1 - beta1) * (g - m): at beta = 0 that leaves the rounding of g - m in m (v 5% off at beta2 = 0)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    p = p * (1.0 - lr * weight_decay)
    p = p - step_size * (m / (tl.sqrt_rn(v) / bias2_sqrt + eps))

    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    tl.store(p_ptr, p.to(P_DTYPE, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit(do_not_specialize=["first_block"])
def _sum_squares_kernel(
    table, block_tensor, block_index, first_block,   # as in _adamw_kernel
    partials,                    # (n_blocks,) fp32 out: sum of g*g over each program's block
    P_DTYPE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t, offs, mask = _block(table, block_tensor, block_index, first_block, MASKED, BLOCK)
    g = tl.load(_address(table, t, GRAD, P_DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)
    if MASKED:
        g = tl.where(mask, g, 0.0)
    tl.store(partials + first_block + tl.program_id(0), tl.sum(g * g, axis=0))


# ---------------------------------------------------------------------------------------------
# tables and launchers


class _Tables:
    """The device tables of the tensors of one dtype in one param group.

    rows: (param, grad, exp_avg, exp_avg_sq, step) per tensor. All but the grad are held here, so
    that their addresses cannot outlive them; the grad is not, so that zero_grad(set_to_none=True)
    frees it -- the cache key holds the grads' addresses instead, so a table is only used while
    the grads it names are the live p.grad. The block table depends on the sizes only, and is
    reused while just the addresses move.
    """

    def __init__(self, rows: list, previous=None):
        self.held = [(p, m, v, step) for p, _, m, v, step in rows]
        device = rows[0][0].device
        numels = tuple(row[0].numel() for row in rows)
        addresses = [[t.data_ptr() for t in row] + [n] for row, n in zip(rows, numels)]
        self.table = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
        self.aligned = all(address % 16 == 0 for row in addresses for address in row[:4])  # not step, numel
        if previous is not None and previous.numels == numels:
            self.block_tensor, self.block_index = previous.block_tensor, previous.block_index
            self.n_full, self.n_tail = previous.n_full, previous.n_tail
        else:
            self._build_blocks(numels, device)
        self.numels = numels

    def _build_blocks(self, numels: tuple, device) -> None:
        """Full blocks of every tensor first, then the partial last block of each tensor that has one."""
        numels = torch.tensor(numels, dtype=torch.int64)
        n_full = numels // BLOCK
        full_tensor = torch.repeat_interleave(torch.arange(len(numels)), n_full)
        starts = torch.cumsum(n_full, 0) - n_full
        full_index = torch.arange(len(full_tensor)) - torch.repeat_interleave(starts, n_full)
        has_tail = (numels % BLOCK) > 0
        tail_tensor = torch.nonzero(has_tail).flatten()
        block_tensor = torch.cat([full_tensor, tail_tensor])
        block_index = torch.cat([full_index, n_full[has_tail]])
        self.block_tensor = block_tensor.to(torch.int32).to(device, non_blocking=True)
        self.block_index = block_index.to(torch.int32).to(device, non_blocking=True)
        self.n_full, self.n_tail = len(full_tensor), len(tail_tensor)

    @property
    def n_blocks(self) -> int:
        return self.n_full + self.n_tail

    def launch(self, kernel, *args, **meta) -> None:
        """kernel over the full blocks (unmasked), then over the partial ones."""
        for first, count, masked in ((0, self.n_full, False), (self.n_full, self.n_tail, True)):
            if count:
                direct(kernel)[(count,)](self.table, self.block_tensor, self.block_index, first, *args,
                                         MASKED=masked, ALIGNED=self.aligned, BLOCK=BLOCK,
                                         num_warps=NUM_WARPS, **meta)


class _GroupTables:
    """A param group's tables, one per dtype, for the params that have a grad, and their step counters.

    key: the addresses of those params and grads. Equal keys mean equal tables (exp_avg and
    exp_avg_sq only change through load_state_dict, which drops every table), so a step costs a
    tuple of data_ptr() calls, and the tables are rebuilt only when a grad was allocated elsewhere.
    """

    def __init__(self, key: tuple, params: list, states: list, previous=None):
        self.key = key
        rows_by_dtype = {}
        for p, state in zip(params, states):
            _check(p)
            row = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
            rows_by_dtype.setdefault(p.dtype, []).append(row)
        old = previous.by_dtype if previous is not None else {}
        self.by_dtype = {dtype: _Tables(rows, old.get(dtype)) for dtype, rows in rows_by_dtype.items()}
        self.steps = [state["step"] for state in states]


def _group_key(params: list) -> tuple:
    """The addresses of params and grads; a grad that is not contiguous counts as -1, so that a new one at
    an old address is not read through a table that takes it for contiguous (the rebuild refuses it)."""
    grads = tuple(p.grad.data_ptr() if p.grad.is_contiguous() else -1 for p in params)
    return tuple(map(torch.Tensor.data_ptr, params)) + grads


def _check(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError("FusedAdamW does not support sparse gradients")
    if p.dtype not in _TL_DTYPES:
        raise TypeError(f"FusedAdamW takes fp32, bf16 or fp16 parameters, got {p.dtype}")
    if not (p.is_contiguous() and p.grad.is_contiguous()):
        raise ValueError(f"FusedAdamW needs contiguous parameters and gradients, got shape {tuple(p.shape)} "
                         f"with strides {p.stride()} (grad {p.grad.stride()})")


# ---------------------------------------------------------------------------------------------
# the optimizer


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (same math, same state_dict) in one pass per param group and dtype: a launch
    over every full block of its tensors and one over their partial last blocks.

    clip_grad_norm_(max_norm) returns the global grad norm and folds the clip into the next step()
    without touching p.grad; see the module docstring.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        # the checks and messages of torch.optim.AdamW
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self._tables = {}          # group index -> _GroupTables of the last step
        self._pending_clip = None  # (norm, max_norm) from clip_grad_norm_, for the next step()
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """torch's, refusing a group that puts parameters on a second device or lists one twice (the kernel
        would update it twice a step, racing with itself on a GPU; torch only warns)."""
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        devices = {p.device for group in self.param_groups for p in group["params"]}
        problem = None
        if len(devices) > 1:
            problem = f"keeps all parameters on one device, got {sorted(map(str, devices))}"
        elif len(set(map(id, params))) < len(params):
            problem = "takes each parameter once, but a parameter group lists one twice"
        if problem:
            self.param_groups.pop()
            raise ValueError(f"FusedAdamW {problem}")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    def _group_tables(self) -> list:
        """[(group, _GroupTables)] for every group with a grad; states are created on first use."""
        out = []
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            try:
                key = _group_key(params)
            except RuntimeError:  # a grad without storage (sparse): say so
                for p in params:
                    _check(p)
                raise
            tables = self._tables.get(i)
            if tables is None or tables.key != key:
                tables = self._tables[i] = _GroupTables(key, params, [self._state(p) for p in params], tables)
            out.append((group, tables))
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The L2 norm of all gradients, in fp32, without a host sync; the next step() clips by it.

        Returns the total norm before clipping, like torch.nn.utils.clip_grad_norm_. The grads are
        left unclipped: step() scales them by min(1, max_norm / (norm + 1e-6)) as it reads them (all
        NaN when the norm is NaN, as torch's). max_norm=inf only measures: no clip, so that a NaN
        gradient stays where it is, as without clipping (torch's would multiply every gradient by NaN).
        """
        all_tables = [(dtype, tables) for _, group_tables in self._group_tables()
                      for dtype, tables in group_tables.by_dtype.items()]
        device = next(p.device for group in self.param_groups for p in group["params"])
        partials = torch.empty(sum(tables.n_blocks for _, tables in all_tables), dtype=torch.float32, device=device)
        start = 0
        for dtype, tables in all_tables:
            tables.launch(_sum_squares_kernel, partials[start:], P_DTYPE=_TL_DTYPES[dtype])
            start += tables.n_blocks
        norm = partials.sum().sqrt()
        self._pending_clip = (norm, float(max_norm)) if float(max_norm) != math.inf else None
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_clip = None  # a clip belongs to the grads it measured
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FusedAdamW supports neither amsgrad nor maximize")
        all_tables = self._group_tables()
        steps = [step for _, group_tables in all_tables for step in group_tables.steps]
        if steps:
            torch._foreach_add_(steps, 1.0)
        norm, max_norm = self._pending_clip or (None, 0.0)
        for group, group_tables in all_tables:
            beta1, beta2 = group["betas"]
            hyper = (float(group["lr"]), float(group["weight_decay"]), float(beta1), float(beta2),
                     1.0 - float(beta1), 1.0 - float(beta2), float(group["eps"]))
            for dtype, tables in group_tables.by_dtype.items():
                tables.launch(_adamw_kernel, norm, max_norm, *hyper, P_DTYPE=_TL_DTYPES[dtype], CLIP=norm is not None)
        self._pending_clip = None
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, except that exp_avg and exp_avg_sq stay fp32 (torch would cast them to the
        params' dtype) and step becomes a 0-d fp32 tensor on the params' device."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):  # the kernel would read and write past a smaller state
            saved = state_dict["state"].get(i) or {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and saved[key].shape != p.shape:
                    raise ValueError(f"FusedAdamW.load_state_dict: the state's {key} is {tuple(saved[key].shape)} "
                                     f"for a parameter of shape {tuple(p.shape)}: load the state of this model")
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            saved = state_dict["state"].get(i)
            if saved:
                self.state[p] = {
                    "step": torch.as_tensor(saved["step"]).to(p.device, torch.float32, copy=True).reshape(()),
                    "exp_avg": saved["exp_avg"].to(p.device, torch.float32, copy=True).contiguous(),
                    "exp_avg_sq": saved["exp_avg_sq"].to(p.device, torch.float32, copy=True).contiguous(),
                }
        self._tables.clear()
        self._pending_clip = None
