"""Fixtures of the continual-learning tests: one torch thread (tiny ops), generated MNIST files, a quiet Trainer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.fakedata import write_fake_mnist


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the steps are tiny: one thread avoids oversubscribing the shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/mnist/*-ubyte.gz`` in the real IDX format (class-dependent blobs, learnable)."""
    return write_fake_mnist(tmp_path_factory.mktemp("fake_mnist"), n_train=600, n_test=200)


def make_trainer(root: Path | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar, logger or sanity check unless asked for."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "max_epochs": 100,
    }
    if root is not None:
        defaults["default_root_dir"] = str(root)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
