"""The switch: which implementation each hot op of the model uses.

    ops = resolve("torch")                  # PyTorch's own ops everywhere
    ops = resolve("triton")                 # every op on our Triton kernels
    ops = resolve("attention,gelu")         # these on Triton, the rest on PyTorch

The model asks for its op set once, at construction, and never imports a kernel itself. Asking for
a Triton op whose kernel does not exist (or without Triton installed) is an error, never a silent
fallback to PyTorch: a benchmark that silently measured PyTorch would be a lie.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

OP_NAMES = ("attention", "layernorm", "gelu", "adamw")

# op name -> (module, names in that module that implement it)
_TRITON_SOURCES = {
    "attention": ("kernels.attention", ("flash_attention",)),
    "layernorm": ("kernels.layernorm", ("layer_norm", "add_layer_norm")),
    "gelu": ("kernels.gelu", ("gelu",)),
    "adamw": ("kernels.adamw", ("FusedAdamW",)),
}


class KernelsError(ValueError):
    """A --kernels value that cannot be honoured; the message says what to pass instead."""


def torch_attention(q, k, v):
    """Causal attention over (B, H, T, D) tensors."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def torch_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_layer_norm(x, delta, weight, bias, eps=1e-5):
    """Returns (x + delta, layer_norm(x + delta)): the residual stream and the next sublayer's input."""
    x = x + delta
    return x, torch_layer_norm(x, weight, bias, eps)


def torch_gelu(x):
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class OpSet:
    attention: Callable          # (q, k, v) (B, H, T, D) -> causal attention (B, H, T, D)
    layer_norm: Callable         # (x, weight, bias, eps) -> y
    add_layer_norm: Callable     # (x, delta, weight, bias, eps) -> (x + delta, y)
    gelu: Callable               # tanh approximation
    adamw: type                  # a torch.optim.Optimizer class with AdamW's signature
    on_triton: frozenset         # names of the ops that run on Triton

    @property
    def spec(self) -> str:
        if not self.on_triton:
            return "torch"
        if self.on_triton == frozenset(OP_NAMES):
            return "triton"
        return ",".join(name for name in OP_NAMES if name in self.on_triton)


TORCH_OPS = OpSet(
    attention=torch_attention,
    layer_norm=torch_layer_norm,
    add_layer_norm=torch_add_layer_norm,
    gelu=torch_gelu,
    adamw=torch.optim.AdamW,
    on_triton=frozenset(),
)


def parse(spec: str) -> frozenset:
    """'torch' | 'triton' | 'attention,gelu,...' -> the set of op names to run on Triton."""
    spec = (spec or "").strip().lower()
    if spec == "torch":
        return frozenset()
    if spec == "triton":
        return frozenset(OP_NAMES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in OP_NAMES]
    if not names or unknown:
        raise KernelsError(
            f"unknown kernels {', '.join(unknown) or repr(spec)}: use 'torch', 'triton', "
            f"or a comma list of {', '.join(OP_NAMES)}"
        )
    return frozenset(names)


def _load_triton(name: str) -> tuple:
    module_name, attrs = _TRITON_SOURCES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == "triton":
            raise KernelsError(
                f"the Triton kernel '{name}' needs the triton package, which is not installed "
                f"(pip install triton, Linux only); or run it on PyTorch: --kernels=torch"
            ) from None
        if err.name != module_name:
            raise
        raise KernelsError(
            f"the Triton kernel '{name}' is not implemented yet ({module_name.replace('.', '/')}.py "
            f"is missing): leave '{name}' out of --kernels, e.g. --kernels=torch"
        ) from None
    return tuple(getattr(module, attr) for attr in attrs)


def resolve(spec: str) -> OpSet:
    """The op set for a --kernels value; see the module docstring."""
    on_triton = parse(spec)
    chosen = {
        "attention": TORCH_OPS.attention,
        "layer_norm": TORCH_OPS.layer_norm,
        "add_layer_norm": TORCH_OPS.add_layer_norm,
        "gelu": TORCH_OPS.gelu,
        "adamw": TORCH_OPS.adamw,
    }
    if "attention" in on_triton:
        (flash_attention,) = _load_triton("attention")
        chosen["attention"] = lambda q, k, v: flash_attention(q, k, v, causal=True)
    if "layernorm" in on_triton:
        chosen["layer_norm"], chosen["add_layer_norm"] = _load_triton("layernorm")
    if "gelu" in on_triton:
        (chosen["gelu"],) = _load_triton("gelu")
    if "adamw" in on_triton:
        (chosen["adamw"],) = _load_triton("adamw")
    return OpSet(on_triton=on_triton, **chosen)
