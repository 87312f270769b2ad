"""The trainer on the CPU: learning, kernels agreeing, exact resume, DDP equal to one process, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from gpt2.data import prepare_shakespeare
from gpt2.sampling import SEPARATOR
from gpt2.trainer import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "4",
        "--total_batch_size", "128", "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_interval", "0",
        "--sample_interval", "0", "--checkpoint_interval", "0", "--hellaswag_interval", "0", "--device", "cpu"]


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

    original = Run.train_step

    def dies_at_step_6(self):
        if self.step == 6:
            raise KeyboardInterrupt  # the run stops between checkpoints, in the middle of a step
        return original(self)

    monkeypatch.setattr(Run, "train_step", dies_at_step_6)
    assert run_train(*args, "--out_dir", tmp_path / "cut") == 130
    monkeypatch.setattr(Run, "train_step", original)
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
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    np.save(corrupt / "x_val_000000.npy", np.zeros(1000, dtype=np.uint16))
    (corrupt / "x_train_000001.npy").write_bytes(b"not a numpy file")
    expect_error(capsys, "--data", corrupt, "--out_dir", tmp_path, "--max_steps", 1, match="x_train_000001.npy")

    assert run_train("--data", shakespeare, "--out_dir", tmp_path / "small", "--max_steps", 1,
                     "--checkpoint_interval", 1) == 0
    expect_error(capsys, "--data", shakespeare, "--out_dir", tmp_path / "small", "--resume", "--n_embd", 32,
                 match="another shape")

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
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
