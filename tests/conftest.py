"""Shared fixtures: seeded, CPU-only, offline, one torch thread, quiet about the tiny init."""

import logging
import os

import pytest
import torch

# Tests run two at a time (pytest-xdist, one worker per core) beside the Flower processes the
# end-to-end tests start: more than one torch thread per process makes tiny convolutions crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests start
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_cpu() -> None:
    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about the untrained tiny CLIP


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests run on one xdist worker, one after another (see pyproject's addopts)."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("e2e"))
