"""A user-defined ObjectiveSet: two conflicting regression targets (relaxed MSE for training, hard MAE for
evaluation) trained with PHN-LS and PHN-EPO, checkpointed, predicted at several rays, and given on the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.pareto import ParetoBaselineModule, ParetoHyperNetModule
from hyperlit.pareto.objectives import ObjectiveSet, resolve_objectives

ROOT = Path(__file__).resolve().parents[2]


class TwoTargets(ObjectiveSet):
    """One scalar output, two targets: batches ``(x, t)`` with t (B, 2); outputs (K, B, 1)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.names = ("mse_a", "mse_b")

    @property
    def num_statistics(self) -> int:
        return 5  # Σ squared errors (2), Σ absolute errors (2), n

    def eval_names(self, hard: bool = True) -> tuple[str, ...]:
        return ("mae_a", "mae_b") if hard else self.names

    def check_batch(self, batch: Sequence[Any]) -> None:
        if batch[1].dim() != 2 or batch[1].shape[-1] != 2:
            raise ValueError(f"TwoTargets needs targets (B, 2), got {tuple(batch[1].shape)}")

    def losses(self, outputs: Tensor, batch: Sequence[Any]) -> Tensor:
        err = outputs.squeeze(-1)[..., None] - batch[1]  # (K, B, 2)
        return self.scale * (err**2).mean(-2)

    def statistics(self, outputs: Tensor, batch: Sequence[Any]) -> Tensor:
        err = outputs.detach().double().squeeze(-1)[..., None] - batch[1].double()
        n = torch.full_like(err[:, 0, :1], float(err.shape[1]))
        return torch.cat([self.scale * (err**2).sum(1), err.abs().sum(1), n], dim=-1)

    def from_statistics(self, stats: Tensor, hard: bool = True) -> Tensor:
        return (stats[:, 2:4] if hard else stats[:, :2]) / stats[:, 4:].clamp_min(1)

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs.squeeze(-1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    t = torch.stack([x[:, 0] + 0.5, -x[:, 0] + 0.1 * x[:, 1]], dim=-1) * 0.5  # conflicting targets
    return DataLoader(TensorDataset(x, t), batch_size=32)


def _phn(solver: str, **kwargs: Any) -> ParetoHyperNetModule:
    return ParetoHyperNetModule(
        objectives=TwoTargets(),
        solver=solver,
        in_dim=4,
        target_hidden=(16,),
        hnet_hidden=(16,),
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
        ref_point=(3.0, 3.0),
        num_test_rays=9,
        **kwargs,
    )


@pytest.mark.parametrize("solver", ["ls", "epo"])
def test_custom_objectives_train_to_a_finite_front(solver: str, tmp_path: Path, make_trainer) -> None:
    dl = _loader()
    model = _phn(solver)
    before = model.evaluate(dl)
    trainer = make_trainer(max_epochs=4)
    trainer.fit(model, dl, dl)
    front = model.last_front
    assert front is not None and front.names == ("mae_a", "mae_b") and front.losses.shape == (9, 2)
    assert 0 < front.hv < 9 and torch.isfinite(front.losses).all()
    assert front.hv > before.hv  # training moved the front towards the origin
    logged = trainer.callback_metrics
    assert float(logged["val/hv"]) == pytest.approx(front.hv, abs=1e-6) and "val/mae_a_mean" in logged
    if solver == "epo":
        assert int(model.epo_solves) == int(model.ray_step) == 16

    # checkpoint round trip: the set is given again (an instance is not a weights-only hyperparameter)
    path = tmp_path / "phn.ckpt"
    trainer.save_checkpoint(path)
    loaded = ParetoHyperNetModule.load_from_checkpoint(path, objectives=TwoTargets())
    assert isinstance(loaded.objective_set, TwoTargets)
    assert loaded.evaluate(dl).hv == pytest.approx(model.evaluate(dl).hv, abs=1e-9)
    with pytest.raises(
        TypeError, match=r"trained with the objective set tests\.pareto\.test_custom_objectives\.TwoTargets "
    ):
        ParetoHyperNetModule.load_from_checkpoint(path)  # forgotten: named, not a silent default
    with pytest.raises(CheckpointMismatchError, match="objectives: checkpoint"):
        ParetoHyperNetModule.load_from_checkpoint(path, objectives=["bce", "fpr_gap"], ref_point=(3.0, 3.0))

    # predictions at several rays: (R, B)
    model.predict_rays = [[0.9, 0.1], [0.1, 0.9]]
    out = ParetoHyperNetModule.gather_predictions(make_trainer().predict(model, dl))  # type: ignore[arg-type]
    assert out["rays"].shape == (2, 2) and out["predictions"].shape == (2, 128)
    x = dl.dataset.tensors[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        torch.testing.assert_close(out["predictions"][1], model.network_for_ray([0.1, 0.9])(x).squeeze(-1))


def test_custom_objectives_with_the_baselines(make_trainer) -> None:
    dl = _loader()
    base = ParetoBaselineModule(
        objectives=TwoTargets(), in_dim=4, target_hidden=(8,), rays=[[0.7, 0.3], [0.3, 0.7]], ref_point=(3.0, 3.0)
    )
    make_trainer(max_epochs=1).fit(base, dl, dl)
    assert base.last_front is not None and base.last_front.hv > 0
    out = make_trainer().predict(base, dl)
    assert out[0]["rays"].shape == (2, 2) and out[0]["predictions"].shape == (2, 32)  # type: ignore[index]


def test_bad_objective_sets_are_named() -> None:
    class OneName(TwoTargets):
        def __init__(self) -> None:
            self.names = ("mse",)

    class BadEvalNames(TwoTargets):
        def eval_names(self, hard: bool = True) -> tuple[str, ...]:
            return ("mae", "mae")

    class WrongShape(TwoTargets):
        def losses(self, outputs: Tensor, batch: Sequence[Any]) -> Tensor:
            return super().losses(outputs, batch).sum(-1)

    with pytest.raises(ValueError, match=r"OneName\.names must be >= 2 distinct strings .*got \['mse'\]"):
        ParetoHyperNetModule(objectives=OneName(), in_dim=4)
    with pytest.raises(ValueError, match=r"BadEvalNames\.eval_names\(hard=True\) must give 2 distinct names"):
        ParetoHyperNetModule(objectives=BadEvalNames(), in_dim=4)
    with pytest.raises(TypeError, match="got the string 'bce'"):
        resolve_objectives("bce")
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        type("Partial", (ObjectiveSet,), {"names": ("a", "b")})()
    assert isinstance(resolve_objectives(TwoTargets), TwoTargets)  # a class: built without arguments
    model = ParetoHyperNetModule(objectives=WrongShape(), in_dim=4, solver="ls", ref_point=(3.0, 3.0))
    x, t = next(iter(_loader()))
    model._trainer = None
    with pytest.raises(ValueError, match=r"WrongShape\.losses returned shape \(1,\); it must be \(K, m\) = \(1, 2\)"):
        model._check_step((x, t), 0, model.objective_set.losses(torch.zeros(1, 32, 1), (x, t)), torch.ones(1, 2) / 2)


def test_cli_takes_an_objective_set_by_class_path(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from hyperlit.cli import main

    spec = "{class_path: tests.pareto.test_custom_objectives.TwoTargets, init_args: {scale: 2.0}}"
    args = ["fit", "--config", str(ROOT / "examples" / "phn_adult.yaml"), "--model.objectives", spec]
    with pytest.raises(SystemExit):
        main([*args, "--model.ref_point", "[3, 3]", "--print_config"])
    objectives = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["objectives"]
    assert objectives == {"class_path": "tests.pareto.test_custom_objectives.TwoTargets", "init_args": {"scale": 2.0}}
    with pytest.raises(SystemExit):  # names still parse
        main(["fit", "--config", str(ROOT / "examples" / "phn_adult.yaml"), "--print_config"])
    names = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["objectives"]
    assert list(names) == ["bce", "fpr_gap", "fnr_gap"]
