"""The 1-D continual regression toy: the three polynomials, seeded noise, schedule."""

from __future__ import annotations

import pytest
import torch

from datamodules.regression1d import Regression1DDataModule


def test_tasks_functions_domains_and_noise() -> None:
    dm = Regression1DDataModule(num_train=2000, num_test=50, noise_std=0.05)
    fns = [lambda x: x + 3, lambda x: 2 * x**2 - 1, lambda x: (x - 3) ** 3]
    domains = [(-4, -2), (-1, 1), (2, 4)]
    for t, (fn, (lo, hi)) in enumerate(zip(fns, domains)):
        x, y = dm.data["train"][t]
        assert x.shape == (2000, 1) and bool((x >= lo).all() and (x <= hi).all())
        assert float((y - fn(x)).std()) == pytest.approx(0.05, rel=0.1)  # training targets are noisy
        xt, yt = dm.data["test"][t]
        torch.testing.assert_close(xt.squeeze(1), torch.linspace(lo, hi, 50))
        torch.testing.assert_close(yt, fn(xt))  # test targets are noise-free


def test_seeded_and_batches_carry_task() -> None:
    a, b = Regression1DDataModule(data_seed=1), Regression1DDataModule(data_seed=1)
    assert torch.equal(a.data["train"][1][1], b.data["train"][1][1])
    assert not torch.equal(a.data["train"][1][1], Regression1DDataModule(data_seed=2).data["train"][1][1])
    loader = a.train_dataloader()
    loader.sampler.set_epoch(2)
    batch = next(iter(loader))
    assert batch["task"] == 2 and batch["x"].shape == (32, 1) and batch["y"].shape == (32, 1)
    assert len(a.val_dataloader()) == 3  # no validation split: Lightning's validation measures the test points
    assert a.task_type == "regression"
    with pytest.raises(ValueError, match="3 tasks"):
        Regression1DDataModule(num_tasks=4)
