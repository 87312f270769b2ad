"""Test setup: the Triton interpreter on machines without CUDA, seeds, the gpu marker, the shared data.

TRITON_INTERPRET and GPT2_AUTOTUNE must be set before any kernel module is imported (triton.jit and
the autotuning candidates read them when the kernel is defined), so they are set here, at collection.

The offline data (tiktoken's GPT-2 files, tinyshakespeare, HellaSwag, a FineWeb-Edu sample) comes from
$GPT2_TEST_DATA, by default ../shared/data beside the repository. Tests that need it skip where it is
missing, except in CI (CI=true), where a missing folder fails them: a CI run must not pass by skipping.
"""
import os
import pathlib
import random
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# attention takes its default block sizes: tuning every (length, head dim, dtype) the tests meet would
# compile each kernel a dozen times over (tests check results, benchmarks/ times them)
os.environ.setdefault("GPT2_AUTOTUNE", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("GPT2_TEST_DATA") or REPO.parent / "shared" / "data").resolve()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernels run: the GPU when there is one, else CPU tensors in the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


SENTINEL = 1234.0


def guarded_empty_like(bands: list, guard: int):
    """A torch.empty_like whose tensor is the front of a larger buffer: the guard elements past its end hold
    SENTINEL, and each guard band is appended to bands. A store past the end lands there and shows, instead
    of corrupting the heap."""
    def empty_like(t, *, dtype=None, **kwargs):
        buffer = torch.full((t.numel() + guard,), SENTINEL, dtype=dtype or t.dtype, device=t.device)
        bands.append(buffer[t.numel():])
        return buffer[:t.numel()].view(t.shape)
    return empty_like


def need_shared_file(path: pathlib.Path) -> pathlib.Path:
    """path (inside the shared data folder) if it exists; else a skip, or in CI a failure."""
    if not path.exists():
        message = f"{path} is missing: set GPT2_TEST_DATA to the shared data folder (default ../shared/data)"
        if IN_CI:
            pytest.fail(message + " -- CI=true, so this fails instead of skipping")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data():
    return need_shared_file(SHARED_DATA)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A data folder of tinyshakespeare's first tokens (the shipped ones): 1,000 val tokens, so that a
    whole-split evaluation takes a moment, and 20,000 train tokens."""
    from gpt2 import shards

    folder = tmp_path_factory.mktemp("small_shakespeare")
    tokens = shards.shipped_shakespeare_tokens()
    shards.save_shard(folder / "small_val_000000.npy", tokens[:1000])
    shards.save_shard(folder / "small_train_000001.npy", tokens[1000:21000])
    return folder


def need_package(name: str):
    """The imported package; where it is missing a skip, or in CI (which installs .[dev]) a failure."""
    try:
        return __import__(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{name} is missing: CI installs it with .[dev]")
        pytest.skip(f"{name} is not installed (pip install {name})")


# imported by every subprocess started with offline_env(): no socket reaches anything
_NO_NETWORK = """
import socket

def _offline(*args, **kwargs):
    raise OSError("network blocked by the test (sitecustomize)")

socket.socket.connect = socket.socket.connect_ex = _offline
socket.create_connection = socket.getaddrinfo = _offline
"""


@pytest.fixture
def offline_env(tmp_path_factory):
    """Environment for a subprocess with no network at all and no GPT-2 BPE files (an empty tiktoken cache)."""
    site = tmp_path_factory.mktemp("no_network")
    (site / "sitecustomize.py").write_text(_NO_NETWORK)
    empty = tmp_path_factory.mktemp("empty_tiktoken_cache")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
            "TIKTOKEN_CACHE_DIR": str(empty), "HELLASWAG_CACHE": str(empty), "HF_HUB_OFFLINE": "1"}


def _poisoned(allocate):
    def allocate_poisoned(*args, **kwargs):
        out = allocate(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)
    return allocate_poisoned


@pytest.fixture
def poison(monkeypatch):
    """Every buffer a launcher allocates with torch.empty / empty_like / empty_strided starts as garbage
    (NaN), so an output element the kernel forgets to write fails the comparison."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch, "empty_strided", _poisoned(torch.empty_strided))


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits as one until its new parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
