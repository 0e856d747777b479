"""Bad batches fail at the first step with a message that says what to fix: fairness labels/groups outside {0, 1},
NaN/inf input features, non-finite losses (``nan_policy="raise"`` or ``"skip"``, the ranks agreeing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.pareto import FrontStatistics, ParetoBaselineModule, ParetoHyperNetModule
from hyperlit.pareto.metrics import evaluation_rays
from hyperlit.pareto.objectives import FairnessObjectives

MODULES = [ParetoHyperNetModule, ParetoBaselineModule]


def _fairness(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (torch.rand(n, generator=g) < 0.5).float(), torch.arange(n) % 2


def _loader(x: Tensor, y: Tensor, group: Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y, group), batch_size=batch_size)


def _module(cls: type, **kwargs: Any) -> Any:
    kwargs.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=1e-3))
    if cls is ParetoBaselineModule:
        kwargs.setdefault("rays", [[0.5, 0.25, 0.25]])
    return cls(in_dim=4, target_hidden=(8,), **kwargs)


@pytest.mark.parametrize("cls", MODULES)
def test_labels_or_groups_outside_0_1_fail_at_the_first_step(cls: type, make_trainer) -> None:
    x, y, group = _fairness()
    y[3] = 2.0
    model = _module(cls)
    with pytest.raises(ValueError, match=r"0/1 labels: batch\[1\] \(labels y\) has values \[2\.0\] — map the classes"):
        make_trainer(limit_val_batches=0).fit(model, _loader(x, y, group))
    assert model.trainer.global_step == 0
    y[3], group[5] = 1.0, 2
    with pytest.raises(ValueError, match=r"0/1 sensitive groups: batch\[2\] \(sensitive group\) has values \[2\]"):
        make_trainer(limit_val_batches=0).fit(_module(cls), _loader(x, y, group))
    # validation batches are checked too
    with pytest.raises(ValueError, match=r"batch\[2\] \(sensitive group\) has values \[2\] — the FPR/FNR gaps"):
        make_trainer(limit_train_batches=0).validate(_module(cls), _loader(x, y, group), verbose=False)


@pytest.mark.parametrize("cls", MODULES)
def test_non_finite_inputs_raise_at_that_step(cls: type, make_trainer) -> None:
    x, y, group = _fairness()
    x[20, 1] = float("nan")  # in the second batch
    model = _module(cls)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite input features at training step 1 \(epoch 0, batch 1\): 1 NaN/inf of 64 values in "
        r"batch\[0\] of shape \(16, 4\) — clean or impute the data .*; pass nan_policy='skip'",
    ):
        make_trainer(limit_val_batches=0).fit(model, _loader(x, y, group))
    assert model.trainer.global_step == 1  # the first (clean) step ran
    with pytest.raises(FloatingPointError, match=r"non-finite input features in a validation batch: 1 NaN/inf"):
        make_trainer().validate(_module(cls), _loader(x, y, group), verbose=False)


def test_skip_policy_skips_the_bad_steps_on_every_rank(make_trainer) -> None:
    x, y, group = _fairness(n=64)
    x[20, 1] = float("inf")  # batch 1 of 4, every epoch
    model = _module(ParetoHyperNetModule, nan_policy="skip", solver="epo")
    clean_x, clean_y, clean_g = _fairness(n=32, seed=1)
    with pytest.warns(UserWarning, match=r"non-finite input features at training step .* step skipped"):
        make_trainer(max_epochs=2).fit(model, _loader(x, y, group), _loader(clean_x, clean_y, clean_g))
    assert model.skipped_steps == 2 and model.trainer.global_step == 6
    assert int(model.ray_step) == 8  # a skipped step still moves on to the next rays
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.last_front is not None and model.last_front.hv > 0
    # the count is checkpointed with the module's state
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    fresh = _module(ParetoHyperNetModule, nan_policy="skip", solver="epo")
    fresh.on_load_checkpoint(ckpt)
    assert fresh.skipped_steps == 2
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'skip', got 'ignore'"):
        _module(ParetoHyperNetModule, nan_policy="ignore")


class _Exploding(nn.Module):
    """A target whose outputs overflow: finite inputs, non-finite losses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * float("inf")


def test_non_finite_losses_raise_with_the_rays_and_values(make_trainer) -> None:
    x, y, group = _fairness()
    model = ParetoHyperNetModule(target=_Exploding(), solver="ls", hnet_hidden=(8,))
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite training losses \{'bce': \[.*\], 'fpr_gap': .*\} at training step 0 \(epoch 0, batch 0\), "
        r"rays \[\[.*\]\] — the network diverged: lower the learning rate or set gradient_clip_val",
    ):
        make_trainer(limit_val_batches=0).fit(model, _loader(x, y, group))


def test_ranks_agree_before_raising_or_skipping(make_trainer) -> None:
    """Another rank's bad step: this (clean) rank raises or skips too, so no rank waits in a collective."""
    x, y, group = _fairness()
    for policy in ("raise", "skip"):
        model = _module(ParetoHyperNetModule, nan_policy=policy)
        answers = iter([False, True] * 4)  # "not every rank is fine", then "every rank's batch passed check_batch"
        model.all_ranks = lambda flag, answers=answers: next(answers)  # type: ignore[method-assign]
        trainer = make_trainer(limit_val_batches=0, limit_train_batches=1)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="another rank had non-finite input features or training"):
                trainer.fit(model, _loader(x, y, group))
        else:
            with pytest.warns(UserWarning, match="another rank had non-finite .* step skipped"):
                trainer.fit(model, _loader(x, y, group))
            assert model.skipped_steps == 1 and trainer.global_step == 0
    model = _module(ParetoHyperNetModule)
    answers = iter([False, False])  # another rank's batch failed check_batch
    model.all_ranks = lambda flag: next(answers)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="another rank's training batch was refused by the objectives"):
        make_trainer(limit_val_batches=0, limit_train_batches=1).fit(model, _loader(x, y, group))


def test_front_with_non_finite_values_names_the_rays() -> None:
    objectives = FairnessObjectives()
    rays = evaluation_rays(3, n_partitions=4)
    metric = FrontStatistics(objectives, rays)
    x, y, group = _fairness()
    outputs = torch.randn(len(rays), 32)
    outputs[1, 0] = float("nan")
    metric.update(outputs, (x, y, group))
    with pytest.raises(FloatingPointError, match=r"non-finite evaluation values at 1 of 3 rays \(first: ray \[.*\], "):
        metric.compute()
