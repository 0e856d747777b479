"""Preference rays and Pareto-front quality: test rays, hypervolume, uniformity.

* Training rays: ``r ~ Dir(α)`` (Navon et al. 2021, §4; α = 0.2), drawn from a generator seeded by
  ``(seed, step)`` so every DDP rank draws the same ray without communication and a resumed run repeats the
  rays of an uninterrupted one.
* Stratified training rays (PHN-HVI, Hoang et al. 2023, ``partition=True``; m = 2): ray k's angle drawn from
  the k-th of K equal bins of ``[0.1, π/2 − 0.1]``, ``r = (cos θ, sin θ)/(cos θ + sin θ)``; and HVI's optional
  ray rescaling ``r·randint(1, 5)·|N(1, 0.2)|`` (:func:`ray_scales`), both from ``(seed, step)`` as well.
* Test rays: 25 evenly spaced angles in ``[0.1, π/2 − 0.1]`` for m = 2 (official ``circle_points``), a
  Das–Dennis simplex-lattice (interior points) for m ≥ 3.
* Hypervolume (minimization) from ``moocore``; the reference point travels with the result.
* Uniformity ``1 − mean_k KL(l̂_k ‖ 𝟙/m)``, ``l̂ = r⊙ℓ / Σ r⊙ℓ`` — the EPO non-uniformity μ_r (Mahapatra &
  Rajan 2020, eq. 3) averaged over test rays; 1 exactly when every r_k ⊙ ℓ_k is uniform (ℓ on the r⁻¹ ray).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FrontEvaluation",
    "circle_rays",
    "das_dennis",
    "evaluate_front",
    "evaluation_rays",
    "hypervolume",
    "non_uniformity",
    "ray_scales",
    "sample_rays",
    "stratified_rays",
    "uniformity",
    "validate_ray",
]


# -- rays ---------------------------------------------------------------------------------------------------


def validate_ray(ray: Sequence[float] | Tensor | np.ndarray, num_objectives: int, atol: float = 1e-6) -> Tensor:
    """A preference ray as a float tensor, or ``ValueError`` naming what is wrong with it.

    A ray has ``num_objectives`` finite, non-negative entries summing to 1 (within ``atol``).
    """
    r = torch.as_tensor(ray, dtype=torch.float32).detach().cpu()
    if r.dim() != 1 or r.numel() != num_objectives:
        raise ValueError(
            f"preference ray {r.tolist()} must have {num_objectives} entries (one per objective), got shape "
            f"{tuple(r.shape)}"
        )
    if not torch.isfinite(r).all():
        raise ValueError(f"preference ray {r.tolist()} has non-finite entries")
    if (r < 0).any():
        raise ValueError(f"preference ray {r.tolist()} has negative entries; rays lie on the simplex")
    if abs(float(r.double().sum()) - 1.0) > atol:
        raise ValueError(f"preference ray {r.tolist()} sums to {float(r.double().sum()):.6g}, not 1")
    return r


def sample_rays(
    num_rays: int, num_objectives: int, alpha: float, seed: int, step: int, min_value: float = 1e-6
) -> Tensor:
    """(K, m) Dirichlet(α) rays from a generator seeded by ``(seed, step)`` (identical on every rank).

    Entries are clamped at ``min_value`` and renormalized (Dir(0.2) underflows to exact zeros otherwise).
    """
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_rays < 1:
        raise ValueError(f"rays per step must be >= 1, got {num_rays}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    rays = rng.dirichlet(np.full(num_objectives, float(alpha)), size=num_rays)
    rays = np.clip(rays, min_value, None)
    rays /= rays.sum(-1, keepdims=True)
    return torch.as_tensor(rays, dtype=torch.float32)


def stratified_rays(
    num_rays: int, seed: int, step: int, min_angle: float = 0.1, max_angle: float = math.pi / 2 - 0.1
) -> Tensor:
    """(K, 2) rays with ray k's angle ``θ_k ~ U(lo + kΔ, lo + (k+1)Δ)``, ``Δ = (hi − lo)/K`` (PHN-HVI's
    stratified sampling), ``r_k = (cos θ_k, sin θ_k)/(cos θ_k + sin θ_k)``; generator seeded by ``(seed, step)``."""
    if num_rays < 1:
        raise ValueError(f"rays per step must be >= 1, got {num_rays}")
    if not 0 <= min_angle < max_angle <= math.pi / 2:
        raise ValueError(f"stratified rays need 0 <= min_angle < max_angle <= pi/2, got {min_angle}, {max_angle}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)])
    delta = (max_angle - min_angle) / num_rays
    theta = min_angle + (np.arange(num_rays) + rng.uniform(size=num_rays)) * delta
    pts = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return torch.as_tensor(pts / pts.sum(1, keepdims=True), dtype=torch.float32)


def ray_scales(num_rays: int, seed: int, step: int) -> Tensor:
    """(K,) factors ``randint(1, 5)·|N(1, 0.2)|`` (integers 1–4) of PHN-HVI's ray rescaling trick, one per ray,
    from a generator seeded by ``(seed, step)`` (a stream of its own: the rays do not change with it)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 1])
    scale = rng.integers(1, 5, size=num_rays) * np.abs(rng.normal(1.0, 0.2, size=num_rays))
    return torch.as_tensor(scale, dtype=torch.float32)


def circle_rays(n: int = 25, min_angle: float = 0.1, max_angle: float = math.pi / 2 - 0.1) -> Tensor:
    """(n, 2) rays ``(cos θ, sin θ)/(cos θ + sin θ)`` for n angles evenly spaced in [min, max] (official PHN)."""
    if n < 1:
        raise ValueError(f"need n >= 1 test rays, got {n}")
    theta = np.linspace(min_angle, max_angle, n)
    pts = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return torch.as_tensor(pts / pts.sum(1, keepdims=True), dtype=torch.float32)


