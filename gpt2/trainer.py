"""The training run behind train.py: the lr schedule, the loop, and what it leaves in --out_dir.

The loop is build-nanogpt's recipe: gradient accumulation to a fixed number of tokens per step, bf16
autocast, TF32 matmuls, global grad-norm clipping, AdamW with decay on 2-D weights, linear warmup then
cosine decay to min_lr_ratio * lr. Under torchrun the model is wrapped in DDP and gradients are synced
only on the last micro-step. Rank 0 alone prints, logs and checkpoints; every rank joins every
collective (validation loss, HellaSwag counts, loader positions for the checkpoint, the stop flag).

A run owns its --out_dir: log.jsonl, loss.png, ckpt_<step>.pt and tensorboard/ (with --tensorboard).
A folder that holds a run is refused unless --resume continues it or --overwrite deletes those files
first. Everything that can be checked without the model (flags, out_dir, data, HellaSwag file, that
the model's vocabulary and positions fit them) is checked before it is built. Ctrl-C (or SIGTERM) stops
the run at the end of the step it is in, with a checkpoint there (exit code 128 + the signal's number:
130, 143); in an evaluation, at its next batch (under torchrun, at the next of the ranks' votes, every
Run.VOTE_EVERY batches), with a checkpoint that evaluates again on resume; while the loader waits for
prepare_data.py's shards, at once, saving the steps since the newest checkpoint if there are any. A
second Ctrl-C stops at once. loss.png is redrawn after every evaluation and at the end of the run.

With --delete_consumed_shards (and --checkpoint_interval > 0), a shard is deleted only once every rank
has read it and the newest checkpoint stands past it: --resume after a crash, even kill -9, finds every
shard from that checkpoint on.
"""
import contextlib
import importlib.util
import json
import math
import os
import pathlib
import signal
import tempfile
import threading
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import ops as ops_module
from gpt2.checkpoint import (checkpoint_path, checkpoints, load_checkpoint, newest_readable_checkpoint,
                             remove_stale_tmp_checkpoints, restore_rng, save_checkpoint)
from gpt2.config import (PRESETS, TrainConfig, TrainError, absolute_paths, grad_accum_steps, make_config,
                         resume_changes, resumed, run_flags, validate)
from gpt2.data import ShardLoader, ensure_shakespeare
from gpt2.files import write_atomic
from gpt2.model import GPT, HF_MODELS, GPTConfig, LoadError
from gpt2.plot import read_log
from gpt2.runtime import DUPLICATE_SIGNAL_S, Distributed, all_reduce_sum, autocast, peak_bf16_flops
from gpt2.shards import WaitStopped
from gpt2.tokenizer import ENCODING_NAME, VOCAB_SIZE

__all__ = ["PRESETS", "TrainConfig", "TrainError", "Interrupted", "Run", "make_config", "resume_config", "train"]

LOG_FILE, PLOT_FILE, TENSORBOARD_DIR = "log.jsonl", "loss.png", "tensorboard"
HELLASWAG_BATCH_SIZE = 16  # examples per forward


