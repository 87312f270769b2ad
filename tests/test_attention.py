"""kernels/attention.py against float64 explicit-softmax attention: output and dq, dk, dv.

On the CPU the kernels run in the Triton interpreter (fp32, fp16) at small odd shapes, with q, k, v
made as the model makes them: strided views of one (B, T, 3C) tensor. On the GPU, bf16 up to T = 4096
is held to the low-precision criterion of STYLE.md: the kernel's error against float64 is at most
about twice that of PyTorch's own SDPA in the same dtype, plus a small atol.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from kernels import attention, launch
from kernels.attention import attention_ref, flash_attention, flash_attention_qkv

gpu = pytest.mark.gpu


def model_qkv(B, H, T, D, dtype, device):
    """q, k, v as the model makes them: (B, H, T, D) views of one (B, T, 3C) leaf tensor."""
    C = H * D
    qkv = torch.randn(B, T, 3 * C, dtype=dtype, device=device, requires_grad=True)
    return qkv, split_heads(qkv, H)


def split_heads(qkv, H):
    B, T, C3 = qkv.shape
    return [t.view(B, T, H, C3 // (3 * H)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2)]


def run(attention, qkv, H, do, packed=None, **kwargs):
    """Output (B, H, T, D) and d(qkv) = [dq | dk | dv] of `attention` applied to the heads of qkv; packed
    (flash_attention_qkv, or a compiled one): it takes qkv itself and returns the heads side by side."""
    qkv = qkv.detach().clone().requires_grad_()
    if packed or (packed is None and attention is flash_attention_qkv):
        B, T, C3 = qkv.shape
        y = attention(qkv, H, **kwargs).view(B, T, H, C3 // (3 * H)).transpose(1, 2)
    else:
        y = attention(*split_heads(qkv, H), **kwargs)
    y.backward(do)
    return y.detach(), qkv.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, got, want, lowp, atol):
    """got (the kernel) within 2x the error of lowp (PyTorch in the same dtype) of want (float64), + atol."""
    err, base = max_err(got, want), max_err(lowp, want)
    assert err <= 2 * base + atol, f"{name}: max error {err:.3e} vs PyTorch's {base:.3e} (atol {atol:.0e})"


def sdpa(q, k, v, causal=True, sm_scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)


def check_against_reference(B, H, T, D, causal, dtype, device, atol, deterministic=True, attention=flash_attention):
    """Output and d(qkv) of flash_attention on q, k, v made as the model makes them (or of
    flash_attention_qkv on qkv itself), against float64."""
    qkv, _ = model_qkv(B, H, T, D, dtype, device)
    do = torch.randn(B, H, T, D, dtype=dtype, device=device)
    got = run(attention, qkv, H, do, causal=causal, deterministic=deterministic)
    want = run(attention_ref, qkv.double(), H, do.double(), causal=causal)
    lowp = run(sdpa, qkv, H, do, causal=causal)
    assert got[1].dtype == dtype
    for name, g, w, l in zip(("out", "d(qkv)"), got, want, lowp):
        check(name, g, w, l, atol)


@pytest.mark.parametrize("B, H, T, D, causal, dtype", [
    (3, 1, 1, 32, True, torch.float32),
    (1, 3, 17, 64, True, torch.float32),
    (3, 1, 17, 32, False, torch.float32),
    (1, 3, 64, 32, True, torch.float16),
    (3, 1, 64, 64, False, torch.float32),
    (1, 3, 130, 32, True, torch.float32),
    (1, 1, 130, 64, False, torch.float16),
    (1, 1, 257, 32, True, torch.float32),
    (1, 1, 257, 64, False, torch.float32),
    (2, 3, 257, 64, True, torch.float16),
    (3, 3, 100, 32, False, torch.float16),
    (2, 1, 37, 16, True, torch.float32),     # the smallest and largest head dims
    (1, 2, 37, 128, True, torch.float32),
    (1, 1, 100, 128, False, torch.float16),
])
def test_matches_reference(B, H, T, D, causal, dtype, device, poison):
    check_against_reference(B, H, T, D, causal, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("B, H, T, D, causal, dtype", [
    (1, 3, 17, 64, True, torch.float32),
    (3, 1, 64, 32, False, torch.float32),
    (2, 3, 257, 64, True, torch.float16),
    (1, 1, 130, 32, False, torch.float16),
])
def test_atomic_backward_matches_reference(B, H, T, D, causal, dtype, device, poison):
    """deterministic=False: dq added up by the dk/dv programs with atomics into an fp32 buffer that the
    delta pass zeroes. Every buffer starts as NaN here, so an element left unwritten (or a buffer left
    unzeroed) shows."""
    check_against_reference(B, H, T, D, causal, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3,
                            deterministic=False)


@pytest.mark.parametrize("B, H, T, D, causal, dtype, deterministic", [
    (1, 3, 17, 64, True, torch.float32, True),
    (3, 1, 1, 32, True, torch.float32, False),
    (2, 3, 130, 32, False, torch.float16, True),
    (1, 2, 100, 16, True, torch.float16, False),
    (2, 1, 37, 128, False, torch.float32, False),
])
def test_packed_matches_reference(B, H, T, D, causal, dtype, deterministic, device, poison):
    """flash_attention_qkv, the model's attention: q, k, v read from one (B, T, 3C) tensor and d(qkv)
    written into one; every buffer starts as NaN (poison), so a slot of d(qkv) left unwritten shows."""
    check_against_reference(B, H, T, D, causal, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3,
                            deterministic=deterministic, attention=flash_attention_qkv)


@pytest.mark.parametrize("deterministic", [True, False])
def test_packed_layouts(deterministic, device):
    """y is (B, T, C) and contiguous, as c_proj takes it; d(qkv) is one contiguous (B, T, 3C) tensor (no
    concatenation made it)."""
    B, H, T, D = 2, 3, 5, 16
    qkv, _ = model_qkv(B, H, T, D, torch.float32, device)
    y = flash_attention_qkv(qkv, H, deterministic=deterministic)
    assert y.shape == (B, T, H * D) and y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()

    # flash_attention on leaves laid out (B, T, H, D), as its output is: dq, dk, dv are three slots of one
    # buffer with the leaves' strides, which autograd keeps as .grad (it copies a gradient of other strides)
    q, k, v = (torch.randn(B, T, H, D, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    flash_attention(q, k, v, deterministic=deterministic).sum().backward()
    assert all(t.grad.stride() == t.stride() for t in (q, k, v))
    assert k.grad.data_ptr() - q.grad.data_ptr() == v.grad.data_ptr() - k.grad.data_ptr() == q.numel() * 4


AUTOTUNED = [(attention._attn_fwd, attention._FWD_CANDIDATES), (attention._attn_bwd_dq, attention._DQ_CANDIDATES),
             (attention._dkdv_kernel, attention._DKDV_CANDIDATES), (attention._dkdv_dq_kernel, attention._DKDV_DQ_CANDIDATES)]


@pytest.mark.parametrize("candidate", range(max(len(candidates) for _, candidates in AUTOTUNED)))
@pytest.mark.parametrize("causal", [True, False])
def test_every_autotuning_candidate(candidate, causal, device, monkeypatch, poison):
    """Training autotunes among every candidate tile; the other tests run the default one (GPT2_AUTOTUNE=0) or,
    in the interpreter, a small one. Here each autotuner is held to its candidate number `candidate` (the
    last one where it has fewer), both backward variants, at a T that no tile divides."""
    chosen = {tuner: candidates[min(candidate, len(candidates) - 1)] for tuner, candidates in AUTOTUNED}
    for tuner, config in chosen.items():
        monkeypatch.setattr(tuner, "configs", [config])
        monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(launch, "_launchers", {})  # the eager path's bound kernels, chosen under other configs
    for deterministic in (True, False):  # fp16: the tiles' shared memory as in training (fp32 may not fit a GPU)
        check_against_reference(1, 2, 130, 64, causal, torch.float16, device, atol=2e-3, deterministic=deterministic)
    assert all(tuner.best_config is config for tuner, config in chosen.items())


def separate_qkv(B, H, T, D, device):
    """Separate q, k, v whose batch, head and time strides all differ from one another's (so that one used
    in place of another reads the wrong elements): rows of a wider (B, H, T, D + 16) tensor, a transposed
    (B, T, H, D) one and a transposed (H, B, T, D) one."""
    q = torch.randn(B, H, T, D + 16, device=device)[..., :D].requires_grad_()
    k = torch.randn(B, T, H, D, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(H, B, T, D, device=device).transpose(0, 1).requires_grad_()
    return q, k, v


def check_separate_tensors(q, k, v, causal, sm_scale, deterministic):
    """Output and dq, dk, dv of flash_attention(q, k, v) with grads through .sum() (dO of stride 0), against
    float64 (fp32 inputs)."""
    y = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, deterministic=deterministic)
    y.sum().backward()
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    y64 = attention_ref(q64, k64, v64, causal=causal, sm_scale=sm_scale)
    y64.sum().backward()
    pairs = (("out", y, y64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad))
    for name, g, w in pairs:
        err = max_err(g.detach().cpu(), w)
        assert err <= 1e-5, f"{name}: max error {err:.3e}"


@pytest.mark.parametrize("causal, deterministic", [(True, True), (False, False)])
def test_separate_tensors_and_scale(causal, deterministic, device):
    """Separate dense q, k, v in three layouts with strides of their own, a custom sm_scale, grads through
    .sum() (dO of stride 0); both backward variants, causal or not."""
    check_separate_tensors(*separate_qkv(2, 3, 33, 32, device), causal, 0.3, deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_head_dimension_that_is_not_contiguous(deterministic, device):
    """q, k, v whose last dimension has a stride of its own (a transposed (B, H, D, T) tensor): the kernels
    read D as contiguous, so the launchers make it so, forward and backward."""
    q, k, v = (torch.randn(1, 2, 32, 37, device=device).transpose(-1, -2).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    check_separate_tensors(q, k, v, True, 0.3, deterministic)


def test_atomic_dq_is_zeroed_before_every_autotuning_trial(device, monkeypatch):
    """Training autotunes the atomic dk/dv kernel: each trial launch adds its dq into DQ_ACC before the real
    launch does, so the autotuner must zero DQ_ACC before every launch (reset_to_zero), or dq comes out
    several times too large. Two candidates here; the interpreter has no timer, so the benchmark is two
    calls of each trial (do_bench makes many) reporting equal times."""
    tuner = attention._dkdv_dq_kernel
    configs = [triton.Config({"BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_N": 16, "BLOCK_M": 16}, num_warps=4, num_stages=1)]
    trials = []

    def benchmark(call, quantiles):
        trials.append(call)
        call(), call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "cache_results", False)  # tune here, not from Triton's on-disk results
    monkeypatch.setitem(tuner.__dict__, "do_bench", benchmark)  # do_bench is a cached_property
    monkeypatch.setattr(launch, "_launchers", {})  # the eager path's bound kernels, chosen under other configs
    check_separate_tensors(*separate_qkv(1, 2, 40, 32, device), True, 0.3, deterministic=False)
    assert len(trials) == 2 and tuner.best_config in configs


def spy_on_precision(monkeypatch):
    """The PRECISION (of tl.dot) that every attention launch asks for, on either path (direct, traced)."""
    seen = []

    def spying(launcher):
        class Spy:
            def __init__(self, kernel):
                self.launch = launcher(kernel)

            def __getitem__(self, grid):
                def go(*args, **kwargs):
                    if "PRECISION" in kwargs:
                        seen.append(kwargs["PRECISION"])
                    return self.launch[grid](*args, **kwargs)
                return go
        return Spy

    monkeypatch.setattr(attention, "direct", spying(attention.direct))
    monkeypatch.setattr(attention, "traced", spying(attention.traced))
    return seen


@pytest.mark.parametrize("path", ["eager", "compile"])
def test_fp32_asks_for_ieee_dot_products(path, device, monkeypatch):
    """fp32 is the dtype for checking results: its dot products must be IEEE fp32, not TF32 (a 10-bit
    mantissa, errors near 1e-3). The interpreter computes every tl.dot in fp32 whatever it is asked, so
    this checks what each launch asks for, on the host: forward, dk/dv and dq, then forward and the atomic
    dk/dv + dq."""
    seen = spy_on_precision(monkeypatch)
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = (torch.randn(1, 2, 17, 32, device=device, requires_grad=True) for _ in range(3))
    for deterministic in (True, False):
        flash_attention(q, k, v, deterministic=deterministic).sum().backward()
    assert seen == ["ieee"] * 5, seen


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_very_negative_scores(causal, deterministic, device):
    """Every score near -140 (base-2 LSE near -200): a key past T, read as zero, must still get P = 0 --
    which the atomic backward's dq (dk^T ds over all of the key block's rows) shows where the dk/dv
    stores skip those rows."""
    B, H, T, D = 1, 1, 17, 32
    u = torch.randn(D, device=device)
    k = (5 * u + 0.1 * torch.randn(B, H, T, D, device=device)).requires_grad_()
    q = (-5 * u.expand(B, H, T, D)).clone().requires_grad_()
    v = torch.randn(B, H, T, D, device=device, requires_grad=True)
    got = [flash_attention(q, k, v, causal=causal, deterministic=deterministic)]
    lowp = [sdpa(q, k, v, causal=causal)]
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    want = [attention_ref(q64, k64, v64, causal=causal)]
    for outs, leaves in ((got, (q, k, v)), (lowp, (q, k, v)), (want, (q64, k64, v64))):
        outs += torch.autograd.grad(outs[0], leaves, torch.ones_like(outs[0]))
    for name, g, w, l in zip(("out", "dq", "dk", "dv"), got, want, lowp):
        check(name, g.detach().cpu(), w, l.detach().cpu(), atol=1e-5)


def test_causal_blocks_above_the_diagonal_are_never_read(device):
    """A NaN in the last key/value row: a masked (rather than skipped) block would still multiply it
    by P = 0 and spread NaN into every earlier query block. Holds for query blocks up to 128."""
    B, H, T, D = 1, 2, 200, 32
    q, k, v = (torch.randn(B, H, T, D, device=device, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k[:, :, -1] = float("nan")
        v[:, :, -1] = float("nan")
    y = flash_attention(q, k, v, causal=True)
    y.backward(torch.randn_like(y))
    early = slice(0, T - 1 - 128)
    assert torch.isfinite(y[:, :, early]).all() and torch.isfinite(q.grad[:, :, early]).all()


def test_output_layout_is_bthd(device):
    """The model's y.transpose(1, 2).contiguous() must be free: the output's memory is (B, T, H, D)."""
    _, (q, k, v) = model_qkv(2, 3, 5, 16, torch.float32, device)
    y = flash_attention(q, k, v)
    assert y.shape == (2, 3, 5, 16) and y.transpose(1, 2).is_contiguous()


def test_backward_is_deterministic(device):
    """The default backward: every gradient element written by one program, bitwise reproducible."""
    B, H, T, D = 1, 3, 70, 32
    qkv, _ = model_qkv(B, H, T, D, torch.float32, device)
    do = torch.randn(B, H, T, D, device=device)
    first, second = run(flash_attention, qkv, H, do), run(flash_attention, qkv, H, do)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_rejects_bad_shapes(device):
    q = torch.randn(1, 1, 8, 48, device=device)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(q, q, q)
    with pytest.raises(ValueError, match="one shape"):
        flash_attention(q[..., :32], q[:, :, :4, :32], q[..., :32])
    many = torch.randn(65536, 1, 1, 16, device=device)  # B * H past the grid's second axis
    with pytest.raises(ValueError, match="at most 65535 batch x heads .* 65536 x 1: split the batch"):
        flash_attention(many, many, many)


def test_packed_rejects_bad_input(device):
    qkv = torch.randn(1, 8, 96, device=device)
    for bad_qkv, n_head in ((qkv, 5), (qkv, 0), (qkv[0], 1)):
        with pytest.raises(ValueError, match=r"qkv \(B, T, 3 \* n_head \* head_dim\) and n_head >= 1"):
            flash_attention_qkv(bad_qkv, n_head)
    with pytest.raises(TypeError, match="n_head must be an integer, got 2.0"):
        flash_attention_qkv(qkv, 2.0)
    for n_head, head_dim in ((4, 8), (32, 1)):
        with pytest.raises(ValueError, match=f"C / n_head = 32 / {n_head} = {head_dim}, the kernels take 16, 32, "):
            flash_attention_qkv(qkv, n_head)
    with pytest.raises(ValueError, match="head dim C / n_head = 0 / 1 = 0"):
        flash_attention_qkv(qkv[..., :0], 1)
    with pytest.raises(TypeError, match="flash_attention_qkv: qkv is torch.float64"):
        flash_attention_qkv(qkv.double(), 1)
    with pytest.raises(ValueError, match="flash_attention_qkv wants 0 < sm_scale"):
        flash_attention_qkv(qkv, 1, sm_scale=0.0)
    assert flash_attention_qkv(qkv, torch.tensor(1)).shape == (1, 8, 32)  # an integer tensor stands for an int


def test_rows_past_32_bit_offsets_are_refused():
    """The kernels index the rows of one (batch, head) in 32 bits; d(qkv)'s rows are 3C apart. Meta tensors:
    nothing is allocated, nothing launched."""
    H, D = 32, 128
    T = 2**31 // (3 * H * D) + 1
    q = torch.empty(1, H, T, D, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=f"T \\({T}\\) times the row stride \\(12288 elements\\) .* split the sequence"):
        flash_attention(q, q, q)


def test_rejects_bad_dtypes_and_devices(device):
    """fp64 would run at fp32 precision forward and give wrong gradients; integers fail inside Triton."""
    q = torch.randn(1, 1, 8, 32, device=device)
    with pytest.raises(TypeError, match="k is torch.float64"):
        flash_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="q is torch.int64"):
        flash_attention(*[torch.ones(1, 1, 8, 32, dtype=torch.int64, device=device)] * 3)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="q is on .* but v on meta"):
        flash_attention(q, q, torch.empty(1, 1, 8, 32, device="meta"))
    for scale in (0.0, math.inf, 1e38):  # 1e38 * log2(e) overflows fp32 in the kernel
        with pytest.raises(ValueError, match="sm_scale"):
            flash_attention(q, q, q, sm_scale=scale)
    if device.type == "cpu":  # the interpreter's bf16 tl.dot returns garbage
        with pytest.raises(ValueError, match="interpreter .* not bfloat16: use --dtype float32"):
            flash_attention(*[q.bfloat16()] * 3)


@pytest.mark.parametrize("attention", [flash_attention, flash_attention_qkv])
@pytest.mark.parametrize("deterministic, causal", [(True, True), (False, False)])
def test_compile_path_runs_the_same_launches(deterministic, causal, attention, device, monkeypatch):
    """The custom ops torch.compile traces and the eager autograd.Functions share their launchers (the
    interpreter runs the atomic adds in one order: bitwise equal there too), and the forward ops hand causal,
    sm_scale and deterministic on to their backward."""
    qkv, _ = model_qkv(2, 3, 70, 32, torch.float32, device)
    do = torch.randn(2, 3, 70, 32, device=device)
    kwargs = dict(causal=causal, sm_scale=0.3, deterministic=deterministic)
    eager = run(attention, qkv, 3, do, **kwargs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = run(attention, qkv, 3, do, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(eager, traced))


def test_custom_op_registration(device):
    """Schema and autograd registration; fake-tensor tracing needs a real GPU (see test_opcheck_full)."""
    q, k, v = (torch.randn(1, 2, 17, 32, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.gpt2.flash_attention_fwd.default, (q, k, v, True, 0.2, True),
                          test_utils=("test_schema", "test_autograd_registration"))
    qkv = torch.randn(1, 17, 3 * 64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.gpt2.flash_attention_qkv_fwd.default, (qkv, 2, True, 0.2, True),
                          test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------
# GPU only


@gpu
@pytest.mark.parametrize("B, H, T, D, causal", [
    (3, 5, 1000, 64, True),
    (2, 3, 4096, 128, True),
    (1, 12, 4096, 64, True),
    (2, 3, 1023, 32, False),
    (1, 2, 4096, 128, False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu(B, H, T, D, causal, dtype):
    check_against_reference(B, H, T, D, causal, dtype, "cuda", atol=1e-3)


@gpu
@pytest.mark.parametrize("B, H, T, D, causal", [(3, 5, 1000, 64, True), (2, 3, 1023, 32, False)])
def test_atomic_backward_matches_reference_gpu(B, H, T, D, causal):
    check_against_reference(B, H, T, D, causal, torch.bfloat16, "cuda", atol=1e-3, deterministic=False)


@gpu
def test_backward_is_deterministic_gpu():
    B, H, T, D = 4, 12, 1024, 64
    qkv, _ = model_qkv(B, H, T, D, torch.bfloat16, "cuda")
    do = torch.randn(B, H, T, D, dtype=torch.bfloat16, device="cuda")
    first, second = run(flash_attention, qkv, H, do), run(flash_attention, qkv, H, do)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@gpu
def test_opcheck_full():
    q, k, v = (torch.randn(2, 3, 100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.library.opcheck(torch.ops.gpt2.flash_attention_fwd.default, (q, k, v, True, 0.125, True))
    o, lse = torch.ops.gpt2.flash_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.125, True)
    for deterministic in (True, False):
        torch.library.opcheck(torch.ops.gpt2.flash_attention_bwd.default,
                              (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, True, 0.125,
                               deterministic))
    qkv = torch.randn(2, 100, 3 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.gpt2.flash_attention_qkv_fwd.default, (qkv, 3, True, 0.125, False))


@gpu
@pytest.mark.parametrize("attention, deterministic", [(flash_attention_qkv, True), (flash_attention_qkv, False),
                                                      (flash_attention, True)])  # the model's op in both modes
def test_compiles_without_graph_breaks(attention, deterministic):
    B, H, T, D = 2, 3, 200, 64
    qkv, _ = model_qkv(B, H, T, D, torch.bfloat16, "cuda")
    do = torch.randn(B, H, T, D, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(attention, fullgraph=True)
    got = run(compiled, qkv, H, do, packed=attention is flash_attention_qkv, deterministic=deterministic)
    want = run(attention, qkv, H, do, deterministic=deterministic)
    for g, w in zip(got, want):  # the compiled graph may autotune to other block sizes: not bitwise
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
