"""The two ways a kernel file's launchers are called, and the dtype its outputs are written in.

Every op has two paths to the same launcher:

- under torch.compile, a custom op (`torch.library.triton_op`) whose launcher launches through
  `traced` (= wrap_triton), so that the compiler sees the kernel and traces it into its graph;
- in eager mode, a torch.autograd.Function whose launcher launches through `direct`, the kernel
  itself. The custom op's dispatch (the dispatcher, its autograd wrapper, wrap_triton's higher-order
  op) costs tens of microseconds of host time per call, which a model calling an op hundreds of
  times a step cannot afford.

    def _forward(x, ..., launch):
        launch(_my_kernel)[grid](...)

The public function picks the path with `torch.compiler.is_compiling()`; tests run both.
"""
import torch
from torch.library import wrap_triton

traced = wrap_triton


def direct(kernel):
    return kernel


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would cast a matmul's inputs to on device, or None when autocast is off.

    An op whose output feeds a matmul writes it in this dtype: one narrow write instead of a wide
    write followed by autocast's cast kernel (a read and another write)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
