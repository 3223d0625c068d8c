"""Test setup: Triton runs in interpreter mode on CPU (set before any @triton.jit runs) unless
MMEA_TEST_CUDA=1 (the GPU run: kernels on CUDA tensors, see helpers.TRITON_DEVICES and the
``device`` fixture), under pytest-xdist each worker takes its share of the cores
(intra-op threads), every test starts from its own fixed random state (``seeded``; MMEA_TEST_SEED
shifts all of them, to sweep), the rMD17 data directory is found from MMEA_RMD17_DIR or
../shared/data/rmd17, and the fixtures several test files use: ``one_thread`` (per module), and ``keep_default_dtype``
(every test). The helpers (references, TOL, builders) are in helpers.py."""
import os
import pathlib
import random
import zlib

import pytest

if os.environ.get("MMEA_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import REPO, TRITON_DEVICES  # noqa: E402 - after TRITON_INTERPRET is settled

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` runs pytest-xdist workers
    import torch

    # the cores shared among the workers: OpenMP with more threads than cores on a busy machine
    # can be an order of magnitude slower (tests that need 2 threads set them themselves)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def rmd17_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MMEA_RMD17_DIR", REPO.parent / "shared" / "data" / "rmd17"))


@pytest.fixture
def rmd17():
    path = rmd17_dir()
    if not (path / "ethanol" / "train.xyz").is_file():
        pytest.skip(f"rMD17 data not found at {path} (set MMEA_RMD17_DIR to its location)")
    return path



@pytest.fixture(params=TRITON_DEVICES)
def device(request):
    """The device of a kernel test: "cpu" (Triton through the interpreter) and "cuda" where a GPU
    exists; each is skipped with the reason where it cannot run."""
    import torch

    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its models are small, and OpenMP with 2 threads on a busy 2-core machine can be an order of
    magnitude slower (seen: 1 s -> 35 s for one MACE build)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def keep_default_dtype():
    """No test may leak a changed default dtype (mace-torch's builds and conversions set it): one that
    leaked from the ML-IAP export made a later test build its model in float64 (every test, since)."""
    import torch

    prev = torch.get_default_dtype()
    yield
    now = torch.get_default_dtype()
    torch.set_default_dtype(prev)
    assert now == prev, f"default dtype leaked: {now} (was {prev})"


@pytest.fixture(autouse=True)
def seeded(request):
    """Each test draws from torch's, numpy's and Python's global generators from a state fixed by its
    own name (and MMEA_TEST_SEED, default 0), not by which tests happened to run before it in the
    same worker: a tolerance that held for one draw and not another made CI fail on a test that
    passed here. Sweep with MMEA_TEST_SEED=1, 2, ... to find such tests."""
    import numpy as np
    import torch

    seed = (zlib.crc32(request.node.nodeid.encode()) + 7919 * int(os.environ.get("MMEA_TEST_SEED", "0"))) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
