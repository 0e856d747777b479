"""Shared fixtures: the real-data directory (skip when absent) and a CPU-friendly torch setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``$HYPERLIT_DATA_DIR`` (the shared real data); tests using it are skipped when it is unset."""
    path = os.environ.get("HYPERLIT_DATA_DIR")
    if not path:
        pytest.skip("HYPERLIT_DATA_DIR is not set: real-data test skipped")
    if not Path(path).is_dir():
        pytest.skip(f"HYPERLIT_DATA_DIR={path} is not a directory")
    return Path(path)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def make_trainer(tmp_path: Path):
    """A factory of CPU Trainers for tests: no logger, checkpoints, progress bar, summary or sanity check.

    ``make_trainer(max_epochs=2, logger=True)``: keyword arguments override the defaults; ``default_root_dir`` is the
    test's ``tmp_path``.
    """
    import lightning.pytorch as pl

    def build(**overrides: object) -> pl.Trainer:
        kwargs: dict[str, object] = dict(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)  # type: ignore[arg-type]

    return build
