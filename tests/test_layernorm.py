"""kernels/layernorm.py against a float64 reference: layer_norm and the fused add_layer_norm, forward and every
gradient, at odd shapes; output buffers poisoned with NaN so that an element the kernel skips shows up.

Criterion, fair to low precision: the kernel's max error against fp64 is at most twice PyTorch's own op's
error in the same dtype, plus a small atol relative to the size of the values.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import SENTINEL, guarded_empty_like
from kernels import layernorm
from kernels.layernorm import add_layer_norm, layer_norm, layer_norm_ref

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (shape of x, dtype): C = 100 .. 1600, row counts 1, 15, 37, 4097; big row counts only with small C
CASES = [
    ((1, 768), torch.float32),
    ((1, 1600), torch.float16),
    ((37, 768), torch.float32),
    ((37, 1000), torch.float16),
    ((3, 5, 1600), torch.float32),
    ((3, 5, 1600), torch.float16),
    ((4097, 100), torch.float32),
    ((4097, 100), torch.float16),
    ((37, 768), torch.bfloat16),   # no tl.dot here, so bf16 is exact in the interpreter too
]


def make_inputs(shape, dtype, device, n=1):
    """n inputs of x's shape with non-zero mean and scale, then weight and bias; all require grad."""
    C = shape[-1]
    xs = [torch.randn(shape, device=device) * 2.5 + 1.5 for _ in range(n)]
    weight = torch.randn(C, device=device) * 0.5 + 1.0
    bias = torch.randn(C, device=device) * 0.5
    return [t.to(dtype).requires_grad_() for t in (*xs, weight, bias)]


