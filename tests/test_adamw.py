"""FusedAdamW against torch.optim.AdamW(foreach=False) and a float64 run of it: parameters, states,
state_dict both ways, clipping folded into the step, bf16 parameters, argument errors."""
import copy
import math

import pytest
import torch

from kernels import adamw
from kernels.adamw import BLOCK, FusedAdamW

# BLOCK: only full blocks; 64x65: full + partial; 2 BLOCK + 5: full blocks of one tensor told apart
SHAPES = [(1,), (37,), (13, 7), (64, 65), (BLOCK,), (2 * BLOCK + 5,)]
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def make_params(device, dtype=torch.float32):
    """Fresh odd-sized parameters; the 37 one is a view one fp32 into its storage (not 16-byte aligned)."""
    params = [torch.randn(s, device=device, dtype=dtype) for s in SHAPES]
    params[1] = torch.randn(38, device=device, dtype=dtype)[1:]
    return [torch.nn.Parameter(p) for p in params]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def groups(params):
    """Two groups as GPT.configure_optimizers makes them: matrices decayed, the rest not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cosine_lr(it, total=10, max_lr=1e-3):
    return max_lr * 0.5 * (1 + math.cos(math.pi * it / total))


def set_grads(param_lists, it, scale=1.0):
    """The same fresh gradient, in the first list's dtype, for the same parameter of every list;
    the 37 one has none on steps 3 and 7."""
    for ps in zip(*param_lists):
        g = (scale * torch.randn(ps[0].shape, device=ps[0].device)).to(ps[0].dtype)
        for p in ps:
            p.grad = None if (it in (3, 7) and p.numel() == 37) else g.to(p.dtype, copy=True)


def run(optimizers, param_lists, steps, start=0, clip=None):
    for it in range(start, start + steps):
        set_grads(param_lists, it, scale=10.0 if clip else 1.0)
        for opt, params in zip(optimizers, param_lists):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(it)
            if clip is not None and isinstance(opt, FusedAdamW):
                opt.clip_grad_norm_(clip)
            elif clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()


def max_rel_err(ours, ref):
    """max |ours - ref| over max |ref|, per tensor, worst tensor."""
    return max(((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max()).item()
               for a, b in zip(ours, ref))


def states(opt, params, key):
    return [opt.state[p][key] for p in params]


def test_matches_torch_adamw(device):
    params = make_params(device)
    ref_params, ref64_params = clone_params(params), clone_params(params, torch.float64)
    opt = FusedAdamW(groups(params), **HYPER)
    ref = torch.optim.AdamW(groups(ref_params), **HYPER, foreach=False)
    ref64 = torch.optim.AdamW(groups(ref64_params), **HYPER, foreach=False)
    run([opt, ref, ref64], [params, ref_params, ref64_params], steps=10)

    err, torch_err = max_rel_err(params, ref64_params), max_rel_err(ref_params, ref64_params)
    assert max_rel_err(params, ref_params) <= 1e-6, f"params vs torch fp32: {max_rel_err(params, ref_params):.2e}"
    assert err <= 2 * torch_err + 1e-7, f"params vs fp64: ours {err:.2e}, torch fp32 {torch_err:.2e}"
    for key in ("exp_avg", "exp_avg_sq"):
        e = max_rel_err(states(opt, params, key), states(ref64, ref64_params, key))
        assert e <= 1e-5, f"{key} vs fp64: {e:.2e}"
        assert all(s.dtype == torch.float32 for s in states(opt, params, key))
    steps = [s.item() for s in states(opt, params, "step")]
    assert steps == [s.item() for s in states(ref, ref_params, "step")] and 8.0 in steps  # 37: two skipped


@pytest.mark.parametrize("lr, weight_decay, grad_scale", [
    (0.1, 0.5, 1.0),    # a 5% decay a step: applied to p before the Adam update, as torch does
    (1e-2, 0.0, 1e-8),  # grads near eps: eps is added to sqrt(v) / sqrt(1 - beta2^t), not to sqrt(v)
])
def test_large_decay_and_tiny_grads_match_float64(lr, weight_decay, grad_scale, device):
    """Where the order of the terms shows: a large lr * weight_decay (the decay and the update each move p
    by a few percent), and gradients of eps's size (1e-8), where eps is a large part of the denominator and
    the bias correction of v multiplies it (1 / sqrt(1 - 0.999) = 32 at step 1). HYPER's lr = 1e-3 and unit
    grads hide both."""
    params = make_params(device)
    ref_params, ref64_params = clone_params(params), clone_params(params, torch.float64)
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt = FusedAdamW(params, **hyper)
    ref = torch.optim.AdamW(ref_params, **hyper, foreach=False)
    ref64 = torch.optim.AdamW(ref64_params, **hyper, foreach=False)
    for it in range(3):
        set_grads([params, ref_params, ref64_params], it, scale=grad_scale)
        for optimizer in (opt, ref, ref64):
            optimizer.step()
    err, torch_err = max_rel_err(params, ref64_params), max_rel_err(ref_params, ref64_params)
    assert err <= 2 * torch_err + 1e-7, f"params vs fp64: ours {err:.2e}, torch fp32 {torch_err:.2e}"


def test_alignment_flag_covers_every_tensor(device, monkeypatch):
    """ALIGNED promises the compiler that every address in a launch's table is a multiple of 16 bytes
    (128-bit loads): one misaligned tensor anywhere in the table must turn it off, or the GPU faults on a
    misaligned address; a table of aligned tensors only keeps it on. The undecayed group here has an aligned
    row (1,) before the misaligned 37 one. The interpreter ignores the hint, so this checks the flag each
    launch passes against its table, on the host."""
    launches = []
    direct = adamw.direct

    def spy(kernel):
        launcher = direct(kernel)

        class Launch:
            def __getitem__(self, grid):
                def go(table, *args, ALIGNED, **meta):
                    launches.append((table.cpu(), ALIGNED))
                    return launcher[grid](table, *args, ALIGNED=ALIGNED, **meta)
                return go
        return Launch()

    monkeypatch.setattr(adamw, "direct", spy)
    params = make_params(device)
    opt = FusedAdamW(groups(params), **HYPER)
    set_grads([params], it=0)
    opt.clip_grad_norm_(1.0)
    opt.step()
    aligned = [bool((table[:, :4] % 16 == 0).all()) for table, _ in launches]
    flags = [flag for _, flag in launches]
    assert flags == aligned, f"ALIGNED passed {flags}, tables aligned {aligned}"
    assert True in aligned and False in aligned
    # an aligned parameter whose grad is a misaligned view (a slice of a flat buffer, as DDP's buckets are)
    launches.clear()
    aligned_param = torch.nn.Parameter(torch.randn(64, 65, device=device))
    flat = torch.randn(64 * 65 + 1, device=device)
    aligned_param.grad = flat[1:].view(64, 65)
    FusedAdamW([aligned_param], **HYPER).step()
    flags = [flag for _, flag in launches]
    assert flags and not any(flags), f"a misaligned grad must turn ALIGNED off: {flags}"


def test_state_dict_round_trip(device):
    params = make_params(device)
    resumed, torch_params = clone_params(params), clone_params(params)
    straight = FusedAdamW(groups(params), **HYPER)
    torch.manual_seed(0)  # every run below sees the same gradients
    run([straight], [params], steps=10)

    torch.manual_seed(0)
    first = FusedAdamW(groups(resumed), **HYPER)
    run([first], [resumed], steps=5)
    saved = copy.deepcopy(first.state_dict())
    second = FusedAdamW(groups(resumed), **HYPER)
    second.load_state_dict(saved)
    run([second], [resumed], steps=5, start=5)
    assert max_rel_err(resumed, params) == 0.0, f"save/load changed the run: {max_rel_err(resumed, params):.2e}"

    # ours -> torch for three steps -> ours for two
    torch.manual_seed(0)
    ours = FusedAdamW(groups(torch_params), **HYPER)
    run([ours], [torch_params], steps=5)
    theirs = torch.optim.AdamW(groups(torch_params), **HYPER, foreach=False)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    run([theirs], [torch_params], steps=3, start=5)
    back = FusedAdamW(groups(torch_params), **HYPER)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    step = back.state[torch_params[0]]["step"]
    assert step.dtype == torch.float32 and step.device == torch_params[0].device and step.item() == 8
    run([back], [torch_params], steps=2, start=8)
    assert max_rel_err(torch_params, params) <= 1e-6, f"through torch: {max_rel_err(torch_params, params):.2e}"


def test_a_rollback_and_a_replaced_storage_at_unchanged_grad_addresses(device):
    """The launch tables are cached by address. Grads filled in place keep theirs, so a cached table must
    still see a load_state_dict into an optimizer that has stepped (its moments and step are new tensors),
    and a parameter whose storage was replaced (p.data = ...): both against torch's AdamW doing the same."""
    params = make_params(device)
    theirs_params = clone_params(params)
    ours = FusedAdamW(groups(params), **HYPER)
    theirs = torch.optim.AdamW(groups(theirs_params), **HYPER, foreach=False)
    for p in (*params, *theirs_params):
        p.grad = torch.zeros_like(p)

    def step():
        for p, q in zip(params, theirs_params):
            g = torch.randn(p.shape, device=p.device)
            p.grad.copy_(g)
            q.grad.copy_(g)
        ours.step()
        theirs.step()

    step()
    saved_ours, saved_theirs = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    step()
    ours.load_state_dict(saved_ours)
    theirs.load_state_dict(saved_theirs)
    step()
    assert max_rel_err(params, theirs_params) <= 1e-6, f"after the rollback: {max_rel_err(params, theirs_params):.2e}"
    for p, q in zip(params, theirs_params):
        p.data, q.data = p.data.clone(), q.data.clone()
    step()
    step()
    assert max_rel_err(params, theirs_params) <= 1e-6, f"after p.data = ...: {max_rel_err(params, theirs_params):.2e}"


