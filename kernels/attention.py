"""Flash attention (forward and backward) in Triton, causal or not, for q, k, v of shape (B, H, T, D).

    from kernels import flash_attention, flash_attention_qkv
    y = flash_attention(q, k, v, causal=True)           # (B, H, T, D)
    y = flash_attention_qkv(qkv, n_head)                # qkv (B, T, 3C) -> (B, T, C): the model's call

Forward, one program per (query block, batch*head): one pass over the key/value blocks with an online
softmax, never materialising the T x T matrix. With S = sm_scale * Q K^T, per query row i:

    m_i = max_j S_ij,   l_i = sum_j exp(S_ij - m_i),   O_i = sum_j exp(S_ij - m_i) V_j / l_i

m and l are updated block by block in fp32 (the accumulator is rescaled by exp(m_old - m_new)). The
scores are kept in base 2: log2(e) is folded into the scale so that every exponential is an exp2.
The row's log-sum-exp, LSE_i = m_i + log2(l_i) (base 2, in units of S * log2 e), is saved for backward.

Backward, with P = exp2(S log2 e - LSE) recomputed block by block from Q, K and LSE:

    dV = P^T dO                   dP = dO V^T
    dS = P * (dP - delta),        delta_i = rowsum(dO * O)_i  (= rowsum(P * dP)_i, a preprocessing pass)
    dQ = sm_scale * dS K          dK = sm_scale * dS^T Q

dK and dV are accumulated by one program per key block (looping over query blocks), dQ by another
kernel with one program per query block (looping over key blocks). Every gradient element is
written by exactly one program, with no atomics, so dq, dk and dv are bitwise deterministic (for
the block sizes the autotuner chose in this process); the price is computing P and dP twice: seven
matmuls per (query block, key block) pair.

deterministic=False (opt-in; train.py --no-deterministic) trades that for less work, as FlashAttention-2
does: the dk/dv programs also compute each pair's share of dQ (a fifth matmul, as dQ^T = K^T dS^T
so that its M is the head dim, a Hopper wgmma shape) and add it into an fp32 buffer
with relaxed atomics; the delta pass zeroes that buffer, a cast gives dq its dtype, and the dq kernel
is skipped. Five matmuls per pair instead of seven; dq's additions arrive in any order, so its last
bits can differ run to run (dk and dv stay bitwise reproducible). The price is the adds: D fp32 values
per (query row, key block) pair, T^2 D / (2 BLOCK_N) per (batch, head) when causal, resolved in L2;
whether they cost less than the two matmuls they replace is for a GPU to say.

Not done, on static evidence (compiled for sm_90, Triton 3.9): issuing the next block's Q K^T before
this block's softmax still compiles to `wgmma.wait_group 0` before the softmax, with 14 to 73 more
registers; tensor descriptors (TMA) for K and V turn their loads into cp.async.bulk.tensor but leave
the waits as they are, and `tl.range(warp_specialize=True)` over them fails to compile on 4 warps
("unsupported load type for producer commit") and changes nothing on 8. None of them overlaps the
tensor cores with the softmax, so none is here until a GPU says otherwise.

Causal blocks above the diagonal are never visited (loop bounds). Blocks that are entirely below
the diagonal and inside T run unmasked; only the diagonal blocks and the ragged last block of T
pay for a mask.

Layout: q, k, v may be any strided views whose last dimension is contiguous -- in the model they are
slices of one (B, T, 3C) tensor, read in place. The output is allocated with the memory layout
(B, T, H, D) and returned as a (B, H, T, D) view of it (strides (T*H*D, D, H*D, 1)), so that
`y.transpose(1, 2)` is contiguous: the (B, T, C) the output projection takes. dq, dk and dv are written
into one buffer. flash_attention_qkv (the model's call, which takes qkv itself) returns it whole: d(qkv),
(B, T, 3C), laid out as the model's qkv. That saves a pass over memory that torch.compile cannot save:
autograd concatenates separate dq, dk, dv (SDPA's) into d(qkv), reading and writing 3C elements per token
per layer; at GPT-2 124M, B = 16, T = 1024 in bf16, 151 MB a layer, 1.8 GB a step. flash_attention returns
three (B, H, T, D) views of a (3, B, T, H, D) buffer, each laid out like its output.

Design limits: self-attention only (q, k, v share B, H, T); B * H at most 65535; head dim a power of two
from 16 to 128; fp16 and bf16 on the GPU (fp32 works too, with exact but slow IEEE fp32 dot products,
meant for checking); fp32 or fp16 in the Triton interpreter. Extra memory: the fp32 LSE and delta, B*H*T
each, and for the atomic backward the fp32 dq, B*H*T*D. Block sizes are autotuned per (T rounded up to a
power of two, D, causal, dtype): generation, where T grows by one per token, tunes once per octave of T,
not once per token.
"""
import inspect
import math
import operator
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels.launch import cdiv, check_float_inputs, direct, next_power_of_2, no_double_backward, traced