def das_dennis(num_objectives: int, n_partitions: int, interior: bool = False) -> Tensor:
    """Das–Dennis simplex-lattice: all points with coordinates in {0, 1/p, …, 1} summing to 1.

    ``interior`` keeps the points with every coordinate > 0 (C(p−1, m−1) of them).
    """
    if num_objectives < 1 or n_partitions < 1:
        raise ValueError(f"das_dennis needs m >= 1 and p >= 1, got m={num_objectives}, p={n_partitions}")
    pts = [c for c in itertools.product(range(n_partitions + 1), repeat=num_objectives - 1) if sum(c) <= n_partitions]
    arr = np.array([[*c, n_partitions - sum(c)] for c in pts], dtype=np.float64) / n_partitions
    if interior:
        arr = arr[(arr > 0).all(1)]
    return torch.as_tensor(arr, dtype=torch.float32)


def evaluation_rays(num_objectives: int, n: int = 25, n_partitions: int = 12) -> Tensor:
    """Evaluation rays: ``circle_rays(n)`` for m = 2, interior Das–Dennis points with ``n_partitions`` for m ≥ 3."""
    if num_objectives == 2:
        return circle_rays(n)
    if num_objectives >= 3:
        rays = das_dennis(num_objectives, n_partitions, interior=True)
        if len(rays) == 0:
            raise ValueError(f"n_partitions={n_partitions} < m={num_objectives} leaves no interior Das–Dennis ray")
        return rays
    raise ValueError(f"test rays need >= 2 objectives, got {num_objectives}")


# -- front quality --------------------------------------------------------------------------------------------


def _as_2d(points: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = points.detach().cpu().double().numpy() if isinstance(points, Tensor) else np.asarray(points, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"points must be (N, m), got shape {arr.shape}")
    return arr


def hypervolume(points: Tensor | np.ndarray | Sequence[Sequence[float]], ref_point: Sequence[float]) -> float:
    """Hypervolume dominated by ``points`` (N, m) up to ``ref_point`` (minimization; moocore).

    Points that do not dominate the reference point add nothing. Non-finite values raise ``ValueError``.
    """
    import moocore

    arr = _as_2d(points)
    ref = np.asarray(ref_point, dtype=float)
    if ref.shape != (arr.shape[1],):
        raise ValueError(f"reference point {ref.tolist()} must have {arr.shape[1]} entries")
    if not np.all(np.isfinite(arr)) or not np.all(np.isfinite(ref)):
        raise ValueError("hypervolume of non-finite losses or reference point")
    if len(arr) == 0:
        return 0.0
    return float(moocore.hypervolume(arr, ref=ref))


def non_uniformity(losses: Tensor, rays: Tensor) -> Tensor:
    """``μ_r(ℓ) = KL(r⊙ℓ/Σr⊙ℓ ‖ 𝟙/m)`` per row of (N, m) losses and rays (``0 log 0 = 0``)."""
    if losses.shape != rays.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and rays {tuple(rays.shape)} must have the same shape")
    rl = (rays * losses).double()
    if (rl < 0).any():
        raise ValueError("non-uniformity needs non-negative losses")
    total = rl.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("non-uniformity is undefined when every r_j ℓ_j of a ray is 0")
    l_hat = rl / total
    m = rays.shape[-1]
    return torch.special.xlogy(l_hat, l_hat * m).sum(-1)


def uniformity(losses: Tensor, rays: Tensor) -> float:
    """``1 − mean_k μ_{r_k}(ℓ_k)`` (PHN's uniformity)."""
    return float(1.0 - non_uniformity(losses, rays).mean())


@dataclass
class FrontEvaluation:
    """Losses of a front at its rays, with hypervolume (and the reference point it used), uniformity and the mean
    loss of every objective over the rays."""

    rays: Tensor
    losses: Tensor
    ref_point: tuple[float, ...]
    hv: float
    uniformity: float
    names: tuple[str, ...] = field(default_factory=tuple)
    means: tuple[float, ...] = field(default_factory=tuple)

    def scalars(self) -> dict[str, float]:
        """``hv``, ``uniformity`` and ``<objective>_mean`` (what the modules log per stage)."""
        names = self.names or tuple(f"objective_{j}" for j in range(self.losses.shape[-1]))
        means = self.means or tuple(float(v) for v in self.losses.double().mean(0))
        return {"hv": self.hv, "uniformity": self.uniformity, **{f"{n}_mean": v for n, v in zip(names, means)}}

    def as_dict(self) -> dict[str, object]:
        return {
            "rays": self.rays.tolist(),
            "losses": self.losses.tolist(),
            "ref_point": list(self.ref_point),
            "hv": self.hv,
            "uniformity": self.uniformity,
            "names": list(self.names),
            "means": list(self.means),
        }


def evaluate_front(
    losses: Tensor, rays: Tensor, ref_point: Sequence[float] | None = None, names: Sequence[str] = ()
) -> FrontEvaluation:
    """Hypervolume (reference point default 𝟙), uniformity and per-objective means of (N, m) losses at (N, m) rays.

    The means are taken in the precision of ``losses`` (float64 from summed statistics); the stored losses are
    float32.
    """
    means = tuple(float(v) for v in losses.detach().cpu().double().mean(0))
    losses = losses.detach().cpu().float()
    rays = rays.detach().cpu().float()
    ref = tuple(float(v) for v in (ref_point if ref_point is not None else [1.0] * losses.shape[-1]))
    return FrontEvaluation(
        rays=rays,
        losses=losses,
        ref_point=ref,
        hv=hypervolume(losses, ref),
        uniformity=uniformity(losses, rays),
        names=tuple(names),
        means=means,
    )