@pytest.mark.parametrize("max_norm", [1.0, 1e4])  # clipping active, inactive
def test_clip_folded_into_step(device, max_norm):
    params = make_params(device)
    ref_params = clone_params(params)
    opt = FusedAdamW(groups(params), **HYPER)
    ref = torch.optim.AdamW(groups(ref_params), **HYPER, foreach=False)
    set_grads([params, ref_params], it=0, scale=10.0)
    grads = [p.grad.clone() for p in params]
    norm = opt.clip_grad_norm_(max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.device == params[0].device
    assert abs(norm.item() - ref_norm.item()) <= 1e-6 * ref_norm.item(), f"norm {norm.item()} vs {ref_norm.item()}"
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "clip_grad_norm_ must not touch p.grad"
    opt.step()
    ref.step()
    assert max_rel_err(params, ref_params) <= 1e-6, f"clip+step: {max_rel_err(params, ref_params):.2e}"
    # the clip applies to one step only
    set_grads([params, ref_params], it=1, scale=10.0)
    opt.step()
    ref.step()
    assert max_rel_err(params, ref_params) <= 1e-6, f"step after clip: {max_rel_err(params, ref_params):.2e}"


@pytest.mark.parametrize("max_norm", [1.0, math.inf])  # a clip; only measuring (the trainer's --grad_clip 0)
def test_a_nan_gradient_spreads_as_in_torch(device, max_norm):
    """One NaN gradient element makes the norm NaN. Clipping by it makes every parameter NaN, as torch's
    clip_grad_norm_ does (a clip coefficient that dropped the NaN would let every other parameter take
    an unclipped step); max_norm=inf measures without clipping, so the NaN stays in its own elements, as
    in a torch step without clip_grad_norm_."""
    params = make_params(device)
    ref_params = clone_params(params)
    opt = FusedAdamW(groups(params), **HYPER)
    ref = torch.optim.AdamW(groups(ref_params), **HYPER, foreach=False)
    set_grads([params, ref_params], it=0)
    for p in (params[2], ref_params[2]):
        p.grad[3, 4] = math.nan
    assert opt.clip_grad_norm_(max_norm).isnan()
    if max_norm != math.inf:
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    opt.step()
    ref.step()
    for ours, theirs in zip(params, ref_params):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.allclose(ours[~ours.isnan()], theirs[~theirs.isnan()], rtol=1e-6, atol=1e-7)
    assert all(p.isnan().all() for p in params) == (max_norm != math.inf)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.95)])