class EvaluationStopped(Exception):
    """A signal during an evaluation: it ends at its next batch (under DDP, at the ranks' next vote)."""


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; exit_code is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr_ratio * learning_rate at max_steps."""
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)




# ---------------------------------------------------------------------------------------------
# one optimizer step, shared by the trainer and benchmarks/bench_train.py


def accumulate_gradients(model, batches, device, dtype: str, scaler) -> torch.Tensor:
    """Forward and backward over the micro-batches [(x, y), ...]; returns their mean loss (no host sync).

    Under DDP the gradients are all-reduced once, after the last micro-step.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro_step == len(batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                _, loss = model(x, y)
            loss = loss / len(batches)
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    return loss_sum


def clip_and_step(optimizer, model, grad_clip: float, scaler) -> torch.Tensor:
    """Clip the global grad norm to grad_clip (inside FusedAdamW's update when it offers that; 0: no
    clipping), step, and clear the gradients. Returns the norm before clipping, measured either way."""
    scaler.unscale_(optimizer)
    if hasattr(optimizer, "clip_grad_norm_"):
        # max_norm inf measures the norm (one reduction) and clips nothing
        norm = optimizer.clip_grad_norm_(grad_clip if grad_clip > 0 else math.inf)
    elif grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm



# ---------------------------------------------------------------------------------------------
# the output folder and the checks before any heavy work


def pretrained_size(name: str) -> tuple:
    """(vocab_size, positions) of --init_from's model, from its config.json alone (the weights load
    later); transformers' GPT2Config defaults where it is silent, or where there is no readable
    config.json for GPT.from_pretrained to complain about."""
    default = (VOCAB_SIZE, 1024)  # every hub GPT-2 (HF_MODELS), and GPT2Config's defaults
    path = pathlib.Path(name) / "config.json"
    if name in HF_MODELS or not path.is_file():
        return default
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    if not isinstance(config, dict):
        return default
    return config.get("vocab_size", default[0]), config.get("n_positions", config.get("n_ctx", default[1]))


def run_files(out_dir) -> list[pathlib.Path]:
    """The files a run leaves in out_dir: what --overwrite deletes, and nothing else."""
    out_dir = pathlib.Path(out_dir)
    files = [out_dir / LOG_FILE, out_dir / PLOT_FILE, *checkpoints(out_dir), *out_dir.glob(".ckpt_*.pt.tmp*"),
             *out_dir.glob(f".{LOG_FILE}.tmp*"), *(out_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")]
    return [f for f in files if f.is_file()]


def check_out_dir(cfg: TrainConfig) -> None:
    """out_dir is, or can become, a folder this process writes to, and holds no other run unless
    --resume or --overwrite says what to do with it. Changes nothing on disk."""
    out_dir = pathlib.Path(cfg.out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == out_dir else f": {existing}"
        raise TrainError(f"--out_dir {out_dir}{where} is a file, not a folder; choose another --out_dir")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # as root, permission bits say nothing: try it
    except OSError as err:
        raise TrainError(f"--out_dir {out_dir}: cannot write in {existing} ({err.strerror}); "
                         "choose a writable --out_dir") from None
    if holds_run(out_dir) and not (cfg.resume or cfg.overwrite):
        files = [f.name for f in run_files(out_dir)]
        found = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        raise TrainError(f"{out_dir} holds a run ({found}): continue it with --resume, train into another "
                         f"--out_dir, or pass --overwrite to delete its log, checkpoints and plot")


def holds_run(out_dir) -> bool:
    """out_dir holds a checkpoint, or a log.jsonl with a training step. A run that failed before its first
    step left only its description (and maybe a step-0 evaluation): nothing to resume or to protect."""
    log = pathlib.Path(out_dir) / LOG_FILE
    return bool(checkpoints(out_dir)) or (log.exists() and any("loss" in r for r in read_log(out_dir)))


def checkpoint_to_resume(out_dir, mmap: bool):
    """(path, checkpoint, [(unreadable newer path, why), ...]) of the newest readable checkpoint, or None
    when out_dir holds none; TrainError when it holds some and none is readable. mmap: its tensors are
    mapped, not read (a look at its flags and model)."""
    try:
        return newest_readable_checkpoint(out_dir, mmap)
    except ValueError as err:
        raise TrainError(str(err)) from None


def resume_config(cfg: TrainConfig, given) -> TrainConfig:
    """train.py's --resume: cfg with the resumed run's value of every flag not in `given` (the flags on the
    command line), so that `--resume` alone continues a run started with other flags than the preset's."""
    found = checkpoint_to_resume(cfg.out_dir, mmap=True) if cfg.resume else None
    return resumed(cfg, run_flags(found[1]), given) if found else cfg


class SlowProgress:
    """`what: done/total batches (N s)` on rank 0 every EVERY_S seconds of work that has run that long:
    a whole-split validation in the Triton interpreter, or HellaSwag on a large model, takes minutes."""

    EVERY_S = 30.0

    def __init__(self, what: str, total: int, announce: bool, unit: str = "batches"):
        self.what, self.total, self.announce, self.unit = what, total, announce, unit
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.announce and now - self.last >= self.EVERY_S:
            print(f"{self.what}: {done}/{self.total} {self.unit} ({now - self.start:.0f} s)", flush=True)
            self.last = now


def check_seed(cfg: TrainConfig) -> None:
    if not 0 <= cfg.seed < 2**64:  # torch.manual_seed's range; numpy's generators take no negative seed
        raise TrainError(f"--seed must be in [0, 2**64), got {cfg.seed}")


def check_tensorboard(cfg: TrainConfig) -> None:
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard")


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal stopped the run where it was, without a checkpoint; exit_code is 128 + its number."""

    def __init__(self, signum: int):
        super().__init__()
        self.exit_code = 128 + signum


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM inside `with stop:` only sets `signum`: the loop finishes the step,
    saves a checkpoint and exits (a wait for prepare_data.py's shards polls it and ends at once). A
    second signal raises StoppedAtOnce at once, unless it comes within DUPLICATE_S of the first:
    torchrun forwards the terminal's Ctrl-C to workers that got it already (and kills them 30 s later,
    its shutdown timeout). Inside `with stop.deferred():` (a checkpoint being written) the second
    signal's StoppedAtOnce waits for the end of the block."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    DUPLICATE_S = DUPLICATE_SIGNAL_S

    def __init__(self, announce: bool):
        self.signum, self.announce, self._previous, self._first = None, announce, {}, 0.0
        self._deferring, self._deferred = False, None  # _deferred: the second signal's number

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._deferred:
            raise StoppedAtOnce(self._deferred)

    def _handle(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self._first < self.DUPLICATE_S:
                return
            if self._deferring:
                self._deferred = signum
                if self.announce:
                    os.write(2, f"\n{signal.Signals(signum).name}: stopping once the checkpoint is "
                                "written\n".encode())
                return
            raise StoppedAtOnce(signum)
        self.signum, self._first = signum, time.monotonic()
        if self.announce:  # os.write: print() may be in the middle of a write on this thread
            os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint "
                        "(press Ctrl-C again to stop at once)\n".encode())


# ---------------------------------------------------------------------------------------------
# the run


class Run:
    """One training run: the model, optimizer, loaders and logs, and the step loop over them."""

    VOTE_EVERY = 8  # evaluation batches between the ranks' votes on a stop (each vote waits for the GPU)

    def __init__(self, cfg: TrainConfig, ddp: Distributed, device: torch.device):
        self.cfg, self.ddp, self.device = cfg, ddp, device
        self.dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        self.compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.ops = ops_module.resolve(cfg.kernels, device, cfg.deterministic)
        if self.ops.interpreted and "attention" in self.ops.on_triton and self.dtype == "bfloat16":
            raise TrainError("--dtype bfloat16 with attention on Triton needs a CUDA device: the Triton interpreter's "
                             "bf16 matmuls are wrong. Use --dtype float32, or --kernels without attention")
        self.grad_accum = grad_accum_steps(cfg, ddp.world_size)
        self.out_dir = pathlib.Path(cfg.out_dir)
        self.log_path = self.out_dir / LOG_FILE
        self.stop = StopRequest(announce=ddp.is_main)
        # the checkpoint --resume continues from, and the config of the model it holds (None: starting anew)
        self.resume_path, self.resume_model = self._look_at_checkpoint() if cfg.resume else (None, None)
        self._open_inputs()  # before the model: a bad data folder or HellaSwag file fails in a second
        self._build_training()
        self.step = 0
        self.resumed_at, self.evaluated_at_resume = None, False
        self.saved_at = None  # the step of the newest checkpoint, saved or resumed from
        if cfg.resume:
            self._resume()
        # --delete_consumed_shards keeps the shards from here on, for a --resume after a crash
        self.checkpoint_position = self.train_loader.state_dict()
        self.flops_per_token = self.raw_model.flops_per_token(cfg.block_size)
        self.peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.stop_votes = 0.0  # ranks that had seen a signal when the last step's loss was reduced
        self.tensorboard = None

    def _open_inputs(self):
        """The tokenizer check, HellaSwag's examples and the data loaders."""
        cfg, ddp = self.cfg, self.ddp
        self.can_tokenize = self._check_tokenizer()
        self.hellaswag = self._hellaswag_examples() if cfg.hellaswag_interval and self.can_tokenize else None
        self.data_dir = self._data_dir()
        random_seed = cfg.seed if cfg.sampling == "random" else None
        self.train_loader = ShardLoader(self.data_dir, "train", cfg.batch_size, cfg.block_size, ddp.rank,
                                        ddp.world_size, random_seed=random_seed,
                                        delete_consumed=cfg.delete_consumed_shards)
        if cfg.delete_consumed_shards:
            self._check_disk_budget()
        self.val_loader = ShardLoader(self.data_dir, "val", cfg.batch_size, cfg.block_size, ddp.rank,
                                      ddp.world_size) if cfg.eval_interval else None
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:  # a signal ends a wait for prepare_data.py (see run())
                loader.stop_waiting = lambda: self.stop.signum is not None
        self._check_model_fits()

    def _check_disk_budget(self):
        """The shards the trainer holds at once must fit prepare_data.py's --max_shards_on_disk, or the two
        wait for each other forever: one optimizer step's, and every shard from the newest checkpoint's
        position on (kept for --resume). The shards before a checkpoint go after the step that follows it,
        so that step reads while the previous checkpoint's shards are still there: a checkpoint interval
        and one step."""
        cfg, loader = self.cfg, self.train_loader
        loader.check_disk_budget(cfg.total_batch_size)
        K, S, interval = loader.meta.get("max_shards_on_disk"), loader.meta.get("shard_size"), cfg.checkpoint_interval
        needed = loader.shards_spanned((interval + 1) * cfg.total_batch_size)
        if K and S and interval and needed > K:
            # the most tokens that span K shards at most are (K - 1) S: an interval and a step of them
            fits = (K - 1) * S // cfg.total_batch_size - 1
            shorter = f"--checkpoint_interval {fits} or less, or " if fits > 0 else ""
            raise TrainError(
                f"--delete_consumed_shards keeps every shard from the newest checkpoint on, for --resume: "
                f"--checkpoint_interval {interval} steps of {cfg.total_batch_size} tokens and the step after them "
                f"may span {needed} shards of {S} tokens, but prepare_data.py keeps at most {K} on disk "
                f"(--max_shards_on_disk): use {shorter}rerun prepare_data.py with --max_shards_on_disk >= {needed}")

    def _check_model_fits(self):
        """The model's vocabulary must hold every token id of the data and its positions --block_size. Known
        before it is built: from the flags, or --init_from's config.json, and the data's meta.json (a folder
        without one is checked batch by batch, check_token_ids)."""
        cfg = self.cfg
        if self.resume_model is not None:
            vocab, positions = self.resume_model["vocab_size"], self.resume_model["block_size"]
        else:
            vocab, positions = pretrained_size(cfg.init_from) if cfg.init_from else (cfg.vocab_size, None)
        meta = self.train_loader.meta or {}
        # GPT-2 BPE shards hold ids below VOCAB_SIZE, checked against the vocabulary here, once: only other
        # folders are checked batch by batch
        self.ids_unchecked = meta.get("tokenizer") != ENCODING_NAME
        if not self.ids_unchecked and vocab < VOCAB_SIZE:
            if cfg.init_from:
                model, fix = f"--init_from {cfg.init_from}'s vocab_size {vocab}", "fine-tune a GPT-2 vocabulary model"
            else:
                model, fix = f"--vocab_size {vocab}", "use --vocab_size 50304, the default (GPT-2's, padded for speed)"
            raise TrainError(f"{model} is below the {VOCAB_SIZE} tokens of the GPT-2 BPE, which the shards in "
                             f"{self.data_dir} hold (its meta.json): {fix}")
        if positions is not None and cfg.block_size > positions:
            raise TrainError(f"--block_size {cfg.block_size} is more than the {positions} positions of --init_from "
                             f"{cfg.init_from}: use --block_size {positions} or less")

    def _build_training(self):
        """The model (seeded), its optimizer and grad scaler, and its torch.compile and DDP wrappers."""
        cfg, ddp, device = self.cfg, self.ddp, self.device
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32
        self.raw_model = self._build_model().to(device)
        self.optimizer = self.raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95),
                                                             device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == "float16")
        # dynamic=False: the step, validation and HellaSwag's padded lengths are a few fixed shapes; a
        # dynamic graph for the second would be pinned to one B * T by the cross-entropy's chunking anyway
        self.model = torch.compile(self.raw_model, dynamic=False) if self.compile else self.raw_model
        if ddp.enabled:
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def check_token_ids(self, x, y):
        """A token id past the embedding fails here, in one line, not as an IndexError (or a CUDA device
        assert) inside the model: a data folder without meta.json says nothing of its ids in advance."""
        if not self.ids_unchecked:
            return
        top = int(torch.maximum(x.max(), y.max()))
        vocab = self.raw_model.config.vocab_size
        if top >= vocab and self.cfg.init_from:
            raise TrainError(f"{self.data_dir} holds token id {top}, but --init_from {self.cfg.init_from} has "
                             f"{vocab} token ids: fine-tune it on data tokenized for it")
        if top >= vocab:
            # only this batch's ids are known: the largest id of the data may lie further on
            raise TrainError(f"{self.data_dir} holds token id {top}, but --vocab_size is {vocab}: train with a "
                             f"--vocab_size above every id of the data's tokenizer, not only {top} (50304 for "
                             "GPT-2's BPE)")

    def _build_model(self) -> GPT:
        cfg = self.cfg
        if self.resume_model is not None:  # its weights come from the checkpoint: no --init_from to load first
            return GPT(GPTConfig(**self.resume_model), self.ops)
        if cfg.init_from:
            try:
                return GPT.from_pretrained(cfg.init_from, kernels=self.ops)
            except LoadError as err:
                raise TrainError(f"--init_from {cfg.init_from}: {err}") from None
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd), self.ops)

    def _data_dir(self) -> str:
        if self.cfg.data:
            return self.cfg.data
        if self.cfg.preset != "shakespeare":
            raise TrainError(f"--preset {self.cfg.preset} needs --data DIR: a folder of token shards "
                             f"(python prepare_data.py fineweb --out DIR)")
        folder = pathlib.Path("data") / "shakespeare"
        if self.ddp.is_main:
            try:
                ensure_shakespeare(folder)  # from the copy shipped in the package: no network, no BPE
            except OSError as err:
                raise TrainError(f"could not prepare tinyshakespeare in {folder} ({err}): run from a writable "
                                 "folder, or pass --data DIR") from None
        self._barrier()
        return str(folder)

    def _check_tokenizer(self) -> bool:
        """Training reads token shards and needs no BPE; samples and HellaSwag do. Without the BPE they are
        skipped, with one line that says how to get it."""
        from gpt2.tokenizer import available

        wanted = [name for name, interval in (("samples", self.cfg.sample_interval),
                                              ("HellaSwag", self.cfg.hellaswag_interval)) if interval]
        if not wanted or available():
            return True
        self.print(f"note: the GPT-2 BPE is not here (tiktoken could not load it), so {' and '.join(wanted)} "
                   "are skipped; training needs none. To enable them, set TIKTOKEN_CACHE_DIR to a folder of "
                   "tiktoken's cached GPT-2 files, or connect to the internet once")
        return False

    def _hellaswag_examples(self):
        from gpt2.hellaswag import load_examples

        try:
            return load_examples(self.cfg.hellaswag_data, limit=self.cfg.hellaswag_limit,
                                 local_flag="--hellaswag_data")
        except RuntimeError as err:  # offline: the message names --hellaswag_data
            raise TrainError(f"--hellaswag_interval {self.cfg.hellaswag_interval}: {err}, or turn HellaSwag "
                             "off with --hellaswag_interval 0") from None

    def _barrier(self):
        if self.ddp.enabled:
            torch.distributed.barrier()

    # -- resume and checkpoints ------------------------------------------------------------------

    def _look_at_checkpoint(self):
        """(path, model_config) of the checkpoint to resume from, (None, None) if there is none; its tensors
        are not read yet. The flags this run changes in it are said, and one it cannot change is a TrainError."""
        found = checkpoint_to_resume(self.out_dir, mmap=True)
        if found is None:
            return None, None
        path, checkpoint, skipped = found
        if skipped:
            why = skipped[0][1].splitlines()[0]
            self.print(f"{why}; resuming from the older {path}" if len(skipped) == 1 else
                       f"{len(skipped)} newer checkpoints are not readable ({why}); resuming from {path}")
        changes = resume_changes(self.cfg, run_flags(checkpoint))
        if changes:
            self.print(f"--resume from {path} with changed flags, from its step on: {', '.join(changes)}")
        return path, checkpoint["model_config"]

    def _resume(self):
        if self.resume_path is None:
            started = " (the run in it saved none)" if holds_run(self.out_dir) else ""
            self.print(f"--resume: no checkpoint in {self.out_dir}{started}, starting from step 0 with this "
                       "command's flags")
            if self.ddp.is_main:
                self._truncate_log(0, keep_evaluations=False)
            return
        path = self.resume_path
        try:
            checkpoint = load_checkpoint(path)
        except ValueError as err:
            raise TrainError(str(err)) from None
        self.raw_model.load_state_dict(checkpoint["model"])
        # the moments come from the checkpoint, the groups' settings from this run: a --weight_decay given
        # with --resume, and the optimizer of this --kernels and device (a FusedAdamW's groups have no
        # "fused" key, and a torch AdamW loading them would turn its fused step off)
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, setting in zip(self.optimizer.param_groups, settings):
            group.update(setting)
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["loader_states"]
        if len(states) != self.ddp.world_size:
            raise TrainError(f"{path} was written by {len(states)} ranks, this run has {self.ddp.world_size}: "
                             f"resume with the same number of processes")
        self.train_loader.load_state_dict(states[self.ddp.rank])
        restore_rng(checkpoint)
        self.step = self.resumed_at = self.saved_at = checkpoint["step"]
        # a checkpoint saved on Ctrl-C comes before its step's evaluations; any other, after them
        self.evaluated_at_resume = checkpoint.get("periodic_done", True)
        if self.ddp.is_main:
            self._truncate_log(self.step, keep_evaluations=self.evaluated_at_resume)
        self.print(f"resumed from {path} at step {self.step}")
        if self.step >= self.cfg.max_steps:
            left = "" if self.evaluated_at_resume else " but this step's evaluations, cut short before"
            self.print(f"--max_steps is {self.cfg.max_steps}: nothing left to train{left} (a larger --max_steps trains "
                       "on, at the learning rate its longer schedule has at this step)")

    def _truncate_log(self, step: int, keep_evaluations: bool):
        """Drop the log lines of what the resumed run will do again, so the log reads as one run."""
        if self.log_path.exists():
            kept = [r for r in read_log(self.out_dir)
                    if r["step"] < step or (keep_evaluations and r["step"] == step and "loss" not in r)]
            text = "".join(json.dumps(record) + "\n" for record in kept)
            write_atomic(self.log_path, lambda f: f.write(text.encode()))  # a stop here leaves the old log whole

    def save(self, periodic_done: bool = True, gather: bool = True):
        """Every rank's loader state into one checkpoint, written by rank 0; returns its path there.

        gather=False: no collective, for a rank that cannot count on the others joining one (stopped while
        waiting for data). Their states are its own then: all ranks stand at the same position.
        """
        state = self.train_loader.state_dict()
        states = [state] * self.ddp.world_size
        if self.ddp.enabled and gather:
            torch.distributed.all_gather_object(states, state)
        path = checkpoint_path(self.out_dir, self.step)
        if self.ddp.is_main:
            with self.stop.deferred():  # a second Ctrl-C stops the run once the checkpoint is whole
                try:
                    save_checkpoint(path, model=self.raw_model, optimizer=self.optimizer, step=self.step,
                                    loader_states=states, train_config=absolute_paths(self.cfg),
                                    scaler=self.scaler, periodic_done=periodic_done)
                except OSError as err:
                    raise TrainError(f"could not save the checkpoint {path} ({err}): free space in --out_dir, "
                                     "then continue from the newest checkpoint with --resume") from None
                self.print(f"saved {path}")
        if gather:  # no rank exits before the checkpoint is whole: torchrun then stops the others at once
            self._barrier()
        self.saved_at, self.checkpoint_position = self.step, state
        return path if self.ddp.is_main else None

    # -- the output folder and logging -------------------------------------------------------------

    def start_outputs(self):
        """Rank 0 makes out_dir, clears the old run's files (--overwrite) and the leftovers of a killed
        save, and opens the TensorBoard writer. Only now: every check before this one changed nothing."""
        if not self.ddp.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite or not (self.cfg.resume or holds_run(self.out_dir)):
            old = run_files(self.out_dir)
            for f in old:
                f.unlink()
            if old and self.cfg.overwrite:
                self.print(f"--overwrite: deleted the {len(old)} files of the previous run in {self.out_dir}")
            elif old:
                self.print(f"deleted the {len(old)} files of a run in {self.out_dir} that failed before its first step")
        stale = remove_stale_tmp_checkpoints(self.out_dir)
        if stale:
            self.print(f"removed {len(stale)} temporary files of an interrupted save ({stale[0]}, ...)")
        if self.cfg.tensorboard:
            self._open_tensorboard()

    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events of the steps it does again, as it drops their log lines
        self.tensorboard = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=self.resumed_at,
                                         flush_secs=30)
        if self.resumed_at is not None:
            for record in read_log(self.out_dir):
                if record["step"] == self.resumed_at:  # the evaluations kept at the resumed step
                    self._tensorboard_scalars(record)

    def _tensorboard_scalars(self, record: dict):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(key, value, record["step"])

    def print(self, *args):
        if self.ddp.is_main:
            print(*args, flush=True)

    def log(self, record: dict):
        if self.ddp.is_main:
            try:
                with self.log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:  # a full disk
                raise TrainError(f"could not write to {self.log_path} ({err.strerror}): free space in --out_dir, "
                                 "then continue from the newest checkpoint with --resume") from None
            if self.tensorboard is not None:
                self._tensorboard_scalars(record)

    def describe(self) -> dict:
        """The run at a glance, for the log's first line and the plot's title."""
        meta = self.train_loader.meta or {}
        return {"preset": self.cfg.preset, "data": self.data_dir, "data_name": meta.get("name"),
                "data_source": meta.get("source"), "kernels": self.ops.spec, "deterministic": self.ops.deterministic,
                "device": str(self.device), "params": self.raw_model.num_params(), "sampling": self.cfg.sampling}

    # -- periodic work ------------------------------------------------------------------------------

    def due(self, interval: int, last: bool) -> bool:
        return interval > 0 and (self.step % interval == 0 or last)

    def val_batches(self):
        """The whole val split when eval_steps is 0 or would read all of it; else its first eval_steps batches.
        Returns (the batches, how many)."""
        loader, steps = self.val_loader, self.cfg.eval_steps
        if steps == 0 or steps * loader.tokens_per_step >= loader.num_tokens() - 1:
            return loader.whole_split_batches(), loader.whole_split_batch_count()
        loader.reset()
        return (loader.next_batch() for _ in range(steps)), steps

    @torch.no_grad()
    def evaluate_val_loss(self) -> float:
        """The token-weighted mean loss over the val batches of all ranks."""
        # no DDP wrapper: ranks may hold a different number of real tokens. GPT has no dropout, so
        # train/eval mode does not matter; switching it would make torch.compile recompile
        model = getattr(self.model, "module", self.model)
        total = torch.zeros(2, device=self.device)  # summed token losses, tokens
        batches, count = self.val_batches()
        progress = SlowProgress(f"step {self.step:6d} | validation", count, self.ddp.is_main)
        for done, (x, y) in enumerate(batches, 1):
            tokens = int((y != -1).sum())
            if tokens > 0:  # a rank's last batches may hold no window
                self.check_token_ids(x, y)
                with autocast(self.device, self.dtype):
                    _, loss = model(x.to(self.device), y.to(self.device))  # mean over the targets that are not -1
                total[0] += loss.detach().float() * tokens
                total[1] += tokens
            progress.update(done)
            self.stop_evaluation_if_signalled(done, count)  # every rank runs count batches
        all_reduce_sum(total)
        if total[1] == 0:  # a split of 0 or 1 tokens, found only now in a folder still being written
            raise TrainError(f"the val split in {self.data_dir} has no target token: a validation loss needs at "
                             "least 2 tokens; prepare more data, or train without validation (--eval_interval 0)")
        return (total[0] / total[1]).item()

    def evaluate_hellaswag(self) -> float:
        from gpt2.hellaswag import evaluate

        world, batch_size = self.ddp.world_size, HELLASWAG_BATCH_SIZE
        mine = len(self.hellaswag[self.ddp.rank::world])
        # ranks hold len // world examples or one more, so they may differ by a batch: all run this many
        shared = -(-(len(self.hellaswag) // world) // batch_size)
        progress = SlowProgress(f"step {self.step:6d} | hellaswag", mine, self.ddp.is_main, unit="examples")
        batches = 0

        def batch_done(examples: int):
            nonlocal batches
            batches += 1
            progress.update(examples)
            self.stop_evaluation_if_signalled(batches, shared)

        result = evaluate(getattr(self.model, "module", self.model), self.hellaswag, self.device,
                          batch_size=batch_size, rank=self.ddp.rank, world_size=world, autocast_dtype=self.dtype,
                          progress=batch_done)
        return result["acc_norm"]

    def stop_evaluation_if_signalled(self, batch: int, shared: int):
        """After an evaluation's batch-th batch, of which every rank runs the first `shared`: a signal stops
        the evaluation, and the checkpoint then saved does it again on resume. One process stops at the
        first batch after the signal. Under DDP the ranks vote every VOTE_EVERY of their shared batches, so
        that all stop at the same one: torchrun kills its workers 30 s after it forwards a signal, too soon
        for an evaluation of a large model to run to its end."""
        if not self.ddp.enabled:
            stop = self.stop.signum is not None
        elif batch % self.VOTE_EVERY == 0 and batch <= shared:
            vote = torch.tensor(float(self.stop.signum is not None), device=self.device)
            stop = all_reduce_sum(vote).item() > 0
        else:
            return
        if stop:
            raise EvaluationStopped

    def print_samples(self):
        from gpt2.sampling import format_samples, sample_text

        texts = sample_text(self.raw_model, self.cfg.sample_prompt, num_samples=2, max_new_tokens=48,
                            seed=self.cfg.seed, dtype=self.dtype)
        self.print(f"step {self.step:6d} | samples:\n{format_samples(texts)}")

    def evaluations(self, last: bool):
        cfg = self.cfg
        if self.val_loader is not None and self.due(cfg.eval_interval, last):
            val_loss = self.evaluate_val_loss()
            self.print(f"step {self.step:6d} | val loss {val_loss:.4f}")
            self.log({"step": self.step, "val_loss": val_loss})
            self.plot()
        if self.hellaswag is not None and self.due(cfg.hellaswag_interval, last):
            acc_norm = self.evaluate_hellaswag()
            self.print(f"step {self.step:6d} | hellaswag acc_norm {acc_norm:.4f}")
            self.log({"step": self.step, "hellaswag_acc_norm": acc_norm})
            self.plot()
        if self.ddp.is_main and self.can_tokenize and self.due(cfg.sample_interval, last) and self.step > 0:
            self.print_samples()

    def periodic(self, last: bool):
        """Evaluations, samples and the checkpoint of this step. At the step a run resumed from, the
        checkpoint is the one just loaded, and its evaluations are done unless it was saved on Ctrl-C."""
        resumed = self.step == self.resumed_at
        if not (resumed and self.evaluated_at_resume):
            self.evaluations(last)
        if not resumed and self.due(self.cfg.checkpoint_interval, last) and self.step > 0:
            self.save()

    def plot(self):
        if self.ddp.is_main:
            from gpt2.plot import plot_log

            plot_log(self.out_dir)

    # -- the step ------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        start = self.train_loader.state_dict()
        try:
            batches = [self.train_loader.next_batch() for _ in range(self.grad_accum)]
        except WaitStopped:  # the step never began: a checkpoint of it resumes with its first micro-batch
            self.train_loader.load_state_dict(start)
            raise
        for x, y in batches:
            self.check_token_ids(x, y)
        loss = accumulate_gradients(self.model, batches, self.device, self.dtype, self.scaler)
        # the ranks' losses and their stop votes (a signal seen) in one collective
        summed = all_reduce_sum(torch.stack([loss, loss.new_full((), float(self.stop.signum is not None))]))
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = clip_and_step(self.optimizer, self.raw_model, self.cfg.grad_clip, self.scaler)
        loss_value, stop_votes, norm_value = torch.stack(
            [summed[0] / self.ddp.world_size, summed[1], grad_norm.float()]).tolist()
        self.stop_votes = stop_votes
        dt = time.perf_counter() - t0  # .tolist() waited for the GPU: the step is done
        tokens_per_sec = self.cfg.total_batch_size / dt
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                  "dt_ms": 1000 * dt, "tokens_per_sec": tokens_per_sec}
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens_per_sec / self.peak
        return record

    def diverged(self, record: dict) -> bool:
        """The step's loss is not finite (the forward overflows), or its grad norm is not and no fp16
        GradScaler skipped the step (the update made every weight nan): the run stops before it saves
        anything more. All ranks agree: both values are all-reduced."""
        return not math.isfinite(record["loss"]) or (not self.scaler.is_enabled()
                                                       and not math.isfinite(record["grad_norm"]))

    def divergence_message(self, record: dict) -> str:
        what = "loss" if not math.isfinite(record["loss"]) else "grad norm"
        newest = (f"the newest checkpoint is {checkpoint_path(self.out_dir, self.saved_at)}: continue from it with "
                  "--resume and a lower --learning_rate" if self.saved_at is not None else
                  "no checkpoint was saved: start over with --overwrite and a lower --learning_rate")
        return f"step {record['step']}: the {what} is {record[what.replace(' ', '_')]}, training diverged; nothing " \
               f"after it is saved, and {newest}"

    def delete_consumed_shards(self):
        """Rank 0 deletes the shards every rank has read, but none from the newest checkpoint's position on
        (the first checkpoint's: the start), so that --resume after a crash finds them. Without periodic
        checkpoints there is no such position to keep: shards go as soon as they are read."""
        keep_from = self.checkpoint_position if self.cfg.checkpoint_interval else None
        self.train_loader.delete_finished_shards(keep_from=keep_from)

    def stop_requested(self) -> bool:
        """A signal arrived: on one process, at any time before now; under DDP, on any rank before this
        step's loss was reduced (all ranks agree, so that all stop at the same step, and no collective
        of its own is needed)."""
        if not self.ddp.enabled:
            return self.stop.signum is not None
        return self.stop_votes > 0

    def run(self):
        cfg = self.cfg
        self.start_outputs()
        self.print(f"{self.ops.describe()} device={self.device} dtype={self.dtype} compile={self.compile} "
                   f"ranks={self.ddp.world_size} params={self.raw_model.num_params() / 1e6:.2f}M "
                   f"grad_accum={self.grad_accum} tokens/step={cfg.total_batch_size}")
        if cfg.warmup_steps > cfg.max_steps:
            self.print(f"note: --warmup_steps {cfg.warmup_steps} is more than --max_steps {cfg.max_steps}: the "
                       f"learning rate rises to {learning_rate(cfg.max_steps - 1, cfg):.2e} at most, not to "
                       f"--learning_rate {cfg.learning_rate:.2e}")
        if self.resumed_at is None:
            self.log({"step": 0, "run": self.describe()})
        try:
            with self.stop:
                try:
                    self.loop()
                except WaitStopped:  # a signal came while the loader waited for prepare_data.py
                    raise self.stopped_while_waiting() from None
                except EvaluationStopped:
                    raise self.stopped_during_evaluation() from None
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def interrupted(self, message: str) -> Interrupted:
        """For train.py: rank 0's message, and the exit code 128 + the signal's number."""
        return Interrupted(message if self.ddp.is_main else "", 128 + (self.stop.signum or signal.SIGINT))

    def stopped_during_evaluation(self) -> Interrupted:
        """Before this step, in its evaluations: save the step (its evaluations marked not done, so that
        --resume does them again), and stop as Ctrl-C does."""
        self.plot()
        done = "no step done, nothing to save" if self.step == 0 else \
            f"saved {self.save(periodic_done=False)}; resume with --resume, which evaluates it again"
        return self.interrupted(f"interrupted at step {self.step} during its evaluation: {done}")

    def stopped_while_waiting(self) -> Interrupted:
        """Between two steps, waiting for data: save the steps done since the newest checkpoint, if any,
        without a collective (the other ranks may still wait, or be gone), and stop as Ctrl-C does."""
        self.plot()
        if self.step == (self.saved_at or 0):
            done = (f"nothing new to save since {checkpoint_path(self.out_dir, self.step)}; resume with --resume"
                    if self.saved_at is not None else "no step done, nothing to save")
        else:
            done = f"saved {self.save(periodic_done=False, gather=False)}; resume with --resume"
        return self.interrupted(f"interrupted at step {self.step} while waiting for data: {done}")

    def loop(self):
        cfg = self.cfg
        while self.step < cfg.max_steps:
            self.periodic(last=False)
            if self.compile and self.step == (self.resumed_at or 0):
                self.print(f"step {self.step:6d} | torch.compile: this first step compiles the model, and takes longer")
            try:
                record = self.train_step()
            except StopIteration:  # a one-pass stream (--delete_consumed_shards) has no more shards
                self.print(f"the training data ended at step {self.step}")
                break
            if self.step == 0 and self.device.type == "cuda":
                self.print(f"peak memory after the first step: {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB")
            self.step += 1
            mfu = f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
            self.print(f"step {record['step']:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                       f"norm {record['grad_norm']:.3f} | {record['dt_ms']:.0f} ms | "
                       f"{record['tokens_per_sec']:.0f} tok/s{mfu}")
            self.log(record)
            if self.diverged(record):
                self.plot()
                raise TrainError(self.divergence_message(record))
            if cfg.delete_consumed_shards:
                self._barrier()  # every rank has finished its reads of this step
                self.delete_consumed_shards()
            if self.stop_requested():
                # the plot before the checkpoint: the other ranks wait for rank 0 in save()'s collective
                # rather than exit, which would have torchrun stop rank 0 in the middle of its work
                self.plot()
                path = self.save(periodic_done=False)
                raise self.interrupted(f"interrupted at step {self.step}: saved {path}; resume with --resume")
        self.periodic(last=True)
        self.plot()  # also for a run without evaluations, which redraw it as they come


def train(cfg: TrainConfig, ddp: Distributed, device: torch.device) -> None:
    """Check everything that needs no model, then build the run and train. TrainError: bad input;
    Interrupted: stopped on a signal, with a checkpoint."""
    validate(cfg, ddp.world_size)
    check_seed(cfg)
    check_out_dir(cfg)
    check_tensorboard(cfg)
    try:
        Run(cfg, ddp, device).run()
    except torch.OutOfMemoryError:
        raise TrainError(f"out of memory with --batch_size {cfg.batch_size} (micro-batch per rank): lower "
                         f"--batch_size; gradient accumulation keeps --total_batch_size") from None
