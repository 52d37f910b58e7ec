"""Shared fixtures: seeded, CPU-only, offline, and quiet about the tiny preset's random init."""

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_cpu() -> None:
    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about the untrained tiny CLIP
