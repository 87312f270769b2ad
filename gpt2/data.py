"""The distributed loader over token shards (written by prepare_data.py, see gpt2/shards.py).

    loader = ShardLoader("data/edu_fineweb10B", "train", batch_size=16, block_size=1024,
                         rank=ddp.rank, world_size=ddp.world_size)
    x, y = loader.next_batch()          # (B, T) int64 CPU tensors; y is x shifted by one token

The shards of a split, in order, form one token stream. Each step takes the next B*T*world_size
tokens of it (plus one, for the last target): rank r gets the r-th slice of B*T (+1) tokens, so the
ranks read disjoint tokens and together cover every token of an epoch once (the last, partial step
of an epoch is dropped). A step may span shards. Shards are read through np.load(mmap_mode="r"), so
memory stays flat whatever their size.

Random windows (random_seed=S, train.py --sampling random, for small data): each row of a batch is
the T + 1 tokens at a random position of the split, drawn from a stream of positions seeded by S; the
rows of a step are the same for any number of ranks, and the state (the rows drawn so far) resumes the
stream exactly. Without it a small dataset's first epoch sees its text in order, one part per stretch.

Validation over the whole split: whole_split_batches() yields every token once (the last window
short, missing targets -1), so a validation loss over it is a deterministic, token-weighted mean.

Epochs: over a complete folder (the producer's DONE marker is there, or the folder holds shards made
elsewhere without meta.json) the loader cycles, optionally shuffling the shard order of each epoch
with `shuffle_seed`. While prepare_data.py is still writing (meta.json but no DONE), the loader waits
for the next train shard instead of ending the epoch, with a message after `warn_after` seconds.

Deleting consumed shards (train.py --delete_consumed_shards, with prepare_data.py
--max_shards_on_disk K running beside it): build the train loader with delete_consumed=True; it then
makes one pass and raises StopIteration at the end of the stream. After each optimizer step, on
EVERY rank:

    if loader.delete_consumed:
        if ddp.enabled:
            torch.distributed.barrier()      # every rank has finished its reads of this step
        loader.delete_finished_shards()      # rank 0 deletes the shards all ranks are past; others no-op

All ranks stand at the same position, and a step never reads behind it, so no rank ever opens a
deleted shard. state_dict()/load_state_dict() resume at the exact token (the state is the same on every
rank, and batch size and world size may change on resume). A resumed loader never looks behind its
position, but it needs the shards from the checkpoint's position on: the trainer passes the newest
checkpoint's state as delete_finished_shards(keep_from=state), and checks that --max_shards_on_disk
holds a checkpoint interval. A loader whose position lies in a deleted shard (consumed.txt lists it)
fails at once, saying so, rather than waiting for a shard the producer never writes again.

A wait for the producer ends with shards.WaitStopped as soon as `loader.stop_waiting()` is true (the
trainer sets it to "a signal came").

A trainer started beside prepare_data.py must start after the producer has written meta.json (the
producer writes it first thing); a folder without shards and without meta.json is an error.
"""
import os
import pathlib

import numpy as np
import torch

from gpt2.shards import (
    CONSUMED_FILE, DONE_FILE, SPLITS, count_shards, delete_consumed_shards, ensure_shakespeare,
    prepare_shakespeare, read_consumed, read_done, read_meta, shard_name, wait_until,
)

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file
RANDOM_BLOCK = 4096        # random window starts drawn per generator

__all__ = ["ShardLoader", "ensure_shakespeare", "prepare_shakespeare"]  # the last two for train.py


