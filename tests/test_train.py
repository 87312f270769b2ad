"""The trainer on the CPU: learning, kernels agreeing, exact resume, DDP equal to one process, errors."""
import contextlib
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import train
from gpt2 import trainer
from gpt2.checkpoint import checkpoints
from gpt2.data import prepare_shakespeare
from gpt2.sampling import SEPARATOR
from gpt2.trainer import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "4",
        "--total_batch_size", "128", "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_interval", "0",
        "--sample_interval", "0", "--checkpoint_interval", "0", "--hellaswag_interval", "0", "--device", "cpu"]
UNSHAPED = TINY[6:]  # for --init_from, whose weights give the model's shape


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("shakespeare")
    prepare_shakespeare(folder, input_file=shared_data / "tinyshakespeare.txt")
    return folder


def losses(out_dir) -> list[float]:
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def val_losses(out_dir) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "val_loss" in r]


def run_train(*args) -> int:
    return train.main([*TINY, *[str(a) for a in args]])


@contextlib.contextmanager
def stopped_at_step(step: int, error=KeyboardInterrupt):
    """Inside the block, a run's train_step raises `error` at `step`: a Ctrl-C (or a kill) in the middle of
    the run, between checkpoints."""
    original = Run.train_step

    def stopping(self):
        if self.step == step:
            raise error
        return original(self)

    Run.train_step = stopping
    try:
        yield
    finally:
        Run.train_step = original


def test_loss_falls_on_shakespeare(shakespeare, tmp_path):
    assert run_train("--data", shakespeare, "--out_dir", tmp_path, "--max_steps", 30, "--learning_rate", "3e-3") == 0
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < curve[0] - 2.0, f"loss went {curve[0]:.2f} -> {curve[-5:]}"
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec"} <= set(record)


def test_triton_and_torch_kernels_give_the_same_losses(shakespeare, tmp_path):
    args = ("--data", shakespeare, "--max_steps", 3, "--n_layer", 1)
    assert run_train(*args, "--out_dir", tmp_path / "torch", "--kernels", "torch") == 0
    assert run_train(*args, "--out_dir", tmp_path / "triton", "--kernels", "triton") == 0
    np.testing.assert_allclose(losses(tmp_path / "triton"), losses(tmp_path / "torch"), rtol=1e-4)


def test_resume_after_interruption_repeats_the_run_exactly(shakespeare, tmp_path, monkeypatch):
    args = ("--data", shakespeare, "--max_steps", 8, "--checkpoint_interval", 4, "--eval_interval", 4,
            "--eval_steps", 4)
    assert run_train(*args, "--out_dir", tmp_path / "whole") == 0

    with stopped_at_step(6):
        assert run_train(*args, "--out_dir", tmp_path / "cut") == 130
    checkpoint = tmp_path / "cut" / "ckpt_000004.pt"
    saved = checkpoint.stat().st_mtime_ns
    evaluated_at, evaluate = [], Run.evaluate_val_loss

    def spy(self):
        evaluated_at.append(self.step)
        return evaluate(self)

    monkeypatch.setattr(Run, "evaluate_val_loss", spy)
    assert run_train(*args, "--out_dir", tmp_path / "cut", "--resume") == 0
    assert evaluated_at == [8] and checkpoint.stat().st_mtime_ns == saved  # step 4's work is not redone
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bitwise, step for step
    whole = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in cut] == [json.loads(x)["step"] for x in whole]