__all__ = ["flash_attention", "flash_attention_qkv"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = math.log2(math.e)
_MAX_GRID_Y = 65535  # (batch, head) is the grid's second axis
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernels are built for (a block holds a whole head)


# ---------------------------------------------------------------------------------------------
# autotuning


def _candidates(owned, stepped, tiles):
    """Autotuning candidates for a kernel whose programs each own an `owned`-sized block and step over
    the other sequence `stepped` at a time; tiles are (owned, stepped, num_warps, num_stages), the first
    one the default. The stepped size must divide the owned one: the causal diagonal stage steps through
    the owned block."""
    assert all(a % b == 0 for a, b, _, _ in tiles)
    return [triton.Config({owned: a, stepped: b}, num_warps=warps, num_stages=stages) for a, b, warps, stages in tiles]


def _tuned(candidates):
    """The configs the autotuner tries: every candidate; only the default with GPT2_AUTOTUNE=0 (tests,
    host-path benchmarks). The interpreter gets one small config: autotuning there would only be slow,
    and small blocks exercise the multi-block and ragged paths at the tiny T the tests use
    (tests/test_attention.py checks every candidate too)."""
    if _INTERPRET:
        owned, stepped = candidates[0].kwargs
        return [triton.Config({owned: 32, stepped: 16}, num_warps=4, num_stages=1)]
    return candidates[:1] if os.environ.get("GPT2_AUTOTUNE", "1") == "0" else candidates


# forward and dq: a program owns BLOCK_M queries and steps over the keys BLOCK_N at a time;
# dk/dv: a program owns BLOCK_N keys and steps over the queries BLOCK_M at a time.
# The candidates are those that can win at D = 64 (every GPT-2 size's head dim), by their resources
# compiled for sm_90 with the scalar types torch.compile uses (python benchmarks/compiled_kernels.py
# --configs). Left out: tiles that spill (dk/dv 128 x 32 on 4 warps: 184 bytes a thread), tiles at the
# 255-register cap (forward 128 x 64 and dk/dv 64 x 64 on 4 warps), 4 warps where 8 hold the same tile
# in half the registers (dq 128 x 32: 212 against 115), and all but one pipeline depth per tile (the
# depth changes shared memory, not registers). 14 configs instead of 42: the first call of a new length
# bucket compiles a third as much. At D = 128 the larger tiles reach the register cap and dk/dv's spill;
# they lose the tuning there, and the defaults (first) fit every head dim with Triton 3.6 and 3.9 (dk/dv's is
# 8 warps: on 4, Triton 3.6 spills 40 bytes at D = 128). Which one wins at D = 64 is still to be timed on a GPU.
_FWD_CANDIDATES = _candidates("BLOCK_M", "BLOCK_N", [(64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3),
                                                     (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)])
_DQ_CANDIDATES = _candidates("BLOCK_M", "BLOCK_N", [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)])
_DKDV_CANDIDATES = _candidates("BLOCK_N", "BLOCK_M", [(64, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)])
# dk/dv with the atomic dq (deterministic=False), the same way: 128 x 64 spills there, 64 x 64 on 4 warps is at
# the cap, and the default (first) is the one that fits D = 128 without spilling (249 registers with Triton
# 3.9, 255 with 3.6).
_DKDV_DQ_CANDIDATES = _candidates("BLOCK_N", "BLOCK_M", [(64, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3),
                                                         (64, 64, 8, 3)])
