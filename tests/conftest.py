"""Shared test set-up: deterministic CPU runs, a small thread count, headless plots."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import lightning  # noqa: F401  (its console log handler binds the session's stderr, not one test's capture)
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny convs (faster without OpenMP contention on shared cores).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