def run(fn, inputs, grads):
    """Outputs of fn(*inputs) followed by the gradients of every input, for the given output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def as_f64(inputs):
    return [t.detach().double() for t in inputs]


def assert_fair(names, got, torch_same_dtype, ref64, dtype):
    for name, g, t, r in zip(names, got, torch_same_dtype, ref64):
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name}: {g.dtype} {tuple(g.shape)} vs {t.dtype} {tuple(t.shape)}"
        err = (g.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        atol = ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * torch_err + atol, f"{name}: max error {err:.3e}, PyTorch's {torch_err:.3e}, atol {atol:.1e}"


def torch_add_layer_norm(x, delta, weight, bias, eps=1e-5):
    s = x + delta
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def check_layer_norm(shape, dtype, device):
    inputs = make_inputs(shape, dtype, device)
    grads = [torch.randn(shape, device=device)]
    got = run(layer_norm, inputs, grads)
    same = run(lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b), inputs, grads)
    ref = run(lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b), as_f64(inputs), grads)
    assert_fair(["y", "dx", "dweight", "dbias"], got, same, ref, dtype)


def check_add_layer_norm(shape, dtype, device):
    inputs = make_inputs(shape, dtype, device, n=2)
    grads = [torch.randn(shape, device=device), torch.randn(shape, device=device)]
    got = run(add_layer_norm, inputs, grads)
    same = run(torch_add_layer_norm, inputs, grads)
    ref = run(torch_add_layer_norm, as_f64(inputs), grads)
    assert_fair(["x + delta", "y", "dx", "ddelta", "dweight", "dbias"], got, same, ref, dtype)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_layer_norm(shape, dtype, device, poison):
    check_layer_norm(shape, dtype, device)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_add_layer_norm(shape, dtype, device, poison):
    check_add_layer_norm(shape, dtype, device)


def test_without_bias(device, poison):
    x, weight, _ = make_inputs((7, 300), torch.float32, device)
    grads = [torch.randn(7, 300, device=device)]
    got = run(lambda x, w: layer_norm(x, w, None), [x, weight], grads)
    ref = run(lambda x, w: F.layer_norm(x, (300,), w, None), as_f64([x, weight]), grads)
    for name, g, r in zip(["y", "dx", "dweight"], got, ref):
        err = (g.double() - r).abs().max().item()
        assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.3e}"


def test_non_contiguous(device, poison):
    """A transposed x (column stride != 1) and a row-strided slice of a wider tensor."""
    transposed = (torch.randn(200, 9, device=device) * 2 + 1).t()     # (9, 200)
    sliced = (torch.randn(9, 260, device=device) * 2 + 1)[:, 30:230]  # (9, 200), row stride 260
    weight, bias = torch.randn(200, device=device), torch.randn(200, device=device)
    grads = [torch.randn(9, 200, device=device), torch.randn(9, 200, device=device)]
    got = run(add_layer_norm, [transposed, sliced, weight, bias], grads)
    ref = run(torch_add_layer_norm, as_f64([transposed, sliced, weight, bias]), grads)
    for name, g, r in zip(["x + delta", "y", "dx", "ddelta", "dweight", "dbias"], got, ref):
        err = (g.double() - r).abs().max().item()
        assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.3e}"


def spy_on_backward(monkeypatch):
    """What every call of layernorm._backward (both paths' launcher) returned: [(dx, ddelta, dweight_dbias)]."""
    calls = []
    backward = layernorm._backward

    def recorded(*args):
        calls.append(backward(*args))
        return calls[-1]

    monkeypatch.setattr(layernorm, "_backward", recorded)
    return calls


@pytest.mark.parametrize("path", ["eager", "compile"])
@pytest.mark.parametrize("x_dtype,delta_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)],
                         ids=["fp32_x-fp16_delta", "fp16_x-fp32_delta"])
def test_mixed_dtypes(x_dtype, delta_dtype, path, device, monkeypatch, poison):
    """An fp32 residual stream plus an fp16 sublayer output (autocast), and the other way round: the sum has
    the promoted dtype (fp32) whichever operand is the narrower one, as in PyTorch, and each gradient its
    input's dtype. An fp16 delta's gradient is written by the backward kernel itself, beside dx (one 2-byte
    write instead of a cast kernel after it: autograd's own cast would hide its absence), and is what
    reaches delta.grad."""
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, delta, weight, bias = make_inputs((37, 300), torch.float32, device, n=2)
    inputs = [x.detach().to(x_dtype).requires_grad_(), delta.detach().to(delta_dtype).requires_grad_(), weight, bias]
    grads = [torch.randn(37, 300, device=device), torch.randn(37, 300, device=device)]
    backward_calls = spy_on_backward(monkeypatch)
    got = run(add_layer_norm, inputs, grads)
    same = run(torch_add_layer_norm, inputs, grads)
    ref = run(torch_add_layer_norm, as_f64(inputs), grads)
    assert [t.dtype for t in got[:4]] == [torch.float32, torch.float32, x_dtype, delta_dtype]
    (_, kernel_ddelta, _), = backward_calls
    if delta_dtype == torch.float16:
        assert kernel_ddelta is not None and kernel_ddelta.dtype == torch.float16, "the kernel wrote no fp16 ddelta"
        assert torch.equal(kernel_ddelta, got[3])
    assert_fair(["x + delta", "y", "dx", "ddelta", "dweight", "dbias"], got, same, ref, torch.float32)


@pytest.mark.parametrize("path", ["eager", "compile"])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.float16], ids=["fp32_delta", "fp16_delta"])
def test_add_layer_norm_with_only_y_used(delta_dtype, path, device, monkeypatch, poison):
    """As the model's final LayerNorm: the sum is discarded, so its gradient never arrives. dx is the
    LayerNorm gradient alone, and the backward gets None for ds, not a tensor of zeros that autograd
    would fill and the kernel read back (B*T*C fp32 each way, every step)."""
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, delta, weight, bias = make_inputs((37, 200), torch.float32, device, n=2)
    inputs = [x, delta.detach().to(delta_dtype).requires_grad_(), weight, bias]
    grads = [torch.randn(37, 200, device=device)]
    ds_given = []
    backward = layernorm._backward
    monkeypatch.setattr(layernorm, "_backward", lambda dy, ds, *rest: ds_given.append(ds) or backward(dy, ds, *rest))
    got = run(lambda x, d, w, b: add_layer_norm(x, d, w, b)[1], inputs, grads)
    ref = run(lambda x, d, w, b: torch_add_layer_norm(x, d, w, b)[1], as_f64(inputs), grads)
    assert ds_given == [None], "the unused sum's gradient reached the kernel"
    assert got[2].dtype == delta_dtype
    tolerance = 1e-3 if delta_dtype == torch.float16 else 1e-4  # ddelta rounded to fp16
    for name, g, r in zip(["y", "dx", "ddelta", "dweight", "dbias"], got, ref):
        err = (g.double() - r).abs().max().item()
        assert err < tolerance * max(1.0, r.abs().max().item()), f"{name}: max error {err:.3e}"


