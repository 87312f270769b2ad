"""Checkpoints: everything a run needs to continue as if it had never stopped.

<out_dir>/ckpt_<step:06d>.pt holds the model (plain module keys, never torch.compile's `_orig_mod.` or
DDP's `module.` prefixes), the optimizer, every rank's loader position, the step, RNG states and the
resolved training config, and whether the step's evaluations were done before it was saved
(`periodic_done`: a checkpoint saved on Ctrl-C comes before them). It is written to a temporary name
and renamed, so a run killed while saving (even by kill -9) leaves the previous checkpoint intact and
never a half-written one; remove_stale_tmp_files clears what such a kill leaves. A checkpoint damaged
anyway (a full disk, a copy cut short) is passed over by newest_readable_checkpoint.
"""
import dataclasses
import pathlib
import re
import sys

import torch

from gpt2.files import remove_stale_tmp_files, write_atomic
from gpt2.model import GPT, GPTConfig
from gpt2.ops import resolve

REQUIRED_KEYS = ("model", "model_config", "optimizer", "step", "loader_states", "rng")
_NAME = re.compile(r"^ckpt_(\d{6,})\.pt$")


def checkpoint_path(out_dir, step: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"ckpt_{step:06d}.pt"


def checkpoints(out_dir) -> list[pathlib.Path]:
    """The checkpoints in out_dir, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in pathlib.Path(out_dir).glob("ckpt_*.pt") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_readable_checkpoint(out_dir, mmap: bool = False):
    """(path, checkpoint, [(unreadable newer path, why), ...]) of the newest checkpoint that loads, or
    None when out_dir holds no checkpoint. ValueError when it holds some and none loads. mmap: the
    tensors are mapped, not read (cheap, for a look at the config)."""
    skipped = []
    for path in checkpoints(out_dir):
        try:
            return path, load_checkpoint(path, mmap), skipped
        except ValueError as err:
            skipped.append((path, str(err)))
    if skipped:
        raise ValueError(f"no checkpoint in {out_dir} is readable ({skipped[0][1]}, ...): start over with "
                         "--overwrite, or use another --out_dir")
    return None


def remove_stale_tmp_checkpoints(out_dir) -> list:
    """The temporary files of saves that were killed (their process is gone)."""
    return remove_stale_tmp_files(out_dir, ".ckpt_*.pt.tmp*")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare GPT inside DDP and torch.compile wrappers (their keys carry `module.`/`_orig_mod.`)."""
    model = getattr(model, "module", model)       # DDP
    return getattr(model, "_orig_mod", model)     # torch.compile


def save_checkpoint(path, *, model, optimizer, step: int, loader_states: list, train_config: dict,
                    scaler=None, periodic_done: bool = True) -> None:
    """Write the checkpoint atomically. OSError when the write fails (a full disk): the temporary file is
    removed and any checkpoint already at path is left as it was."""
    state = {
        "model": unwrap(model).state_dict(),
        "model_config": dataclasses.asdict(unwrap(model).config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "loader_states": loader_states,
        "train_config": train_config,
        "periodic_done": periodic_done,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    try:
        write_atomic(path, lambda f: torch.save(state, f))
    except RuntimeError as err:  # torch.save reports a failed write (a full disk) as an "enforce fail"
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


def load_checkpoint(path, mmap: bool = False) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (it lacks {', '.join(missing)})")
    return checkpoint


def restore_rng(checkpoint: dict) -> None:
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available():
        # one state per GPU the saving process saw: a resume may see fewer (CUDA_VISIBLE_DEVICES, a smaller box)
        states = checkpoint["rng"]["cuda"][:torch.cuda.device_count()]
        for device, state in enumerate(states):
            torch.cuda.set_rng_state(state, device)


def load_model(path, device, kernels: str = "torch") -> GPT:
    """The model of a checkpoint, for sampling and evaluation, with the --kernels value `kernels`. path may
    be a run's folder: its newest readable checkpoint."""
    if pathlib.Path(path).is_dir():
        newest = newest_readable_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in the folder {path}")
        path, checkpoint, _ = newest
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:  # once under torchrun, not once per rank
            print(f"{path}: the newest readable checkpoint in the folder", file=sys.stderr)
    else:
        checkpoint = load_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["model_config"]), resolve(kernels, device))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)