def test_resume_after_kill_9_repeats_the_run_exactly(shakespeare, tmp_path):
    import signal
    import time

    args = [sys.executable, "train.py", *TINY, "--data", str(shakespeare), "--max_steps", "20",
            "--checkpoint_interval", "3"]
    subprocess.run([*args, "--out_dir", str(tmp_path / "whole")], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    run = subprocess.Popen([*args, "--out_dir", str(tmp_path / "cut")], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "ckpt_000003.pt").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([*args, "--out_dir", str(tmp_path / "cut"), "--resume"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_two_ranks_equal_one_process(small_data, tmp_path):
    # the whole-split validation loss too: the ranks take different windows of it
    args = [*TINY, "--data", str(small_data), "--max_steps", "4", "--total_batch_size", "256",
            "--eval_interval", "4", "--eval_steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *args, "--out_dir", str(tmp_path / "one")], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args, "--out_dir", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ranks=2" in two.stdout and "grad_accum=1" in two.stdout
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    np.testing.assert_allclose(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"), rtol=1e-5)


def test_overfitting_one_batch_drives_the_loss_near_zero(tmp_path):
    data = tmp_path / "one_batch"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "tiny_val_000000.npy", rng.integers(0, 500, 4 * 32 + 1).astype(np.uint16))
    np.save(data / "tiny_train_000001.npy", rng.integers(0, 500, 4 * 32 + 1).astype(np.uint16))
    assert run_train("--data", data, "--out_dir", tmp_path / "out", "--max_steps", 35, "--learning_rate", "1e-2",
                     "--min_lr_ratio", 1, "--weight_decay", 0, "--sampling", "sequential") == 0
    assert losses(tmp_path / "out")[-1] < 0.1


def expect_error(capsys, *args, match):
    assert run_train(*args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


def test_errors_are_messages_not_tracebacks(shakespeare, tmp_path, capsys, monkeypatch):
    expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path, "--kernels", "cuda-magic", match="unknown kernels")
    expect_error(capsys, "--data", tmp_path / "nowhere", "--out_dir", tmp_path, match="does not exist")
    expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path, "--total_batch_size", 100,
                 match="not a multiple of --batch_size")
    if not torch.cuda.is_available():  # the interpreter's bf16 tl.dot returns garbage
        expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path / "bf16", "--kernels", "attention",
                     "--dtype", "bfloat16", match="--dtype bfloat16 with attention on Triton needs a CUDA device")
        assert not (tmp_path / "bf16").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    np.save(corrupt / "x_val_000000.npy", np.zeros(1000, dtype=np.uint16))
    (corrupt / "x_train_000001.npy").write_bytes(b"not a numpy file")
    expect_error(capsys, "--data", corrupt, "--out_dir", tmp_path, "--max_steps", 1, match="x_train_000001.npy")

    assert run_train("--data", shakespeare, "--out_dir", tmp_path / "small", "--max_steps", 1,
                     "--checkpoint_interval", 1) == 0
    expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path / "small", "--resume", "--n_embd", 32,
                 match="--resume continues a run of --n_embd 64, not --n_embd 32, which its checkpoint fixes")

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Run, "train_step", out_of_memory)
    expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path, match="lower --batch_size")



