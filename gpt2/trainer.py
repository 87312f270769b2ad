"""The training run behind train.py: presets, the lr schedule, and the loop.

The loop is build-nanogpt's recipe: gradient accumulation to a fixed number of tokens per step, bf16
autocast, TF32 matmuls, global grad-norm clipping, AdamW with decay on 2-D weights, linear warmup then
cosine decay to min_lr_ratio * lr. Under torchrun the model is wrapped in DDP and gradients are synced
only on the last micro-step. Rank 0 alone prints, logs and checkpoints; every rank joins every
collective (validation loss, HellaSwag counts, loader positions for the checkpoint).
"""
import contextlib
import dataclasses
import json
import math
import pathlib
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import ops as ops_module
from gpt2.checkpoint import (check_same_shape, checkpoint_path, latest_checkpoint, load_checkpoint,
                             restore_rng, save_checkpoint)
from gpt2.data import ShardLoader, ensure_shakespeare
from gpt2.model import GPT, GPTConfig
from gpt2.plot import read_log
from gpt2.runtime import DTYPES, Distributed, all_reduce_sum, autocast, peak_bf16_flops


class TrainError(Exception):
    """A problem with the run's inputs; the message says what to change. Printed without a traceback."""


@dataclass
class TrainConfig:
    data: str | None = None
    out_dir: str = "out"
    preset: str = "shakespeare"
    kernels: str = "auto"
    device: str = "auto"
    dtype: str | None = None               # None: bfloat16 on CUDA, float32 elsewhere
    compile: bool | None = None            # None: on for CUDA
    init_from: str | None = None           # a HF name or directory to fine-tune from
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    batch_size: int = 64                   # micro-batch per rank
    total_batch_size: int = 524288         # tokens per optimizer step, all ranks
    max_steps: int = 19073
    warmup_steps: int = 715
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_interval: int = 250
    eval_steps: int = 20
    hellaswag_interval: int = 250
    hellaswag_limit: int | None = None     # examples per evaluation (None: all 10,042)
    hellaswag_data: str | None = None
    sample_interval: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    checkpoint_interval: int = 5000
    resume: bool = False
    delete_consumed_shards: bool = False


PRESETS = {
    # a small GPT that learns tinyshakespeare's shape in a few minutes on a laptop CPU
    "shakespeare": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, total_batch_size=512,
                        max_steps=200, warmup_steps=20, learning_rate=2e-3, eval_interval=50, eval_steps=4,
                        hellaswag_interval=0, sample_interval=200, sample_prompt="ROMEO:",
                        checkpoint_interval=200),
    # build-nanogpt: GPT-2 124M on 10B tokens of FineWeb-Edu
    "gpt2-124m": dict(),
    # GPT-3 paper learning rates for the larger sizes; micro-batches that fit an 80 GB GPU in bf16
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=32, learning_rate=3e-4),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=16, learning_rate=2.5e-4),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=8, learning_rate=2e-4),
}


