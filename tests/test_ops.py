"""The switch: one declaration per op, names, errors, and no silent fallback to PyTorch."""
import pytest

from gpt2 import GPT, GPTConfig
from gpt2 import ops


def test_torch_is_pytorch_everywhere():
    op_set = ops.resolve("torch")
    assert op_set.on_triton == frozenset() and op_set.spec == "torch"
    for op in ops.OPS:
        assert getattr(op_set, op.name) is op.torch


def test_triton_takes_every_declared_op_from_its_kernel_file():
    import kernels

    op_set = ops.resolve("triton")
    assert op_set.spec == "triton" and op_set.on_triton == frozenset(ops.OP_NAMES)
    for op in ops.OPS:
        module, attribute = op.triton.split(":")
        assert getattr(op_set, op.name) is getattr(kernels, attribute)  # exported by the package too
        assert module.startswith("kernels.")


def test_package_exports_functions_not_modules():
    import kernels.gelu  # noqa: F401  (the submodule import used to shadow the function)
    from kernels import FusedAdamW, add_layer_norm, flash_attention, gelu, layer_norm

    assert all(callable(f) and not isinstance(f, type(kernels)) for f in
               (flash_attention, layer_norm, add_layer_norm, gelu, FusedAdamW))
    assert gelu.__name__ == "gelu"


@pytest.mark.parametrize("spec", ["flash", "attention,softmax", "", ","])
def test_unknown_names_list_the_valid_ones(spec):
    with pytest.raises(ops.KernelsError, match=", ".join(ops.OP_NAMES)):
        ops.resolve(spec)


def test_auto_is_resolved_by_the_switch():
    assert ops.resolve("auto", "cpu").spec == "torch"
    assert ops.parse("auto", "cuda") == frozenset(ops.OP_NAMES)


def test_triton_off_cuda_runs_in_the_interpreter():
    op_set = ops.resolve("gelu", "cpu")
    assert op_set.interpreted and op_set.on_triton == {"gelu"}
    assert not ops.resolve("torch", "cpu").interpreted


def test_model_rejects_unknown_kernels():
    with pytest.raises(ops.KernelsError):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, block_size=8, kernels="fast"))


def test_model_takes_a_resolved_op_set_and_records_it():
    op_set = ops.resolve("auto", "cpu")
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, block_size=8, kernels="auto")
    model = GPT(config, op_set)
    assert model.ops is op_set and model.config.kernels == "torch" and config.kernels == "auto"


def test_missing_kernel_is_named_not_replaced(monkeypatch):
    missing = ops.Op("gelu", ops.torch_gelu, "kernels.no_such_gelu:gelu", "")
    monkeypatch.setattr(ops, "OPS", tuple(missing if op.name == "gelu" else op for op in ops.OPS))
    with pytest.raises(ops.KernelsError, match="'gelu' is not implemented"):
        ops.resolve("gelu")


def test_partial_sets_keep_the_rest_on_torch():
    assert ops.parse(" Triton ") == frozenset(ops.OP_NAMES)
    assert ops.parse("gelu, attention") == frozenset({"gelu", "attention"})
    op_set = ops.resolve("gelu")
    assert op_set.attention is ops.torch_attention and op_set.spec == "gelu"


def test_nondeterministic_sets_pass_their_declared_arguments():
    """deterministic=False hands each Triton op its declared `nondeterministic` keywords (attention: the
    atomic dq backward) and leaves every other op, and every PyTorch op, as it was."""
    import kernels

    fast = ops.resolve("triton", deterministic=False)
    assert not fast.deterministic and "nondeterministic" in repr(fast) and fast.spec == "triton"
    for op in ops.OPS:
        implementation = getattr(fast, op.name)
        if op.nondeterministic:
            assert implementation.func is getattr(kernels, op.triton.split(":")[1])
            assert implementation.keywords == op.nondeterministic
        else:
            assert implementation is getattr(kernels, op.triton.split(":")[1])
    assert ops.OPS[0].nondeterministic == {"deterministic": False}
    assert ops.resolve("torch", deterministic=False).attention is ops.torch_attention


def test_no_op_gives_a_silent_zero_second_derivative(device):
    """create_graph=True asks autograd for a second derivative, which the kernels do not have: each op's
    backward says so, rather than return first derivatives that differentiate to zero."""
    import torch

    from kernels import add_layer_norm, flash_attention, flash_attention_qkv, gelu, layer_norm, linear_cross_entropy

    x = torch.randn(4, 8, 16, device=device, requires_grad=True)
    w, b = torch.ones(16, device=device), torch.zeros(16, device=device)
    calls = [
        ("layer_norm", lambda: layer_norm(x, w, b)),
        ("layer_norm", lambda: add_layer_norm(x, x * 2, w, b)[1]),
        ("gelu", lambda: gelu(x)),
        ("flash_attention", lambda: flash_attention(*(x.view(2, 2, 8, 16) * k for k in (1, 2, 3)), causal=True)),
        ("flash_attention_qkv", lambda: flash_attention_qkv(torch.cat([x, 2 * x, 3 * x], -1), 1)),
        ("linear_cross_entropy", lambda: linear_cross_entropy(x[0], torch.randn(10, 16, device=device),
                                                              torch.arange(8, device=device) % 10)),
    ]
    for op, call in calls:
        with pytest.raises(RuntimeError, match=f"{op} has no double backward"):
            torch.autograd.grad(call().sum(), x, create_graph=True)


COMPILED_STEP_GRAPHS = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path[:0] = [{benchmarks!r}, {repo!r}]
import torch, stub_gpu
stub_gpu.install(90)
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from gpt2.model import GPT, GPTConfig
from gpt2.ops import resolve

def backward_graph(deterministic):
    graphs = []
    def keep(graph, example_inputs):
        graphs.append(graph)
        return graph

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    ops = resolve("triton", "cuda", deterministic=deterministic)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=256), ops)
    idx = torch.randint(0, 256, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, idx)
    loss.backward()
    forward, backward = graphs
    return {{"saved": [node.name for node in backward.graph.nodes if node.op == "placeholder"],
            "calls": [str(node.target) for node in backward.graph.nodes if node.op == "call_function"]}}

print(json.dumps([backward_graph(True), backward_graph(False)]))
"""


def test_compiled_step_saves_no_allocation_and_copies_no_gradient():
    """AOTAutograd, as torch.compile runs it, on a stub GPU (Triton compiles for sm_90 and launches
    nothing; no C++ compiler needed): the all-Triton model traces in one graph, with either attention
    backward, and
    - no buffer the kernels write into reaches the backward as a saved input. AOTAutograd merges identical
      allocations other than aten.empty (every layer's attention output made by one empty_strided call,
      say) into one, which inductor then copies before each kernel writes it: four (B, T, C) copies per
      layer and step;
    - d(qkv) leaves attention's backward as one tensor that its kernels write whole: no concatenation of dq,
      dk and dv (a (B, T, 3C) read and write per layer), no clone of it, and no copy or scatter into a slice
      of it (inductor rewrites the whole buffer for each)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    script = COMPILED_STEP_GRAPHS.format(benchmarks=str(repo / "benchmarks"), repo=str(repo))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    for graph in json.loads(result.stdout.strip().splitlines()[-1]):
        saved, calls = graph["saved"], graph["calls"]
        assert "tangents_1" in saved
        assert not [name for name in saved if name.startswith("empty")], saved
        assert calls.count("triton_kernel_wrapper_functional") >= 10
        assert not [call for call in calls if call.startswith(("aten.cat", "aten.copy", "aten.clone")) or "scatter" in call], calls
