"""The two ways a kernel file's launchers are called, the inputs they take, and the dtype their outputs are
written in.

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

`direct` launches a kernel as `kernel[grid](...)` does, but binds its arguments once per
specialization instead of on every call. Triton's `JITFunction.run` binds every argument, builds a
cache key string, reads its knobs and fetches launch metadata at each launch: about 20 us of host time
on a slow CPU, more than the whole aten op it stands in for. `DirectLauncher` keys its own cache on what
Triton specializes on (each tensor's dtype and 16-byte alignment, each int's range, divisibility by 16
and equality to 1, each constant's value), lets Triton bind, compile and launch the first call of a key,
and from then on calls the compiled kernel with every parameter in order, as Triton's own
`CompiledKernel[grid](...)` takes. An autotuned kernel's cache is keyed on its tuning key as well, and
its first launch for a key goes through the autotuner. Launch hooks (a profiler's) and the interpreter
keep Triton's full path.
"""
import torch
import triton
from torch.library import wrap_triton
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

traced = wrap_triton


def _specialization(args) -> tuple:
    """What Triton specializes a kernel on, argument by argument, or something finer: each tensor's dtype
    and 16-byte alignment; each int's equality to 1, divisibility by 16 and width; a float is always fp32;
    anything else (None, a bool, a constant) by value. One comprehension: this runs at every launch."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                  (a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63) if type(a) is int else
                  float if type(a) is float else a for a in args])


def _launch_hooks_set() -> bool:
    """Whether a profiler has hooked Triton's launches (Triton 3.6 - 3.9 keep them in HookChains)."""
    hooks = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


class DirectLauncher:
    """`launcher[grid](*args, **constexprs)` launches what `kernel[grid](*args, **constexprs)` would,
    with the arguments bound once per specialization. kernel: a JITFunction, or an autotuner over one
    (whose choice for the key is made, and then kept, by the autotuner's first launch)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.names = self.jit.arg_names
        tuning_keys = kernel.keys if isinstance(kernel, Autotuner) else []
        self.tuning_positions = [self.names.index(name) for name in tuning_keys]  # their values choose the config
        self.bound = {}  # key -> (compiled kernel, values of the params after the positional args)

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launch(grid, args, constexprs)

    def launch(self, grid, args, constexprs):
        device = driver.active.get_current_device()
        key = (device, _specialization(args), *constexprs.items(),
               *[args[i] for i in self.tuning_positions if i < len(args)])
        bound = self.bound.get(key)
        if bound is None or _launch_hooks_set():
            self._launch_through_triton(key, grid, args, constexprs)
            return
        compiled, rest = bound
        if callable(grid):  # called as Triton calls it: with every parameter by name
            grid = grid(dict(zip(self.names, (*args, *rest))))
        # Triton's own CompiledKernel[grid](*args): every parameter positional, no launch metadata or hooks
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *rest)

    def _launch_through_triton(self, key, grid, args, constexprs):
        compiled = self.kernel[grid](*args, **constexprs)  # binds, tunes and compiles if new, launches
        config = getattr(self.kernel, "best_config", None)
        if config is not None and config.pre_hook is not None:
            return  # a config with a hook to run before each launch: always Triton's path
        given = {**constexprs, **(config.all_kwargs() if config is not None else {})}
        self.bound[key] = compiled, [given[p.name] if p.name in given else p.default
                                     for p in self.jit.params[len(args):]]


_launchers: dict = {}  # id(kernel) -> its DirectLauncher, which holds the kernel: ids stay unique


def direct(kernel):
    """The kernel's launcher for the eager path: `direct(kernel)[grid](...)`."""
    launcher = _launchers.get(id(kernel))  # by id: a JITFunction hashes its source
    if launcher is None:
        plain = type(kernel) is JITFunction or (type(kernel) is Autotuner and type(kernel.fn) is JITFunction)
        if not plain:  # interpreted, or heuristics: Triton's own launch
            return kernel
        launcher = _launchers[id(kernel)] = DirectLauncher(kernel)
    return launcher


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_inputs(op: str, **tensors: torch.Tensor | None) -> None:
    """The kernels load fp32, fp16 or bf16 and compute in fp32, all operands on one device: anything else
    (integers, fp64, a CPU tensor beside a CUDA one) is refused here, with what to pass instead, rather than
    computed wrongly or failing inside Triton. None entries (an absent bias) are skipped."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} is {t.dtype}; the Triton kernels take float32, float16 or bfloat16 "
                            f"(use the PyTorch op, --kernels=torch, for {t.dtype})")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {first} is on {device} but {name} on {t.device}: move them to one device")


def no_double_backward(op: str) -> None:
    """Called first in an eager backward. Under create_graph=True autograd records a backward's ops for a
    second derivative; the kernels' outputs would have none, and it would silently come out zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no double backward (create_graph=True): use its PyTorch op, --kernels=torch")


def cdiv(a, b):
    """ceil(a / b) on the host: triton.cdiv is a ConstexprFunction in Triton 3.9, 5 us a call."""
    return -(-a // b)


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), without its few us of host time when x has that dtype already."""
    return x if x.dtype == dtype else x.to(dtype)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without triton.next_power_of_2's 5 us a call."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would cast a matmul's inputs to on device, or None when autocast is off.

    An op whose output feeds a matmul writes it in this dtype: one narrow write instead of a wide
    write followed by autocast's cast kernel (a read and another write)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