def make_config(preset: str, **overrides) -> TrainConfig:
    """The preset's config with every override that is not None applied."""
    if preset not in PRESETS:
        raise TrainError(f"unknown --preset {preset!r}: choose from {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(preset=preset, **fields)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr_ratio * learning_rate at max_steps."""
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_micro_step:
        raise TrainError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of --batch_size x --block_size x ranks "
            f"= {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_micro_step}; change one of them")
    return cfg.total_batch_size // per_micro_step


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
    """Clip the global grad norm to grad_clip (inside FusedAdamW's update when it offers that), step,
    and clear the gradients. Returns the norm before clipping (zero when clipping is off)."""
    norm = torch.zeros((), device=next(model.parameters()).device)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        if hasattr(optimizer, "clip_grad_norm_"):
            norm = optimizer.clip_grad_norm_(grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


class Run:
    """One training run: the model, optimizer, loaders and logs, and the step loop over them."""

    def __init__(self, cfg: TrainConfig, ddp: Distributed, device: torch.device):
        self.cfg, self.ddp, self.device = cfg, ddp, device
        self.dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if self.dtype not in DTYPES:
            raise TrainError(f"unknown --dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        self.compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.ops = ops_module.resolve(cfg.kernels, device)
        self.grad_accum = grad_accum_steps(cfg, ddp.world_size)
        self.out_dir = pathlib.Path(cfg.out_dir)
        self.log_path = self.out_dir / "log.jsonl"
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32

        self.raw_model = self._build_model().to(device)
        self.optimizer = self.raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95),
                                                             device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == "float16")
        self.model = torch.compile(self.raw_model) if self.compile else self.raw_model
        if ddp.enabled:
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)

        data_dir = self._data_dir()
        self.train_loader = ShardLoader(data_dir, "train", cfg.batch_size, cfg.block_size, ddp.rank,
                                        ddp.world_size, delete_consumed=cfg.delete_consumed_shards)
        if cfg.delete_consumed_shards:  # a disk budget below one step's shards would deadlock with the producer
            self.train_loader.check_disk_budget(cfg.total_batch_size)
        self.val_loader = ShardLoader(data_dir, "val", cfg.batch_size, cfg.block_size, ddp.rank,
                                      ddp.world_size) if cfg.eval_interval else None
        self.hellaswag = self._hellaswag_examples() if cfg.hellaswag_interval else None
        self.step = 0
        if cfg.resume:
            self._resume()
        self.flops_per_token = self.raw_model.flops_per_token(cfg.block_size)
        self.peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def _build_model(self) -> GPT:
        cfg = self.cfg
        if cfg.init_from:
            return GPT.from_pretrained(cfg.init_from, kernels=self.ops)
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
                ensure_shakespeare(folder)
            except RuntimeError as err:  # offline: the message names prepare_data.py --input
                raise TrainError(str(err)) from None
        self._barrier()
        return str(folder)

    def _hellaswag_examples(self):
        from gpt2.hellaswag import load_examples

        return load_examples(self.cfg.hellaswag_data, limit=self.cfg.hellaswag_limit)

    def _barrier(self):
        if self.ddp.enabled:
            torch.distributed.barrier()

    # -- resume and checkpoints ------------------------------------------------------------------

    def _resume(self):
        path = latest_checkpoint(self.out_dir)
        if path is None:
            self.print(f"--resume: no checkpoint in {self.out_dir}, starting from step 0")
            return
        checkpoint = load_checkpoint(path)
        check_same_shape(checkpoint, self.raw_model.config, path)
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["loader_states"]
        if len(states) != self.ddp.world_size:
            raise TrainError(f"{path} was written by {len(states)} ranks, this run has {self.ddp.world_size}: "
                             f"resume with the same number of processes")
        self.train_loader.load_state_dict(states[self.ddp.rank])
        restore_rng(checkpoint)
        self.step = checkpoint["step"]
        if self.ddp.is_main:
            self._truncate_log(self.step)
        self.print(f"resumed from {path} at step {self.step}")

    def _truncate_log(self, step: int):
        """Drop log lines of steps the resumed run will do again, so the log reads as one run."""
        if self.log_path.exists():
            kept = [record for record in read_log(self.out_dir) if record["step"] < step]
            self.log_path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def save(self):
        states = [None] * self.ddp.world_size
        if self.ddp.enabled:
            torch.distributed.all_gather_object(states, self.train_loader.state_dict())
        else:
            states = [self.train_loader.state_dict()]
        if self.ddp.is_main:
            path = checkpoint_path(self.out_dir, self.step)
            save_checkpoint(path, model=self.raw_model, optimizer=self.optimizer, step=self.step,
                            loader_states=states, train_config=dataclasses.asdict(self.cfg), scaler=self.scaler)
            self.print(f"saved {path}")

    # -- logging ----------------------------------------------------------------------------------

    def print(self, *args):
        if self.ddp.is_main:
            print(*args, flush=True)

    def log(self, record: dict):
        if self.ddp.is_main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    # -- periodic work ------------------------------------------------------------------------------

    def due(self, interval: int, last: bool) -> bool:
        return interval > 0 and (self.step % interval == 0 or last)

    @torch.no_grad()
    def evaluate_val_loss(self) -> float:
        # GPT has no dropout, so train/eval mode does not matter; switching it would make
        # torch.compile recompile the training graph
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.eval_steps):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.dtype):
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.detach()
        all_reduce_sum(total)
        return total.item() / (self.cfg.eval_steps * self.ddp.world_size)

    def evaluate_hellaswag(self) -> float:
        from gpt2.hellaswag import evaluate

        result = evaluate(getattr(self.model, "module", self.model), self.hellaswag, self.device, rank=self.ddp.rank,
                          world_size=self.ddp.world_size, autocast_dtype=self.dtype)
        return result["acc_norm"]

    def periodic(self, last: bool):
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
        if self.ddp.is_main and self.due(cfg.sample_interval, last) and self.step > 0:
            from gpt2.sampling import sample_text

            for text in sample_text(self.raw_model, cfg.sample_prompt, num_samples=2, max_new_tokens=48,
                                    seed=cfg.seed, dtype=self.dtype):
                self.print(f"sample: {text!r}")
        if self.due(cfg.checkpoint_interval, last) and self.step > 0:
            self.save()

    def plot(self):
        if self.ddp.is_main:
            from gpt2.plot import plot_log

            plot_log(self.out_dir)

    # -- the step ------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        batches = [self.train_loader.next_batch() for _ in range(self.grad_accum)]
        loss = accumulate_gradients(self.model, batches, self.device, self.dtype, self.scaler)
        all_reduce_sum(loss)
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = clip_and_step(self.optimizer, self.raw_model, self.cfg.grad_clip, self.scaler)
        loss_value, norm_value = torch.stack([loss / self.ddp.world_size, grad_norm.float()]).tolist()
        dt = time.perf_counter() - t0  # .tolist() waited for the GPU: the step is done
        tokens_per_sec = self.cfg.total_batch_size / dt
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                  "dt_ms": 1000 * dt, "tokens_per_sec": tokens_per_sec}
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens_per_sec / self.peak
        return record

    def run(self):
        cfg = self.cfg
        interpreted = " (in the Triton interpreter: slow, for checking)" if self.ops.interpreted else ""
        self.print(f"kernels={self.ops.spec}{interpreted} device={self.device} dtype={self.dtype} compile={self.compile} "
                   f"ranks={self.ddp.world_size} params={self.raw_model.num_params() / 1e6:.2f}M "
                   f"grad_accum={self.grad_accum} tokens/step={cfg.total_batch_size}")
        while self.step < cfg.max_steps:
            self.periodic(last=False)
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
            if cfg.delete_consumed_shards:
                self._barrier()  # every rank has finished its reads of this step
                self.train_loader.delete_finished_shards()  # rank 0 deletes; the others do nothing
        self.periodic(last=True)


def train(cfg: TrainConfig, ddp: Distributed, device: torch.device) -> None:
    out_dir = pathlib.Path(cfg.out_dir)
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = Run(cfg, ddp, device)
        run.run()
    except torch.OutOfMemoryError:
        raise TrainError(f"out of memory with --batch_size {cfg.batch_size} (micro-batch per rank): lower "
                         f"--batch_size; gradient accumulation keeps --total_batch_size") from None
