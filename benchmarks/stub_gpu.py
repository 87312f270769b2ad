"""A CUDA GPU that is not there: Triton's own launch path on a machine without one.

    import stub_gpu
    stub_gpu.install(arch=90)          # before the first kernel launch; TRITON_INTERPRET must be unset
    y = layer_norm(x, w, b)            # CPU tensors: compiled for sm_90 with ptxas, launched nowhere

Triton's launch path (argument binding, specialization, the compiled-kernel cache, the launcher call)
runs exactly as on a GPU; only loading the binary and the launch itself are skipped. Every kernel a
call would launch is compiled for the target, so that the first call of a new specialization takes
seconds, like on a GPU, and `compiled()` lists what was built. What the kernels would compute is not
computed: outputs hold whatever torch.empty left there.

Two users: benchmarks/host_overhead.py times the host path of each op (everything a GPU step pays on the
CPU except cuLaunchKernel), and tests/test_compiled_kernels.py records the kernels a model step launches,
then recompiles each with the argument types torch.compile uses. Written against Triton 3.6 - 3.9's
runtime (triton.runtime.driver, CompiledKernel); an autotuned kernel takes its first config.
"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

_compiled = []  # (ASTSource, options) of every kernel compiled since install()
_launches = None  # while recording: (kernel hash, grid, args) of every launch


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module and function handles (not None: loaded once), registers, spills, max threads

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _StubDriver:
    """The parts of triton's active driver that compiling and launching touch."""

    utils = _Utils()

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def launcher_cls(self, src, metadata):
        def launch(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
                   *args):
            if _launches is not None:
                _launches.append((metadata.hash, (grid_x, grid_y, grid_z), args))
        return launch

    def get_benchmarker(self):
        raise RuntimeError("stub_gpu: nothing can be timed on a GPU that is not there")


def install(arch: int = 90) -> None:
    """Make Triton compile for sm_<arch> and launch nothing; autotuned kernels keep their first config."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("stub_gpu needs the real Triton JIT: unset TRITON_INTERPRET")
    driver.set_active(_StubDriver(arch))
    _record_compilations()
    _first_config_only()


def record_launches() -> list:
    """From now on, every launch is appended to the list returned: (the compiled kernel's hash, the grid,
    the arguments the launcher got, every parameter of the kernel in order)."""
    global _launches
    _launches = []
    return _launches


def compiled() -> list:
    """[(ASTSource, options)] of the kernels compiled since install(): what a step launches."""
    return list(_compiled)


def _record_compilations() -> None:
    # a JITFunction looks triton.compiler.compile up when it first launches on a device
    import triton.compiler

    original = triton.compiler.compile

    def compile_and_record(src, target=None, options=None, **kwargs):
        _compiled.append((src, dict(options or {})))
        return original(src, target=target, options=options, **kwargs)

    triton.compiler.compile = compile_and_record


def _first_config_only() -> None:
    """An autotuner would time its configs on the GPU; here it takes the first, untimed. Its list of
    configs stays as it is, for whoever wants to compile them all."""
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]
    Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]
