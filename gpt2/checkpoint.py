"""Checkpoints: everything a run needs to continue as if it had never stopped.

<out_dir>/ckpt_<step:06d>.pt holds the model (plain module keys, never torch.compile's `_orig_mod.` or
DDP's `module.` prefixes), the optimizer, every rank's loader position, the step, RNG states and the
resolved training config. It is written to a temporary name and renamed, so a run killed while saving
(even by kill -9) leaves the previous checkpoint intact and never a half-written one.
"""
import dataclasses
import os
import pathlib
import re

import torch

from gpt2.model import GPT, GPTConfig
from gpt2.ops import resolve

SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
_NAME = re.compile(r"^ckpt_(\d{6,})\.pt$")


def checkpoint_path(out_dir, step: int) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"ckpt_{step:06d}.pt"


def latest_checkpoint(out_dir):
    """The checkpoint with the highest step in out_dir, or None."""
    folder = pathlib.Path(out_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt_*.pt") if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare GPT inside DDP and torch.compile wrappers (their keys carry `module.`/`_orig_mod.`)."""
    model = getattr(model, "module", model)       # DDP
    return getattr(model, "_orig_mod", model)     # torch.compile


def save_checkpoint(path, *, model, optimizer, step: int, loader_states: list, train_config: dict,
                    scaler=None) -> None:
    state = {
        "model": unwrap(model).state_dict(),
        "model_config": dataclasses.asdict(unwrap(model).config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "loader_states": loader_states,
        "train_config": train_config,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None


def check_same_shape(checkpoint: dict, config: GPTConfig, path) -> None:
    theirs = checkpoint["model_config"]
    diffs = [f"{k}={theirs[k]} (run: {getattr(config, k)})" for k in SHAPE_FIELDS if theirs[k] != getattr(config, k)]
    if diffs:
        raise ValueError(f"{path} holds a model of another shape: {', '.join(diffs)}; "
                         f"use a fresh --out_dir or the flags of that run")


def restore_rng(checkpoint: dict) -> None:
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if checkpoint["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


def load_model(path, device, kernels: str = "torch") -> GPT:
    """The model of a checkpoint, for sampling and evaluation, with the --kernels value `kernels`."""
    checkpoint = load_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["model_config"]), resolve(kernels, device))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)
