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
    for name in ("attention", "layernorm", "add_layernorm", "add_layernorm_model", "gelu", "adamw", "adamw_clip",
                 "cross_entropy", "train"):
        assert f"## {name} (smoke)" in result.stdout


def test_gpu_check_smoke_runs_every_section(tmp_path):
    """The one command a GPU slot runs first, at tiny sizes on the CPU: it must not rot between slots."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for section in ("## tests", "## step B=16", "## kernels", "## step B=64"):
        assert section in report
    assert "| triton | 2 |" in report and "error" not in report.lower()
    assert (tmp_path / "tests.log").exists()


def test_gpu_check_tables_each_autotuners_choice(monkeypatch):
    """The kernels section's autotuning table: every key an autotuner chose a config for, and the times of
    the candidates it tried (here a tuning made up on the attention's atomic dk/dv autotuner)."""
    import gpu_check
    import kernels.attention as attention

    tuner = attention._dkdv_dq_kernel
    key = (1024, 64, True, "torch.bfloat16")
    monkeypatch.setattr(tuner, "cache", {key: tuner.configs[0]})
    monkeypatch.setattr(tuner, "configs_timings", {c: [0.25 + i, 0.2, 0.3] for i, c in enumerate(tuner.configs)},
                        raising=False)
    table = gpu_check.tuning_table()
    row = next(line for line in table.splitlines() if "_dkdv_dq_kernel" in line)
    assert str(key) in row and "0.250" in row and row.count(": ") == len(tuner.configs), table


def test_host_overhead_smoke_times_every_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for case in ("layernorm", "add_layernorm", "gelu", "attention", "cross_entropy", "adamw step", "GPT step"):
        assert f"| {case}" in result.stdout


def test_smoke_catches_a_provider_that_disagrees():
    bench = harness.OpBench(
        name="tanh", unit="GB/s",
        make_inputs=lambda config, device, dtype: (torch.randn(config["n"], device=device, dtype=dtype,
                                                               requires_grad=True),),
        providers={"torch": torch.tanh, "wrong_grad": lambda x: torch.tanh(x.detach()) + 0.0 * x},
        work=lambda config, mode: 8.0 * config["n"], configs=[], smoke_configs=[{"n": 33}])
    rows = harness.smoke_op(bench, torch.device("cpu"))
    assert {r["provider"]: r["ok"] for r in rows} == {"torch": True, "wrong_grad": False}
