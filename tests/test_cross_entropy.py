"""kernels/cross_entropy.py against a float64 reference: the loss and both gradients (dh, dW), for the
reductions mean, sum and none, at row counts and vocabulary sizes that are no multiple of the chunk or
of the kernel's block, with ignored targets; output buffers poisoned with NaN.

Criterion (test_layernorm.assert_fair): the kernel's max error against fp64 is at most twice PyTorch's
own error in the same dtype (the unfused op: full logits, softmax in fp32), plus a small atol.
"""
import pytest
import torch
import torch.nn.functional as F

from gpt2 import GPT, GPTConfig
from gpt2.ops import torch_cross_entropy
from kernels import cross_entropy as ce
from kernels.cross_entropy import default_chunk_rows, linear_cross_entropy
from test_layernorm import assert_fair

# (rows, V, C, dtype, reduction, chunk_rows): V 97 and 1000 fit one block, 5000 and 50304 take 2 and 13
# (4096 columns each, the last one ragged); chunk_rows None is the default (one chunk at these sizes)
CASES = [
    (1, 97, 16, torch.float32, "mean", None),
    (7, 1000, 32, torch.float16, "none", 3),
    (37, 97, 64, torch.float32, "sum", 5),
    (37, 5000, 48, torch.float16, "mean", 36),
    (130, 1000, 24, torch.float32, "none", 37),
    (11, 5000, 24, torch.float32, "none", 4),     # "none" recomputes its logits in the backward: 2 blocks
    (130, 5000, 16, torch.float32, "mean", 64),
    (37, 1000, 40, torch.bfloat16, "mean", 10),   # no tl.dot: bf16 is exact in the interpreter too
    (9, 50304, 16, torch.float32, "mean", 4),
]


def make_inputs(n_rows, n_cols, width, dtype, device, ignored=0.25, logit_std=2.0):
    """h (rows, C), weight (V, C) with logits of std logit_std, targets with about `ignored` of them -1."""
    h = torch.randn(n_rows, width, device=device)
    weight = torch.randn(n_cols, width, device=device) * logit_std / width**0.5
    targets = torch.randint(0, n_cols, (n_rows,), device=device)
    targets[torch.rand(n_rows, device=device) < ignored] = -1
    if ignored < 1 and n_rows > 0:  # the first and last class, which random draws miss
        targets[-2:] = torch.tensor([0, n_cols - 1])[-n_rows:]
    return h.to(dtype), weight.to(dtype), targets


