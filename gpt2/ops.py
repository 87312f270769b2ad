"""The switch: which implementation each hot op of the model uses.

Every op is declared once, in OPS below: its --kernels name, its PyTorch implementation, and where its
Triton implementation lives. The op set, the list of valid names and the error messages follow from
that one entry (docs/adding-a-kernel.md says how to add one).

    ops = resolve("torch")                  # PyTorch's own ops everywhere
    ops = resolve("triton")                 # every op on our Triton kernels
    ops = resolve("attention,gelu")         # these on Triton, the rest on PyTorch
    ops = resolve("auto", device)           # triton on CUDA, torch elsewhere
    ops = resolve("triton", deterministic=False)  # and the faster variants that are not bitwise reproducible
    y = ops.gelu(x)                         # an op set has one attribute per op, named as in OPS

A script resolves --kernels once and hands the op set to the model (GPT(config, ops)); the model
never imports a kernel itself. Asking for a Triton op whose kernel does not exist (or without Triton
installed) is an error, never a silent fallback to PyTorch: a benchmark that silently measured
PyTorch would be a lie. Without a CUDA device the Triton kernels run in the Triton interpreter on
CPU tensors: slow, meant for checking, and the op set says so (`interpreted`).
"""
import functools
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


class KernelsError(ValueError):
    """A --kernels value that cannot be honoured; the message says what to pass instead."""


@dataclass(frozen=True)
class Op:
    name: str        # its --kernels name, and the op set's attribute
    torch: Any       # PyTorch's implementation: the default, and what the Triton one must agree with
    triton: str      # "module:attribute" of the Triton implementation, imported only when chosen
    summary: str     # what it computes, for --help texts and docs
    # keyword arguments of the Triton implementation that buy speed with run-to-run differences in the
    # last bits (atomics): used when the op set is resolved with deterministic=False
    nondeterministic: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# PyTorch's implementations


def torch_attention(qkv, n_head):
    """Causal attention over the n_head heads of qkv (B, T, 3C), q, k and v side by side in its last
    dimension -> (B, T, C), the heads side by side."""
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, C3 // (3 * n_head)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def torch_layernorm(x, delta, weight, bias, eps=1e-5):
    """(x + delta, layer_norm(x + delta)): the residual stream and the next sublayer's input.
    delta None: (x, layer_norm(x))."""
    if delta is not None:
        x = x + delta
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_gelu(x):
    return F.gelu(x, approximate="tanh")


def torch_cross_entropy(h, weight, targets, reduction="mean"):
    """Cross-entropy of the logits h @ weight.T (softmax in fp32, or fp64 for fp64 inputs: the tests'
    reference) against targets; -1 is ignored. h (..., C), weight (V, C), targets h.shape[:-1] -> a 0-d
    loss, or losses shaped like targets ("none")."""
    logits = h @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses


# ---------------------------------------------------------------------------------------------
# the registry: one entry per op

OPS = (
    Op("attention", torch_attention, "kernels.attention:flash_attention_qkv",
       "(qkv (B, T, 3C), n_head) -> causal softmax attention over the heads (B, T, C)",
       nondeterministic={"deterministic": False}),
    Op("layernorm", torch_layernorm, "kernels.layernorm:add_layer_norm",
       "(x, delta | None, weight, bias, eps) -> (x + delta, LayerNorm(x + delta))"),
    Op("gelu", torch_gelu, "kernels.gelu:gelu",
       "x -> GELU, tanh approximation"),
    Op("adamw", torch.optim.AdamW, "kernels.adamw:FusedAdamW",
       "an Optimizer class with torch.optim.AdamW's signature"),
    Op("cross_entropy", torch_cross_entropy, "kernels.cross_entropy:linear_cross_entropy",
       "(h, weight, targets, reduction) -> cross-entropy of h @ weight.T, targets -1 ignored; fp32"),
)
OP_NAMES = tuple(op.name for op in OPS)
_BY_NAME = {op.name: op for op in OPS}


