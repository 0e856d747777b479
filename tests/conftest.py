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