# tuning results are kept on disk (Triton's cache), so that a restarted run does not tune again
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_AUTOTUNE = dict(key=["T_BUCKET", "HEAD_DIM", "CAUSAL"], **_CACHE_RESULTS)  # the autotuner adds the dtypes


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _query_block(H, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's (batch * head, batch, head, first query) when each owns BLOCK_M queries: axis 0
    the query block, axis 1 the (batch, head). Causal: the last query blocks have the most work, so they
    start first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_bh = tl.program_id(1)
    return off_bh, (off_bh // H).to(tl.int64), (off_bh % H).to(tl.int64), pid_m * BLOCK_M


@triton.jit
def _key_block_scores(q, K, V, stride_kt, stride_vt, offs_m, start_n, T,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                      BOUNDS: tl.constexpr, PRECISION: tl.constexpr):
    """The key/value block at start_n (rows past T read as zero when BOUNDS) and the scores q k^T
    (BLOCK_M, BLOCK_N), unscaled, -inf where masked: above the diagonal (CAUSAL_MASK) and past T
    (BOUNDS: a zero key would still get P = exp2(-LSE), which can overflow)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
    if BOUNDS:
        k = tl.load(k_ptrs, mask=(offs_n < T)[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(offs_n < T)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if CAUSAL_MASK:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    if BOUNDS:
        s = tl.where(offs_n[None, :] < T, s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr,
               PRECISION: tl.constexpr):
    """Folds key/value blocks [lo, hi) into the running (acc, l_i, m_i) of one query block.
    K, V point at this (batch, head); offs_m are the block's query positions."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kt, stride_vt, offs_m, start_n, T,
                                    HEAD_DIM, BLOCK_N, CAUSAL_MASK, BOUNDS, PRECISION)  # s unscaled: see below
        # scaling inside the exponent makes it one fused multiply-add per score (qk_scale > 0)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_tuned(_FWD_CANDIDATES), **_AUTOTUNE)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,                                   # q, k, v, o: (B, H, T, D) strided; LSE: (B, H, T) fp32
    stride_qb, stride_qh, stride_qt,                   # the last dimension of q, k, v, o is contiguous
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, T_BUCKET, qk_scale,                          # T_BUCKET: the autotuning key, next_power_of_2(T)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,   # PRECISION: of tl.dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,      # queries per program, keys per step
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    off_bh, off_b, off_h, start_m = _query_block(H, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    q = tl.load(q_ptrs, mask=(offs_m < T)[:, None], other=0.0)

    # m starts finite so that a row with no visible key in a block never computes -inf - (-inf)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:  # keys below this query block, then the diagonal block (masked), nothing above
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                                   0, start_m, T, qk_scale, HEAD_DIM, BLOCK_N, False, False, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                                   start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, True, PRECISION)
    else:  # whole key blocks, then the ragged last one (masked)
        t_whole = T // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                                   0, t_whole, T, qk_scale, HEAD_DIM, BLOCK_N, False, False, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                                   t_whole, T, T, qk_scale, HEAD_DIM, BLOCK_N, False, True, PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m < T)[:, None])
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta(
    O, DO, DELTA, DQ_ACC,                              # o, do: (B, H, T, D) strided; DELTA: (B, H, T) fp32
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,                # DQ_ACC: (B, H, T, D) fp32, zeroed when ZERO_DQ
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ZERO_DQ: tl.constexpr,                             # the atomic backward's dq accumulator starts here
):
    off_bh, off_b, off_h, start_m = _query_block(H, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (offs_m < T)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    if ZERO_DQ:  # this pass visits every row anyway: no memset launch of its own
        dq_ptrs = DQ_ACC + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=rows)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, stride_qt, stride_dot, stride_dqt, offs_n, lo, hi, T,
                qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr,
                KEY_BOUNDS: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Adds the contributions of query blocks [lo, hi) to one key block's dk, dv (transposed view:
    rows are keys, columns queries), and with ATOMIC_DQ this key block's share of each query block's dq
    to the fp32 DQ_ACC. Q, DO, LSE, DELTA, DQ_ACC point at this (batch, head).
    KEY_BOUNDS zeroes P for the keys past T (zero rows of k):
    those rows are never stored, but exp2(-LSE) can overflow there. In the causal case the causal
    mask already covers them."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = Q + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :]
        if BOUNDS:  # a query row past T gets LSE = +inf, hence P = 0: it adds nothing
            rows = offs_m < T
            q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=rows, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)            # (BLOCK_N, BLOCK_M)
        if CAUSAL_MASK:
            s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
        if KEY_BOUNDS:
            s_t = tl.where(offs_n[:, None] < T, s_t, float("-inf"))
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # the fifth matmul of the block pair, where the dq kernel would redo the first two
            # as dq^T = k^T ds^T: its M is the head dim (64), a wgmma shape, where BLOCK_M rows may be too few
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=PRECISION) * sm_scale   # (HEAD_DIM, BLOCK_M)
            dq_ptrs = DQ_ACC + offs_m[None, :] * stride_dqt + offs_d[:, None]
            # relaxed: the adds only need to be atomic, not ordered (the default acq_rel fences each)
            if BOUNDS:
                tl.atomic_add(dq_ptrs, dq_t, mask=rows[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq_t, sem="relaxed")
    return dk, dv


def _attn_bwd_dkdv(
    Q, K, V, DO, DQKV, LSE, DELTA, DQ_ACC,             # (B, H, T, D) strided; LSE, DELTA: (B, H, T) fp32
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_gb, stride_gh, stride_gt, stride_gs,        # DQKV: dq, dk, dv in one buffer, each stride_gs further
    stride_dqb, stride_dqh, stride_dqt,                # DQ_ACC: fp32 (B, H, T, D), zeroed; read only if ATOMIC_DQ
    H, T, T_BUCKET, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,   # PRECISION: of tl.dot
    ATOMIC_DQ: tl.constexpr,                           # also add dq into DQ_ACC (the dq kernel is skipped)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,      # keys per program, queries per step
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_n = tl.program_id(0)  # causal: the first key blocks have the most work and already start first
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    cols = (offs_n < T)[:, None]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=cols, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=cols, other=0.0)
    Q_bh = Q + off_b * stride_qb + off_h * stride_qh
    DO_bh = DO + off_b * stride_dob + off_h * stride_doh
    LSE_bh = LSE + off_bh.to(tl.int64) * T
    DELTA_bh = DELTA + off_bh.to(tl.int64) * T
    DQ_bh = DQ_ACC + off_b * stride_dqb + off_h * stride_dqh

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    t_whole = T // BLOCK_M * BLOCK_M
    if CAUSAL:  # the diagonal block (masked), then the query blocks below it; none above
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, stride_qt, stride_dot, stride_dqt,
                             offs_n, start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale, sm_scale,
                             HEAD_DIM, BLOCK_M, True, True, False, PRECISION, ATOMIC_DQ)
        lo = start_n + BLOCK_N
    else:
        lo = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, stride_qt, stride_dot, stride_dqt,
                         offs_n, lo, t_whole, T, qk_scale, sm_scale,
                         HEAD_DIM, BLOCK_M, False, False, not CAUSAL, PRECISION, ATOMIC_DQ)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, DQ_bh, stride_qt, stride_dot, stride_dqt,
                         offs_n, tl.maximum(lo, t_whole), T, T, qk_scale, sm_scale,
                         HEAD_DIM, BLOCK_M, False, True, not CAUSAL, PRECISION, ATOMIC_DQ)

    DK = DQKV + stride_gs
    DV = DK + stride_gs
    out = off_b * stride_gb + off_h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=cols)
    tl.store(DV + out, dv.to(DQKV.dtype.element_ty), mask=cols)