def test_bias_corrections_in_fp32_are_exact_to_rounding(device, betas):
    """1 - beta^t in fp32 without cancellation: one step at t = 1, 2, 7, 1000, 10**6 against float64,
    from p = 0 so that p holds the update itself. The plain 1 - exp(t log beta) in fp32 is off by
    1.3e-5 relative at beta = 0.999, t = 1 (6e-6 in the update)."""
    for t in (1, 2, 7, 1000, 10**6):
        p = torch.nn.Parameter(torch.zeros(5, device=device))
        opt = FusedAdamW([p], lr=1e-2, betas=betas, eps=0.0, weight_decay=0.0)
        p.grad = torch.full((5,), 0.25, device=device)
        state = {"step": torch.tensor(float(t - 1)), "exp_avg": torch.full((5,), 0.125),
                 "exp_avg_sq": torch.full((5,), 0.0625)}
        opt.load_state_dict({"state": {0: state}, "param_groups": opt.state_dict()["param_groups"]})
        opt.step()
        b1, b2 = betas
        m, v = b1 * 0.125 + (1 - b1) * 0.25, b2 * 0.0625 + (1 - b2) * 0.0625
        want = -1e-2 / (1 - b1**t) * m / (math.sqrt(v) / math.sqrt(1 - b2**t))
        err = abs(p[0].item() - want) / abs(want)
        assert err <= 1e-6, f"t={t}, betas={betas}: update off by {err:.1e} of its size"


