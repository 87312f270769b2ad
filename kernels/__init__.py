"""Hand-written Triton kernels, one file per op: kernels, launcher, autograd Function, public function.

    from kernels import flash_attention, layer_norm, add_layer_norm, gelu, FusedAdamW

Every kernel file lists its public names in `__all__`; this package exports them all, so that
`from kernels import gelu` is the function gelu, never the module kernels/gelu.py. Importing the
package imports Triton. Set TRITON_INTERPRET=1 before the import to run the kernels on CPU tensors.
"""
import importlib
import pkgutil

__all__ = []
for _module_info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_module_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