@triton.jit
def _bwd_dq_cast(
    DQ_ACC, DQKV,                                      # DQ_ACC: fp32 (B, H, T, D); DQKV: dq's slot is first
    stride_ab, stride_ah, stride_at,
    stride_gb, stride_gh, stride_gt,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The atomic backward's last pass: dq, added up in fp32, written in d(qkv)'s dtype. A kernel, not a
    copy into a slice of d(qkv): under torch.compile that copy rewrites the whole buffer, twice."""
    _, off_b, off_h, start_m = _query_block(H, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (offs_m < T)[:, None]
    dq = tl.load(DQ_ACC + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_at + offs_d[None, :],
                 mask=rows)
    tl.store(DQKV + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :],
             dq.to(DQKV.dtype.element_ty), mask=rows)


# Two kernels of one source, each with its own autotuner: the atomic one holds a dq tile more, so other
# tiles fit it, and it adds into DQ_ACC, which every config tried while tuning must find zeroed.
_dkdv_kernel = triton.autotune(configs=_tuned(_DKDV_CANDIDATES), **_AUTOTUNE)(triton.jit(_attn_bwd_dkdv))
_dkdv_dq_kernel = triton.autotune(configs=_tuned(_DKDV_DQ_CANDIDATES), reset_to_zero=["DQ_ACC"], **_AUTOTUNE)(
    triton.jit(_attn_bwd_dkdv))


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, lo, hi, T, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr,
              PRECISION: tl.constexpr):
    """Adds the contributions of key blocks [lo, hi) to one query block's dq. K, V point at this
    (batch, head)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kt, stride_vt, offs_m, start_n, T,
                                    HEAD_DIM, BLOCK_N, CAUSAL_MASK, BOUNDS, PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_tuned(_DQ_CANDIDATES), **_AUTOTUNE)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,                       # (B, H, T, D) strided; LSE, DELTA: (B, H, T) fp32
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, T_BUCKET, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,   # PRECISION: of tl.dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,      # queries per program, keys per step
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    off_bh, off_b, off_h, start_m = _query_block(H, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    rows = offs_m < T
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                       0, start_m, T, qk_scale, HEAD_DIM, BLOCK_N, False, False, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True, True, PRECISION)
    else:
        t_whole = T // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                       0, t_whole, T, qk_scale, HEAD_DIM, BLOCK_N, False, False, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K_bh, V_bh, stride_kt, stride_vt, offs_m,
                       t_whole, T, T, qk_scale, HEAD_DIM, BLOCK_N, False, True, PRECISION)

    out = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ---------------------------------------------------------------------------------------------
