"""gpt2/data.py ShardLoader: ranks split every step's tokens exactly, epochs cover each token once,
resume is exact, errors are clear, and the streaming mode (producer beside a deleting trainer)
stays within its disk budget and consumes every token once."""
import io
import json
import math
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tiktoken
import torch

from gpt2 import shards
from gpt2.data import ShardLoader

REPO = pathlib.Path(__file__).resolve().parents[1]

LENGTHS = [1000, 37, 523, 1200, 5]   # odd sizes, a step spans several shards


def make_folder(folder, lengths=LENGTHS, val_lengths=(300,), prepared=True, done=True, max_shards_on_disk=None):
    """Shards whose tokens are their positions in the split's stream, so a batch says where it read."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"val": [], "train": []}
    index = 0
    for split, sizes in (("val", val_lengths), ("train", lengths)):
        start = 0
        for n in sizes:
            names[split].append(shards.shard_name("syn", split, index))
            shards.save_shard(folder / names[split][-1], np.arange(start, start + n, dtype=np.uint16))
            start, index = start + n, index + 1
    if prepared:
        shards.write_json(folder / shards.META_FILE,
                          shards.make_meta("syn", None, len(val_lengths), "test", max_shards_on_disk))
    if prepared and done:
        shards.write_json(folder / shards.DONE_FILE, {"shards": names, "tokens": {}})
    return names


def steps(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "foreign"])
def test_two_ranks_cover_one_rank_tokens_once_per_epoch(tmp_path, prepared):
    make_folder(tmp_path, prepared=prepared)
    B, T = 3, 16
    ranks = [ShardLoader(tmp_path, "train", B, T, rank=r, world_size=2) for r in range(2)]
    single = ShardLoader(tmp_path, "train", 2 * B, T)
    per_epoch = (sum(LENGTHS) - 1) // (2 * B * T)
    for epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
            xs, ys = single.next_batch()
            for x, y in ((x0, y0), (x1, y1), (xs, ys)):
                assert x.shape == y.shape == (B if x is not xs else 2 * B, T) and x.dtype == y.dtype == torch.int64
                assert (y == x + 1).all()  # the tokens are positions, so the targets are the next position
            assert (torch_cat(x0, x1) == xs.flatten()).all()
            seen.append(xs.flatten())
        stream = torch_cat(*seen)
        assert (stream == torch.arange(per_epoch * 2 * B * T)).all(), f"epoch {epoch} missed or repeated tokens"
        assert ranks[0].epoch == epoch


def test_resume_gives_the_identical_next_batch(tmp_path):
    make_folder(tmp_path)
    for seed in (None, 7):
        loader = ShardLoader(tmp_path, "train", 2, 24, rank=1, world_size=3, shuffle_seed=seed)
        steps(loader, 13)
        state = json.loads(json.dumps(loader.state_dict()))  # it must survive a checkpoint's serialization
        expected = steps(loader, 25)                          # crosses the end of the epoch
        resumed = ShardLoader(tmp_path, "train", 2, 24, rank=1, world_size=3, shuffle_seed=seed)
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(expected, steps(resumed, 25)):
            assert (x == rx).all() and (y == ry).all()
    with pytest.raises(ValueError, match="shuffle_seed"):
        ShardLoader(tmp_path, "train", 2, 24).load_state_dict(state)


def test_shuffled_epochs_reorder_shards_and_cover_tokens_once(tmp_path):
    lengths = [400, 300, 500, 200, 350, 250]
    make_folder(tmp_path, lengths)
    B, T = 4, 8
    per_epoch = (sum(lengths) - 1) // (B * T)

    def epochs(seed, n):
        loader = ShardLoader(tmp_path, "train", B, T, shuffle_seed=seed)
        return [torch_cat(*[x.flatten() for x, _ in steps(loader, per_epoch)]) for _ in range(n)]

    first, again = epochs(3, 3), epochs(3, 3)
    assert all((a == b).all() for a, b in zip(first, again)), "the same seed must give the same order"
    assert not (first[0] == first[1]).all() or not (first[1] == first[2]).all()
    for stream in first:
        assert len(set(stream.tolist())) == len(stream) == per_epoch * B * T


def test_reset_restarts_validation(tmp_path):
    make_folder(tmp_path)
    val = ShardLoader(tmp_path, "val", 2, 8)
    first = steps(val, 3)
    val.reset()
    assert all((a[0] == b[0]).all() for a, b in zip(first, steps(val, 3)))
    assert (first[0][0].flatten() == torch.arange(16)).all()


def test_random_windows_are_seeded_resumable_and_rank_invariant(tmp_path):
    make_folder(tmp_path)   # tokens are their positions: a row says where it starts
    total = sum(LENGTHS)
    one = ShardLoader(tmp_path, "train", 4, 16, random_seed=7)
    rows = torch.cat([x for x, _ in steps(one, 6)])                      # (24, 16)
    starts = rows[:, 0]
    assert ((rows - starts[:, None]) == torch.arange(16)).all()          # windows of the stream
    assert starts.max() <= total - 17 and len(set(starts.tolist())) > 20  # anywhere, not in order
    x, y = ShardLoader(tmp_path, "train", 4, 16, random_seed=7).next_batch()
    assert (x == rows[:4]).all() and (y == x + 1).all()                  # the seed fixes the rows
    assert not (ShardLoader(tmp_path, "train", 4, 16, random_seed=8).next_batch()[0] == x).all()
    # two ranks of batch 2 read, step for step, the rows one rank of batch 4 reads
    ranks = [ShardLoader(tmp_path, "train", 2, 16, rank=r, world_size=2, random_seed=7) for r in (0, 1)]
    assert (torch.cat([r.next_batch()[0] for r in ranks]) == rows[:4]).all()
    # the state resumes the stream, also with another batch size
    resumed = ShardLoader(tmp_path, "train", 8, 16, random_seed=7)
    resumed.load_state_dict(ranks[0].state_dict())
    assert (resumed.next_batch()[0] == rows[4:12]).all()
    with pytest.raises(ValueError, match="random_seed=7.*--sampling"):
        ShardLoader(tmp_path, "train", 4, 16).load_state_dict(one.state_dict())


@pytest.mark.parametrize("world_size", [1, 3])
def test_whole_split_batches_hold_every_token_once(tmp_path, world_size):
    make_folder(tmp_path, val_lengths=(300, 51))   # 351 tokens: 350 targets, 22 windows of 16 (the last 14)
    targets = []
    for rank in range(world_size):
        loader = ShardLoader(tmp_path, "val", 4, 16, rank=rank, world_size=world_size)
        batches = list(loader.whole_split_batches())
        assert len(batches) == math.ceil(math.ceil(22 / world_size) / 4)   # the same on every rank
        assert loader.whole_split_batch_count() == len(batches)
        for x, y in batches:
            assert x.shape == y.shape == (4, 16)
            keep = y != -1
            assert (y[keep] == x[keep] + 1).all()
            targets += y[keep].tolist()
    assert sorted(targets) == list(range(1, 351))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare_data.py"):
        ShardLoader(tmp_path / "nope", "train", 2, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train shards.*prepare_data.py$"):
        ShardLoader(tmp_path / "empty", "train", 2, 8)
    with pytest.raises(FileNotFoundError, match="no val shards.*--eval_interval 0"):
        ShardLoader(tmp_path / "empty", "val", 2, 8)
    with pytest.raises(ValueError, match="split"):
        ShardLoader(tmp_path / "empty", "test", 2, 8)
    make_folder(tmp_path / "small", [40, 20])
    with pytest.raises(ValueError, match="has 60 tokens.*needs 65"):
        ShardLoader(tmp_path / "small", "train", 2, 8, rank=1, world_size=4)
    x, y = ShardLoader(tmp_path / "small", "train", 1, 59).next_batch()  # exactly one step fits
    assert (x.flatten() == torch.arange(59)).all() and y[0, -1] == 59
    bad_files = {
        "int32": lambda p: np.save(p, np.arange(10, dtype=np.int32)),
        "2d": lambda p: np.save(p, np.zeros((2, 5), dtype=np.uint16)),
        "truncated": lambda p: p.write_bytes(uint16_npy_bytes(11)[:-1]),
        "odd_tail": lambda p: p.write_bytes(uint16_npy_bytes(11) + b"\0"),
    }
    messages = {"int32": "int32 array.*1-D uint16", "2d": r"shape \(2, 5\)", "truncated": "not a complete .npy",
                "odd_tail": "not its header plus 11 uint16 tokens"}
    for kind, write in bad_files.items():
        folder = tmp_path / kind
        folder.mkdir()
        write(folder / "x_train_000000.npy")
        with pytest.raises(ValueError, match=messages[kind]):
            ShardLoader(folder, "train", 1, 2)


def test_delete_consumed_shards_in_process(tmp_path):
    names = make_folder(tmp_path)["train"]
    B, T = 2, 20
    ranks = [ShardLoader(tmp_path, "train", B, T, rank=r, world_size=2, delete_consumed=True) for r in range(2)]
    position = 0
    while True:
        try:
            batches = [loader.next_batch() for loader in ranks]
        except StopIteration:
            break
        position += 2 * B * T
        assert ranks[1].delete_finished_shards() == []
        ranks[0].delete_finished_shards()
        ends = np.cumsum(LENGTHS)
        expected_gone = {n for n, end in zip(names, ends) if end <= position}
        on_disk = {p.name for p in tmp_path.glob("syn_train_*.npy")}
        assert on_disk == set(names) - expected_gone, f"at token {position}"
        assert batches[1][0][0, 0].item() == position - B * T  # rank 1 reads the second half of the step
    assert position == (sum(LENGTHS) - 1) // (2 * B * T) * 2 * B * T
    assert shards.read_consumed(tmp_path) == expected_gone
    with pytest.raises(StopIteration):
        ranks[1].next_batch()
    fresh = ShardLoader(tmp_path, "train", B, T, delete_consumed=True)  # deleted shards do not break construction
    with pytest.raises(FileNotFoundError, match="deleted by a trainer with --delete_consumed_shards"):
        fresh.next_batch()
    with pytest.raises(ValueError, match="train split only"):
        ShardLoader(tmp_path, "val", B, T, delete_consumed=True)


def test_delete_keeps_the_shards_of_a_checkpoint(tmp_path):
    names = make_folder(tmp_path)["train"]
    loader = ShardLoader(tmp_path, "train", 1, 50, delete_consumed=True)
    steps(loader, 21)                  # at token 1050: shard 0 (1000 tokens) and shard 1 (37) are behind
    checkpoint = loader.state_dict()
    steps(loader, 20)                  # at token 2050: shard 2 (ends at 1560) is behind too
    assert loader.finished_shards() == names[:3]
    assert loader.delete_finished_shards(keep_from=checkpoint) == names[:2]
    resumed = ShardLoader(tmp_path, "train", 1, 50, delete_consumed=True)
    resumed.load_state_dict(checkpoint)
    assert (resumed.next_batch()[0].flatten() == torch.arange(1050, 1100)).all()
    assert loader.delete_finished_shards() == names[2:3]


@pytest.mark.parametrize("keep", ["none", "checkpoint"])
def test_a_step_that_ends_a_shard_deletes_it_and_needs_it_no_more(tmp_path, keep):
    """Steps of 64 tokens, shards of 128: every other step ends exactly at a shard's end. That shard is
    finished, is deleted, and neither the next step nor a resume from a checkpoint there opens it again
    (a position (k, end of k) read shard k for zero tokens, after its deletion)."""
    names = make_folder(tmp_path, [128] * 4)["train"]
    loader = ShardLoader(tmp_path, "train", 2, 32, delete_consumed=True)
    for position in range(64, 64 * 7 + 1, 64):
        checkpoint = loader.state_dict()
        x, _ = loader.next_batch()
        assert x[0, 0].item() == position - 64
        deleted = loader.delete_finished_shards(keep_from=checkpoint if keep == "checkpoint" else None)
        if keep == "checkpoint":  # the shard a checkpoint at its end points into goes with the next step
            assert deleted == ([names[position // 128 - 1]] if position % 128 == 64 and position > 64 else [])
            resumed = ShardLoader(tmp_path, "train", 2, 32, delete_consumed=True)
            resumed.load_state_dict(checkpoint)
            assert resumed.next_batch()[0][0, 0].item() == position - 64
        else:
            assert deleted == ([names[position // 128 - 1]] if position % 128 == 0 else [])
    with pytest.raises(StopIteration):  # a last step would need the token after the split's 512
        loader.next_batch()


def test_disk_budget_too_small_for_one_step_is_refused(tmp_path):
    make_folder(tmp_path, max_shards_on_disk=2)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "shard_size": 100}))
    with pytest.raises(ValueError, match="reads 121 tokens between deletions.*--max_shards_on_disk >= 3"):
        ShardLoader(tmp_path, "train", 2, 60, delete_consumed=True)  # 121 tokens span up to 3 shards of 100
    loader = ShardLoader(tmp_path, "train", 2, 50, delete_consumed=True)  # 101 tokens span at most 2
    with pytest.raises(ValueError, match="reads 401 tokens between deletions.*>= 5"):
        loader.check_disk_budget(4 * loader.tokens_per_step)  # gradient accumulation over 4 micro-steps


def test_waits_for_the_producer_then_cycles(tmp_path, capsys):
    names = make_folder(tmp_path, [50, 30], done=False)
    late = tmp_path / names["train"][1]
    tokens = np.load(late)
    late.unlink()

    def producer():
        time.sleep(0.3)
        shards.save_shard(late, tokens)
        time.sleep(0.2)
        shards.write_json(tmp_path / shards.DONE_FILE, {"shards": names, "tokens": {}})

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        loader = ShardLoader(tmp_path, "train", 1, 25, warn_after=0.05)
        stream = torch_cat(*[x.flatten() for x, _ in steps(loader, 3)])  # waits for shard 2, then for DONE
        x, _ = loader.next_batch()                                       # epoch 2 starts over
    finally:
        thread.join()
    assert (stream == torch.arange(75)).all() and (x.flatten() == torch.arange(25)).all()
    assert "no DONE marker yet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shuffling and random sampling need every shard"):
        (tmp_path / shards.DONE_FILE).unlink()
        ShardLoader(tmp_path, "train", 1, 25, shuffle_seed=0)


def test_streaming_producer_and_deleting_consumer(shared_data, tmp_path):
    """prepare_data.py --max_shards_on_disk 2 in its own process, two ranks consuming with deletion."""
    source = shared_data / "fineweb_sample" / "fineweb_edu_150.jsonl"
    out, S, K = tmp_path / "stream", 7000, 2
    producer = subprocess.Popen(
        [sys.executable, str(REPO / "prepare_data.py"), "fineweb", "--input", str(source), "--out", str(out),
         "--shard_size", str(S), "--max_shards_on_disk", str(K), "--workers", "1", "--no_progress"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "meta.json").exists():
            assert producer.poll() is None, producer.stderr.read()
            assert time.monotonic() < deadline, "the producer never started"
            time.sleep(0.02)
        B, T, W = 2, 64, 2
        ranks = [ShardLoader(out, "train", B, T, rank=r, world_size=W, delete_consumed=True) for r in range(W)]
        deadline = time.monotonic() + 300
        for loader in ranks:  # a producer that failed would leave the ranks waiting for its shards forever
            loader.stop_waiting = lambda: producer.poll() not in (None, 0) or time.monotonic() > deadline
        consumed, most_on_disk = [], 0
        while True:
            try:
                batches = [loader.next_batch() for loader in ranks]
            except StopIteration:
                break
            except shards.WaitStopped:
                raise AssertionError(f"waited for a shard: producer exit code {producer.poll()}") from None
            most_on_disk = max(most_on_disk, shards.count_shards(out, "train"))
            consumed += [x.flatten() for x, _ in batches]
            for loader in ranks:  # the trainer: barrier, then every rank calls it; only rank 0 deletes
                loader.delete_finished_shards()
        assert producer.wait(timeout=60) == 0, producer.stderr.read()
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
        producer.stderr.close()
    enc = tiktoken.get_encoding("gpt2")
    docs = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    train = np.concatenate([[enc.eot_token] + enc.encode_ordinary(d) for d in docs])[S:]  # shard 0 is val
    stream = torch_cat(*consumed).numpy()
    step = B * T * W
    assert len(stream) == (len(train) - 1) // step * step, "every full step of the stream, once"
    assert np.array_equal(stream, train[:len(stream)])
    n_train = -(-len(train) // S)
    assert n_train >= 11 and most_on_disk <= K
    assert len(shards.read_consumed(out)) >= n_train - 1  # all but the shard holding the dropped tail
    assert shards.count_shards(out, "val") == 1 and (out / "DONE").exists()


def torch_cat(*tensors):
    return torch.cat([t.flatten() for t in tensors])


def uint16_npy_bytes(n):
    buf = io.BytesIO()
    np.save(buf, np.arange(n, dtype=np.uint16))
    return buf.getvalue()


def test_a_shard_deleted_by_a_trainer_fails_at_once_instead_of_waiting(tmp_path, monkeypatch):
    """A folder still being produced (no DONE) whose shards a trainer deleted: a loader that needs one (a
    resume from an older checkpoint, a new run from the start) is told so, not left waiting for a shard
    that prepare_data.py never writes again."""
    import gpt2.data

    make_folder(tmp_path, done=False)
    loader = ShardLoader(tmp_path, "train", 1, 50, delete_consumed=True)
    start = loader.state_dict()
    steps(loader, 25)                                  # at token 1250: shards 0 and 1 are behind
    assert loader.delete_finished_shards() != []

    def waits(*args, **kwargs):
        raise AssertionError("the loader waits for a shard that a trainer deleted")

    monkeypatch.setattr(gpt2.data, "wait_until", waits)
    resumed = ShardLoader(tmp_path, "train", 1, 50, delete_consumed=True)
    with pytest.raises(FileNotFoundError, match="syn_train_000001.npy was deleted by a trainer"):
        resumed.load_state_dict(start)                # resume fails when it loads the position
    with pytest.raises(FileNotFoundError, match="syn_train_000001.npy was deleted by a trainer"):
        ShardLoader(tmp_path, "train", 1, 50, delete_consumed=True).next_batch()


def test_a_wait_for_the_producer_ends_when_the_loader_is_told_to_stop(tmp_path):
    """stop_waiting (train.py: a Ctrl-C or SIGTERM) ends a wait for a shard that has not come."""
    from gpt2.shards import WaitStopped

    make_folder(tmp_path, [50, 30], done=False)
    (tmp_path / shards.shard_name("syn", "train", 2)).unlink()
    loader = ShardLoader(tmp_path, "train", 1, 25)
    polls = []
    loader.stop_waiting = lambda: polls.append(1) or len(polls) > 3
    start = time.monotonic()
    with pytest.raises(WaitStopped):
        steps(loader, 3)                                # the third step needs the missing shard
    assert time.monotonic() - start < 5


def test_a_file_for_the_data_folder_is_named_as_such(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'meta.json'} is a file, not a folder.*{tmp_path}"):
        ShardLoader(tmp_path / "meta.json", "train", 1, 8)


def test_a_val_split_without_a_target_is_refused(tmp_path):
    make_folder(tmp_path, val_lengths=(1,))
    with pytest.raises(ValueError, match="val split in .* has 1 token: a validation loss needs at least 2"):
        ShardLoader(tmp_path, "val", 1, 8)