def test_checkpoints_feed_sample_and_hellaswag(shakespeare, shared_data, tmp_path, capsys):
    import eval_hellaswag
    import sample

    assert run_train("--data", shakespeare, "--out_dir", tmp_path, "--max_steps", 2, "--checkpoint_interval", 2) == 0
    checkpoint = tmp_path / "ckpt_000002.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    assert state["step"] == 2 and state["train_config"]["n_embd"] == 64
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--num_samples", "2",
                        "--max_new_tokens", "5", "--device", "cpu"]) == 0
    samples = capsys.readouterr().out.split("\n" + SEPARATOR + "\n")
    assert len(samples) == 2 and all(text.startswith("ROMEO:") for text in samples)
    out = tmp_path / "hellaswag.json"
    eval_hellaswag.main(["--checkpoint", str(checkpoint), "--data", str(shared_data / "hellaswag_val.jsonl"),
                         "--limit", "4", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["n"] == 4


def test_whole_split_val_loss_is_the_token_weighted_mean(small_data, tmp_path):
    from gpt2.runtime import Distributed

    cfg = train.parse_args([*TINY, "--data", str(small_data), "--out_dir", str(tmp_path), "--eval_interval", "1",
                            "--eval_steps", "0"])
    run = Run(cfg, Distributed(), torch.device("cpu"))
    tokens = torch.from_numpy(np.load(small_data / "small_val_000000.npy").astype(np.int64))  # 1,000: 999 targets
    total = 0.0
    for start in range(0, len(tokens) - 1, 32):              # windows of 32, the last one 7 long
        x, y = tokens[start:start + 32], tokens[start + 1:start + 33]
        logits, _ = run.raw_model(x[None])
        total += torch.nn.functional.cross_entropy(logits[0, :len(y)], y, reduction="sum").item()
    assert run.evaluate_val_loss() == pytest.approx(total / 999, rel=1e-5)
    assert run.evaluate_val_loss() == run.evaluate_val_loss()  # the same batches every time


def test_a_long_validation_says_how_far_it_is(small_data, tmp_path, capsys, monkeypatch):
    from gpt2.runtime import Distributed
    from gpt2.trainer import SlowProgress

    cfg = train.parse_args([*TINY, "--data", str(small_data), "--out_dir", str(tmp_path), "--eval_interval", "1",
                            "--eval_steps", "0"])
    run = Run(cfg, Distributed(), torch.device("cpu"))
    run.evaluate_val_loss()
    assert capsys.readouterr().out == ""  # quick: nothing said
    monkeypatch.setattr(SlowProgress, "EVERY_S", 0.0)
    run.evaluate_val_loss()
    lines = capsys.readouterr().out.splitlines()
    # 1,000 tokens in windows of 32: 32 windows, 8 batches of 4
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [f"{i}/8 batches" for i in range(1, 9)], lines
    assert lines[0].startswith("step      0 | validation: 1/8 batches (")


def test_presets_sample_small_data_at_random_and_fineweb_in_order():
    from gpt2.config import make_config

    assert make_config("shakespeare").sampling == "random" and make_config("shakespeare").eval_steps == 0
    assert all(make_config(p).sampling == "sequential" for p in ("gpt2-124m", "gpt2-350m", "gpt2-1558m"))


def test_every_flag_is_a_config_field_with_true_help():
    import argparse
    import dataclasses

    from gpt2.config import TrainConfig, add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(TrainConfig)}
    switches_off = {name for name, help in flags.items() if "0 turns" in help}
    assert switches_off == {"eval_interval", "hellaswag_interval", "sample_interval", "checkpoint_interval",
                            "grad_clip"}
    assert "(default: 200; gpt2-*: 19073)" in flags["max_steps"]


def test_sample_prompt_flag(small_data, tmp_path, capsys):
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 2, "--sample_interval", 2,
                     "--sample_prompt", "JULIET:") == 0
    out = capsys.readouterr().out
    samples = out.split("samples:\n", 1)[1].split("\n" + SEPARATOR + "\n")
    assert len(samples) == 2 and all(text.startswith("JULIET:") for text in samples), out


def test_tensorboard_holds_every_scalar_of_the_log(small_data, tmp_path):
    from conftest import need_package

    need_package("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 3, "--eval_interval", 2,
                     "--tensorboard") == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    expected = {(key, r["step"]): value for r in records for key, value in r.items()
                if key != "step" and isinstance(value, (int, float))}
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert set(logged) == set(expected) and {"loss", "val_loss", "lr", "grad_norm"} <= {k for k, _ in logged}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6)


def test_tensorboard_missing_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    expect_error(capsys, "--data", small_data, "--out_dir", tmp_path / "out", "--tensorboard",
                 match="--tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "out").exists()


def test_a_second_ctrl_c_stops_at_once_but_a_forwarded_copy_does_not(monkeypatch):
    import signal

    from gpt2.trainer import StopRequest

    with StopRequest(announce=False) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)   # torchrun's copy of the same Ctrl-C, a moment later
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(StopRequest, "DUPLICATE_S", 0.0)
        with pytest.raises(KeyboardInterrupt) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.exit_code == 143  # as the second signal's own default would have ended it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- streaming data: deleted shards, a producer that is late ----------------------------------------

def stream_folder(folder, n_shards, done=True, max_shards_on_disk=None, shard_size=None):
    """A prepare_data.py folder of n_shards train shards of 300 tokens (their positions) and one val shard."""
    from test_data import make_folder

    make_folder(folder, [300] * n_shards, done=done, max_shards_on_disk=max_shards_on_disk)
    if shard_size:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "shard_size": shard_size}))
    return folder