@pytest.mark.parametrize("path", ["eager", "compile"])
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_autocast_writes_y_in_the_matmul_dtype(autocast, path, device, monkeypatch, poison):
    """As the model runs it under bf16 autocast: fp32 residual x, bf16 sublayer output delta. The sum
    stays fp32; y is written once in bf16 (what the next matmul reads), equal to PyTorch's fp32
    LayerNorm rounded to bf16; its gradient arrives in bf16. layer_norm alone (ln_f, or the first
    block's ln_1 on fp32 x) writes its y in bf16 too. Both ops, on both paths: each public function
    passes the autocast dtype to its own launcher call on each path; fp16 autocast (--dtype float16) alike."""
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, delta, weight, bias = make_inputs((37, 768), torch.float32, device, n=2)
    inputs = [x, delta.detach().to(autocast).requires_grad_(), weight, bias]
    grads = [torch.randn(37, 768, device=device), torch.randn(37, 768, device=device).to(autocast)]
    with torch.autocast(device.type, dtype=autocast):
        got = run(add_layer_norm, inputs, grads)
        got_ln = run(layer_norm, [x, weight, bias], grads[1:])
    ref = run(torch_add_layer_norm, as_f64(inputs), [grads[0], grads[1].double()])
    ref_ln = run(lambda x, w, b: F.layer_norm(x, (768,), w, b), as_f64([x, weight, bias]), [grads[1].double()])
    assert [t.dtype for t in got[:4]] == [torch.float32, autocast, torch.float32, autocast]
    assert [t.dtype for t in got_ln[:2]] == [autocast, torch.float32]
    for y, r in ((got[1], ref[1]), (got_ln[0], ref_ln[0])):
        ulp = torch.finfo(autocast).eps * r.abs()  # one: the GPU rounds to nearest, the Triton 3.9 interpreter truncates
        assert ((y.double() - r).abs() <= ulp + 1e-6).all(), f"y is not fp32 LayerNorm rounded to {autocast}"
    for name, g, r in zip(["x + delta", "dx", "dweight", "dbias", "layer_norm dx", "layer_norm dweight",
                           "layer_norm dbias"],
                          [got[0], got[2], got[4], got[5], *got_ln[1:]], [ref[0], ref[2], ref[4], ref[5], *ref_ln[1:]]):
        err = (g.double() - r).abs().max().item()
        assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.3e}"


def test_compile_path_runs_the_same_launches(device, monkeypatch):
    """The custom ops torch.compile traces and the eager autograd.Function share their launchers:
    run eagerly, both paths give the same bits, forward and every gradient."""
    inputs = make_inputs((37, 100), torch.float32, device, n=2)
    grads = [torch.randn(37, 100, device=device), torch.randn(37, 100, device=device)]
    x, delta, weight, bias = inputs

    def both_ops():
        return run(add_layer_norm, inputs, grads) + run(layer_norm, [x, weight, bias], grads[1:])

    eager = both_ops()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_path = both_ops()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled_path))


@pytest.mark.parametrize("path", ["eager", "compile"])
def test_eps_on_rows_of_small_variance(path, device, monkeypatch, poison):
    """Rows whose variance is of eps's size, eps 1e-5 and 0.1: eps is a large part of rstd there (and a
    kernel, or a path, that ignored its eps argument would pass every other test)."""
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for eps in (1e-5, 0.1):
        x = (torch.randn(37, 300, device=device) * 3e-3 + 2.0).requires_grad_()
        weight, bias = (torch.randn(300, device=device).requires_grad_() for _ in range(2))
        grads = [torch.randn(37, 300, device=device)]
        got = run(lambda x, w, b: layer_norm(x, w, b, eps), [x, weight, bias], grads)
        ref = run(lambda x, w, b: F.layer_norm(x, (300,), w, b, eps), as_f64([x, weight, bias]), grads)
        for name, g, r in zip(["y", "dx", "dweight", "dbias"], got, ref):
            err = (g.double() - r).abs().max().item()
            assert err < 1e-4 * max(1.0, r.abs().max().item()), f"eps {eps}, {name}: max error {err:.3e}"


