"""Hypervolume gradients of a point set (minimisation): the weights of PHN-HVI (Hoang et al., AAAI 2023).

For points ``ℓ_1, …, ℓ_n`` in ``R^m`` and a reference point ``ref``, :func:`hypervolume_gradient` returns
``−∂HV/∂ℓ_{i,k}`` (Emmerich & Deutz 2014): how much hypervolume point i adds per unit decrease of its k-th
coordinate, non-negative. With ``S_ik = {j ≠ i : ℓ_{j,k} < ℓ_{i,k}}`` (the points already past i along k) the
derivative is the (m−1)-dimensional hypervolume of the face of i's box that no point of ``S_ik`` covers
("face formula"):

    ``−∂HV/∂ℓ_{i,k} = HV_{m−1}(proj_{−k}(S_ik ∪ {i}), ref_{−k}) − HV_{m−1}(proj_{−k}(S_ik), ref_{−k})``

(``proj_{−k}`` drops coordinate k; ``HV_1`` of a set is ``ref − min``), evaluated with ``moocore`` (a Python
loop over the n·m entries: meant for the K ≈ 16 solutions of a training step). For m = 2 a vectorised closed
form gives the same: with the non-dominated points sorted by ℓ₁ ascending, ``−∂HV/∂ℓ₁,ᵢ = ℓ₂,ᵢ₋₁ − ℓ₂,ᵢ``
(``ℓ₂,₀ = ref₂``) and ``−∂HV/∂ℓ₂,ᵢ = ℓ₁,ᵢ₊₁ − ℓ₁,ᵢ`` (``ℓ₁,ₙ₊₁ = ref₁``).

Conventions (both methods agree on them):

* points outside the reference box (some ``ℓ_{i,k} ≥ ref_k``) get 0 and do not affect the others;
* dominated points get 0 (a dominating point covers their faces);
* **one-sided derivatives → 0**: where a tie ``ℓ_{j,k} = ℓ_{i,k}`` makes the derivative of moving ℓ_{i,k} up
  (``S_ik`` taken with ``≤``) differ from moving it down (``<``), entry (i, k) is 0, as in the HVI code.
  Duplicated points therefore get 0 in every coordinate (they still cover their box for the others); a tied
  point whose face part is already covered by ``S_ik`` changes nothing and the two-sided value stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch import Tensor

__all__ = ["hypervolume_gradient", "nondominated_fronts"]


def _as_array(values: Tensor | np.ndarray | Sequence[Sequence[float]] | Sequence[float], ndim: int) -> np.ndarray:
    tensor = isinstance(values, Tensor)
    arr = values.detach().cpu().double().numpy() if tensor else np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-d array, got shape {arr.shape}")
    return arr


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of (n, d) points that all lie strictly inside the box (d ≥ 1; 0 for no points)."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    import moocore

    return float(moocore.hypervolume(points, ref=ref))


def _faces(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The face formula for (n, m) points strictly inside the box (m ≥ 2)."""
    n, m = points.shape
    grad = np.zeros((n, m))
    others = ~np.eye(n, dtype=bool)
    for k in range(m):
        keep = [c for c in range(m) if c != k]
        proj, ref_k = points[:, keep], ref[keep]
        col = points[:, k]
        for i in range(n):
            before = others[i] & (col < col[i])
            down = _hv(np.vstack([proj[before], proj[i : i + 1]]), ref_k) - _hv(proj[before], ref_k)
            tied = others[i] & (col == col[i])
            if tied.any():  # moving ℓ_ik up: the tied points are past it too
                upto = before | tied
                up = _hv(np.vstack([proj[upto], proj[i : i + 1]]), ref_k) - _hv(proj[upto], ref_k)
                if not np.isclose(up, down, rtol=1e-9, atol=1e-12 * float(np.prod(ref_k - proj.min(0)))):
                    continue  # one-sided derivative: 0
            grad[i, k] = down
    return np.clip(grad, 0.0, None)  # rounding in the differences of moocore volumes


def _closed_form_2d(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The m = 2 closed form for (n, 2) points strictly inside the box, vectorised over all (i, j) pairs.

    ``−∂HV/∂ℓ_{i,k} = max(0, min({ℓ_{j,o} : ℓ_{j,k} < ℓ_{i,k}} ∪ {ref_o}) − ℓ_{i,o})`` (o the other coordinate):
    on a front sorted by ℓ₁ this is ``ℓ₂,ᵢ₋₁ − ℓ₂,ᵢ`` and ``ℓ₁,ᵢ₊₁ − ℓ₁,ᵢ``; dominated points get 0. It is 0 as
    well where a tied point (``ℓ_{j,k} = ℓ_{i,k}``) would lower that minimum (one-sided derivative).
    """
    n = len(points)
    other = points[:, ::-1]  # other[j, k] = ℓ_{j,o}
    col_i, col_j = points[:, None, :], points[None, :, :]  # (i, j, k)
    less = col_j < col_i
    tied = (col_j == col_i) & ~np.eye(n, dtype=bool)[:, :, None]
    before = np.where(less, other[None, :, :], np.inf).min(1)
    before = np.minimum(before, ref[::-1][None, :])  # min over S_ik ∪ {ref_o}
    tied_min = np.where(tied, other[None, :, :], np.inf).min(1)
    grad = np.clip(before - other, 0.0, None)
    grad[tied_min < before] = 0.0  # moving ℓ_ik up: the tied point would cover part of the face
    return grad


def hypervolume_gradient(
    points: Tensor | np.ndarray | Sequence[Sequence[float]],
    ref: Tensor | np.ndarray | Sequence[float],
    method: Literal["auto", "faces"] = "auto",
) -> np.ndarray:
    """``−∂HV/∂ℓ`` (n, m) of the hypervolume of ``points`` (n, m) up to ``ref`` (m,), minimisation.

    Args:
        points: Objective vectors, one per row (any set: dominated, duplicated and outside points get 0).
        ref: Reference point.
        method: ``auto``: the closed form for m = 2, the face formula (moocore) otherwise; ``faces``: the face
            formula for every m (the m = 2 closed form's oracle in the tests).

    Returns:
        Non-negative float64 array; see the module docstring for the conventions at ties.
    """
    pts = _as_array(points, 2)
    ref_arr = _as_array(ref, 1)
    n, m = pts.shape
    if ref_arr.shape != (m,):
        raise ValueError(f"reference point {ref_arr.tolist()} must have {m} entries (one per objective)")
    if m < 2:
        raise ValueError(f"hypervolume gradients need m >= 2 objectives, got points of shape {pts.shape}")
    if not np.all(np.isfinite(pts)) or not np.all(np.isfinite(ref_arr)):
        raise ValueError("hypervolume gradient of non-finite points or reference point")
    if method not in ("auto", "faces"):
        raise ValueError(f"method must be 'auto' or 'faces', got {method!r}")
    grad = np.zeros((n, m))
    inside = np.flatnonzero((pts < ref_arr).all(1))
    if len(inside):
        solve = _closed_form_2d if (m == 2 and method == "auto") else _faces
        grad[inside] = solve(pts[inside], ref_arr)
    return grad


def nondominated_fronts(points: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Front index (0 = non-dominated) of each row of (n, m) points (non-dominated sorting, moocore's
    ``pareto_rank``; duplicates share a front)."""
    import moocore

    pts = _as_array(points, 2)
    if len(pts) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(moocore.pareto_rank(pts), dtype=np.int64)