def test_a_crash_between_checkpoints_with_deleted_shards_resumes_exactly(tmp_path, monkeypatch):
    """--delete_consumed_shards keeps the shards from the newest checkpoint's position on: a run killed at
    step 8 (checkpoints every 3 steps of 128 tokens) resumes from step 6 and reads what the whole run read."""
    args = ("--max_steps", 10, "--checkpoint_interval", 3, "--sampling", "sequential", "--delete_consumed_shards")
    assert run_train("--data", stream_folder(tmp_path / "data_whole", 8), "--out_dir", tmp_path / "whole", *args) == 0
    data = stream_folder(tmp_path / "data_cut", 8)

    class Killed(BaseException):
        """kill -9: no handler runs, nothing is saved."""

    with stopped_at_step(8, Killed), pytest.raises(Killed):
        run_train("--data", data, "--out_dir", tmp_path / "cut", *args)
    # the crash came at token 1024; the checkpoint of step 6 stands at token 768, in tokens 600..899
    assert not (data / "syn_train_000002.npy").exists() and (data / "syn_train_000003.npy").exists()
    assert run_train("--data", data, "--out_dir", tmp_path / "cut", *args, "--resume") == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_a_disk_budget_below_a_checkpoint_interval_is_refused(tmp_path, capsys):
    data = stream_folder(tmp_path / "data", 8, max_shards_on_disk=3, shard_size=300)
    expect_error(capsys, "--data", data, "--out_dir", tmp_path / "out", "--sampling", "sequential",
                 "--delete_consumed_shards", "--checkpoint_interval", 10,
                 match="use --checkpoint_interval 3 or less, or rerun prepare_data.py with --max_shards_on_disk >= 6")
    assert not (tmp_path / "out").exists()
    # 4 steps and the one after them read 641 tokens, which may span 4 shards: the producer would wait for room
    expect_error(capsys, "--data", data, "--out_dir", tmp_path / "out", "--sampling", "sequential",
                 "--delete_consumed_shards", "--checkpoint_interval", 4, match="--checkpoint_interval 3 or less")
    assert run_train("--data", data, "--out_dir", tmp_path / "out", "--sampling", "sequential",
                     "--delete_consumed_shards", "--checkpoint_interval", 3, "--max_steps", 4) == 0


def signal_later(when, signum, finished: threading.Event):
    """Send signum to the main thread once when() holds, and again after 20 s if the run still goes on
    (a second signal stops it at once: a run that ignored the first one fails the test, not hangs it)."""
    def send():
        while not when():
            time.sleep(0.02)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signum)
        if not finished.wait(20):
            signal.pthread_kill(threading.main_thread().ident, signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_signal_while_waiting_for_shards_stops_the_run(tmp_path, capsys, monkeypatch):
    """900 train tokens of a producer that is late: step 7 waits for the next shard. SIGTERM ends the wait,
    saves step 7 and exits with 143; resumed, the run waits again, and a signal then saves nothing new."""
    import gpt2.data

    waiting, wait_until = threading.Event(), gpt2.data.wait_until

    def spy(*args, **kwargs):
        waiting.set()
        return wait_until(*args, **kwargs)

    monkeypatch.setattr(gpt2.data, "wait_until", spy)
    data = stream_folder(tmp_path / "data", 3, done=False)
    out = tmp_path / "out"
    args = ("--data", data, "--out_dir", out, "--max_steps", 20, "--sampling", "sequential")
    for resume, expected in ((), f"saved {out / 'ckpt_000007.pt'}"), (("--resume",), "nothing new to save"):
        waiting.clear()
        finished = threading.Event()
        signal_later(waiting.is_set, signal.SIGTERM, finished)
        code = run_train(*args, *resume)
        finished.set()
        err = capsys.readouterr().err
        assert code == 143, err
        assert f"interrupted at step 7 while waiting for data: {expected}" in err, err
        assert [p.name for p in out.glob("ckpt_*.pt")] == ["ckpt_000007.pt"]
    assert len(losses(out)) == 7


# -- what the log and the plot hold -----------------------------------------------------------------

def test_the_plot_is_written_without_evaluations(small_data, tmp_path):
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 2) == 0  # --eval_interval 0
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("kernels", ["torch", "adamw"])
def test_the_grad_norm_is_logged_with_clipping_off(tmp_path, kernels):
    """--grad_clip 0 logs the real norm: that of a run whose clip never bites (same losses too)."""
    def norms(out_dir):
        return [r["grad_norm"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
                if "grad_norm" in r]

    data = tmp_path / "data"   # token ids below 256: a small embedding keeps FusedAdamW quick in the interpreter
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "tiny_val_000000.npy", rng.integers(0, 256, 200).astype(np.uint16))
    np.save(data / "tiny_train_000001.npy", rng.integers(0, 256, 2000).astype(np.uint16))
    args = ("--data", data, "--max_steps", 3, "--n_layer", 1, "--vocab_size", 256, "--kernels", kernels)
    assert run_train(*args, "--out_dir", tmp_path / "off", "--grad_clip", 0) == 0
    assert run_train(*args, "--out_dir", tmp_path / "loose", "--grad_clip", 1e9) == 0
    assert all(n > 0 for n in norms(tmp_path / "off"))
    assert norms(tmp_path / "off") == norms(tmp_path / "loose")
    assert losses(tmp_path / "off") == losses(tmp_path / "loose")


