"""train.py, sample.py and eval_hellaswag.py as a user meets them: the first run offline, bad input
(one line, exit 2, nothing on disk changed), a second run into the same folder, Ctrl-C, damaged files."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gpt2 import shards
from gpt2.runtime import Distributed
import train
from test_train import TINY, UNSHAPED, losses, run_train, stopped_at_step, val_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, cwd=REPO, env=None, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(*folders) -> dict:
    """Every file under the folders with its size and mtime: equal snapshots, nothing changed."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_refusal(result, *phrases):
    """Exit code 2 and one line on stderr that holds every phrase, no traceback."""
    err = result.stderr.strip()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err
    return err


# -- item 2: the README's first command, with no network and no BPE files --------------------------

def test_first_run_needs_no_network_and_no_bpe(tmp_path, offline_env):
    result = script("train.py", "--max_steps", 2, "--eval_interval", 0, cwd=tmp_path, env=offline_env)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "TIKTOKEN_CACHE_DIR" in line]
    assert len(notes) == 1 and "samples are skipped" in notes[0], result.stdout  # one line, not a traceback
    assert (tmp_path / "data" / "shakespeare" / "shakespeare_train_000001.npy").exists()
    assert (tmp_path / "out" / "ckpt_000002.pt").exists() and len(losses(tmp_path / "out")) == 2


# -- item 3: --kernels=triton on a machine without a GPU ------------------------------------------

def test_triton_kernels_without_a_gpu_run_in_the_interpreter_and_say_so(small_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = script("train.py", *TINY, "--data", small_data, "--out_dir", tmp_path / "out", "--max_steps", 1,
                    "--n_layer", 1, "--kernels", "triton", "--no-deterministic", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    header = [line for line in result.stdout.splitlines() if line.startswith("kernels=")]
    assert header == [header[0]] and "kernels=triton (in the Triton interpreter" in header[0], result.stdout
    assert "nondeterministic" in header[0], header[0]


# -- item 1: a second run into a folder that holds one --------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused(small_data, tmp_path):
    out = tmp_path / "out"
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 2, "--checkpoint_interval", 2) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    result = script("train.py", *TINY, "--data", small_data, "--out_dir", out, "--max_steps", 2)
    expect_refusal(result, str(out), "--resume", "another --out_dir", "--overwrite")
    assert snapshot(out) == before

    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 1, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "loss.png", "notes.txt"]  # the old checkpoint is gone
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 0] and "run" in records[0]       # one run, from step 0


# -- item 4: bad flags and output folders, before any heavy work -----------------------------------

