"""Optimizer factories: fused kernels when the user chose none, the same numbers, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlit.optim import build_optimizer, build_scheduler, check_factories, step_scheduler


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=gen)), nn.Parameter(torch.randn(3, generator=gen))]


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
)
def test_unset_implementation_becomes_fused_with_the_same_trajectory(factory) -> None:
    fused_params, plain_params = _params(), _params()
    fused = build_optimizer(factory, fused_params, "phi_optimizer")
    plain = factory(plain_params)
    assert fused.defaults["fused"] is True and plain.defaults["fused"] is None
    assert type(fused) is type(plain)
    for key in ("lr", "weight_decay"):
        assert fused.param_groups[0][key] == plain.param_groups[0][key]
    for step in range(5):
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_options_survive_and_an_explicit_choice_is_kept() -> None:
    p1, p2 = _params()
    opt = build_optimizer(
        lambda p: torch.optim.Adam(p, lr=1e-3), [{"params": [p1]}, {"params": [p2], "lr": 0.5}], "hyper_optimizer"
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.5] and opt.defaults["fused"] is True
    chosen = build_optimizer(lambda p: torch.optim.Adam(p, foreach=True), _params(), "x")
    assert chosen.defaults["foreach"] is True and chosen.defaults["fused"] is None
    unfused = build_optimizer(lambda p: torch.optim.Adam(p), _params(), "x", fuse=False)
    assert unfused.defaults["fused"] is None


def test_bad_factories_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"phi_optimizer must build a torch\.optim\.Optimizer"):
        build_optimizer(lambda p: nn.Linear(2, 2), _params(), "phi_optimizer")
    with pytest.raises(ValueError, match="learning rate"):  # torch's own check, at construction
        build_optimizer(lambda p: torch.optim.Adam(p, lr=-1.0), _params(), "phi_optimizer")
    opt = torch.optim.SGD(_params(), lr=0.1)
    with pytest.raises(TypeError, match="phi_lr_scheduler must build"):
        build_scheduler(lambda o: o, opt, "phi_lr_scheduler")
    assert build_scheduler(None, opt, "phi_lr_scheduler") is None


def test_plateau_schedule_follows_its_monitor() -> None:
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = build_scheduler(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0), opt, "s")
    step_scheduler(sched, {"val/loss": torch.tensor(1.0)}, "val/loss")
    step_scheduler(sched, {"val/loss": torch.tensor(2.0)}, "val/loss")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(KeyError, match="val/loss"):
        step_scheduler(sched, {}, "val/loss")
    step = build_scheduler(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5), opt, "s")
    step_scheduler(step, {}, "val/loss")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_factories_are_checked_at_construction() -> None:
    check_factories(phi_optimizer=torch.optim.SGD, phi_lr_scheduler=None)
    with pytest.raises(TypeError, match=r"phi_optimizer must be a callable params -> torch\.optim\.Optimizer"):
        check_factories(phi_optimizer="sgd")
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        check_factories(optimizer=None)  # only schedules may be None
    with pytest.raises(TypeError, match="lr_scheduler must be a callable optimizer -> scheduler"):
        check_factories(lr_scheduler=3)
