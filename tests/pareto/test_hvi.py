"""PHN-HVI (Hoang et al., AAAI 2023): HV weights, the solver's loss, stratified/rescaled rays, the module's step,
and the toy problem's front."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.nn import HyperNetwork
from hyperlit.pareto import ParetoHyperNetModule
from hyperlit.pareto.metrics import evaluation_rays, hypervolume, ray_scales, stratified_rays
from hyperlit.pareto.objectives import toy_objectives
from hyperlit.pareto.solvers import HVISolver, SolverOutput, hv_weights

FRONT4 = np.array([[0.6, 0.2], [0.1, 0.9], [0.3, 0.5], [0.8, 0.1]])


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_hv_weights_closed_form_with_the_dynamic_reference() -> None:
    # ref (0.5, 0.5) lies inside the losses' range: the dynamic reference is 1.1·max = (0.88, 0.99)
    r1, r2 = 1.1 * 0.8, 1.1 * 0.9
    expected = np.array([[0.5 - 0.2, 0.8 - 0.6], [r2 - 0.9, 0.3 - 0.1], [0.9 - 0.5, 0.6 - 0.3], [0.2 - 0.1, r1 - 0.8]])
    np.testing.assert_allclose(hv_weights(FRONT4, (0.5, 0.5)), _unit(expected), atol=1e-12)
    # a reference beyond the losses is kept
    big = np.array([[0.5 - 0.2, 0.8 - 0.6], [2 - 0.9, 0.3 - 0.1], [0.9 - 0.5, 0.6 - 0.3], [0.2 - 0.1, 2 - 0.8]])
    np.testing.assert_allclose(hv_weights(torch.tensor(FRONT4), (2.0, 2.0)), _unit(big), atol=1e-12)


def test_hv_weights_per_front_unit_norm_and_duplicates() -> None:
    losses = np.vstack([FRONT4, [[0.7, 0.6], [0.9, 0.3], [0.9, 0.3]]])  # a second front, with a duplicate
    w = hv_weights(losses, (1.0, 1.0))  # dynamic reference max(1, 1.1·0.9) = 1 in both objectives
    np.testing.assert_allclose(w[:4], hv_weights(FRONT4, (1.0, 1.0)), atol=1e-12)
    # the second front {(0.7, 0.6), (0.9, 0.3) twice} on its own: (ref₂ − 0.6, 0.9 − 0.7)
    np.testing.assert_allclose(w[4], _unit(np.array([[1 - 0.6, 0.9 - 0.7]]))[0], atol=1e-12)
    assert (w[5:] == 0).all()  # duplicates: one-sided derivatives, zero stays zero
    assert (w >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(w[:5], axis=1), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        hv_weights(np.array([[0.1, np.inf]]), (1.0, 1.0))
    with pytest.raises(ValueError, match="must have 2 entries"):
        hv_weights(FRONT4, (1.0, 1.0, 1.0))


def _cos_grad(ell: Tensor, r: Tensor) -> Tensor:
    """∂cos(ℓ, r)/∂ℓ = r/(‖ℓ‖‖r‖) − cos·ℓ/‖ℓ‖²."""
    cos = (ell * r).sum(-1, keepdim=True) / (ell.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True))
    return (
        r / (ell.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True))
        - cos * ell / ell.norm(dim=-1, keepdim=True) ** 2
    )


@pytest.mark.parametrize("weighting", ["intended", "as_coded"])
def test_solver_loss_and_gradient(weighting: str) -> None:
    losses = torch.tensor(FRONT4, dtype=torch.float64, requires_grad=True)
    rays = torch.tensor([[0.3, 0.7], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    out = HVISolver((1.0, 1.0), penalty=3.0, weighting=weighting)(losses, rays)  # type: ignore[arg-type]
    w = torch.as_tensor(hv_weights(FRONT4, (1.0, 1.0)))
    torch.testing.assert_close(out.weights, w)
    cos = torch.nn.functional.cosine_similarity(losses.detach(), rays, dim=-1)
    if weighting == "intended":
        hv_term, dhv = (w * losses.detach()).sum(-1).mean(), w / 4
    else:  # (Σ_j w_kj)(Σ_j ℓ_kj)/m: every objective of ray k gets the same weight Σ_j w_kj / m
        hv_term = (w.sum(-1) * losses.detach().sum(-1)).mean() / 2
        dhv = w.sum(-1, keepdim=True).expand(4, 2) / (2 * 4)
    torch.testing.assert_close(out.loss.detach(), hv_term - 3.0 * cos.mean())
    (grad,) = torch.autograd.grad(out.loss, losses)
    torch.testing.assert_close(grad, dhv - 3.0 * _cos_grad(losses.detach(), rays) / 4)
    assert _cos_grad(losses.detach(), rays).abs().sum() > 0.1  # the cosine term has a gradient of its own


def test_solver_weight_losses_cosine_only_and_bad_settings() -> None:
    losses = torch.tensor(FRONT4, dtype=torch.float32, requires_grad=True)
    rays = torch.full((4, 2), 0.5)
    other = torch.tensor([[0.2, 0.7], [0.4, 0.4], [0.7, 0.15], [0.5, 0.6]])  # e.g. the rank mean under DDP
    out = HVISolver((1.0, 1.0))(losses, rays, weight_losses=other)
    expected = torch.as_tensor(hv_weights(other, (1.0, 1.0)), dtype=torch.float32)
    torch.testing.assert_close(out.weights, expected)
    assert not torch.allclose(expected, torch.as_tensor(hv_weights(FRONT4, (1.0, 1.0)), dtype=torch.float32))
    warm = HVISolver((1.0, 1.0), penalty=5.0)(losses, rays * 3, cosine_only=True)  # the cosine ignores the scale
    cos = torch.nn.functional.cosine_similarity(losses.detach(), rays, dim=-1).mean()
    torch.testing.assert_close(warm.loss.detach(), -cos)
    with pytest.raises(ValueError, match="hvi_penalty must be >= 0"):
        HVISolver((1.0, 1.0), penalty=-1.0)
    with pytest.raises(ValueError, match="hvi_weighting must be"):
        HVISolver((1.0, 1.0), weighting="outer")  # type: ignore[arg-type]


def test_stratified_rays_and_ray_scales() -> None:
    rays = stratified_rays(16, seed=3, step=5)
    assert rays.shape == (16, 2)
    torch.testing.assert_close(rays.sum(1), torch.ones(16))
    theta = torch.atan2(rays[:, 1], rays[:, 0]).double()  # (cos θ, sin θ)/sum keeps the angle
    delta = (math.pi / 2 - 0.2) / 16
    bins = torch.floor((theta - 0.1) / delta)
    assert torch.equal(bins, torch.arange(16, dtype=torch.float64))  # one ray per angle bin, in order
    assert torch.equal(rays, stratified_rays(16, seed=3, step=5))
    assert not torch.equal(rays, stratified_rays(16, seed=3, step=6))
    with pytest.raises(ValueError, match="rays per step"):
        stratified_rays(0, 0, 0)
    scales = ray_scales(4000, seed=3, step=5)
    assert torch.equal(scales, ray_scales(4000, seed=3, step=5)) and (scales > 0).all()
    # randint(1, 5)·|N(1, 0.2)|: mean 2.5·E|N(1, 0.2)| ≈ 2.5
    assert 2.4 < float(scales.mean()) < 2.6 and float(scales.max()) < 4 * 2.2


# -- the module ----------------------------------------------------------------------------------------------


class _TwoTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.heads = nn.Linear(8, 2 * 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(torch.tanh(self.body(x))).view(x.shape[0], 2, 3)


class _RecordingHVI(ParetoHyperNetModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict[str, Tensor]] = []

    def hypernet_rays(self, rays: Tensor) -> Tensor:
        fed = super().hypernet_rays(rays)
        self.seen.append({"rays": rays.clone(), "fed": fed.clone(), "epoch": torch.tensor(self.current_epoch)})
        return fed

    def _apply_step(self, out: SolverOutput, losses: Tensor, batch_size: int) -> None:
        self.seen[-1].update(weights=out.weights.clone(), loss=out.loss.detach().clone(), losses=losses.detach())
        super()._apply_step(out, losses, batch_size)


def _multitask(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    t0 = torch.bucketize(x[:, 0] + x[:, 1], torch.tensor([-0.5, 0.5]))
    t1 = torch.bucketize(x[:, 2] - x[:, 3], torch.tensor([-0.5, 0.5]))
    return TensorDataset(x, torch.stack([t0, t1], dim=1))


def test_module_hvi_steps_move_phi_and_lower_the_losses(tmp_path: Path, make_trainer) -> None:
    torch.manual_seed(0)
    model = _RecordingHVI(
        objectives=("ce_0", "ce_1"),
        target=_TwoTaskNet(),
        solver="hvi",
        rays_per_step=4,
        ray_sampling="stratified",
        ray_scale=True,
        hvi_warmup_epochs=1,
        hnet_hidden=(16,),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        eval_metric="relaxed",
        ref_point=(2.0, 2.0),
        seed=4,
    )
    data = DataLoader(_multitask(), batch_size=16)
    before = model.evaluate(data)
    phi = [p.detach().clone() for p in model.hnet.parameters()]  # type: ignore[union-attr]
    trainer = make_trainer(max_epochs=3, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data)
    after = model.evaluate(data)
    assert int(model.ray_step) == 12 and len(model.seen) == 12
    assert any(not torch.equal(p, q) for p, q in zip(phi, model.hnet.parameters()))  # type: ignore[union-attr]
    assert sum(after.means) < sum(before.means) - 0.05 and after.hv > before.hv
    for step in model.seen:
        w, rays, losses = step["weights"], step["rays"], step["losses"]
        assert (w >= 0).all() and torch.allclose(w.norm(dim=1), torch.ones(4), atol=1e-6)
        torch.testing.assert_close(w, torch.as_tensor(hv_weights(losses, (2.0, 2.0)), dtype=w.dtype))
        scale = step["fed"] / rays  # the hypernet got rescaled rays, one factor per ray
        torch.testing.assert_close(scale[:, 0], scale[:, 1])
        cos = torch.nn.functional.cosine_similarity(losses, rays, dim=-1).mean()
        if int(step["epoch"]) == 0:  # warm-up: the cosine only
            torch.testing.assert_close(step["loss"], -cos)
        else:
            torch.testing.assert_close(step["loss"], (w * losses).sum(-1).mean() - 5.0 * cos)
    assert not torch.allclose(model.seen[0]["fed"], model.seen[0]["rays"])

    path = tmp_path / "hvi.ckpt"
    trainer.save_checkpoint(path)
    loaded = _RecordingHVI.load_from_checkpoint(path, target=_TwoTaskNet())
    assert int(loaded.ray_step) == 12 and loaded.solver.name == "hvi"
    assert loaded.hparams["ray_sampling"] == "stratified" and loaded.hparams["hvi_warmup_epochs"] == 1
    torch.testing.assert_close(loaded.training_rays(), model.training_rays())


def test_module_hvi_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs m = 2 objectives"):
        ParetoHyperNetModule(in_dim=4, ray_sampling="stratified")  # three fairness objectives
    with pytest.raises(ValueError, match="ray_sampling must be"):
        ParetoHyperNetModule(in_dim=4, ray_sampling="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs solver='hvi'"):
        ParetoHyperNetModule(in_dim=4, solver="epo", hvi_warmup_epochs=1)
    with pytest.raises(ValueError, match="hvi_weighting must be"):
        ParetoHyperNetModule(in_dim=4, solver="hvi", hvi_weighting="outer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hvi_penalty must be >= 0"):
        ParetoHyperNetModule(in_dim=4, solver="hvi", hvi_penalty=-1.0)
    with pytest.raises(ValueError, match="hvi_warmup_epochs must be >= 0"):
        ParetoHyperNetModule(in_dim=4, solver="hvi", hvi_warmup_epochs=-1)
    model = ParetoHyperNetModule(in_dim=4, solver="hvi", rays_per_step=3, ray_scale=False)
    assert model.solver.name == "hvi" and torch.equal(model.hypernet_rays(model.training_rays()), model.training_rays())


# -- the toy problem: HVI with K rays reaches the front's hypervolume ------------------------------------------

D = 10
_T = torch.linspace(-1, 1, 40001)
FRONT = torch.stack([1 - torch.exp(-((1 - _T) ** 2)), 1 - torch.exp(-((1 + _T) ** 2))], -1)


def test_hvi_toy_front_hypervolume() -> None:
    """300 steps, K = 8 stratified rays, λ = 5: the 25 test rays' front has the hypervolume (ref (1, 1)) of the 25
    points where the rays meet the true front (HVI's cosine aims at ℓ ∝ r) within 1 %, and ≥ 93 % of the whole
    true front's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        hnet = HyperNetwork({"theta": (D,)}, cond_dim=2, hidden=(100, 100))
        opt = torch.optim.Adam(hnet.parameters(), lr=5e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
        solver = HVISolver((1.0, 1.0), penalty=5.0)
        for step in range(300):
            rays = stratified_rays(8, seed=0, step=step)
            out = solver(toy_objectives(hnet.flat(rays)), rays)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sched.step()
        rays = evaluation_rays(2, n=25)
        with torch.no_grad():
            losses = toy_objectives(hnet.flat(rays))
    finally:
        torch.set_num_threads(threads)
    on_rays = FRONT[torch.nn.functional.cosine_similarity(FRONT[None], rays[:, None], dim=-1).argmax(1)]
    hv, hv_rays, hv_front = (hypervolume(p, (1.0, 1.0)) for p in (losses, on_rays, FRONT))
    assert abs(hv - hv_rays) < 0.01 * hv_rays, (hv, hv_rays)
    assert hv > 0.93 * hv_front, (hv, hv_front)
    assert torch.cdist(losses, FRONT).min(1).values.max() < 0.01  # on the front