BAD_FLAGS = [
    (("--batch_size", 0), "--batch_size must be positive, got 0"),
    (("--batch_size", -3), "--batch_size must be positive, got -3"),
    (("--n_head", 0), "--n_head must be positive"),
    (("--n_head", 3), "--n_embd 64 is not a multiple of --n_head 3"),
    (("--eval_steps", -1), "--eval_steps must be 0 or more"),
    (("--max_steps", -5), "--max_steps must be 0 or more"),
    (("--learning_rate", 0), "--learning_rate must be positive"),
    (("--learning_rate", "inf"), "--learning_rate must be a finite number, got inf"),
    (("--grad_clip", "nan"), "--grad_clip must be a finite number, got nan"),
    (("--min_lr_ratio", 2), "--min_lr_ratio must be in [0, 1]"),
    (("--hellaswag_limit", 0), "--hellaswag_limit must be positive"),
    (("--resume", "--overwrite"), "give one of them"),
    (("--init_from", "gpt2"), "--init_from gpt2 takes the model's shape from its weights: leave out --n_layer "
                              "--n_head --n_embd"),
    (("--delete_consumed_shards",), "--delete_consumed_shards reads the train split once, in order: "
                                    "add --sampling sequential"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(map(str, f)) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_before_the_model(flags, message, small_data, tmp_path, capsys, monkeypatch):
    import gpt2.trainer

    monkeypatch.setattr(gpt2.trainer, "GPT", None)  # building the model would fail differently
    assert run_train("--data", small_data, "--out_dir", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_output_folders_are_refused_before_the_model(small_data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = snapshot(tmp_path)
    expect_refusal(script("train.py", *TINY, "--data", small_data, "--out_dir", a_file, "--batch_size", -3),
                   "--batch_size must be positive")
    expect_refusal(script("train.py", *TINY, "--data", small_data, "--out_dir", a_file),
                   f"--out_dir {a_file} is a file", "choose another --out_dir")
    # /proc takes no new files, whoever runs this (root ignores permission bits)
    expect_refusal(script("train.py", *TINY, "--data", small_data, "--out_dir", "/proc/gpt2_run"),
                   "cannot write in /proc", "writable --out_dir")
    assert snapshot(tmp_path) == before


def test_hellaswag_offline_names_the_trainers_flag(small_data, tmp_path, offline_env, shared_data):
    env = {**offline_env, "TIKTOKEN_CACHE_DIR": str(shared_data / "tiktoken_cache")}  # the BPE is here
    err = expect_refusal(script("train.py", *TINY, "--data", small_data, "--out_dir", tmp_path / "out",
                                "--hellaswag_interval", 10, env=env),
                         "could not download HellaSwag", "--hellaswag_data FILE", "--hellaswag_interval 0")
    assert " --data FILE" not in err
    assert not (tmp_path / "out").exists()


# -- item 5: damaged inputs are named, with what to do -----------------------------------------------

def test_damaged_data_folders_name_the_file(small_data, tmp_path):
    meta = tmp_path / "meta_broken"
    shards.prepare_shakespeare(meta)
    (meta / "meta.json").write_text('{"name": "shakespeare\x01"}')
    text_shard = tmp_path / "text_shard"
    text_shard.mkdir()
    np.save(text_shard / "x_val_000000.npy", np.zeros(1000, dtype=np.uint16))
    (text_shard / "x_train_000001.npy").write_text("these are words, not tokens\n" * 20)
    before = snapshot(tmp_path)
    expect_refusal(script("train.py", *TINY, "--data", meta, "--out_dir", tmp_path / "out"),
                   str(meta / "meta.json"), "prepare_data.py")
    err = expect_refusal(script("train.py", *TINY, "--data", text_shard, "--out_dir", tmp_path / "out"),
                         str(text_shard / "x_train_000001.npy"), "not a token shard written by prepare_data.py")
    assert "unsafely" not in err and "pickle" not in err
    assert snapshot(tmp_path) == before


def test_a_malformed_hellaswag_line_is_named_by_file_and_line(tmp_path, shared_data):
    lines = (shared_data / "hellaswag_val.jsonl").read_text().splitlines()[:4]
    bad = tmp_path / "hellaswag.jsonl"
    bad.write_text("\n".join([lines[0], "", lines[1], lines[2][:-5], lines[3]]) + "\n")   # line 4 is cut short
    expect_refusal(script("eval_hellaswag.py", "--model", "gpt2", "--data", bad, "--device", "cpu"),
                   f"{bad}:4:", "not a JSON object")


# -- item 6: checkpoints ------------------------------------------------------------------------------

def test_ctrl_c_saves_at_the_step_boundary_and_resume_repeats_the_run(small_data, tmp_path):
    args = [*TINY, "--data", small_data, "--max_steps", 12]
    assert run_train(*args, "--out_dir", tmp_path / "whole") == 0
    cut = tmp_path / "cut"
    run = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--out_dir", str(cut)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while run.poll() is None and time.time() < deadline and not (
            (cut / "log.jsonl").exists() and (cut / "log.jsonl").read_text().count('"loss"') >= 2):
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 130, (out[-2000:], err[-2000:])
    step = len(losses(cut))
    assert 2 <= step < 12
    assert f"interrupted at step {step}: saved {cut / f'ckpt_{step:06d}.pt'}; resume with --resume" in err
    assert "Traceback" not in err
    assert run_train(*args, "--out_dir", cut, "--resume") == 0
    assert losses(cut) == losses(tmp_path / "whole")  # bitwise, step for step


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of this rank."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}: {children}")


def torchrun_two_ranks(script_path, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script_path), *map(str, TINY), "--total_batch_size", "256", *map(str, args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(small_data, tmp_path):
    """The ranks vote in the step's loss all-reduce: a SIGINT that reaches rank 1 alone still makes rank 0
    save the checkpoint of the step where both stop."""
    cut = tmp_path / "cut"
    run = torchrun_two_ranks("train.py", "--data", small_data, "--max_steps", 40, "--out_dir", cut)
    deadline = time.time() + 300
    while run.poll() is None and time.time() < deadline and not (
            (cut / "log.jsonl").exists() and (cut / "log.jsonl").read_text().count('"loss"') >= 2):
        time.sleep(0.02)
    os.kill(_worker_of_rank(run.pid, 1), signal.SIGINT)
    out, err = run.communicate(timeout=120)  # ranks that disagree hang in their next collective
    step = len(losses(cut))
    assert 2 <= step < 40, (out[-2000:], err[-2000:])
    assert f"interrupted at step {step}: saved {cut / f'ckpt_{step:06d}.pt'}" in err, err[-3000:]
    assert [p.name for p in cut.glob("ckpt_*.pt")] == [f"ckpt_{step:06d}.pt"]


SIGNAL_RANK_1_IN_VALIDATION = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from gpt2.trainer import Run, SlowProgress
import train

Run.VOTE_EVERY = 1
update = SlowProgress.update

def updating(self, done):
    if os.environ["RANK"] == "1" and "step      2 | validation" in self.what and done == 2:
        signal.raise_signal(signal.SIGINT)
    return update(self, done)

SlowProgress.update = updating
sys.exit(train.main())
"""


def test_under_torchrun_a_signal_on_one_rank_stops_the_evaluation_of_every_rank(small_data, tmp_path,
                                                                                shared_data):
    """The ranks vote after each batch of an evaluation (VOTE_EVERY 1) that all of them run: rank 1's SIGINT
    in its second validation batch of step 2 (of 4) stops both ranks there, with a checkpoint. HellaSwag's
    33 examples give rank 0 two batches and rank 1 one: a vote after rank 0's second would meet rank 1's
    sum of the counts, and the run would hang or fail."""
    wrapper = tmp_path / "train_signalled.py"
    wrapper.write_text(SIGNAL_RANK_1_IN_VALIDATION.format(repo=REPO))
    cut = tmp_path / "cut"
    run = torchrun_two_ranks(wrapper, "--data", small_data, "--max_steps", 6, "--eval_interval", 2,
                             "--eval_steps", 0, "--hellaswag_interval", 2, "--hellaswag_limit", 33,
                             "--hellaswag_data", shared_data / "hellaswag_val.jsonl",
                             "--out_dir", cut)
    out, err = run.communicate(timeout=300)
    assert "exitcode  : 130" in err, (out[-2000:], err[-3000:])  # torchrun's own exit code is 1
    assert (f"interrupted at step 2 during its evaluation: saved {cut / 'ckpt_000002.pt'}; resume with --resume, "
            "which evaluates it again") in err, err[-3000:]
    assert len(val_losses(cut)) == 1 and len(losses(cut)) == 2  # step 0's evaluation, steps 0 and 1

def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(small_data, tmp_path, capsys):
    args = ("--data", small_data, "--checkpoint_interval", 2)
    assert run_train(*args, "--out_dir", tmp_path / "whole", "--max_steps", 6) == 0
    out = tmp_path / "cut"
    assert run_train(*args, "--out_dir", out, "--max_steps", 4) == 0
    newest = out / "ckpt_000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # a copy cut short
    stale = [out / ".ckpt_000006.pt.tmp999999999", out / ".ckpt_000006.pt.tmp.999999999"]  # from a kill -9
    for tmp in stale:
        tmp.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert run_train(*args, "--out_dir", out, "--max_steps", 6, "--resume") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "not a readable checkpoint" in line]
    assert len(said) == 1 and "ckpt_000004.pt" in said[0] and "resuming from the older" in said[0], said
    assert "ckpt_000002.pt" in said[0]
    assert not any(tmp.exists() for tmp in stale)
    assert losses(out) == losses(tmp_path / "whole")



def test_resume_alone_continues_with_the_runs_flags(small_data, tmp_path, capsys, monkeypatch):
    # the run's flags differ from every preset default that matters: model, lr, batch, data, device
    args = (*TINY, "--data", small_data, "--max_steps", 5, "--checkpoint_interval", 2, "--learning_rate", "2e-3")
    assert run_train(*args, "--out_dir", tmp_path / "whole") == 0
    cut = tmp_path / "cut"
    with stopped_at_step(3):  # no checkpoint there: the resume starts from step 2's
        assert run_train(*args, "--out_dir", cut) == 130
    capsys.readouterr()
    assert train.main(["--out_dir", str(cut), "--resume"]) == 0  # no other flag
    assert "changed flags" not in capsys.readouterr().out
    assert losses(cut) == losses(tmp_path / "whole")  # bitwise, step for step


def test_a_flag_given_with_resume_changes_the_run_and_says_so(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 2, "--checkpoint_interval", 2) == 0
    capsys.readouterr()
    assert train.main(["--out_dir", str(out), "--resume", "--max_steps", "3", "--grad_clip", "0.5",
                       "--weight_decay", "0.5"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "changed flags" in line]
    assert len(said) == 1 and "--max_steps 3 (the run's: --max_steps 2)" in said[0], said
    assert "--grad_clip 0.5 (the run's: --grad_clip 1.0)" in said[0], said
    assert len(losses(out)) == 3
    # said and done: the optimizer's state_dict had brought the run's weight decay back
    groups = torch.load(out / "ckpt_000003.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.5, 0.0]
    for flags, named in [(("--seed", 7), "--seed 1337"), (("--n_layer", 3, "--sampling", "random"), "--n_layer 2"),
                         (("--preset", "gpt2-124m"), "--preset shakespeare")]:
        err = expect_refusal(script("train.py", "--out_dir", out, "--resume", *flags), named, "checkpoint fixes",
                             "another --out_dir")
        assert flags[0] in err.split(", not ")[1], err
    # a bool the run had on can be turned off; one left to the device is "unset"
    assert train.parse_args(["--out_dir", str(out), "--resume", "--no-compile"]).compile is False
    from gpt2.trainer import Run
    capsys.readouterr()
    Run(train.parse_args(["--out_dir", str(out), "--resume", "--compile"]), Distributed(), torch.device("cpu"))
    assert "--compile (the run's: --compile unset)" in capsys.readouterr().out


def test_a_fine_tune_resumes_from_another_folder_without_its_weights(small_data, tmp_path, monkeypatch):
    from test_model import save_small_hf

    started_in, resumed_in = tmp_path / "a", tmp_path / "b"
    started_in.mkdir(), resumed_in.mkdir()
    save_small_hf(started_in / "hf", vocab_size=50257, n_positions=64, n_embd=32)
    (started_in / "data").symlink_to(small_data)
    args = [*UNSHAPED, "--init_from", "hf", "--data", "data", "--max_steps", "5", "--checkpoint_interval", "2"]
    monkeypatch.chdir(started_in)  # relative --init_from and --data
    assert train.main([*args, "--out_dir", "whole"]) == 0
    with stopped_at_step(3):
        assert train.main([*args, "--out_dir", "cut"]) == 130
    shutil.rmtree(started_in / "hf")  # the weights are in the checkpoint
    monkeypatch.chdir(resumed_in)
    assert train.main(["--out_dir", str(started_in / "cut"), "--resume"]) == 0
    assert losses(started_in / "cut") == losses(started_in / "whole")


def test_resume_without_a_readable_checkpoint_stops_before_building(small_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 2, "--checkpoint_interval", 2) == 0
    (out / "ckpt_000002.pt").write_bytes(b"cut short")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert train.main(["--out_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "is readable" in err and "--overwrite" in err, err
    assert not (tmp_path / "data").exists()  # the preset's data was not prepared: nothing was built


def test_resume_of_a_run_without_a_checkpoint_says_it_starts_over(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 2) == 0  # no checkpoint at all
    capsys.readouterr()
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 3, "--resume") == 0
    said = capsys.readouterr().out
    assert (f"--resume: no checkpoint in {out} (the run in it saved none), starting from step 0 "
            "with this command's flags") in said, said
    assert len(losses(out)) == 3
    capsys.readouterr()
    assert run_train("--data", small_data, "--out_dir", out, "--max_steps", 3, "--checkpoint_interval", 3,
                     "--overwrite") == 0
    assert run_train("--data", small_data, "--out_dir", out, "--resume") == 0
    assert "--max_steps is 3: nothing left to train" in capsys.readouterr().out

def test_an_old_checkpoint_without_a_field_takes_its_presets_value():
    from gpt2.config import make_config, run_flags

    stored = dataclasses.asdict(make_config("gpt2-124m", data="d"))
    del stored["eval_steps"], stored["sampling"]
    model = {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
    flags = run_flags({"train_config": stored, "model_config": model})
    assert flags["eval_steps"] == make_config("gpt2-124m").eval_steps != make_config("shakespeare").eval_steps
    assert flags["sampling"] == "sequential" and flags["data"] == "d"

# -- item 8: sample.py's flags ---------------------------------------------------------------------

def test_sample_rejects_a_negative_length(tmp_path):
    expect_refusal(script("sample.py", "--init_from", tmp_path, "--max_new_tokens", -1, "--device", "cpu"),
                   "--max_new_tokens must be positive, got -1")