# launchers


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_bthd(like, dtype=None):
    """A (B, H, T, D) tensor whose memory is laid out (B, T, H, D), as the model wants it back. Made by
    torch.empty, not empty_strided: AOTAutograd merges identical empty_strided calls (every layer's o, and
    the atomic backward's dq accumulator) into one buffer that inductor then copies before each kernel
    writes it."""
    B, H, T, D = like.shape
    return torch.empty((B, T, H, D), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def _tuning_bucket(T):
    """The autotuning key for T: the next power of two. Under torch.compile with dynamic shapes T is
    symbolic; it is then passed as is, rather than as a bit-twiddling expression of it."""
    return next_power_of_2(T) if isinstance(T, int) else T


def _dot_precision(x):
    """fp32 inputs get exact fp32 dot products (slow, for checking); fp16/bf16 use the tensor cores."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _bht(x):
    return x.stride()[:3]


def _check(q, k, v):
    check_float_inputs("flash_attention", q=q, k=k, v=v)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash_attention wants q, k, v of one shape (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention wants one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if _INTERPRET and q.dtype == torch.bfloat16:  # its tl.dot of bf16 operands returns garbage, silently
        raise ValueError("flash_attention in the Triton interpreter (no CUDA device) takes float32 or float16, "
                        "not bfloat16: use --dtype float32, or --kernels torch")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"flash_attention supports head dims {', '.join(map(str, HEAD_DIMS))}, got {D}")
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        raise ValueError(f"flash_attention takes at most {_MAX_GRID_Y} batch x heads (CUDA's grid limit), got "
                         f"{q.shape[0]} x {q.shape[1]}: split the batch")
    T, row_stride = q.shape[2], max(3 * q.shape[1] * D, *(t.stride(2) for t in (q, k, v)))  # 3HD: d(qkv)'s
    if T * row_stride >= 2**31:
        raise ValueError(f"flash_attention indexes the rows of a (batch, head) in 32 bits: T ({T}) times the row "
                         f"stride ({row_stride} elements) must be below 2**31: split the sequence")


def _forward(q, k, v, causal, sm_scale, launch):
    """(o, lse): o (B, H, T, D) in (B, T, H, D) memory, lse (B, H, T) fp32 in base 2."""
    _check(q, k, v)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    B, H, T, D = q.shape
    o = _empty_bthd(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * H)

    launch(_attn_fwd)[grid](
        q, k, v, o, lse, *_bht(q), *_bht(k), *_bht(v), *_bht(o),
        H, T, _tuning_bucket(T), sm_scale * _LOG2E,
        HEAD_DIM=D, CAUSAL=causal, PRECISION=_dot_precision(q),
    )
    return o, lse


def _heads(qkv, n_head):
    """q, k, v: (B, H, T, D) views of qkv (B, T, 3C), which holds them side by side in its last dimension."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def _split_heads(y, n_head):
    """(B, T, C) -> (B, H, T, D), a view where it can be one."""
    B, T, C = y.shape
    return y.reshape(B, T, n_head, C // n_head).transpose(1, 2)


def _slots(grads):
    """dq, dk, dv: the (B, H, T, D) views of the (3, B, T, H, D) gradients of separate q, k, v."""
    return grads.transpose(2, 3).unbind(0)


def _merge_heads(o):
    """(B, H, T, D) in (B, T, H, D) memory -> the (B, T, C) view of it: the heads side by side."""
    B, H, T, D = o.shape
    return o.transpose(1, 2).view(B, T, H * D)


def _backward(do, q, k, v, o, lse, causal, sm_scale, deterministic, launch, packed):
    """dq, dk and dv, written by the kernels into one buffer that they are passed whole (under
    torch.compile a kernel writing into a slice of a buffer is followed by a copy of the buffer):
    - packed: d(qkv) (B, T, 3C), dq, dk and dv side by side as q, k and v are in the model's qkv, so that
      it is qkv's gradient as it stands, with no concatenation after;
    - else (3, B, T, H, D): `_slots` gives the three (B, H, T, D) views, each laid out (B, T, H, D) like o,
      as leaves made that way take their .grad without a copy.
    deterministic: dq by a kernel of its own (bitwise reproducible); else added up in fp32 by the dk/dv
    programs with atomics, in whatever order they arrive, then cast (5 matmuls per block pair instead of 7)."""
    do = _last_dim_contiguous(do)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    B, H, T, D = q.shape
    if packed:
        grads = torch.empty((B, T, 3 * H * D), dtype=q.dtype, device=q.device)
        grad_strides, slot_stride = (3 * T * H * D, D, 3 * H * D), H * D  # (b, h, t) of each slot; dq first
    else:
        grads = torch.empty((3, B, T, H, D), dtype=q.dtype, device=q.device)
        grad_strides, slot_stride = (T * H * D, D, H * D), B * T * H * D
    delta = torch.empty_like(lse)
    # the atomic path's fp32 accumulator; the deterministic path passes lse, never written, in its place
    dq_acc = lse if deterministic else _empty_bthd(q, torch.float32)
    acc_strides = (0, 0, 0) if deterministic else _bht(dq_acc)
    block_rows = 32 if _INTERPRET else 64
    launch(_bwd_delta)[(cdiv(T, block_rows), B * H)](
        o, do, delta, dq_acc, *_bht(o), *_bht(do), *acc_strides, H, T, HEAD_DIM=D, BLOCK_M=block_rows,
        ZERO_DQ=not deterministic,
    )

    def dkdv_grid(meta):
        return (cdiv(T, meta["BLOCK_N"]), B * H)

    def dq_grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * H)

    qk_scale = sm_scale * _LOG2E
    t_bucket = _tuning_bucket(T)
    launch(_dkdv_kernel if deterministic else _dkdv_dq_kernel)[dkdv_grid](
        q, k, v, do, grads, lse, delta, dq_acc, *_bht(q), *_bht(k), *_bht(v), *_bht(do), *grad_strides, slot_stride,
        *acc_strides, H, T, t_bucket, qk_scale, sm_scale, HEAD_DIM=D, CAUSAL=causal, PRECISION=_dot_precision(q),
        ATOMIC_DQ=not deterministic,
    )
    if not deterministic:
        launch(_bwd_dq_cast)[(cdiv(T, block_rows), B * H)](
            dq_acc, grads, *_bht(dq_acc), *grad_strides, H, T, HEAD_DIM=D, BLOCK_M=block_rows,
        )
        return grads
    launch(_attn_bwd_dq)[dq_grid](
        q, k, v, do, grads, lse, delta, *_bht(q), *_bht(k), *_bht(v), *_bht(do), *grad_strides,
        H, T, t_bucket, qk_scale, sm_scale, HEAD_DIM=D, CAUSAL=causal, PRECISION=_dot_precision(q),
    )
    return grads


# ---------------------------------------------------------------------------------------------
# the torch.compile path: custom ops that launch through wrap_triton


# deterministic only chooses the backward; the forward op takes it so that its autograd can pass it on
@triton_op("gpt2::flash_attention_fwd", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, sm_scale, traced)


@triton_op("gpt2::flash_attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, causal: bool, sm_scale: float, deterministic: bool,
                      packed: bool) -> torch.Tensor:
    return _backward(do, q, k, v, o, lse, causal, sm_scale, deterministic, traced, packed)


def _op_setup(ctx, inputs, output):
    q, k, v, causal, sm_scale, deterministic = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic


def _op_backward(ctx, do, _dlse):
    grads = _attention_bwd_op(do, *ctx.saved_tensors, ctx.causal, ctx.sm_scale, ctx.deterministic, False)
    return *_slots(grads), None, None, None


torch.library.register_autograd("gpt2::flash_attention_fwd", _op_backward, setup_context=_op_setup)


# the heads of one (B, T, 3C) qkv in, (B, T, C) out: an op of its own, whose gradient is d(qkv) itself
@triton_op("gpt2::flash_attention_qkv_fwd", mutates_args=())
def _attention_qkv_op(qkv: torch.Tensor, n_head: int, causal: bool, sm_scale: float,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _forward(*_heads(qkv, n_head), causal, sm_scale, traced)
    return _merge_heads(o), lse


def _qkv_op_setup(ctx, inputs, output):
    qkv, ctx.n_head, ctx.causal, ctx.sm_scale, ctx.deterministic = inputs
    ctx.save_for_backward(qkv, *output)


def _qkv_op_backward(ctx, dy, _dlse):
    qkv, y, lse = ctx.saved_tensors
    H = ctx.n_head
    dqkv = _attention_bwd_op(_split_heads(dy, H), *_heads(qkv, H), _split_heads(y, H), lse, ctx.causal, ctx.sm_scale,
                             ctx.deterministic, True)
    return dqkv, None, None, None, None


torch.library.register_autograd("gpt2::flash_attention_qkv_fwd", _qkv_op_backward, setup_context=_qkv_op_setup)


# ---------------------------------------------------------------------------------------------
# the eager path: an autograd.Function that launches directly


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, deterministic):
        o, lse = _forward(q, k, v, causal, sm_scale, direct)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.deterministic = causal, sm_scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        no_double_backward("flash_attention")
        grads = _backward(do, *ctx.saved_tensors, ctx.causal, ctx.sm_scale, ctx.deterministic, direct, False)
        return *_slots(grads), None, None, None


class _AttentionQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head, causal, sm_scale, deterministic):
        q, k, v = _heads(qkv, n_head)
        o, lse = _forward(q, k, v, causal, sm_scale, direct)
        ctx.save_for_backward(q, k, v, o, lse)  # the views, not qkv and y: fewer host calls in the backward
        ctx.n_head, ctx.causal, ctx.sm_scale, ctx.deterministic = n_head, causal, sm_scale, deterministic
        return _merge_heads(o)

    @staticmethod
    def backward(ctx, dy):
        no_double_backward("flash_attention_qkv")
        dqkv = _backward(_split_heads(dy, ctx.n_head), *ctx.saved_tensors, ctx.causal, ctx.sm_scale, ctx.deterministic,
                         direct, True)
        return dqkv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public