class OpSet:
    """One implementation per op of OPS, as attributes named after the ops."""

    def __init__(self, implementations: dict, on_triton: frozenset, interpreted: bool = False,
                 deterministic: bool = True):
        self.__dict__.update(implementations)
        self.on_triton = on_triton          # names of the ops that run on Triton
        self.interpreted = interpreted      # those run in the Triton interpreter (no CUDA device)
        self.deterministic = deterministic  # False: the Triton ops' atomic variants, where they have one

    @property
    def spec(self) -> str:
        """The --kernels value that resolves to this op set."""
        if not self.on_triton:
            return "torch"
        if self.on_triton == frozenset(OP_NAMES):
            return "triton"
        return ",".join(name for name in OP_NAMES if name in self.on_triton)

    def describe(self) -> str:
        """kernels=<spec>, and how they run where that matters: what a script's first line says."""
        notes = ", in the Triton interpreter: slow, for checking" if self.interpreted else ""
        notes += ", nondeterministic" if not self.deterministic else ""
        return f"kernels={self.spec}" + (f" ({notes[2:]})" if notes else "")

    def __repr__(self) -> str:
        flags = (", interpreted" if self.interpreted else "") + ("" if self.deterministic else ", nondeterministic")
        return f"OpSet({self.spec!r}{flags})"


def parse(spec: str, device=None) -> frozenset:
    """'torch' | 'triton' | 'auto' | 'attention,gelu,...' -> the set of op names to run on Triton."""
    spec = (spec or "").strip().lower()
    if spec == "auto":
        spec = "triton" if _is_cuda(device) else "torch"
    if spec == "torch":
        return frozenset()
    if spec == "triton":
        return frozenset(OP_NAMES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in _BY_NAME]
    if not names or unknown:
        raise KernelsError(
            f"unknown kernels {', '.join(unknown) or repr(spec)}: use 'auto', 'torch', 'triton', "
            f"or a comma list of {', '.join(OP_NAMES)}"
        )
    return frozenset(names)


def resolve(spec, device=None, deterministic: bool = True) -> OpSet:
    """The op set for a --kernels value (an OpSet passes through unchanged); see the module docstring.

    device: where the model will run (None: the machine's default). Triton ops off CUDA run in the
    Triton interpreter. deterministic=False: the Triton ops that have a faster variant whose results
    can differ run to run in the last bits (attention's backward, adding dq up with atomics) use it."""
    if isinstance(spec, OpSet):
        return spec
    on_triton = parse(spec, device)
    interpreted = bool(on_triton) and not _is_cuda(device)
    if interpreted:
        _use_interpreter()
    chosen = {op.name: _load_triton(op, deterministic) if op.name in on_triton else op.torch for op in OPS}
    return OpSet(chosen, on_triton, interpreted, deterministic)


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _use_interpreter() -> None:
    """Turn on the Triton interpreter. It must be on before triton itself is first imported, not only
    before our kernels: triton.jit reads it when a function is defined, and triton's own library
    (tl.sum's combine function, ...) is defined at import, so a kernel interpreted on top of a compiled
    library fails inside the interpreter. Whatever imports transformers imports triton with it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise KernelsError("triton was imported in this process before the Triton interpreter was switched on, so "
                           "the Triton kernels cannot run on this CPU device: start the command with "
                           "TRITON_INTERPRET=1, or use --kernels=torch")
    os.environ["TRITON_INTERPRET"] = "1"


def _load_triton(op: Op, deterministic: bool = True):
    module_name, attribute = op.triton.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == "triton":
            raise KernelsError(
                f"the Triton kernel '{op.name}' needs the triton package, which is not installed "
                f"(pip install triton, Linux only); or run it on PyTorch: --kernels=torch"
            ) from None
        if err.name != module_name:
            raise
        raise KernelsError(
            f"the Triton kernel '{op.name}' is not implemented yet ({module_name.replace('.', '/')}.py "
            f"is missing): leave '{op.name}' out of --kernels, e.g. --kernels=torch"
        ) from None
    implementation = getattr(module, attribute)
    if op.nondeterministic and not deterministic:
        return functools.partial(implementation, **op.nondeterministic)
    return implementation
