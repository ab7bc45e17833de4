"""Fixtures shared by the test files: a private tiny-Shakespeare data root and single-threaded torch."""

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A private data root holding a copy of tiny Shakespeare (tokenized on first use)."""
    for src in (REPO / "data" / "tinyshakespeare" / "input.txt",
                REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if src.is_file():
            root = tmp_path_factory.mktemp("data")
            (root / "tinyshakespeare").mkdir()
            shutil.copy(src, root / "tinyshakespeare" / "input.txt")
            return root
    pytest.skip("tiny Shakespeare input.txt not found")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads make
    them many times slower; in-process runs then also match subprocesses started with OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
