"""The PHN/EPO toy problem with a known concave front: PHN-EPO hits the exact Pareto optimal points of the test
rays, PHN-LS only reaches the two ends of the front.

ℓ1 = 1 − exp(−‖θ − 𝟙/√d‖²), ℓ2 = 1 − exp(−‖θ + 𝟙/√d‖²); the hypernetwork outputs θ directly. The Pareto set is
the segment θ = t·𝟙/√d, t ∈ [−1, 1], so the front is {(1 − e^{−(1−t)²}, 1 − e^{−(1+t)²})}.

The training loop uses the same pieces as :class:`ParetoHyperNetModule.training_step` (HyperNetwork, seeded
Dirichlet rays, solver, per-objective gradients w.r.t. φ), without a Trainer.
"""

from __future__ import annotations

import pytest
import torch

from hyperlit.nn import HyperNetwork
from hyperlit.pareto.metrics import evaluation_rays, sample_rays
from hyperlit.pareto.objectives import toy_objectives
from hyperlit.pareto.solvers import make_solver, objective_gradients

D = 10
U = torch.full((D,), D**-0.5)
_T = torch.linspace(-1, 1, 40001)
FRONT = torch.stack([1 - torch.exp(-((1 - _T) ** 2)), 1 - torch.exp(-((1 + _T) ** 2))], -1)
ENDS = FRONT[[0, -1]]


def _train(solver_name: str, steps: int = 600, rays_per_step: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    hnet = HyperNetwork({"theta": (D,)}, cond_dim=2, hidden=(100, 100))
    params = list(hnet.parameters())
    opt = torch.optim.Adam(params, lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    solver = make_solver(solver_name)
    fallbacks = 0
    for step in range(steps):
        rays = sample_rays(rays_per_step, 2, alpha=1.0, seed=seed, step=step)
        losses = toy_objectives(hnet.flat(rays))
        out = solver(losses, rays, lambda ls: (ls, objective_gradients(ls, params)))
        fallbacks += out.fallbacks
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    rays = evaluation_rays(2, n=25)
    with torch.no_grad():
        theta = hnet.flat(rays)
    return rays, theta, toy_objectives(theta), torch.tensor(fallbacks)


def _front_distance(losses: torch.Tensor) -> torch.Tensor:
    return torch.cdist(losses, FRONT).min(1).values


def _pareto_set_distance(theta: torch.Tensor) -> torch.Tensor:
    t = (theta @ U).clamp(-1, 1)
    return (theta - t[:, None] * U).norm(dim=1)


def _train_single_threaded(solver_name: str) -> tuple[torch.Tensor, ...]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threads only add synchronisation
    try:
        return _train(solver_name)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def epo_run() -> tuple[torch.Tensor, ...]:
    return _train_single_threaded("epo")


@pytest.fixture(scope="module")
def ls_run() -> tuple[torch.Tensor, ...]:
    return _train_single_threaded("ls")


def test_phn_epo_solutions_are_exact_pareto_optimal(epo_run: tuple[torch.Tensor, ...]) -> None:
    rays, theta, losses, fallbacks = epo_run
    assert int(fallbacks) == 0
    assert _front_distance(losses).max() < 0.02
    assert _pareto_set_distance(theta).max() < 0.02
    rl = rays * losses
    rel_gap = (rl[:, 0] - rl[:, 1]).abs() / rl.mean(1)
    assert rel_gap.max() < 0.05, rel_gap


def test_phn_ls_reaches_only_the_ends_of_the_concave_front(
    ls_run: tuple[torch.Tensor, ...], epo_run: tuple[torch.Tensor, ...]
) -> None:
    _, _, ls_losses, _ = ls_run
    _, _, epo_losses, _ = epo_run
    assert _front_distance(ls_losses).max() < 0.02  # on the front ...
    ls_at_ends = (torch.cdist(ls_losses, ENDS).min(1).values < 0.05).sum()
    epo_at_ends = (torch.cdist(epo_losses, ENDS).min(1).values < 0.05).sum()
    assert ls_at_ends >= 21  # ... but at its ends (only the rays near (½, ½) sit in the switch between them)
    assert epo_at_ends == 0  # EPO spreads over the interior
    # LS prefers the objective with the larger weight: ℓ1 small for r1 > ½ and vice versa
    assert ls_losses[0, 0] < ls_losses[0, 1] and ls_losses[-1, 0] > ls_losses[-1, 1]