def attention_ref(q, k, v, causal=True, sm_scale=None, upcast=True):
    """Explicit-softmax attention in PyTorch, the reference for tests (upcast: compute in float64)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    T = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = (q @ k.transpose(-2, -1)) * scale                                  # (B, H, T, T)
    if causal:
        visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    y = torch.softmax(s, dim=-1) @ v                                       # (B, H, T, D)
    return y if upcast else y.to(dtype)


def _scale(sm_scale, head_dim, op):
    if sm_scale is None:
        return head_dim ** -0.5
    if not 0 < sm_scale < 1e30:  # times log2(e) in fp32 in the kernel: finite
        raise ValueError(f"{op} wants 0 < sm_scale < 1e30, got {sm_scale}")
    return float(sm_scale)


def flash_attention(q, k, v, causal=True, sm_scale=None, deterministic=True):
    """softmax(sm_scale * q k^T (+ causal mask)) v for q, k, v (B, H, T, D); sm_scale defaults to 1/sqrt(D).

    Returns (B, H, T, D) whose memory is laid out (B, T, H, D): `.transpose(1, 2)` of it is contiguous.
    deterministic=False: a backward that adds dq up with fp32 atomics, two matmuls per block pair fewer,
    whose dq can differ in its last bits from run to run (dk and dv stay bitwise reproducible).
    """
    sm_scale = _scale(sm_scale, q.shape[-1], "flash_attention")
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, causal, sm_scale, bool(deterministic))[0]
    return _AttentionFunction.apply(q, k, v, causal, sm_scale, bool(deterministic))


def flash_attention_qkv(qkv, n_head, causal=True, sm_scale=None, deterministic=True):
    """flash_attention over the n_head heads of qkv (B, T, 3C), which holds q, k and v side by side in its
    last dimension, as one linear layer makes them. Returns (B, T, C), the heads side by side, as the output
    projection takes them.

    Its backward returns d(qkv) as the one tensor its kernels wrote. flash_attention on slices of qkv hands
    dq, dk and dv to autograd, which concatenates them into d(qkv): a read and a write of 3C elements per
    token more.
    """
    try:
        n_head = operator.index(n_head)  # an int, or what stands for one (a 0-d integer tensor, a numpy int)
    except TypeError:
        raise TypeError(f"flash_attention_qkv: n_head must be an integer, got {n_head!r}") from None
    check_float_inputs("flash_attention_qkv", qkv=qkv)
    if qkv.dim() != 3 or n_head < 1 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"flash_attention_qkv wants qkv (B, T, 3 * n_head * head_dim) and n_head >= 1, got "
                         f"{tuple(qkv.shape)} and n_head {n_head}")
    C, head_dim = qkv.shape[-1] // 3, qkv.shape[-1] // (3 * n_head)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash_attention_qkv: head dim C / n_head = {C} / {n_head} = {head_dim}, the kernels take "
                         f"{', '.join(map(str, HEAD_DIMS))}: choose n_head to match")
    sm_scale = _scale(sm_scale, head_dim, "flash_attention_qkv")
    if torch.compiler.is_compiling():
        return _attention_qkv_op(qkv, n_head, causal, sm_scale, bool(deterministic))[0]
    return _AttentionQKVFunction.apply(qkv, n_head, causal, sm_scale, bool(deterministic))
