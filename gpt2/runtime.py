"""Where and how the scripts run: device choice, autocast, and torchrun's process group.

Shared by train.py, sample.py and eval_hellaswag.py so that none of them sets these up alone.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# bf16 dense peak FLOP/s by GPU name, for MFU (datasheet numbers without sparsity; SXM parts, unless named)
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
                   "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "L4": 121e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak of the longest name in the table that device_name contains ("NVIDIA H200 NVL" is an
    H200 NVL, not an H200)."""
    keys = [key for key in PEAK_BF16_FLOPS if key in device_name]
    return PEAK_BF16_FLOPS[max(keys, key=len)] if keys else None


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else is checked, with a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch lists twenty device types, most of them not ours
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda (cuda:N for one GPU) or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"--device {name}: this machine has {count} GPU{'s' if count > 1 else ''}, "
                         f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def autocast(device: torch.device, dtype: str):
    """Mixed precision for the forward pass; a no-op for float32."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if DTYPES[dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# seconds within which a second SIGINT or SIGTERM is the same stop: torchrun forwards the terminal's Ctrl-C
# to workers that got it already
DUPLICATE_SIGNAL_S = 1.0


def init_distributed(device_name: str = "auto") -> tuple:
    """Join torchrun's process group if launched by torchrun: NCCL on CUDA, gloo elsewhere.

    Returns (Distributed, device). Under torchrun each rank takes cuda:<local_rank>.
    """
    if "RANK" not in os.environ:
        return Distributed(), pick_device(device_name)
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return ddp, device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (gloo has no ReduceOp.AVG, so averaging callers divide themselves)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
