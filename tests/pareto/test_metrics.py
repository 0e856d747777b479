"""Hypervolume, uniformity and rays; the front of a whole split as a torchmetrics Metric (FrontStatistics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hyperlit.pareto.front_metric import FrontStatistics
from hyperlit.pareto.metrics import (
    circle_rays,
    das_dennis,
    evaluate_front,
    evaluation_rays,
    hypervolume,
    non_uniformity,
    sample_rays,
    uniformity,
    validate_ray,
)
from hyperlit.pareto.objectives import FairnessObjectives, MultiTaskObjectives


def _grid_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact HV by summing the cells of the grid spanned by all coordinates that some point dominates."""
    pts = points[(points < ref).all(1)]
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([pts[:, j], [ref[j]]])) for j in range(points.shape[1])]
    total = 0.0
    for idx in itertools.product(*[range(len(a) - 1) for a in axes]):
        lo = np.array([a[i] for a, i in zip(axes, idx)])
        hi = np.array([a[i + 1] for a, i in zip(axes, idx)])
        if (pts <= lo).all(1).any():
            total += float(np.prod(hi - lo))
    return total


def test_hypervolume_hand_values() -> None:
    assert hypervolume([[0, 1], [0.5, 0.5], [1, 0]], [2, 2]) == pytest.approx(3.25)
    assert hypervolume([[1, 0], [0, 1]], [2, 2]) == pytest.approx(3.0)
    # dominated and out-of-reference points add nothing
    assert hypervolume([[0, 1], [0.5, 0.5], [1, 0], [0.6, 0.6], [3, 0]], [2, 2]) == pytest.approx(3.25)
    assert hypervolume(np.zeros((0, 2)), [1, 1]) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        hypervolume([[np.nan, 1.0]], [2, 2])
    with pytest.raises(ValueError, match="reference point"):
        hypervolume([[0.0, 1.0]], [2, 2, 2])


def test_hypervolume_matches_independent_computations_on_random_3d_fronts() -> None:
    from pymoo.indicators.hv import HV

    rng = np.random.default_rng(0)
    for _ in range(10):
        pts = rng.uniform(0, 1.2, size=(int(rng.integers(3, 9)), 3))
        ref = np.array([1.0, 1.1, 1.2])
        ours = hypervolume(pts, ref)
        assert ours == pytest.approx(_grid_hypervolume(pts, ref), rel=1e-10)
        assert ours == pytest.approx(float(HV(ref_point=ref)(pts)), rel=1e-10)  # pymoo (wraps moocore)


def test_uniformity_is_one_exactly_on_the_inverse_ray() -> None:
    rays = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    on_ray = 0.7 / rays  # ℓ ∝ r⁻¹  ⇒  r⊙ℓ uniform
    assert uniformity(on_ray, rays) == 1.0
    assert torch.equal(non_uniformity(on_ray, rays), torch.zeros(3, dtype=torch.float64))
    off = on_ray * torch.tensor([1.0, 1.2, 0.9])
    lhat = (rays * off) / (rays * off).sum(-1, keepdim=True)
    kl = (lhat * torch.log(3 * lhat)).sum(-1)  # KL(l̂ ‖ uniform) written out
    assert uniformity(off, rays) == pytest.approx(1 - kl.mean().item())
    assert uniformity(off, rays) < 1
    with pytest.raises(ValueError, match="same shape"):
        uniformity(on_ray[:2], rays)


def test_evaluate_front_stores_reference_point() -> None:
    rays = circle_rays(5)
    losses = torch.stack([torch.linspace(0.1, 0.9, 5), torch.linspace(0.9, 0.1, 5)], -1)
    front = evaluate_front(losses, rays, names=("a", "b"))
    assert front.ref_point == (1.0, 1.0)
    assert front.hv == pytest.approx(hypervolume(losses, [1, 1]))
    assert front.as_dict()["ref_point"] == [1.0, 1.0]
    assert evaluate_front(losses, rays, ref_point=(2, 2)).ref_point == (2.0, 2.0)


