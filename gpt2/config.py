"""The training run's configuration: one dataclass, its presets, its checks, and train.py's flags.

Every field of TrainConfig is declared once, with its type, default and help (`option(...)`): the
command line (`add_flags`), the checks (`validate`) and the help text all follow from that declaration.
A preset overrides some defaults; a flag on the command line overrides the preset. --resume takes the
resumed run's values instead of the preset's (resumed, below).
"""
import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from gpt2.runtime import DTYPES


class TrainError(Exception):
    """A problem with the run's inputs; the message says what to change. Printed without a traceback."""


def option(default, help: str, *, check: str | None = None, choices=None, metavar: str | None = None):
    """A config field: default, help text, what validate() requires of it ("positive", "non-negative")
    or the values it may take, and the flag's metavar (default: its type)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "metavar": metavar})


SAMPLING = ("sequential", "random")


@dataclass
class TrainConfig:
    data: str | None = option(None, "folder of token shards written by prepare_data.py; the shakespeare preset "
                                    "needs none: it trains on the tinyshakespeare shipped with this package, "
                                    "prepared into data/shakespeare", metavar="DIR")
    out_dir: str = option("out", "folder of the run's log.jsonl, loss.png and checkpoints; one run per folder",
                            metavar="DIR")
    preset: str = option("shakespeare", "the defaults of every other field")
    kernels: str = option("auto", "auto (triton on CUDA, torch elsewhere) | torch | triton | op,op,...")
    device: str = option("auto", "auto | cuda | cpu | mps")
    dtype: str | None = option(None, "autocast dtype; none given: bfloat16 on CUDA, float32 elsewhere",
                               choices=tuple(DTYPES))
    compile: bool | None = option(None, "torch.compile the model; none given: on for CUDA")
    deterministic: bool = option(True, "bitwise reproducible Triton kernels; --no-deterministic: attention's "
                                       "backward adds dq up with atomics, two of its seven matmuls fewer, and "
                                       "dq may differ run to run in the last bits (PyTorch's flash SDPA does "
                                       "the same)")
    init_from: str | None = option(None, "fine-tune from HF weights: gpt2 | gpt2-medium | ... | a local dir; "
                                          "the weights give the model's shape (no --n_layer, --n_head, --n_embd, "
                                          "--vocab_size)", metavar="NAME")
    n_layer: int = option(12, "transformer blocks", check="positive")
    n_head: int = option(12, "attention heads; must divide --n_embd", check="positive")
    n_embd: int = option(768, "width of the residual stream", check="positive")
    block_size: int = option(1024, "context length in tokens", check="positive")
    vocab_size: int = option(50304, "embedding rows: GPT-2's 50257 tokens padded for speed", check="positive")
    batch_size: int = option(64, "micro-batch per rank, in sequences", check="positive")
    total_batch_size: int = option(524288, "tokens per optimizer step, all ranks; a multiple of "
                                           "batch_size x block_size x ranks (gradient accumulation does "
                                           "the rest)", check="positive")
    max_steps: int = option(19073, "optimizer steps", check="non-negative")
    warmup_steps: int = option(715, "steps of linear learning-rate warmup; 0: none", check="non-negative")
    learning_rate: float = option(6e-4, "peak learning rate", check="positive")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of --learning_rate, in [0, 1]",
                                 check="non-negative")
    weight_decay: float = option(0.1, "AdamW weight decay of the 2-D weights", check="non-negative")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 turns clipping off",
                              check="non-negative")
    seed: int = option(1337, "seed of the weights and of random sampling")
    sampling: str = option("sequential", "how train batches are read: sequential (the token stream in order, "
                                         "as build-nanogpt; for big data) or random (windows at seeded random "
                                         "positions; for small data)", choices=SAMPLING)
    eval_interval: int = option(250, "steps between validation losses; 0 turns them off", check="non-negative")
    eval_steps: int = option(20, "validation batches per rank; 0, or more than the val split holds: the "
                                 "whole split, each token once", check="non-negative")
    hellaswag_interval: int = option(250, "steps between HellaSwag evaluations; 0 turns them off",
                                     check="non-negative")
    hellaswag_limit: int | None = option(None, "HellaSwag examples per evaluation; none given: all 10,042",
                                         check="positive")
    hellaswag_data: str | None = option(None, "local hellaswag_val.jsonl; none given: downloaded once",
                                        metavar="FILE")
    sample_interval: int = option(250, "steps between printed samples; 0 turns them off", check="non-negative")
    sample_prompt: str = option("Hello, I'm a language model,", "the prompt of the printed samples")
    checkpoint_interval: int = option(5000, "steps between checkpoints, and one at the end; 0 turns them off "
                                            "(Ctrl-C still saves one)", check="non-negative")
    resume: bool = option(False, "continue the run in --out_dir from its newest readable checkpoint, with the "
                                 "flags stored there; a flag given with it changes that setting")
    overwrite: bool = option(False, "start over in an --out_dir that holds a run: deletes that run's log, "
                                    "checkpoints, plot and TensorBoard events (no other file)")
    delete_consumed_shards: bool = option(False, "delete each train shard once every rank is done with it and "
                                                 "the newest checkpoint is past it (with a streaming "
                                                 "prepare_data.py; --sampling sequential)")
    tensorboard: bool = option(False, "also log every scalar of log.jsonl as TensorBoard events in "
                                      "<out_dir>/tensorboard (pip install tensorboard)")


PRESETS = {
    # a small GPT that learns tinyshakespeare's shape in a few minutes on a laptop CPU; its 33,803 val
    # tokens are evaluated whole, and its 304,223 train tokens sampled at random windows
    "shakespeare": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, total_batch_size=512,
                        max_steps=200, warmup_steps=20, learning_rate=2e-3, sampling="random", eval_interval=50,
                        eval_steps=0, hellaswag_interval=0, sample_interval=200, sample_prompt="ROMEO:",
                        checkpoint_interval=200),
    # build-nanogpt: GPT-2 124M on 10B tokens of FineWeb-Edu
    "gpt2-124m": dict(),
    # GPT-3 paper learning rates for the larger sizes; micro-batches that fit an 80 GB GPU in bf16
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=32, learning_rate=3e-4),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=16, learning_rate=2.5e-4),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=8, learning_rate=2e-4),
}


def make_config(preset: str | None, **overrides) -> TrainConfig:
    """The preset's config (None: the default preset) with every override that is not None applied."""
    preset = preset or TrainConfig.preset
    if preset not in PRESETS:
        raise TrainError(f"unknown --preset {preset!r}: choose from {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    ignored = [f"--{name}" for name in ("n_layer", "n_head", "n_embd", "vocab_size") if name in given]
    if given.get("init_from") and ignored:
        raise TrainError(f"--init_from {given['init_from']} takes the model's shape from its weights: leave out "
                         f"{' '.join(ignored)}")
    return TrainConfig(preset=preset, **{**PRESETS[preset], **given})


# ---------------------------------------------------------------------------------------------
# --resume: a run continues with the flags stored in its newest checkpoint, not with the preset's
# defaults; a flag given with --resume changes that setting from the resumed step on, except those the
# checkpoint fixes: the model, and the seed and sampling of the loader's position. The weights come
# from the checkpoint, so --init_from means nothing to a resumed run.

NEVER_RESUMED = ("out_dir", "resume", "overwrite", "init_from")
FIXED_ON_RESUME = ("preset", "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "seed", "sampling")
MODEL_SHAPE = ("vocab_size", "n_layer", "n_head", "n_embd")   # block_size is the batches' length too
PATH_FIELDS = ("data", "hellaswag_data")


def run_flags(checkpoint: dict) -> dict:
    """The flags of the run a checkpoint belongs to: its train_config, where an older version stored no
    value its preset's, and the shape of the model it holds (an --init_from model's is not the flags')."""
    stored = checkpoint.get("train_config") or {}
    preset = stored.get("preset") if stored.get("preset") in PRESETS else None
    model = checkpoint["model_config"]
    return {**dataclasses.asdict(make_config(preset)), **stored, **{name: model[name] for name in MODEL_SHAPE}}


def resumed(cfg: TrainConfig, run: dict, given) -> TrainConfig:
    """cfg with the run's value of every field whose flag is not in `given`."""
    inherited = {f.name for f in dataclasses.fields(TrainConfig)} - {*NEVER_RESUMED, *given}
    return dataclasses.replace(cfg, **{name: value for name, value in run.items() if name in inherited})


def resume_changes(cfg: TrainConfig, run: dict) -> list[str]:
    """'--flag value (the run's: --flag old)' for each setting cfg changes in the run it resumes; TrainError
    for a change of one the checkpoint fixes."""
    changed = [f.name for f in dataclasses.fields(cfg) if f.name in run and f.name not in NEVER_RESUMED
               and not _same(f.name, getattr(cfg, f.name), run[f.name])]
    fixed = [name for name in changed if name in FIXED_ON_RESUME]
    if fixed:
        theirs, ours = (" ".join(flag(n, values[n]) for n in fixed) for values in (run, dataclasses.asdict(cfg)))
        raise TrainError(f"--resume continues a run of {theirs}, not {ours}, which its checkpoint fixes: leave "
                         f"{'them' if len(fixed) > 1 else 'it'} out, or train into another --out_dir")
    return [f"{flag(n, getattr(cfg, n))} (the run's: {flag(n, run[n])})" for n in changed]


def _same(name: str, ours, theirs) -> bool:
    if name in PATH_FIELDS and ours is not None and theirs is not None:
        return os.path.realpath(ours) == os.path.realpath(theirs)
    return ours == theirs


def absolute_paths(cfg: TrainConfig) -> dict:
    """cfg as a dict whose folders and files are absolute, as a checkpoint stores it: a --resume from
    another working directory finds them."""
    return {**dataclasses.asdict(cfg), **{name: os.path.abspath(getattr(cfg, name))
                                          for name in PATH_FIELDS if getattr(cfg, name) is not None}}


def flag(name: str, value) -> str:
    """The command-line flag that sets field `name` to value (None: left to the default)."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {'unset' if value is None else value}"


# ---------------------------------------------------------------------------------------------
# checks: every one before any heavy work, each a one-line message that names the flag


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise TrainError for the first value no run can use."""
    for f in dataclasses.fields(cfg):
        value, check, choices = getattr(cfg, f.name), f.metadata["check"], f.metadata["choices"]
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
            raise TrainError(f"--{f.name} must be a finite number, got {value}")
        if check == "positive" and value <= 0:
            raise TrainError(f"--{f.name} must be positive, got {value}")
        if check == "non-negative" and value < 0:
            raise TrainError(f"--{f.name} must be 0 or more, got {value}")
        if choices and value not in choices:
            raise TrainError(f"unknown --{f.name} {value!r}: choose from {', '.join(choices)}")
    if cfg.n_embd % cfg.n_head:
        raise TrainError(f"--n_embd {cfg.n_embd} is not a multiple of --n_head {cfg.n_head}: the heads split it")
    if cfg.min_lr_ratio > 1:
        raise TrainError(f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out_dir and --overwrite deletes it: give one of them")
    if cfg.delete_consumed_shards and cfg.sampling == "random":
        raise TrainError("--delete_consumed_shards reads the train split once, in order: add --sampling sequential "
                         "(--sampling random, the shakespeare preset's, draws windows from the whole split)")
    grad_accum_steps(cfg, world_size)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_micro_step:
        raise TrainError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of --batch_size x --block_size x ranks "
            f"= {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_micro_step}; change one of them")
    return cfg.total_batch_size // per_micro_step


# ---------------------------------------------------------------------------------------------
# the command line: one flag per field, its type and help from the field


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--<field> for every TrainConfig field. Defaults stay None, so that the preset's value applies;
    the help names each preset's value."""
    for f in dataclasses.fields(TrainConfig):
        kind = _scalar_type(f.type)
        help = f"{f.metadata['help']}{_preset_values(f.name)}"
        if f.name == "preset":  # default None: --resume tells a preset given from the default one
            parser.add_argument("--preset", choices=list(PRESETS), help=f"{help} (default: {TrainConfig.preset})")
        elif kind is bool and f.name not in NEVER_RESUMED:  # --no-<field> too: it may undo the resumed run's
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=None, help=help)
        else:
            parser.add_argument(f"--{f.name}", type=kind, choices=f.metadata["choices"], metavar=_metavar(f, kind),
                                help=help)


def _scalar_type(annotation):
    """int for `int` and for `int | None`."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
    return kinds[0] if kinds else annotation


def _metavar(f, kind) -> str | None:
    return None if f.metadata["choices"] else f.metadata["metavar"] or kind.__name__.upper()


def _preset_values(name: str) -> str:
    """' (default: X)' for the default preset's value, then the other presets' values where they differ;
    nothing for a default of None."""
    values = {preset: getattr(make_config(preset), name) for preset in PRESETS}
    default = values.pop(TrainConfig.preset)
    if name == "preset" or default is None or default is False:
        return ""
    others = {}
    for preset, value in values.items():
        if value != default:
            others.setdefault(value, []).append(preset)
    return f" (default: {default}" + "".join(
        f"; {'gpt2-*' if len(presets) == len(values) else ', '.join(presets)}: {value}"
        for value, presets in others.items()) + ")"
