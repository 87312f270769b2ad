"""The eager path's launcher (kernels/launch.py): the same launches as Triton's own, for less host time."""
import os
import pathlib
import subprocess
import sys

import triton

from kernels.launch import cdiv, next_power_of_2

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_launch_paths(*flags):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT2_AUTOTUNE")}
    return subprocess.run([sys.executable, "tests/launch_paths.py", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_direct_launches_what_triton_launches():
    result = _run_launch_paths()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launches matched Triton's" in result.stdout


def test_the_comparison_catches_a_launcher_blind_to_alignment():
    """A cache keyed without each tensor's alignment reuses an aligned kernel for a misaligned tensor."""
    result = _run_launch_paths("--weaken", "alignment")
    assert result.returncode == 1 and "MISMATCH: _probe_kernel" in result.stdout, result.stdout[-3000:]


def test_host_helpers_match_triton():
    for n in range(1, 70000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for a in range(300):
        for b in range(1, 70):
            assert cdiv(a, b) == triton.cdiv(a, b)
