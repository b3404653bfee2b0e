"""Shared fixtures: tiny GPT-2 models and the optional `../shared` data folder."""

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# Tiny models gain nothing from several threads, and OpenMP threads that compete with another
# process for 2 cores (the METEOR JVM, a CLI subprocess) slow a step down 20-fold.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def no_wandb_by_default(monkeypatch):
    """CI exports WANDB_MODE=offline for its smoke run; tests opt in to W&B explicitly."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def shared_dir() -> Path:
    """`../shared` beside the project root; the test is skipped where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