def test_the_widest_row_and_nothing_written_past_the_end(device, monkeypatch):
    """Rows of 16384, the widest taken, and of 700 in a block of 1024 columns, its last block of rows
    partial: the masked lanes neither store nor load. Each output the launchers allocate with empty_like is
    the front of a larger buffer whose guard band (longer than a block row) holds a sentinel."""
    bands = []
    empty_like = torch.empty_like
    for shape in ((1, 16384), (37, 700)):
        x, weight, bias = make_inputs(shape, torch.float32, device)
        grads = [torch.randn(shape, device=device)]
        ref = run(lambda x, w, b: F.layer_norm(x, shape[-1:], w, b), as_f64([x, weight, bias]), grads)
        monkeypatch.setattr(torch, "empty_like", guarded_empty_like(bands, guard=2048))
        got = run(layer_norm, [x, weight, bias], grads)
        monkeypatch.setattr(torch, "empty_like", empty_like)
        assert len(bands) >= 2, "y and dx come from empty_like"
        assert all((band == SENTINEL).all() for band in bands), f"{shape}: written past the end of an output"
        bands.clear()
        for name, g, r in zip(["y", "dx", "dweight", "dbias"], got, ref):
            err = (g.double() - r).abs().max().item()
            assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{shape}, {name}: max error {err:.3e}"


def test_the_sum_is_rounded_before_it_is_normalized(device, poison):
    """fp16 values near 1000 (an ulp of 0.5) plus small deltas: y is the LayerNorm of the stored sum s,
    as `x + delta` then F.layer_norm gives, not of the exact sum, which differs by a good part of a unit."""
    x = (torch.randn(37, 256, device=device) + 1000).half()
    delta = (torch.randn(37, 256, device=device) * 0.3).half()
    weight, bias = torch.ones(256, device=device, dtype=torch.half), torch.zeros(256, device=device, dtype=torch.half)
    s, y = add_layer_norm(x, delta, weight, bias)
    assert torch.equal(s, x + delta)
    of_stored = F.layer_norm(s.double(), (256,))
    of_exact = F.layer_norm(x.double() + delta.double(), (256,))
    assert (of_stored - of_exact).abs().max() > 0.1  # the case tells the two apart
    assert (y.double() - of_stored).abs().max() < 1e-2


def test_only_the_sum_used(device, poison):
    """Only s feeds the loss: its gradient passes to x and delta, and the weight and bias get none, as
    from F.layer_norm."""
    x, delta, weight, bias = make_inputs((37, 200), torch.float32, device, n=2)
    s, _ = add_layer_norm(x, delta, weight, bias)
    grad = torch.randn(37, 200, device=device)
    s.backward(grad)
    assert torch.equal(x.grad, grad) and torch.equal(delta.grad, grad)
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("path", ["eager", "compile"])
def test_no_rows(path, device, monkeypatch):
    """Zero rows, on both paths: the custom op stands in an empty tensor for a ddelta that dx is, which must
    not be taken for a real one when dx is empty too."""
    if path == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, delta, weight, bias = make_inputs((0, 768), torch.float32, device, n=2)
    y = layer_norm(x, weight, bias)
    s, y2 = add_layer_norm(x, delta, weight, bias)
    (y.sum() + s.sum() + y2.sum()).backward()
    assert y.shape == s.shape == (0, 768) and x.grad.shape == delta.grad.shape == (0, 768)
    assert not weight.grad.any() and not bias.grad.any()


def test_strided_parameters_and_inputs(device, poison):
    """Every operand a view with strides of its own: a row-strided x, a transposed delta, a weight that is
    every other element of a longer tensor, a bias expanded from one element; and the output gradients
    strided too: the sum's one row expanded over all rows (stride 0, as from a .sum()), y's a transposed
    one, both views into storage of the full size, so that reading them as dense rows gives wrong values
    rather than reads past the end. (run() clones its leaves, which makes a strided slice dense; here the
    views themselves go in.)"""
    bases = [torch.randn(9, 260, device=device) * 2 + 1, torch.randn(200, 9, device=device) * 2 + 1,
             torch.randn(400, device=device), torch.randn(1, device=device)]
    grads = [torch.randn(9, 200, device=device)[:1].expand(9, 200), torch.randn(200, 9, device=device).t()]

    def outputs_and_base_grads(fn, bases, grads):
        leaves = [b.detach().clone().requires_grad_() for b in bases]
        x, delta, weight, bias = leaves[0][:, 30:230], leaves[1].t(), leaves[2][::2], leaves[3].expand(200)
        outs = fn(x, delta, weight, bias)
        torch.autograd.backward(outs, grads)
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    got = outputs_and_base_grads(add_layer_norm, bases, grads)
    ref = outputs_and_base_grads(torch_add_layer_norm, as_f64(bases), [g.double() for g in grads])
    for name, g, r in zip(["x + delta", "y", "dx", "ddelta", "dweight", "dbias"], got, ref):
        err = (g.double() - r).abs().max().item()
        assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.3e}"


