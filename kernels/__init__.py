"""Hand-written Triton kernels, one file per op: kernels, launcher, autograd Function, public function.

    from kernels import flash_attention, layer_norm, add_layer_norm, gelu, FusedAdamW

Each name is imported on first use, so `import kernels` neither imports Triton nor fails for an op
whose file does not exist yet.
"""
import importlib

_MODULE_OF = {
    "flash_attention": "attention",
    "layer_norm": "layernorm",
    "add_layer_norm": "layernorm",
    "gelu": "gelu",
    "FusedAdamW": "adamw",
}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    module = importlib.import_module(f"kernels.{_MODULE_OF[name]}")
    return getattr(module, name)
