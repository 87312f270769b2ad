"""The benchmark harness on the CPU: every entry's smoke pass, and that a wrong provider is caught."""
import os
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402


def test_smoke_pass_runs_every_benchmark():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the smoke path, even on a GPU machine
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("attention", "layernorm", "add_layernorm", "gelu", "adamw", "adamw_clip", "cross_entropy",
                 "cross_entropy_eval", "train"):
        assert f"## {name} (smoke)" in result.stdout


def test_smoke_catches_a_provider_that_disagrees():
    bench = harness.OpBench(
        name="tanh", unit="GB/s",
        make_inputs=lambda config, device, dtype: (torch.randn(config["n"], device=device, dtype=dtype,
                                                               requires_grad=True),),
        providers={"torch": torch.tanh, "wrong_grad": lambda x: torch.tanh(x.detach()) + 0.0 * x},
        work=lambda config, mode: 8.0 * config["n"], configs=[], smoke_configs=[{"n": 33}])
    rows = harness.smoke_op(bench, torch.device("cpu"))
    assert {r["provider"]: r["ok"] for r in rows} == {"torch": True, "wrong_grad": False}