def test_weight_grads_are_deterministic(device):
    inputs = make_inputs((1000, 100), torch.float32, device, n=2)
    grads = [torch.randn(1000, 100, device=device), torch.randn(1000, 100, device=device)]
    first = run(add_layer_norm, inputs, grads)
    second = run(add_layer_norm, inputs, grads)
    assert torch.equal(first[-2], second[-2]) and torch.equal(first[-1], second[-1])


def test_bad_shapes_are_clear_errors(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm(x, torch.ones(63, device=device), torch.zeros(64, device=device))
    with pytest.raises(ValueError, match="delta"):
        add_layer_norm(x, torch.randn(1, 64, device=device), torch.ones(64, device=device), None)
    with pytest.raises(ValueError, match="at most"):
        big = torch.randn(1, 1 << 15, device=device)
        layer_norm(big, torch.ones(1 << 15, device=device), None)
    with pytest.raises(ValueError, match="at most"):  # in the forward, though no row is there to normalize
        layer_norm(big[:0], torch.ones(1 << 15, device=device), None)
    with pytest.raises(ValueError, match="weight None"):
        layer_norm(x, None, None)
    with pytest.raises(ValueError, match="0-d x"):
        layer_norm(x[0, 0], torch.ones(64, device=device), None)


def test_bad_dtypes_and_devices_are_clear_errors(device):
    """Integers and fp64 are refused (the kernels compute in fp32 and would truncate or lose precision
    silently), as are operands on two devices."""
    x, w = torch.randn(4, 64, device=device), torch.ones(64, device=device)
    with pytest.raises(TypeError, match="x is torch.int64"):
        layer_norm(torch.arange(256, device=device).view(4, 64), w, None)
    with pytest.raises(TypeError, match="delta is torch.float64.*--kernels=torch"):
        add_layer_norm(x, x.double(), w, None)
    with pytest.raises(ValueError, match="x is on .* but weight on meta"):
        layer_norm(x, torch.ones(64, device="meta"), None)


def test_reference_upcasts():
    x = torch.randn(3, 50, dtype=torch.float16) * 4 + 2
    w, b = torch.randn(50, dtype=torch.float16), torch.randn(50, dtype=torch.float16)
    y = layer_norm_ref(x, w, b)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (50,), w.float(), b.float()), atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, full GPT-2 sizes, the compile path


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4097, 768), (2, 1024, 1600), (37, 8192), (3, 16384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_sizes(shape, dtype, device, poison):
    check_layer_norm(shape, dtype, device)
    check_add_layer_norm(shape, dtype, device)


@pytest.mark.gpu
def test_opcheck(device):
    """Schema, fake tensor and autograd registration (opcheck runs real kernels: GPU only)."""
    x, delta, w, b = make_inputs((37, 768), torch.float32, device, n=2)
    torch.library.opcheck(layernorm._layer_norm_op, (x, w, b, 1e-5, None))
    torch.library.opcheck(layernorm._add_layer_norm_op, (x, delta, w, b, 1e-5, None))


@pytest.mark.gpu
def test_compiles_without_graph_break(device):
    x, delta, w, b = make_inputs((4, 33, 768), torch.bfloat16, device, n=2)

    def block(x, delta, w, b):
        s, y = add_layer_norm(x, delta, w, b)
        return s + layer_norm(y, w, b)

    compiled = torch.compile(block, fullgraph=True)
    grads = [torch.randn(4, 33, 768, device=device)]
    for got, want in zip(run(compiled, [x, delta, w, b], grads), run(block, [x, delta, w, b], grads)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_rows_past_int32_are_refused_before_any_work():
    """The kernels index rows in 32 bits whatever width their ints arrive in (64-bit index math took 27 more
    registers a thread); 2**31 rows is refused with a message, on an expanded view that holds one element."""
    x = torch.zeros(1, 1).expand(2**31, 1)
    w = torch.ones(1)
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 rows"):
        layernorm._check(x, None, w, w)  # the launchers' first step; the public path would allocate 8 GB without it