class ShardLoader:
    """Batches (x, y) of one split for one rank; see the module docstring.

    data_dir: a folder written by prepare_data.py (or any folder of *_{split}_*.npy uint16 shards).
    shuffle_seed: None keeps the shard order; an int shuffles it per epoch (needs a finished folder).
    random_seed: None reads the stream in order; an int samples windows at random positions instead
        (see the module docstring; needs a finished folder).
    delete_consumed: one pass over a train split whose finished shards rank 0 deletes on request.
    warn_after: seconds of waiting for prepare_data.py before a message says so.
    stop_waiting: None, or a function that ends such a wait (shards.WaitStopped) when it returns True.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, *,
                 shuffle_seed=None, random_seed=None, delete_consumed=False, warn_after=60.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dir = pathlib.Path(data_dir)
        self.split, self.B, self.T = split, batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed, self.delete_consumed, self.warn_after = shuffle_seed, delete_consumed, warn_after
        self.random_seed = random_seed
        self._total = None      # tokens in the split, once known
        self._starts_block, self._starts = None, None  # the random window starts drawn last
        self.stop_waiting = None
        if self.dir.is_file():
            raise FileNotFoundError(f"data folder {self.dir} is a file, not a folder: pass the folder of token "
                                    f"shards that holds it, {self.dir.parent}")
        if not self.dir.is_dir():
            raise FileNotFoundError(
                f"data folder {self.dir} does not exist: make it with prepare_data.py "
                "(python prepare_data.py shakespeare --out DIR, or python prepare_data.py fineweb --out DIR)"
            )
        self.meta = read_meta(self.dir)
        self._lengths = {}      # shard name -> tokens
        self._mmaps = {}        # shard name -> open memmap, only the few around the position
        self._refresh()
        self._check_options()
        if self._complete:
            self._check_complete_split()
        self.reset()

    @property
    def tokens_per_step(self) -> int:
        return self.B * self.T * self.world_size

    # ------------------------------------------------------------------ public API

    def reset(self) -> None:
        """Back to the first token of epoch 0 (for validation: the same batches at every eval)."""
        self._set_position(epoch=0, k=0, offset=0)
        self.rows = 0  # random windows drawn so far, all ranks together

    def next_batch(self):
        """(x, y) int64 (B, T) tensors. StopIteration only at the end of a delete_consumed pass."""
        if self.random_seed is not None:
            return self._random_batch()
        step = self.tokens_per_step
        if self._locate(self.k, self.offset, step + 1) is None:
            at_start = self.k == 0 and self.offset == 0
            if at_start:
                raise ValueError(self._too_small_message())
            if self.delete_consumed:
                raise StopIteration
            self._set_position(self.epoch + 1, 0, 0)
            if self._locate(0, 0, step + 1) is None:
                raise ValueError(self._too_small_message())
        k, offset = self._locate(self.k, self.offset, self.rank * self.B * self.T)
        buf = self._read(k, offset, self.B * self.T + 1)
        k, offset = self._locate(self.k, self.offset, step)
        if offset == self._length(k):  # the end of a shard is the start of the next: no later read, resume
            k, offset = k + 1, 0       # or deletion then counts on the finished shard, which may be deleted
        self.k, self.offset = k, offset
        self._evict_before(self.k)
        buf = torch.from_numpy(buf)
        x = buf[:-1].view(self.B, self.T)  # (B, T)
        y = buf[1:].view(self.B, self.T)   # (B, T)
        return x, y

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def num_tokens(self) -> int:
        """Tokens in the split (waiting, in a folder still being written, for its shards to come)."""
        if self._total is None:
            total, k = 0, 0
            while (length := self._length(k)) is not None:
                total, k = total + length, k + 1
            self._total = total
        return self._total

    def _windows_per_rank(self) -> int:
        windows = -(-(self.num_tokens() - 1) // self.T)
        return -(-windows // self.world_size)

    def whole_split_batch_count(self) -> int:
        """How many batches whole_split_batches yields."""
        return -(-self._windows_per_rank() // self.B)

    def whole_split_batches(self):
        """Every token of the split once, for a validation loss that is the same at every evaluation.

        The split is cut into windows of T inputs (the last one shorter), rank r taking windows r,
        r + world_size, ...; each yielded (x, y) is (B, T) with the targets of missing tokens set to -1,
        which the loss ignores. Every rank yields the same number of batches.
        """
        n = self.num_tokens()
        per_rank = self._windows_per_rank()
        for first in range(0, per_rank, self.B):
            x = torch.zeros((self.B, self.T), dtype=torch.long)   # (B, T)
            y = torch.full((self.B, self.T), -1, dtype=torch.long)  # (B, T)
            for row, j in enumerate(range(first, min(first + self.B, per_rank))):
                start = (j * self.world_size + self.rank) * self.T
                if start >= n - 1:
                    break
                tokens = torch.from_numpy(self._read_at(start, min(self.T + 1, n - start)))
                x[row, :len(tokens) - 1], y[row, :len(tokens) - 1] = tokens[:-1], tokens[1:]
            yield x, y

    def state_dict(self) -> dict:
        if self.random_seed is not None:
            return {"split": self.split, "random_seed": self.random_seed, "rows": self.rows}
        return {
            "split": self.split, "epoch": self.epoch, "shard": self.k, "offset": self.offset,
            "shard_name": self._name_at(self.k), "shuffle_seed": self.shuffle_seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the exact token. Batch size and world size may differ from the saved run's."""
        for key in ("split", "shuffle_seed", "random_seed"):  # older states have no random_seed: None
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{getattr(self, key)!r} (train.py: resume with that run's --sampling and --seed)")
        if self.random_seed is not None:
            self.rows = state["rows"]
            return
        self._set_position(state["epoch"], state["shard"], state["offset"])
        name = self._name_at(self.k)
        if state["shard_name"] is not None and name is not None and name != state["shard_name"]:
            raise ValueError(
                f"loader state points at shard {state['shard_name']}, but shard {self.k} of epoch "
                f"{self.epoch} in {self.dir} is {name}: the folder holds other shards than the saved run's"
            )
        if name is not None:
            self._check_not_deleted(name)

    def finished_shards(self, keep_from=None) -> list:
        """Names of the shards of this epoch that every rank is past (no later step reads them).

        keep_from: a state_dict() (say, the newest checkpoint's); shards at or after its position count
        as unfinished, so that a run resumed from that checkpoint still finds them.
        """
        k = self.k  # next_batch moves a position at the end of shard k to (k + 1, 0)
        if keep_from is not None:
            k = min(k, keep_from["shard"])  # a checkpoint's shard stays, even at its end
        return [self._name_at(j) for j in range(k)]

    def delete_finished_shards(self, keep_from=None) -> list:
        """With delete_consumed: rank 0 deletes the finished shards (after the trainer's barrier, see the
        module docstring) and returns their names; other ranks return [].

        keep_from: see finished_shards. Keeping a checkpoint's shards needs --max_shards_on_disk large
        enough to hold a checkpoint interval of tokens, or the producer and the trainer wait on each other.
        """
        if not self.delete_consumed or self.rank != 0:
            return []
        finished = self.finished_shards(keep_from)[self._deleted_upto:]
        names = [n for n in finished if (self.dir / n).exists()]
        for n in finished:
            self._mmaps.pop(n, None)
        delete_consumed_shards(self.dir, names)
        self._deleted_upto += len(finished)
        return names

    # ------------------------------------------------------------------ shard list

    def _refresh(self) -> None:
        """Read the shard list: complete (DONE, or no meta.json) or still being produced."""
        done = read_done(self.dir)
        if done is not None:
            self._names, self._complete = list(done["shards"].get(self.split, [])), True
        elif self.meta is None:
            self._names = sorted(p.name for p in self.dir.glob(f"*_{self.split}_*.npy"))
            self._complete = True
        else:
            self._names, self._complete = [], False
        if self._complete and not self._names:
            without = " (train.py: or train without validation, --eval_interval 0)" if self.split == "val" else ""
            raise FileNotFoundError(
                f"no {self.split} shards in {self.dir} (files named *_{self.split}_*.npy): "
                f"prepare the data with prepare_data.py{without}"
            )

    def _check_options(self) -> None:
        if (self.shuffle_seed is not None or self.random_seed is not None) and not self._complete:
            raise ValueError(
                f"shuffling and random sampling need every shard, but prepare_data.py has not finished {self.dir} "
                "(no DONE marker): wait for it, or train with sequential sampling"
            )
        if self.random_seed is not None and (self.delete_consumed or self.shuffle_seed is not None):
            raise ValueError("random sampling (train.py --sampling random) reads the whole split: it shuffles no "
                             "shards and deletes none (--delete_consumed_shards needs --sampling sequential)")
        if not self.delete_consumed:
            return
        if self.split != "train":
            raise ValueError("delete_consumed is for the train split only (validation rereads its shards)")
        if self.meta is None:
            raise ValueError(f"delete_consumed needs a folder written by prepare_data.py ({self.dir} has no meta.json)")
        self.check_disk_budget(self.tokens_per_step)

    def check_disk_budget(self, tokens_between_deletes: int) -> None:
        """Refuse a --max_shards_on_disk too small for what the trainer reads between two calls of
        delete_finished_shards (with gradient accumulation: every micro-step of an optimizer step)."""
        K = self.meta.get("max_shards_on_disk")
        needed = self.shards_spanned(tokens_between_deletes)
        if not (K and needed):
            return
        # all of those shards must be on disk at once, or the producer (waiting for room) and the trainer
        # (waiting for a shard) deadlock
        if K < needed:
            raise ValueError(
                f"the trainer reads {tokens_between_deletes + 1} tokens between deletions, which may span "
                f"{needed} shards of {self.meta['shard_size']} tokens, but prepare_data.py keeps at most {K} on disk "
                f"(--max_shards_on_disk): use --max_shards_on_disk >= {needed}, larger shards, or smaller batches"
            )

    def shards_spanned(self, tokens: int):
        """How many of the producer's shards `tokens` + 1 tokens (the last target) touch at most, from
        wherever they start; None when meta.json gives no shard size."""
        S = (self.meta or {}).get("shard_size")
        return (S + tokens - 1) // S + 1 if S else None

    def _check_complete_split(self) -> None:
        """Open every shard still on disk (a bad file fails now, not hours in) and check the size."""
        consumed = read_consumed(self.dir)
        total, all_there = 0, True
        for name in self._names:
            if name in consumed and not (self.dir / name).exists():
                all_there = False
                continue
            total += len(self._open(name))
        self._mmaps.clear()
        if all_there:
            self._total = total
        # a val split smaller than one batch is still evaluated whole (whole_split_batches)
        if all_there and self.split == "train" and total < self.tokens_per_step + 1:
            raise ValueError(self._too_small_message(total))
        if all_there and self.split == "val" and total < 2:
            raise ValueError(f"the val split in {self.dir} has {total} token{'s' * (total != 1)}: a validation "
                             "loss needs at least 2, an input and its target; prepare more data, or train "
                             "without validation (train.py --eval_interval 0)")
        if self.random_seed is not None and not all_there:
            raise ValueError(f"random sampling needs every shard of {self.dir}, but a trainer deleted some "
                             "(--delete_consumed_shards): prepare the data again")

    def _too_small_message(self, total=None) -> str:
        have = f"{total} tokens" if total is not None else "too few tokens"
        return (
            f"the {self.split} split in {self.dir} has {have}: one step of batch_size={self.B} x "
            f"block_size={self.T} x world_size={self.world_size} needs {self.tokens_per_step + 1}"
        )

    def _set_position(self, epoch, k, offset) -> None:
        self.epoch, self.k, self.offset = epoch, k, offset
        self._perm = None
        if self.shuffle_seed is not None:
            self._perm = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self._names))
        self._mmaps.clear()
        self._deleted_upto = 0

    def _name_at(self, k):
        """Name of the k-th shard of this epoch, or None past the split's end (so far as known)."""
        if self._complete:
            if k >= len(self._names):
                return None
            return self._names[self._perm[k] if self._perm is not None else k]
        # the producer writes shards in index order: val 0 .. val_shards-1, then train
        val_shards = self.meta["val_shards"]
        if self.split == "val":
            return shard_name(self.meta["name"], "val", k) if k < val_shards else None
        return shard_name(self.meta["name"], "train", val_shards + k)

    def _length(self, k):
        """Tokens in the k-th shard; waits for a shard still to come; None past the split's end."""
        name = self._name_at(k)
        if name is None:
            return None
        if name not in self._lengths:
            if not self._complete and not (self.dir / name).exists():
                self._check_not_deleted(name)  # else the wait would never end
                self._wait_for(name)
                name = self._name_at(k)
                if name is None:
                    return None
            self._lengths[name] = len(self._open(name))
        return self._lengths[name]

    def _wait_for(self, name) -> None:
        """Until the shard exists or the producer has finished (DONE); then reread the shard list."""
        path = self.dir / name
        wait_until(lambda: path.exists() or (self.dir / DONE_FILE).exists(),
                   lambda: self._waiting_message(path), self.warn_after, stop=self.stop_waiting)
        if not path.exists():
            self._refresh()

    def _waiting_message(self, path) -> str:
        message = (f"waiting for {path}: {self.dir} has no DONE marker yet, so prepare_data.py should still "
                   "be writing shards (if it stopped, run it again to finish the folder).")
        K = self.meta.get("max_shards_on_disk")
        if K and not self.delete_consumed:
            message += (f" It keeps at most {K} train shards on disk (--max_shards_on_disk) and writes more only "
                        "when a trainer with --delete_consumed_shards deletes consumed ones.")
        elif K and count_shards(self.dir, "train") >= K:
            message += (f" It is itself waiting for room: {K} train shards are on disk (--max_shards_on_disk), "
                        "and this trainer deletes shards only between optimizer steps, keeping those from its "
                        "newest checkpoint on. If they are more than the shards on disk hold, the two wait for "
                        "each other: rerun prepare_data.py with a larger --max_shards_on_disk.")
        return message

    # ------------------------------------------------------------------ reading

    def _open(self, name) -> np.ndarray:
        if name in self._mmaps:
            return self._mmaps[name]
        path = self.dir / name
        if not path.exists():
            self._check_not_deleted(name)
            raise FileNotFoundError(f"shard {path} is missing")
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:  # else numpy takes it for a pickle and advises loading it "unsafely"
            raise ValueError(f"{path} is not a token shard written by prepare_data.py (it has no .npy header): "
                             f"move it out of {self.dir}, or prepare the data again")
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path} is not a complete .npy token shard ({err})") from None
        if tokens.ndim != 1 or tokens.dtype != np.uint16:
            raise ValueError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}; "
                             "token shards are 1-D uint16")
        size = os.path.getsize(path)
        if tokens.offset + tokens.nbytes != size:
            raise ValueError(f"{path} is {size} bytes, not its header plus {len(tokens)} uint16 tokens")
        self._mmaps[name] = tokens
        return tokens

    def _check_not_deleted(self, name) -> None:
        path = self.dir / name
        if not path.exists() and name in read_consumed(self.dir):
            raise FileNotFoundError(
                f"{path} was deleted by a trainer with --delete_consumed_shards ({CONSUMED_FILE} lists it), but "
                "this run needs it: resume from a checkpoint past it, or prepare the data again"
            )

    def _evict_before(self, k) -> None:
        keep = {self._name_at(j) for j in range(k, k + 2)}
        for name in [n for n in self._mmaps if n not in keep]:
            del self._mmaps[name]

    def _locate(self, k, offset, n):
        """The position n tokens after (k, offset), or None if this epoch ends before it."""
        while True:
            length = self._length(k)
            if length is None:
                return None
            if offset + n <= length:
                return k, offset + n
            n -= length - offset
            k, offset = k + 1, 0

    def _read_at(self, start, n) -> np.ndarray:
        """n tokens from position start of the split's stream (a complete split)."""
        k, offset = self._locate(0, 0, start)
        return self._read(k, offset, n)

    def _random_batch(self):
        """B windows of T + 1 tokens at random starts. The starts are one seeded stream over the rows of
        all ranks (rank r takes rows r*B .. r*B + B-1 of each draw), so the rows that make up an optimizer
        step are the same for any number of ranks, and `rows` alone resumes the stream."""
        first = self.rows + self.rank * self.B
        rows = [self._read_at(self._random_start(g), self.T + 1) for g in range(first, first + self.B)]
        self.rows += self.B * self.world_size
        buf = torch.from_numpy(np.stack(rows))      # (B, T + 1)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def _random_start(self, row: int) -> int:
        # starts are drawn RANDOM_BLOCK at a time, from a generator seeded by (seed, block): any row's
        # start is known without replaying the ones before it
        block, i = divmod(row, RANDOM_BLOCK)
        if self._starts_block != block:
            rng = np.random.default_rng([self.random_seed, block])
            self._starts = rng.integers(0, self.num_tokens() - self.T, size=RANDOM_BLOCK)
            self._starts_block = block
        return int(self._starts[i])

    def _read(self, k, offset, n) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            tokens = self._open(self._name_at(k))
            take = min(n - filled, len(tokens) - offset)
            out[filled:filled + take] = tokens[offset:offset + take]
            filled += take
            k, offset = k + 1, 0
        return out