def round_to_bf16(x):
    """The kernel's fp32 -> bf16 store: round to nearest even on the GPU; the Triton 3.9 interpreter
    truncates instead (an interpreter gap), so under it the reference truncates too."""
    if x.is_cuda:
        return x.bfloat16().float()
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32)


def test_bf16_params_fp32_states(device):
    """bf16 params: each step's update in fp32 from the bf16 value, rounded to bf16 once.

    Every step starts the reference from the kernel's bf16 values: a value that lands next to a
    rounding boundary may go either way by one ulp, and that difference must not compound.
    """
    params = make_params(device, torch.bfloat16)
    ref_params = clone_params(params, torch.float32)
    hyper = {**HYPER, "lr": 1e-2}  # updates of several bf16 ulps, so the arithmetic shows
    opt = FusedAdamW(groups(params), **hyper)
    ref = torch.optim.AdamW(groups(ref_params), **hyper, foreach=False)
    for it in range(4):
        set_grads([params, ref_params], it)
        with torch.no_grad():
            for p, q in zip(params, ref_params):
                q.copy_(p)
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            ulps = ((p.float() - round_to_bf16(q.detach())).abs() / (2**-7 * q.detach().abs())).max().item()
            assert ulps <= 1.0, f"bf16 params, step {it}: {ulps:.2f} bf16 ulps from the reference"
    assert all(p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    e = max_rel_err(states(opt, params, "exp_avg_sq"), states(ref, ref_params, "exp_avg_sq"))
    assert e <= 1e-5, f"exp_avg_sq: {e:.2e}"


def test_mixed_dtypes_in_one_group_with_clip(device):
    """fp32, bf16 and fp16 parameters in one group (a table and a launch each), clipped as one: the norm over
    every grad in its own dtype, then each update in fp32 from the parameter's value, rounded once to its
    dtype. As in the bf16 test, each step starts the reference from the kernel's values."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float16]
    params = [torch.nn.Parameter(torch.randn(shape, device=device).to(dtype))
              for shape, dtype in zip([(64, 65), (37,), (BLOCK + 3,), (13, 7)], dtypes)]
    ref_params = clone_params(params, torch.float32)
    hyper = {**HYPER, "lr": 1e-2, "weight_decay": 0.1}
    opt = FusedAdamW(params, **hyper)
    ref = torch.optim.AdamW(ref_params, **hyper, foreach=False)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
    for it in range(3):
        with torch.no_grad():
            for p, q in zip(params, ref_params):
                q.copy_(p)
                p.grad = (10 * torch.randn(p.shape, device=device)).to(p.dtype)
                q.grad = p.grad.to(torch.float32, copy=True)  # torch's clip scales it in place
        norm, ref_norm = opt.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        assert abs(norm.item() - ref_norm.item()) <= 1e-6 * ref_norm.item(), f"norm {norm.item()} vs {ref_norm.item()}"
        opt.step()
        ref.step()
        assert max_rel_err(params[:1], ref_params[:1]) <= 1e-6, f"fp32 param, step {it}"
        for p, q in zip(params[1:], ref_params[1:]):
            want = round_to_bf16(q.detach()) if p.dtype == torch.bfloat16 else q.detach().to(p.dtype).float()
            ulps = ((p.float() - want).abs() / (ulp[p.dtype] * q.detach().abs())).max().item()
            assert ulps <= 1.0, f"{p.dtype} param, step {it}: {ulps:.2f} ulps from the reference"
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)


def test_zero_grad_frees_grads_and_drops_clip(device):
    """The table cache must not keep grads alive (zero_grad(set_to_none=True) frees them), and a
    clip measured on grads that were then zeroed must not reach the next step."""
    import weakref

    params = make_params(device)
    ref_params = clone_params(params)
    opt = FusedAdamW(groups(params), **HYPER)
    ref = torch.optim.AdamW(groups(ref_params), **HYPER, foreach=False)
    set_grads([params, ref_params], it=0, scale=10.0)
    opt.step()
    ref.step()
    grad = weakref.ref(params[3].grad)
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()
    assert grad() is None, "the optimizer still holds a gradient after zero_grad()"
    set_grads([params, ref_params], it=1)
    opt.step()
    ref.step()
    assert max_rel_err(params, ref_params) <= 1e-6, f"step after zero_grad: {max_rel_err(params, ref_params):.2e}"


def test_non_contiguous_param_raises():
    p = torch.nn.Parameter(torch.randn(8, 6).t())
    p.grad = torch.randn(8, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        FusedAdamW([p]).step()


@pytest.mark.parametrize("betas", [(0.0, 0.95), (0.9, 0.0), (0.0, 0.0)])
def test_betas_of_zero_match_float64(betas, device):
    """beta = 0 makes the moment the newest gradient (or its square), exactly: m + (1 - beta) * (g - m) kept
    the rounding of g - m there (exp_avg_sq 5 % off after a gradient of 2 then one of 1e-3)."""
    params = make_params(device)
    ref_params, ref64_params = clone_params(params), clone_params(params, torch.float64)
    hyper = {**HYPER, "betas": betas}
    opt = FusedAdamW(params, **hyper)
    ref = torch.optim.AdamW(ref_params, **hyper, foreach=False)
    ref64 = torch.optim.AdamW(ref64_params, **hyper, foreach=False)
    for it, scale in enumerate([2.0, 1e-3, 1.0]):
        set_grads([params, ref_params, ref64_params], it, scale=scale)
        for optimizer in (opt, ref, ref64):
            optimizer.step()
    err, torch_err = max_rel_err(params, ref64_params), max_rel_err(ref_params, ref64_params)
    assert err <= 2 * torch_err + 1e-7, f"params vs fp64: ours {err:.2e}, torch fp32 {torch_err:.2e}"
    for key in ("exp_avg", "exp_avg_sq"):
        e = max_rel_err(states(opt, params, key), states(ref64, ref64_params, key))
        assert e <= 1e-6, f"{key} vs fp64: {e:.2e}"


def test_refusals_name_the_problem():
    """What the kernel cannot take is refused with a message, never read past its end or updated twice."""
    p = torch.nn.Parameter(torch.randn(BLOCK + 100))
    p.grad = torch.randn(BLOCK + 100)
    small = FusedAdamW([torch.nn.Parameter(torch.randn(4))])
    small.param_groups[0]["params"][0].grad = torch.randn(4)
    small.step()
    opt = FusedAdamW([p])
    with pytest.raises(ValueError, match=r"exp_avg is \(4,\) for a parameter of shape \(4196,\)"):
        opt.load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="lists one twice"):
        FusedAdamW([p, p])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, device="meta"))]})
    assert len(opt.param_groups) == 1
    sparse = torch.nn.Parameter(torch.randn(5, 3))
    sparse.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        FusedAdamW([sparse]).step()


def test_a_non_contiguous_grad_at_a_cached_address_raises():
    """The cached tables are keyed by addresses: a transposed grad in the old grad's memory has the same one."""
    p = torch.nn.Parameter(torch.randn(6, 6))
    grad = torch.randn(6, 6)
    p.grad = grad
    opt = FusedAdamW([p])
    opt.step()
    p.grad = grad.t()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()


@pytest.mark.parametrize("kwargs", [dict(lr=-1e-3), dict(eps=-1.0), dict(betas=(1.0, 0.9)),
                                    dict(betas=(0.9, -0.1)), dict(weight_decay=-0.1)])
def test_bad_arguments_raise_like_torch(kwargs):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW(p, **kwargs)
    with pytest.raises(ValueError, match=str(theirs.value).replace("(", r"\(").replace(")", r"\)")):
        FusedAdamW(p, **kwargs)


@pytest.mark.gpu
def test_gpt2_sized_tensors_no_recompile_no_sync():
    """Tensors of many blocks on the GPU; a new lr every step reuses the compiled kernels, and
    neither clip_grad_norm_ nor step synchronises with the host."""
    from kernels.adamw import _adamw_kernel

    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(2304, 768), (50304, 768), (768,), (3,)]]
    ref_params = clone_params(params)
    opt = FusedAdamW(groups(params), **HYPER)
    ref = torch.optim.AdamW(groups(ref_params), **HYPER, foreach=False)
    for optimizer, ps in ((opt, params), (ref, ref_params)):
        torch.manual_seed(1)
        run([optimizer], [ps], steps=2, clip=1.0)
        if optimizer is opt:
            kernel_cache = _adamw_kernel.device_caches[torch.cuda.current_device()][0]
            compiled = len(kernel_cache)
            torch.cuda.set_sync_debug_mode("error")
        try:
            run([optimizer], [ps], steps=6, start=2, clip=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(kernel_cache) == compiled, "a new lr recompiled the kernel"
    assert max_rel_err(params, ref_params) <= 1e-6, f"params: {max_rel_err(params, ref_params):.2e}"