def run(fn, h, weight, targets, grad, grad_of_sum=False, **kwargs):
    """(loss, dh, dweight) of fn(h, weight, targets, **kwargs) for the output gradient grad, or of
    grad * loss.sum() (the way a sum of per-token losses sends its gradient back: expanded)."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, weight, targets, **kwargs)
    (loss.sum() * grad if grad_of_sum else loss).backward(None if grad_of_sum else grad.to(loss.dtype))
    return [loss.detach(), h.grad, weight.grad]


def output_grad(n_rows, reduction, device):
    return torch.randn(n_rows, device=device) if reduction == "none" else torch.tensor(1.7, device=device)


def check(n_rows, n_cols, width, dtype, reduction, chunk_rows, device, ignored=0.25):
    h, weight, targets = make_inputs(n_rows, n_cols, width, dtype, device, ignored)
    grad = output_grad(n_rows, reduction, device)
    got = run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=chunk_rows)
    same = run(torch_cross_entropy, h, weight, targets, grad, reduction=reduction)
    ref = run(torch_cross_entropy, h.double(), weight.double(), targets, grad.double(), reduction=reduction)
    assert_fair(["loss", "dh", "dweight"], got, same, ref, dtype)
    return got


@pytest.mark.parametrize("n_rows,n_cols,width,dtype,reduction,chunk_rows", CASES)
def test_matches_float64(n_rows, n_cols, width, dtype, reduction, chunk_rows, device, poison):
    check(n_rows, n_cols, width, dtype, reduction, chunk_rows, device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored(reduction, device, poison):
    """As PyTorch: mean is 0/0 = nan, sum and the per-token losses are 0; every gradient is 0."""
    h, weight, targets = make_inputs(7, 300, 16, torch.float32, device, ignored=1.0)
    grad = output_grad(7, reduction, device)
    got = run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=3)
    want = run(torch_cross_entropy, h, weight, targets, grad, reduction=reduction)
    for name, g, w in zip(["loss", "dh", "dweight"], got, want):
        torch.testing.assert_close(g, w, equal_nan=True, msg=name)
    assert not got[1].any() and not got[2].any()


def test_fp16_gradients_wait_for_the_loss_scale(device, poison):
    """fp16 under a GradScaler's scale g: the mean's small gradients must not underflow before g arrives.
    The forward keeps those of the summed loss; scaling dz by 1/n_valid first flushes the gradient of
    rarely likely tokens to zero (215 of 80K dW entries here, 99th percentile relative error 0.74
    against PyTorch's 0.04), which no max-abs criterion notices and which Adam would (per element)."""
    h, weight, targets = make_inputs(130, 5000, 16, torch.float16, device, ignored=0.0, logit_std=4.0)
    grad = torch.tensor(65536.0, device=device)
    got = run(linear_cross_entropy, h, weight, targets, grad, chunk_rows=64)
    same = run(torch_cross_entropy, h, weight, targets, grad)
    ref = run(torch_cross_entropy, h.double(), weight.double(), targets, grad.double())
    for name, g, t, r in zip(["dh", "dweight"], got[1:], same[1:], ref[1:]):
        nonzero = r != 0
        err, torch_err = [((x.double() - r).abs() / r.abs())[nonzero].quantile(0.99).item() for x in (g, t)]
        assert err <= 2 * torch_err + 0.01, f"{name}: 99th percentile relative error {err:.3f}, PyTorch's {torch_err:.3f}"


def test_chunk_boundaries(device, poison):
    """Every chunking of the rows gives the same losses and gradients: one row a chunk, ragged, one chunk."""
    h, weight, targets = make_inputs(37, 700, 24, torch.float32, device)
    grad = output_grad(37, "none", device)
    results = [run(linear_cross_entropy, h, weight, targets, grad, reduction="none", chunk_rows=rows)
               for rows in (1, 5, 36, 37, 1000)]
    for other in results[1:]:
        for name, a, b in zip(["losses", "dh", "dweight"], results[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_default_chunks_bound_the_logits():
    for n_rows, n_cols, dtype in [(16384, 50304, torch.bfloat16), (65536, 50304, torch.float32), (5, 97, torch.float16)]:
        rows = default_chunk_rows(n_rows, n_cols, dtype)
        assert rows * n_cols * dtype.itemsize <= ce.CHUNK_BYTES
        assert -(-n_rows // rows) * rows - n_rows < -(-n_rows // rows)  # balanced: the last chunk is nearly full
    assert default_chunk_rows(16384, 50304, torch.bfloat16) == 2341


def under_autocast(fn, device_type, dtype=torch.bfloat16):
    """fn with its forward under autocast; run() calls the backward after it, as training does."""
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)
    return forward


@pytest.mark.parametrize("path", ["eager", "compile"])
@pytest.mark.parametrize("reduction,autocast", [("mean", torch.bfloat16), ("none", torch.bfloat16),
                                                ("mean", torch.float16)])
def test_autocast_dtypes(reduction, autocast, path, device, monkeypatch, poison):
    """Under bf16 (or fp16) autocast, the forward in it and the backward after it (as training runs the head): every
    logits chunk is bf16, the recomputed ones of the backward of "none" too, where autocast is off by then
    (the forward must pass its compute dtype on); softmax in fp32; dh in h's dtype, dW in W's fp32, loss
    fp32. Both paths."""
    seen = []  # the dtype of every logits chunk the kernel is launched on
    launch_rows = ce._launch_rows

    def recorded(logits, *rest):
        seen.append(logits.dtype)
        return launch_rows(logits, *rest)

    monkeypatch.setattr(ce, "_launch_rows", recorded)
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    h, weight, targets = make_inputs(37, 1000, 32, torch.float32, device)
    grad = output_grad(37, reduction, device)
    got = run(under_autocast(linear_cross_entropy, device.type, autocast), h, weight, targets, grad,
              reduction=reduction, chunk_rows=10)
    chunks = 4 if reduction == "mean" else 8  # 37 rows, 10 a chunk; "none" recomputes them in its backward
    assert seen == [autocast] * chunks, f"the kernel saw logits chunks of {[str(d) for d in seen]}"
    same = run(under_autocast(torch_cross_entropy, device.type, autocast), h, weight, targets, grad,
               reduction=reduction)
    ref = run(torch_cross_entropy, h.double(), weight.double(), targets, grad.double(), reduction=reduction)
    assert [t.dtype for t in got] == [torch.float32] * 3
    assert_fair(["loss", "dh", "dweight"], got, same, ref, autocast)


def reference_ignoring(ignore_index):
    """gpt2.ops.torch_cross_entropy (which ignores -1) with another ignore_index."""
    def cross_entropy(h, weight, targets, reduction="mean"):
        logits = h @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    return cross_entropy


@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_other_ignore_index(ignore_index, reduction, device, poison):
    """PyTorch's default -100, and 0 (a real class: its targets are ignored too): the losses, the mean's
    count of valid targets in the forward and in the backward, and the gradients all follow ignore_index."""
    h, weight, targets = make_inputs(37, 97, 16, torch.float32, device)
    targets[targets == -1] = ignore_index
    grad = output_grad(37, reduction, device)
    got = run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, ignore_index=ignore_index,
              chunk_rows=10)
    reference = reference_ignoring(ignore_index)
    same = run(reference, h, weight, targets, grad, reduction=reduction)
    ref = run(reference, h.double(), weight.double(), targets, grad.double(), reduction=reduction)
    assert_fair(["loss", "dh", "dweight"], got, same, ref, torch.float32)


def test_layouts(device, poison):
    """targets of any shape, strided (a slice of a token batch), the per-token losses back in its shape; the
    gradient of their sum arrives expanded (stride 0); a frozen weight gets no gradient."""
    rows, weight, tokens = make_inputs(2 * 3 * 6, 500, 16, torch.float32, device)
    h, targets = rows.view(2, 3, 6, 16)[:, :, 1:], tokens.view(2, 3, 6)[:, :, 1:]        # (2, 3, 5), strided
    got = run(linear_cross_entropy, h, weight, targets, torch.tensor(1.0, device=device), chunk_rows=4,
              reduction="none", grad_of_sum=True)
    want = run(torch_cross_entropy, h.double(), weight.double(), targets, torch.tensor(1.0, device=device),
               reduction="none", grad_of_sum=True)
    assert got[0].shape == (2, 3, 5) and got[0].dtype == torch.float32
    for name, g, w in zip(["losses", "dh", "dweight"], got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)
    every_other = tokens[::2]                                                            # 1-D, stride 2
    torch.testing.assert_close(linear_cross_entropy(rows[::2], weight, every_other, reduction="none"),
                               torch_cross_entropy(rows[::2], weight, every_other, reduction="none"))
    frozen = weight.detach()
    h_leaf = h.detach().requires_grad_()
    linear_cross_entropy(h_leaf, frozen, targets, reduction="none").sum().backward()
    assert h_leaf.grad.shape == h.shape and frozen.grad is None


def test_no_grad_computes_no_gradients(device, monkeypatch):
    """Under no_grad (validation loss) the forward writes no dz and runs no backward matmuls."""
    h, weight, targets = make_inputs(37, 500, 16, torch.float32, device)
    h.requires_grad_()
    seen = []
    sweep = ce._sweep
    monkeypatch.setattr(ce, "_sweep", lambda *args, **kwargs: seen.append(kwargs.get("scale")) or sweep(*args, **kwargs))
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, targets, chunk_rows=10)
    assert seen == [None] and loss.grad_fn is None
    torch.testing.assert_close(loss.double(), torch_cross_entropy(h.detach().double(), weight.double(), targets))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_frozen_head_or_input_gets_no_gradient_and_the_other_its_own(reduction, device, poison):
    """Fine-tuning with the lm_head frozen (or h frozen): only the other gradient, against float64."""
    h, weight, targets = make_inputs(37, 1000, 32, torch.float32, device)
    for frozen in ("weight", "h"):
        ours = [h.detach().clone().requires_grad_(frozen != "h"), weight.detach().clone().requires_grad_(frozen != "weight")]
        ref = [t.detach().double().requires_grad_(t.requires_grad) for t in ours]
        linear_cross_entropy(*ours, targets, reduction=reduction, chunk_rows=10).backward()
        torch_cross_entropy(*ref, targets, reduction=reduction).backward()
        for got, want in zip(ours, ref):
            assert (got.grad is None) == (want.grad is None), frozen
            if want.grad is not None:
                assert (got.grad.double() - want.grad).abs().max().item() < 1e-5, frozen


def test_no_rows(device):
    h, weight, targets = make_inputs(0, 100, 8, torch.float32, device)
    for reduction in ("mean", "sum", "none"):
        got = linear_cross_entropy(h, weight, targets, reduction=reduction)
        torch.testing.assert_close(got, torch_cross_entropy(h, weight, targets, reduction=reduction), equal_nan=True)


def test_compile_path_runs_the_same_launches(device, monkeypatch):
    """The custom ops (the torch.compile path), run eagerly, give bitwise what the autograd.Functions give."""
    h, weight, targets = make_inputs(37, 1000, 24, torch.float32, device)
    for reduction in ("mean", "sum", "none"):
        grad = output_grad(37, reduction, device)
        eager = run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=10)
        with monkeypatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
            custom_op = run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=10)
        for name, a, b in zip(["loss", "dh", "dweight"], eager, custom_op):
            assert torch.equal(a, b), f"{reduction} {name}: compile path differs from the eager path"