def test_rays() -> None:
    r = circle_rays(25)
    assert r.shape == (25, 2) and torch.allclose(r.sum(-1), torch.ones(25))
    angle = torch.atan2(r[:, 1], r[:, 0])
    assert angle[0].item() == pytest.approx(0.1, abs=1e-6) and angle[-1].item() == pytest.approx(math.pi / 2 - 0.1)
    from pymoo.util.ref_dirs import get_reference_directions

    ours = das_dennis(3, 6).double().numpy()
    theirs = get_reference_directions("das-dennis", 3, n_partitions=6)
    assert sorted(map(tuple, ours.round(6))) == sorted(map(tuple, theirs.round(6)))
    assert len(evaluation_rays(3, n_partitions=12)) == math.comb(11, 2)
    assert (evaluation_rays(3) > 0).all()


def test_sampled_rays_are_seeded_by_step() -> None:
    a = sample_rays(4, 3, 0.2, seed=1, step=10)
    assert torch.equal(a, sample_rays(4, 3, 0.2, seed=1, step=10))  # what every DDP rank draws
    assert not torch.equal(a, sample_rays(4, 3, 0.2, seed=1, step=11))
    assert torch.allclose(a.sum(-1), torch.ones(4)) and (a > 0).all()
    with pytest.raises(ValueError, match="alpha"):
        sample_rays(1, 2, 0.0, 0, 0)


@pytest.mark.parametrize(
    ("ray", "match"),
    [
        ([0.5, 0.6], r"sums to 1\.1"),
        ([1.2, -0.2], "negative"),
        ([0.5, 0.5, 0.0], "must have 2 entries"),
        ([float("nan"), 1.0], "non-finite"),
    ],
)
def test_bad_rays(ray: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_ray(ray, 2)


def test_front_statistics_sums_batches_into_the_split_front() -> None:
    """Batches of different sizes give the front of the concatenated split (the gaps are split-level ratios)."""
    g = torch.Generator().manual_seed(0)
    objectives = FairnessObjectives()
    rays = evaluation_rays(3, n_partitions=5)
    n = 37
    logits = torch.randn(len(rays), n, 1, generator=g)
    y = (torch.rand(n, generator=g) < 0.4).float()
    group = (torch.rand(n, generator=g) < 0.5).long()
    metric = FrontStatistics(objectives, rays, ref_point=(1.0, 1.2, 1.0))
    assert metric.stats.shape == (len(rays), objectives.num_statistics) and metric.stats.dtype == torch.float64
    for lo, hi in [(0, 5), (5, 21), (21, n)]:
        metric.update(logits[:, lo:hi], (None, y[lo:hi], group[lo:hi]))
    front = metric.compute()
    whole = objectives.from_statistics(objectives.statistics(logits, (None, y, group)))
    expected = evaluate_front(whole, rays, (1.0, 1.2, 1.0), objectives.names)
    torch.testing.assert_close(front.losses, expected.losses)
    assert front.hv == pytest.approx(expected.hv, abs=1e-12) and front.ref_point == (1.0, 1.2, 1.0)
    assert front.uniformity == pytest.approx(expected.uniformity, abs=1e-12)
    scalars = front.scalars()
    assert list(scalars) == ["hv", "uniformity", "bce_mean", "fpr_gap_mean", "fnr_gap_mean"]
    assert scalars["fpr_gap_mean"] == pytest.approx(float(whole[:, 1].mean()), abs=1e-12)
    metric.reset()
    assert metric.update_count == 0 and not metric.stats.any()
    relaxed = FrontStatistics(objectives, rays, hard=False)
    relaxed.update(logits, (None, y, group))
    torch.testing.assert_close(relaxed.compute().losses, objectives.losses(logits, (None, y, group)))
    with pytest.raises(ValueError, match="2 weight sets, the front has 6 rays"):
        metric.update(logits[:2], (None, y, group))
    with pytest.raises(ValueError, match=r"rays must be \(R, 3\)"):
        FrontStatistics(objectives, rays[:, :2])
    assert MultiTaskObjectives(3).num_statistics == 7
