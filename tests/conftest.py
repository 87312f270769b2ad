"""Test setup: the Triton interpreter on machines without CUDA, seeds, and the gpu marker.

TRITON_INTERPRET and GPT2_AUTOTUNE must be set before any kernel module is imported (triton.jit and
the autotuning candidates read them when the kernel is defined), so they are set here, at collection.
"""
import os
import pathlib
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# attention takes its default block sizes: tuning every (length, head dim, dtype) the tests meet would
# compile each kernel a dozen times over (tests check results, benchmarks/ times them)
os.environ.setdefault("GPT2_AUTOTUNE", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
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


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing (it sits beside the repository in CI)")
    return SHARED_DATA


def _poisoned(allocate):
    def allocate_poisoned(*args, **kwargs):
        out = allocate(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-1)
    return allocate_poisoned


@pytest.fixture
def poison(monkeypatch):
    """Every buffer a launcher allocates with torch.empty / empty_like starts as garbage (NaN), so an
    output element the kernel forgets to write fails the comparison."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