def test_custom_op_registration(device):
    """Schema and autograd registration; fake-tensor tracing is checked on the GPU (test_opcheck)."""
    h, weight, targets = make_inputs(9, 100, 16, torch.float32, device)
    h.requires_grad_(), weight.requires_grad_()
    checks = ("test_schema", "test_autograd_registration")
    for reduction in ("mean", "none"):
        args = (h, weight, targets, -1, reduction, torch.float32, reduction == "mean", 4)
        torch.library.opcheck(ce._linear_cross_entropy_op, args, test_utils=checks)


def test_tied_weights_in_a_model(device, poison):
    """A tiny GPT with the op on Triton and on PyTorch: the same loss, and every parameter's gradient
    agrees -- the tied wte / lm_head weight gets the sum of its embedding and its head gradients."""
    config = dict(block_size=16, vocab_size=200, n_layer=1, n_head=2, n_embd=32, real_vocab_size=190)
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**config, kernels="torch")).to(device)
    fused = GPT(GPTConfig(**config, kernels="cross_entropy")).to(device)
    fused.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 190, (3, 16), device=device)
    targets = torch.randint(0, 190, (3, 16), device=device)
    targets[0, :5] = -1
    losses = []
    for model in (reference, fused):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_model_token_losses(device, poison):
    """reduction="none": per-token losses over the real vocabulary, 0 where the target is -1."""
    config = GPTConfig(block_size=16, vocab_size=200, n_layer=1, n_head=2, n_embd=32, real_vocab_size=190,
                       kernels="cross_entropy")
    model = GPT(config).to(device)
    idx = torch.randint(0, 190, (3, 16), device=device)
    targets = torch.randint(0, 190, (3, 16), device=device)
    targets[:, :7] = -1
    with torch.no_grad():
        _, losses = model(idx, targets, reduction="none")
        logits, _ = model(idx)
    want = F.cross_entropy(logits[..., :190].flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    assert losses.shape == (3, 16) and not losses[:, :7].any()
    torch.testing.assert_close(losses, want.view(3, 16), atol=1e-5, rtol=1e-5)


def test_targets_out_of_range_give_nan_not_another_logit(device):
    """A target past V, or -1 where ignore_index is -100, is not refused (that needs a host sync): its row's
    loss is NaN, and so the mean, rather than a plausible loss read from a neighbouring row's logits."""
    h, weight, targets = make_inputs(5, 30, 8, torch.float32, device, ignored=0.0)
    targets[1], targets[3] = 30, -1
    losses = linear_cross_entropy(h, weight, targets, reduction="none", ignore_index=-100)
    assert losses[[1, 3]].isnan().all() and not losses[[0, 2, 4]].isnan().any()
    torch.testing.assert_close(losses[[0, 2, 4]], torch_cross_entropy(h[[0, 2, 4]], weight, targets[[0, 2, 4]],
                                                                      reduction="none"))
    assert linear_cross_entropy(h, weight, targets, ignore_index=-100).isnan()


def test_bad_arguments_are_clear_errors(device):
    h, weight, targets = make_inputs(4, 10, 8, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, weight[:, :7], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, weight, targets[:3])
    with pytest.raises(ValueError, match="targets must be signed integers"):
        linear_cross_entropy(h, weight, targets > 3)
    with pytest.raises(ValueError, match="targets must be signed integers"):  # -1 would be class 255
        linear_cross_entropy(h, weight, targets.to(torch.uint8))
    with pytest.raises(ValueError, match="0-d"):
        linear_cross_entropy(h[0, 0], weight, targets[0])
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        linear_cross_entropy(h, weight, targets, chunk_rows=-1)
    with pytest.raises(TypeError, match="weight is torch.int64"):
        linear_cross_entropy(h, weight.long(), targets)
    with pytest.raises(TypeError, match="h is torch.float64"):
        linear_cross_entropy(h.double(), weight, targets)
    with pytest.raises(ValueError, match="targets on meta"):
        linear_cross_entropy(h, weight, targets.to("meta"))


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 at GPT-2's full size, the compile path, no host sync


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_full_size(reduction, device, poison):
    check(4096, 50304, 768, torch.bfloat16, reduction, None, device, ignored=0.01)
    check(4096, 50304, 768, torch.bfloat16, reduction, 1000, device, ignored=0.01)


@pytest.mark.gpu
def test_opcheck(device):
    h, weight, targets = make_inputs(300, 5000, 64, torch.bfloat16, device)
    h.requires_grad_(), weight.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        args = (h, weight, targets, -1, reduction, torch.bfloat16, reduction != "none", 128)
        torch.library.opcheck(ce._linear_cross_entropy_op, args)
    lse = ce._linear_cross_entropy_op(h.detach(), weight.detach(), targets, -1, "none", torch.bfloat16, False, 128)[1]
    torch.library.opcheck(ce._linear_cross_entropy_bwd_op, (torch.randn(300, device=device), h.detach(), weight.detach(),
                                                            targets, lse, -1, torch.bfloat16, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_without_graph_break(reduction, device):
    h, weight, targets = make_inputs(1000, 50304, 256, torch.float32, device)
    grad = output_grad(1000, reduction, device)

    def head(h, weight, targets, reduction):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(torch.tanh(h), weight, targets, reduction=reduction)

    compiled = torch.compile(head, fullgraph=True)
    got = run(compiled, h, weight, targets, grad, reduction=reduction)
    want = run(head, h, weight, targets, grad, reduction=reduction)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-2)


@pytest.mark.gpu
def test_no_host_sync(device):
    h, weight, targets = make_inputs(2000, 50304, 768, torch.bfloat16, device)
    for reduction in ("mean", "none"):
        grad = output_grad(2000, reduction, device)
        run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=600)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(linear_cross_entropy, h, weight, targets, grad, reduction=reduction, chunk_rows=600)
        finally:
            torch.cuda.set_sync_debug_mode("default")
