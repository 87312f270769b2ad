"""The switch: names, errors, and no silent fallback to PyTorch."""
import pytest

from gpt2 import GPT, GPTConfig
from gpt2 import ops


def test_torch_is_pytorch_everywhere():
    op_set = ops.resolve("torch")
    assert op_set.on_triton == frozenset() and op_set.spec == "torch"
    assert op_set.attention is ops.torch_attention and op_set.gelu is ops.torch_gelu


@pytest.mark.parametrize("spec", ["flash", "attention,softmax", "", ","])
def test_unknown_names_list_the_valid_ones(spec):
    with pytest.raises(ops.KernelsError, match="attention, layernorm, gelu, adamw"):
        ops.resolve(spec)


def test_model_rejects_unknown_kernels():
    with pytest.raises(ops.KernelsError):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, block_size=8, kernels="fast"))


def test_missing_kernel_is_named_not_replaced(monkeypatch):
    monkeypatch.setitem(ops._TRITON_SOURCES, "gelu", ("kernels.no_such_gelu", ("gelu",)))
    with pytest.raises(ops.KernelsError, match="'gelu' is not implemented"):
        ops.resolve("gelu")


def test_partial_sets_keep_the_rest_on_torch():
    assert ops.parse(" Triton ") == frozenset(ops.OP_NAMES)
    assert ops.parse("gelu, attention") == frozenset({"gelu", "attention"})