# -- inputs the model cannot take ---------------------------------------------------------------------

def test_vocab_and_block_size_must_fit_the_data_and_the_model(small_data, tmp_path, capsys):
    from gpt2 import shards

    gpt2_tokens = tmp_path / "shakespeare"
    shards.prepare_shakespeare(gpt2_tokens)                 # meta.json: GPT-2 BPE tokens
    expect_error(capsys, "--data", gpt2_tokens, "--out_dir", tmp_path / "a", "--vocab_size", 100,
                 match="--vocab_size 100 is below the 50257 tokens of the GPT-2 BPE")
    assert not (tmp_path / "a").exists()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"n_positions": 16, "vocab_size": 50257}))  # no weights
    assert train.main([*UNSHAPED, "--data", str(gpt2_tokens), "--out_dir", str(tmp_path / "b"),
                       "--init_from", str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--block_size 32 is more than the 16 positions of --init_from {hf_dir}" in err, err
    assert not (tmp_path / "b").exists()
    # a folder without meta.json says nothing of its tokens: the first batch with a larger id stops the run
    expect_error(capsys, "--data", small_data, "--out_dir", tmp_path / "c", "--vocab_size", 100,
                 match="but --vocab_size is 100: train with a --vocab_size above every id of the data's tokenizer")
    # it failed before its first step: the corrected rerun is not refused
    assert run_train("--data", small_data, "--out_dir", tmp_path / "c", "--max_steps", 1) == 0


def test_a_val_split_of_one_token_is_refused(tmp_path, capsys):
    from test_data import make_folder

    make_folder(tmp_path / "data", val_lengths=(1,))
    expect_error(capsys, "--data", tmp_path / "data", "--out_dir", tmp_path / "out", "--eval_interval", 1,
                 "--max_steps", 1, match="--eval_interval 0")
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_is_one_line(small_data, tmp_path, capsys):
    for device in ("foo", "meta", "xpu"):  # meta and xpu are torch's device types, not ours
        expect_error(capsys, "--data", small_data, "--out_dir", tmp_path, "--device", device,
                     match=f"--device {device}: not a device")


def test_a_warmup_longer_than_the_run_is_said(small_data, tmp_path, capsys):
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 1, "--warmup_steps", 4) == 0
    assert ("note: --warmup_steps 4 is more than --max_steps 1: the learning rate rises to 2.50e-04 at most, not "
            "to --learning_rate 1.00e-03") in capsys.readouterr().out


def test_a_gpu_index_past_the_machines_gpus_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    expect_error(capsys, "--data", small_data, "--out_dir", tmp_path, "--device", "cuda:3",
                 match=r"--device cuda:3: this machine has 1 GPU, cuda:0 to cuda:0")


# -- the audit's defects: one-line errors, a save that a full disk or a second Ctrl-C cannot break ---------

def test_init_from_offline_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore lines")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", offline)
    assert train.main([*UNSHAPED, "--data", str(small_data), "--out_dir", str(tmp_path / "out"),
                       "--init_from", "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init_from gpt2: could not load 'gpt2'") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


class DiskFull(io.RawIOBase):
    """A file whose disk fills after `room` bytes, as a real one does: OSError 28 from write()."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(small_data, tmp_path, capsys,
                                                                                 monkeypatch):
    args = ("--data", small_data, "--out_dir", tmp_path, "--checkpoint_interval", 1)
    assert run_train(*args, "--max_steps", 1) == 0
    previous = (tmp_path / "ckpt_000001.pt").read_bytes()
    capsys.readouterr()
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, DiskFull(f, room=4096)))
    assert run_train(*args, "--max_steps", 2, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not save the checkpoint {tmp_path / 'ckpt_000002.pt'}" in err and "No space left" in err, err
    assert sorted(p.name for p in tmp_path.glob("*.pt*")) == ["ckpt_000001.pt"]  # no temporary file left
    assert not list(tmp_path.glob(".ckpt_*"))
    assert (tmp_path / "ckpt_000001.pt").read_bytes() == previous



def test_a_full_disk_while_logging_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    import pathlib

    opened = pathlib.Path.open

    def full_log(path, mode="r", *args, **kwargs):
        f = opened(path, mode, *args, **kwargs)
        return DiskFull(f, room=0) if path.name == "log.jsonl" and mode == "a" else f

    monkeypatch.setattr(pathlib.Path, "open", full_log)
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not write to {tmp_path / 'log.jsonl'} (No space left on device)" in err, err


def test_hellaswag_in_the_trainer_says_how_far_it_is(small_data, tmp_path, shared_data, capsys, monkeypatch):
    from gpt2.trainer import SlowProgress

    monkeypatch.setattr(SlowProgress, "EVERY_S", 0.0)
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 1, "--hellaswag_interval", 1,
                     "--hellaswag_limit", 20, "--hellaswag_data", shared_data / "hellaswag_val.jsonl") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "| hellaswag:" in line]
    assert said[0].startswith("step      0 | hellaswag: 16/20 examples (") and "20/20 examples" in said[1], said
    assert len(said) == 4, said  # steps 0 and 1


def test_a_compiled_run_says_its_first_step_compiles(small_data, tmp_path, capsys):
    with stopped_at_step(0):  # before any compilation
        assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 1, "--compile") == 130
    assert "step      0 | torch.compile: this first step compiles the model" in capsys.readouterr().out


def test_ctrl_c_during_an_evaluation_stops_it_and_resume_evaluates_again(small_data, tmp_path, capsys, monkeypatch):
    from gpt2.trainer import SlowProgress

    args = ("--data", small_data, "--max_steps", 4, "--eval_interval", 2, "--eval_steps", 0)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_train(*args, "--out_dir", whole) == 0
    update = SlowProgress.update

    def ctrl_c_in_validation_of(step):
        def updating(self, done):
            if f"step {step:6d} | validation" in self.what and done == 3:  # of 8 batches
                signal.raise_signal(signal.SIGINT)
            return update(self, done)
        return updating

    monkeypatch.setattr(SlowProgress, "update", ctrl_c_in_validation_of(2))
    capsys.readouterr()
    assert run_train(*args, "--out_dir", cut) == 130
    err = capsys.readouterr().err
    assert (f"interrupted at step 2 during its evaluation: saved {cut / 'ckpt_000002.pt'}; resume with --resume, "
            "which evaluates it again") in err, err
    assert val_losses(cut) == val_losses(whole)[:1]  # step 0's; step 2's was cut short
    monkeypatch.setattr(SlowProgress, "update", update)
    assert run_train(*args, "--out_dir", cut, "--resume") == 0
    assert losses(cut) == losses(whole) and val_losses(cut) == val_losses(whole)  # bitwise
    monkeypatch.setattr(SlowProgress, "update", ctrl_c_in_validation_of(0))
    assert run_train(*args, "--out_dir", tmp_path / "early") == 130
    assert "interrupted at step 0 during its evaluation: no step done, nothing to save" in capsys.readouterr().err
    assert not list((tmp_path / "early").glob("ckpt_*"))

def test_a_second_ctrl_c_while_saving_waits_for_the_checkpoint(small_data, tmp_path, capfd, monkeypatch):
    import gpt2.trainer
    from gpt2.checkpoint import load_checkpoint
    from gpt2.trainer import StopRequest

    monkeypatch.setattr(StopRequest, "DUPLICATE_S", 0.0)  # the second Ctrl-C is the user's, not torchrun's
    train_step, save_checkpoint = Run.train_step, gpt2.trainer.save_checkpoint

    def first_ctrl_c(self):
        signal.raise_signal(signal.SIGINT)
        return train_step(self)

    def second_ctrl_c(path, **kwargs):
        signal.raise_signal(signal.SIGINT)
        save_checkpoint(path, **kwargs)

    monkeypatch.setattr(Run, "train_step", first_ctrl_c)
    monkeypatch.setattr(gpt2.trainer, "save_checkpoint", second_ctrl_c)
    assert run_train("--data", small_data, "--out_dir", tmp_path, "--max_steps", 5) == 130
    err = capfd.readouterr().err  # the handler writes to fd 2
    assert "Traceback" not in err and "stopping once the checkpoint is written" in err, err
    assert load_checkpoint(tmp_path / "ckpt_000001.pt")["step"] == 1
    assert not list(tmp_path.glob(".ckpt_*"))


def test_a_run_that_fails_before_its_first_step_does_not_block_the_rerun(small_data, tmp_path, capsys,
                                                                           monkeypatch):
    from gpt2.trainer import TrainError

    out = tmp_path / "out"
    expect_error(capsys, "--data", small_data, "--out_dir", out, "--seed", -1, match="--seed must be in [0, 2**64)")
    assert not out.exists()

    def fails(self):
        raise TrainError("the first step failed")

    monkeypatch.setattr(Run, "train_step", fails)
    expect_error(capsys, "--data", small_data, "--out_dir", out, "--max_steps", 2, match="the first step failed")
    assert (out / "log.jsonl").exists()
    monkeypatch.undo()
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 2) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("run" in r for r in records) == 1 and len(losses(out)) == 2
    expect_error(capsys, "--data", small_data, "--out_dir", out, "--max_steps", 2, match="holds a run")


@pytest.mark.parametrize("broken", ["loss", "grad_norm"])
def test_a_diverged_run_stops_before_saving_its_weights(small_data, tmp_path, capsys, monkeypatch, broken):
    """A step whose loss is nan, or whose gradients are (the update then spreads nan into every weight):
    the run stops there, with the newest good checkpoint named, and saves nothing after it."""
    accumulate, calls = trainer.accumulate_gradients, []

    def breaking_at_step_3(model, *args):
        loss = accumulate(model, *args)
        calls.append(None)
        if len(calls) == 4:
            if broken == "loss":
                return loss * math.nan
            next(model.parameters()).grad[0, 0] = math.nan
        return loss

    monkeypatch.setattr(trainer, "accumulate_gradients", breaking_at_step_3)
    out = tmp_path / "out"
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 8, "--checkpoint_interval", 2) == 2
    err = capsys.readouterr().err
    assert f"error: step 3: the {broken.replace('_', ' ')} is nan, training diverged" in err, err
    assert f"the newest checkpoint is {out / 'ckpt_000002.pt'}: continue from it with --resume" in err
    assert [p.name for p in checkpoints(out)] == ["ckpt_000002.pt"]
    assert math.isnan(json.loads((out / "log.jsonl").read_text().splitlines()[-1])[broken])
