"""Fixtures of the continual-learning tests: one torch thread (tiny ops), generated MNIST files, Adam factories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import OptimizerCallable

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


def adam(lr: float) -> OptimizerCallable:
    """An Adam factory as a Python caller writes it (a lambda: like the defaults, not saved in checkpoints).

    A ``functools.partial`` would be saved in ``hyper_parameters`` and make ``fit(ckpt_path=...)`` fail to load
    the checkpoint with ``weights_only=True``; the DDP tests, whose module is pickled, use one without resuming.
    """
    return lambda params: torch.optim.Adam(params, lr=lr)


def optimizers(lr: float) -> dict[str, OptimizerCallable]:
    """``hnet_optimizer`` and ``emb_optimizer``: Adam with the same learning rate (the old single ``lr``)."""
    return {"hnet_optimizer": adam(lr), "emb_optimizer": adam(lr)}
