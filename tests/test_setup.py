"""The test setup itself: the shared data folder comes from GPT2_TEST_DATA, and in CI its absence fails."""
import os
import subprocess
import sys

from conftest import REPO

ONE_DATA_TEST = "tests/test_prepare_data.py::test_shakespeare_round_trip"


def run_pytest(tmp_path, **env):
    env = {**os.environ, "GPT2_TEST_DATA": str(tmp_path / "missing"), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ONE_DATA_TEST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_data_skips_locally_and_fails_in_ci(tmp_path):
    local = run_pytest(tmp_path, CI="")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
    assert "GPT2_TEST_DATA" in local.stdout
    ci = run_pytest(tmp_path, CI="true")
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout[-2000:]  # the fixture fails
    assert "CI=true" in ci.stdout
