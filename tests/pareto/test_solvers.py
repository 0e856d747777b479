"""EPO LP against an independent vertex-enumeration solution; gradients; LS/EPO solver objects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hyperlit.pareto.solvers import (
    EPOSolver,
    LinearScalarizationSolver,
    epo_adjustments,
    epo_lp,
    make_solver,
    objective_gradients,
)

# -- an independent statement of the EPO LP (Mahapatra & Rajan 2020, Alg. 1) and a brute-force solver -------------


def _reference_problem(losses, ray, gram, eps=1e-4):  # type: ignore[no-untyped-def]
    """(objective c to maximize, inequality rows A β >= b, mode) written from the paper, not from our code."""
    m = len(ray)
    rl = ray * losses
    lhat = rl / rl.sum()
    mu = sum(p * np.log(m * p) for p in lhat if p > 0)
    a = ray * (np.log(m * lhat) - mu)
    ca = gram @ a
    if mu > eps:
        rows, rhs = [], []
        jstar = int(np.argmax(rl))
        any_pos = (ca > 0).any()
        for j in range(m):
            if j == jstar or not any_pos:
                rows.append(gram[j])
                rhs.append(0.0)
            elif ca[j] <= 0:
                rows.append(gram[j])
                rhs.append(ca[j])
        return ca, np.array(rows), np.array(rhs), "balance"
    rows = [*gram, ca]
    rhs = [0.0] * m + [min(ca.max(), 0.0)]
    return gram.sum(0), np.array(rows), np.array(rhs), "dominance"


def _brute_force(c, rows, rhs):  # type: ignore[no-untyped-def]
    """Maximize cᵀβ over {β >= 0, Σβ = 1, rows β >= rhs} by enumerating every vertex."""
    m = len(c)
    ineq = [(np.eye(m)[i], 0.0) for i in range(m)] + list(zip(rows, rhs))
    best, best_beta, values = -np.inf, None, []
    for active in itertools.combinations(range(len(ineq)), m - 1):
        a = np.vstack([np.ones(m)] + [ineq[i][0] for i in active])
        b = np.array([1.0] + [ineq[i][1] for i in active])
        if abs(np.linalg.det(a)) < 1e-10:
            continue
        beta = np.linalg.solve(a, b)
        if (beta < -1e-9).any() or any(r @ beta < h - 1e-9 for r, h in zip(rows, rhs)):
            continue
        val = float(c @ beta)
        values.append((val, beta))
        if val > best:
            best, best_beta = val, beta
    return best, best_beta, values


def _instances(n: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    for i in range(n):
        m = [2, 3, 4][i % 3]
        g = rng.normal(size=(m, 6))
        ray = rng.dirichlet(np.ones(m))
        losses = rng.uniform(0.1, 2.0, size=m)
        if i % 4 == 3:  # exactly on the EP ray: μ = 0, the dominance LP
            losses = 0.5 / ray
        yield losses, ray, g @ g.T


def test_epo_lp_matches_brute_force_on_random_instances() -> None:
    modes = set()
    unique_checked = 0
    for losses, ray, gram in _instances(60):
        c, rows, rhs, mode = _reference_problem(losses, ray, gram)
        best, best_beta, values = _brute_force(c, rows, rhs)
        res = epo_lp(losses, ray, gram)
        if best_beta is None:  # infeasible: we must report a fallback, never a made-up β
            assert res.fallback
            continue
        assert res.mode == mode
        modes.add(mode)
        beta = res.beta
        assert beta.min() >= -1e-9 and beta.sum() == pytest.approx(1.0)
        assert (rows @ beta >= rhs - 1e-7).all()
        assert c @ beta == pytest.approx(best, rel=1e-7, abs=1e-9)
        others = [v for v, b in values if not np.allclose(b, best_beta, atol=1e-7)]
        if not others or best - max(others) > 1e-6:  # unique optimum: same β
            np.testing.assert_allclose(beta, best_beta, atol=1e-6)
            unique_checked += 1
    assert modes == {"balance", "dominance"}
    assert unique_checked >= 20


def test_adjustments_and_zero_ray_entries() -> None:
    rl, mu, a = epo_adjustments(np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert mu == pytest.approx(0.0) and np.allclose(a, 0) and np.allclose(rl, 0.5)
    _, mu, a = epo_adjustments(np.array([2.0, 1.0, 3.0]), np.array([0.5, 0.5, 0.0]))
    assert np.isfinite(mu) and a[2] == 0.0  # 0·log 0 = 0, no NaN
    lhat = np.array([2 / 3, 1 / 3])
    assert mu == pytest.approx(float((lhat * np.log(3 * lhat)).sum()))
    with pytest.raises(ValueError, match="non-negative"):
        epo_adjustments(np.array([-1.0, 1.0]), np.array([0.5, 0.5]))


def test_fallbacks_are_reported() -> None:
    ray = np.array([0.25, 0.75])
    gram = np.eye(2)
    res = epo_lp(np.array([0.0, 1.0]), ray, gram)
    assert res.fallback and "loss <= 0" in res.reason and np.allclose(res.beta, ray)
    res = epo_lp(np.array([1.0, 1.0]), ray, np.full((2, 2), np.nan))
    assert res.fallback and "Gram" in res.reason
    with pytest.raises(ValueError, match="shapes"):
        epo_lp(np.ones(3), ray, gram)


def test_objective_gradients_match_per_loss_autograd() -> None:
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    rays = torch.rand(3, 2)
    h = torch.tanh(rays @ w1[:2, :2].T).sum(-1, keepdim=True) * w2[:3]  # (3, 3): depends on all params
    losses = torch.stack([h.pow(2).sum(-1), h.sin().sum(-1)], -1)  # (K=3, m=2)
    g = objective_gradients(losses, [w1, w2])
    for k, j in itertools.product(range(3), range(2)):
        ref = torch.autograd.grad(losses[k, j], [w1, w2], retain_graph=True)
        torch.testing.assert_close(g[k, j], torch.cat([r.reshape(-1) for r in ref]))
    # separable: row k of theta only influences losses[k]
    theta = torch.randn(3, 4, requires_grad=True)
    ls = torch.stack([(theta**2).sum(-1), theta.cos().sum(-1)], -1)
    gs = objective_gradients(ls, [theta], separable=True)
    for k, j in itertools.product(range(3), range(2)):
        ref = torch.autograd.grad(ls[k, j], theta, retain_graph=True)[0][k]
        torch.testing.assert_close(gs[k, j], ref)


def test_solver_objects() -> None:
    losses = torch.tensor([[0.5, 1.0], [2.0, 0.2]], requires_grad=True)
    rays = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    out = LinearScalarizationSolver()(losses, rays)
    assert out.loss.item() == pytest.approx(((rays * losses).sum(-1)).mean().item())
    grads = torch.randn(2, 2, 5)
    out = EPOSolver()(losses, rays, lambda ls: (ls, grads))
    assert torch.allclose(out.weights.sum(-1), torch.full((2,), 2.0))  # β·m, as the official code
    assert out.fallbacks == 0 and len(out.modes) == 2
    out = EPOSolver()(losses * torch.tensor([1.0, 0.0]), rays, lambda ls: (ls, grads))
    assert out.fallbacks == 2 and all("loss <= 0" in r for r in out.reasons)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("mgda")
    with pytest.raises(ValueError, match="gradients"):
        EPOSolver()(losses, rays)
