"""Hypervolume gradients (``hyperlit.pareto.hv_gradient``) against closed forms and finite differences."""

from __future__ import annotations

import moocore
import numpy as np
import pytest
import torch

from hyperlit.pareto.hv_gradient import hypervolume_gradient, nondominated_fronts


def _fd(points: np.ndarray, ref: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``−∂HV/∂ℓ`` by central differences of moocore's hypervolume."""
    grad = np.zeros_like(points)
    for i in range(points.shape[0]):
        for k in range(points.shape[1]):
            up, down = points.copy(), points.copy()
            up[i, k] += eps
            down[i, k] -= eps
            grad[i, k] = -(moocore.hypervolume(up, ref=ref) - moocore.hypervolume(down, ref=ref)) / (2 * eps)
    return grad


def test_closed_form_on_a_known_front() -> None:
    # sorted by ℓ₁: −∂/∂ℓ₁ = ℓ₂ of the previous point (ref₂ first) − ℓ₂; −∂/∂ℓ₂ = next ℓ₁ (ref₁ last) − ℓ₁
    pts = np.array([[0.6, 0.2], [0.1, 0.9], [0.3, 0.5], [0.8, 0.1]])
    expected = np.array([[0.5 - 0.2, 0.8 - 0.6], [1.0 - 0.9, 0.3 - 0.1], [0.9 - 0.5, 0.6 - 0.3], [0.2 - 0.1, 1 - 0.8]])
    for method in ("auto", "faces"):
        np.testing.assert_allclose(hypervolume_gradient(pts, [1.0, 1.0], method=method), expected, atol=1e-12)
    np.testing.assert_allclose(hypervolume_gradient(torch.tensor(pts), torch.ones(2)), expected, atol=1e-6)
    np.testing.assert_allclose(hypervolume_gradient(pts, [1.0, 1.0]), _fd(pts, np.ones(2)), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_face_formula_with_dominated_duplicated_and_outside_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pts = np.round(rng.random((12, 2)), 1)  # a 0.1 grid: many ties and duplicates
    pts = np.vstack([pts, pts[:2], [[1.3, 0.05], [0.05, 1.1]]])  # exact duplicates; two outside the box
    ref = np.array([1.0, 1.1])
    closed = hypervolume_gradient(pts, ref)
    np.testing.assert_allclose(closed, hypervolume_gradient(pts, ref, method="faces"), atol=1e-12)
    assert (closed >= 0).all() and (closed[-2:] == 0).all()


@pytest.mark.parametrize(("seed", "m"), [(0, 3), (1, 3), (2, 3), (3, 4)])
def test_face_formula_equals_finite_differences(seed: int, m: int) -> None:
    rng = np.random.default_rng(seed)
    pts = rng.random((9, m))  # continuous values: no ties; some points dominated
    ref = np.full(m, 1.05)
    grad = hypervolume_gradient(pts, ref)
    np.testing.assert_allclose(grad, _fd(pts, ref), atol=1e-6)
    dominated = ~moocore.is_nondominated(pts)
    assert dominated.any() and (grad[dominated] == 0).all()
    assert (grad[~dominated] > 0).any()


def test_duplicates_and_ties_are_one_sided_so_zero() -> None:
    ref = np.array([1.0, 1.0, 1.0])
    pts = np.array([[0.2, 0.5, 0.6], [0.2, 0.5, 0.6], [0.7, 0.1, 0.3]])
    grad = hypervolume_gradient(pts, ref)
    assert (grad[:2] == 0).all()  # duplicates: moving either up keeps the volume, moving it down adds some
    np.testing.assert_allclose(grad[2], _fd(pts[[0, 2]], ref)[1], atol=1e-6)  # the duplicate still covers its box
    # m = 3: (0.2, 0.6, 0.7) ties (0.2, 0.3, 0.3) in ℓ₁ and covers part of its face: one-sided, 0 ...
    tie = np.array([[0.2, 0.3, 0.3], [0.2, 0.6, 0.7]])
    np.testing.assert_allclose(hypervolume_gradient(tie, ref), [[0.0, 0.8 * 0.7, 0.8 * 0.7], [0, 0, 0]], atol=1e-12)
    # ... unless a point past it along ℓ₁ covers that part already: then the two-sided value stays
    covered = np.vstack([tie, [[0.1, 0.5, 0.5]]])
    np.testing.assert_allclose(hypervolume_gradient(covered, ref)[0], [0.7 * 0.7 - 0.5 * 0.5, 0.56, 0.56], atol=1e-12)
    # m = 2: (0.2, 0.3) and (0.2, 0.6) tie in ℓ₁, a one-sided derivative there
    np.testing.assert_allclose(hypervolume_gradient([[0.2, 0.3], [0.2, 0.6]], [1, 1]), [[0.0, 0.8], [0.0, 0.0]])


def test_points_outside_the_reference_box_and_a_larger_reference() -> None:
    pts = np.array([[0.2, 0.8], [0.5, 0.4], [0.9, 1.5]])
    grad = hypervolume_gradient(pts, [1.0, 1.0])
    assert (grad[2] == 0).all()
    np.testing.assert_allclose(grad[:2], hypervolume_gradient(pts[:2], [1.0, 1.0]))
    # the reference moves only the extreme entries: ℓ₁,ₙ₊₁ = ref₁ and ℓ₂,₀ = ref₂
    big = hypervolume_gradient(pts, [2.0, 2.0])
    np.testing.assert_allclose(
        big, [[2.0 - 0.8, 0.5 - 0.2], [0.8 - 0.4, 2.0 - 0.5], [0.0, 0.0]]
    )  # (0.9, 1.5): dominated
    assert hypervolume_gradient(np.zeros((0, 3)), [1, 1, 1]).shape == (0, 3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="must have 2 entries"):
        hypervolume_gradient([[0.1, 0.2]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="m >= 2"):
        hypervolume_gradient([[0.1]], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        hypervolume_gradient([[0.1, float("nan")]], [1.0, 1.0])
    with pytest.raises(ValueError, match="2-d array"):
        hypervolume_gradient([0.1, 0.2], [1.0, 1.0])
    with pytest.raises(ValueError, match="method must be"):
        hypervolume_gradient([[0.1, 0.2]], [1.0, 1.0], method="sweep")  # type: ignore[arg-type]


def test_nondominated_fronts() -> None:
    pts = np.array([[0.1, 0.9], [0.5, 0.5], [0.6, 0.6], [0.5, 0.5], [0.9, 0.9]])
    np.testing.assert_array_equal(nondominated_fronts(pts), [0, 0, 1, 0, 2])
    assert nondominated_fronts(np.zeros((0, 2))).shape == (0,)
