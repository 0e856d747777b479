"""Multi-objective solvers: linear scalarization, Exact Pareto Optimal (EPO) search and HV-gradient weights (HVI).

All turn a (K, m) matrix of losses — m objectives for each of K preference rays — into one scalar to
backpropagate, ``mean_k Σ_j w_kj ℓ_kj`` with constant weights ``w``:

* **LS** (Navon et al. 2021, PHN-LS): ``w_k = r_k``.
* **EPO** (Mahapatra & Rajan, ICML 2020, §4; PHN-EPO): ``w_k = m·β_k`` where β_k solves a small linear program
  built from the Gram matrix ``C = G Gᵀ`` of the per-objective gradients G (m × P) and the adjustment vector
  ``a`` that points towards the *exact Pareto optimal* ray ``r_1ℓ_1 = … = r_mℓ_m``.
* **HVI** (Hoang et al., AAAI 2023, PHN-HVI): ``w_k`` = the unit-normalised hypervolume gradient of the K
  solutions' losses (per non-dominated front, dynamic reference point), minus ``λ·mean_k cos(ℓ_k, r_k)``, a
  penalty that pulls ``ℓ_k`` onto the ray ``r_k`` (``ℓ ∝ r``; EPO's convention is ``ℓ ∝ r⁻¹``).

The LP is solved with ``scipy.optimize.linprog(method="highs")``. When it cannot be used (a loss ≤ 0 or not
finite, a non-finite Gram matrix, an infeasible or failed LP) the weights fall back to ``r/Σr`` like the
official code, and the :class:`EPOResult` says so (``fallback=True`` and a ``reason``) so callers count it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from torch import Tensor

from hyperlit.pareto.hv_gradient import hypervolume_gradient, nondominated_fronts

__all__ = [
    "EPOResult",
    "EPOSolver",
    "HVISolver",
    "LinearScalarizationSolver",
    "SolverOutput",
    "epo_adjustments",
    "epo_lp",
    "hv_weights",
    "make_solver",
    "objective_gradients",
    "weighted_loss",
]


# -- EPO linear program ------------------------------------------------------------------------------------


def epo_adjustments(losses: np.ndarray, ray: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``(r⊙ℓ, μ_r, a)`` of EPO search (Mahapatra & Rajan 2020, eq. 3–5).

    ``l̂ = r⊙ℓ / Σ r⊙ℓ``; the non-uniformity ``μ_r = KL(l̂ ‖ 𝟙/m) = Σ_j l̂_j log(m l̂_j)``; the adjustment
    ``a_j = r_j (log(m l̂_j) − μ_r)``. Entries with ``r_j = 0`` contribute ``0·log 0 = 0`` and get ``a_j = 0``.
    Raises ``ValueError`` if a product ``r_j ℓ_j`` is negative or all are zero.
    """
    losses = np.asarray(losses, dtype=np.float64)
    ray = np.asarray(ray, dtype=np.float64)
    rl = ray * losses
    if np.any(rl < 0) or not np.all(np.isfinite(rl)):
        raise ValueError(f"EPO needs finite non-negative r⊙ℓ, got r={ray.tolist()}, ℓ={losses.tolist()}")
    total = rl.sum()
    if total <= 0:
        raise ValueError(f"EPO needs Σ r⊙ℓ > 0, got r={ray.tolist()}, ℓ={losses.tolist()}")
    m = len(rl)
    l_hat = rl / total
    positive = l_hat > 0
    log_ml = np.zeros_like(l_hat)
    log_ml[positive] = np.log(m * l_hat[positive])
    mu = float(np.sum(l_hat * log_ml))
    a = np.where(ray > 0, ray * (log_ml - mu), 0.0)
    return rl, mu, a


@dataclass
class EPOResult:
    """Outcome of one EPO LP: the weights β (on the simplex) and how they were obtained."""

    beta: np.ndarray
    mode: Literal["balance", "dominance", "fallback"]
    non_uniformity: float
    reason: str | None = None

    @property
    def fallback(self) -> bool:
        return self.mode == "fallback"


def epo_lp(losses: np.ndarray, ray: np.ndarray, gram: np.ndarray, eps: float = 1e-4) -> EPOResult:
    """One EPO search step's LP (Mahapatra & Rajan 2020, Algorithm 1; official ``epo_lp.py``).

    With ``C`` the gradient Gram matrix and ``Ca = C a``:

    * ``μ_r > eps`` (**balance**): maximize ``βᵀ Ca`` s.t. ``β ≥ 0, Σβ = 1, (Cβ)_j ≥ rhs_j`` where
      ``rhs = Ca`` with the constraints of ``J = {j : (Ca)_j > 0}`` dropped and ``rhs_{J*} = 0`` for
      ``J* = argmax r⊙ℓ`` (``rhs = 0`` if J is empty);
    * otherwise (**dominance**, restricted descent): maximize ``1ᵀ C β`` s.t. ``β ≥ 0, Σβ = 1, Cβ ≥ 0,
      βᵀ Ca ≥ min(max_j (Ca)_j, 0)``.

    Falls back to ``β = r/Σr`` (reported in the result, never silently) if a loss is ≤ 0 or not finite, the
    Gram matrix is not finite, or HiGHS does not return an optimum.
    """
    losses = np.asarray(losses, dtype=np.float64)
    ray = np.asarray(ray, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    m = len(ray)
    if losses.shape != (m,) or gram.shape != (m, m):
        raise ValueError(f"EPO LP shapes: losses {losses.shape}, ray {ray.shape}, gram {gram.shape}; need (m,), (m, m)")
    fallback_beta = ray / ray.sum()

    def fallback(reason: str, mu: float = float("nan")) -> EPOResult:
        return EPOResult(fallback_beta.copy(), "fallback", mu, reason)

    if not np.all(np.isfinite(losses)) or np.any(losses <= 0):
        return fallback(f"loss <= 0 or not finite: {losses.tolist()}")
    if not np.all(np.isfinite(gram)):
        return fallback("gradient Gram matrix is not finite")
    rl, mu, a = epo_adjustments(losses, ray)
    ca = gram @ a
    ones = np.ones((1, m))
    if mu > eps:
        mode: Literal["balance", "dominance"] = "balance"
        rhs = ca.copy()
        keep = ~(ca > 0)
        if not np.any(ca > 0):
            rhs = np.zeros(m)
            keep = np.ones(m, dtype=bool)
        j_star = np.flatnonzero(rl == rl.max())
        rhs[j_star] = 0.0
        keep[j_star] = True
        c = -ca
        a_ub, b_ub = -gram[keep], -rhs[keep]
    else:
        mode = "dominance"
        c = -gram.sum(axis=0)
        a_ub = np.vstack([-gram, -ca[None, :]])
        b_ub = np.concatenate([np.zeros(m), [-min(ca.max(), 0.0)]])
    try:
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=ones, b_eq=[1.0], bounds=(0, None), method="highs")
    except ValueError as err:  # scipy rejects malformed problems with ValueError
        return fallback(f"linprog raised {err}", mu)
    if res.status != 0 or res.x is None:
        return fallback(f"LP {mode}: {res.message}", mu)
    beta = np.clip(res.x, 0.0, None)
    return EPOResult(beta / beta.sum(), mode, mu)


# -- gradients of every objective ---------------------------------------------------------------------------


def objective_gradients(losses: Tensor, inputs: Sequence[Tensor], separable: bool = False) -> Tensor:
    """Per-ray, per-objective gradients ``G`` of shape (K, m, P) (P = total size of ``inputs``).

    Args:
        losses: (K, m) losses, still attached to the graph.
        inputs: Tensors to differentiate with respect to. Shared parameters (the hypernetwork φ: every loss
            depends on all of them) or, with ``separable``, tensors with a leading K dimension whose row k only
            influences ``losses[k]`` (generated weights θ(r_k), or K independent per-ray models).
        separable: See ``inputs``; then m backward passes suffice instead of K·m.

    The backward passes are batched with ``is_grads_batched`` (one vmapped backward); the graph is retained.
    """
    k, m = losses.shape
    if separable:
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        grad_out = eye[:, None, :].expand(m, k, m)
        grads = torch.autograd.grad(losses, inputs, grad_outputs=grad_out, is_grads_batched=True, retain_graph=True)
        flat = torch.cat([g.reshape(m, k, -1) for g in grads], dim=-1)  # (m, K, P)
        return flat.transpose(0, 1)
    eye = torch.eye(k * m, dtype=losses.dtype, device=losses.device).view(k * m, k, m)
    grads = torch.autograd.grad(
        losses, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
    )
    flat = torch.cat(
        [
            (torch.zeros(k * m, p.numel(), device=p.device) if g is None else g.reshape(k * m, -1))
            for g, p in zip(grads, inputs)
        ],
        dim=-1,
    )
    return flat.view(k, m, -1)


def weighted_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """``mean_k Σ_j w_kj ℓ_kj`` with the weights treated as constants."""
    return (weights.detach().to(losses) * losses).sum(-1).mean()


# -- solver objects -------------------------------------------------------------------------------------------


@dataclass
class SolverOutput:
    """The scalar to backpropagate and what the solver did (for logging)."""

    loss: Tensor
    weights: Tensor
    fallbacks: int = 0
    modes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


GradientFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Given (K, m) losses, returns the losses and (K, m, P) gradients the EPO LP sees (all-reduced under DDP)."""


class LinearScalarizationSolver:
    """PHN-LS: ``Σ_j r_j ℓ_j`` (Navon et al. 2021, eq. 4 with the linear scalarization)."""

    name = "ls"
    needs_gradients = False

    def __call__(self, losses: Tensor, rays: Tensor, gradients: GradientFn | None = None) -> SolverOutput:
        return SolverOutput(weighted_loss(losses, rays), rays.detach())


class EPOSolver:
    """PHN-EPO: weights ``m·β`` from the EPO LP on the gradient Gram matrix (one LP per ray).

    Args:
        eps: Non-uniformity threshold between the balance and the dominance LP (official: 1e-4).
        scale_by_m: Multiply β (Σβ = 1) by m as the official code does (weights sum to m).
    """

    name = "epo"
    needs_gradients = True

    def __init__(self, eps: float = 1e-4, scale_by_m: bool = True) -> None:
        if eps < 0:
            raise ValueError(f"EPO eps must be >= 0, got {eps}")
        self.eps = eps
        self.scale_by_m = scale_by_m

    def solve(self, losses: Tensor, rays: Tensor, gram: Tensor) -> list[EPOResult]:
        """One LP per ray from detached (K, m) losses, rays and (K, m, m) Gram matrices."""
        l_np = losses.detach().double().cpu().numpy()
        r_np = rays.detach().double().cpu().numpy()
        c_np = gram.detach().double().cpu().numpy()
        return [epo_lp(l_np[i], r_np[i], c_np[i], self.eps) for i in range(len(r_np))]

    def __call__(self, losses: Tensor, rays: Tensor, gradients: GradientFn | None = None) -> SolverOutput:
        if gradients is None:
            raise ValueError("EPOSolver needs a gradients function (per-objective gradients)")
        lp_losses, grads = gradients(losses)  # (K, m), (K, m, P)
        gram = grads @ grads.transpose(-1, -2)
        results = self.solve(lp_losses, rays, gram)
        beta = torch.as_tensor(np.stack([r.beta for r in results]), dtype=losses.dtype, device=losses.device)
        if self.scale_by_m:
            beta = beta * losses.shape[-1]
        return SolverOutput(
            weighted_loss(losses, beta),
            beta,
            fallbacks=sum(r.fallback for r in results),
            modes=[r.mode for r in results],
            reasons=[r.reason for r in results if r.reason],
        )


def hv_weights(losses: Tensor | np.ndarray, ref_point: Sequence[float], ref_factor: float = 1.1) -> np.ndarray:
    """PHN-HVI's weights (Hoang et al. 2023, HVI ``HvMaximization.compute_weights``) of (K, m) losses → (K, m).

    Non-dominated sorting into fronts; per front the hypervolume gradient ``−∂HV/∂ℓ``
    (:func:`~hyperlit.pareto.hv_gradient.hypervolume_gradient`) against the dynamic reference point
    ``max(ref_point, ref_factor·max_k ℓ_k)`` (per objective, over all K solutions); then each solution's weight
    vector scaled to unit L2 norm (an all-zero vector — duplicates, ties — stays zero).
    """
    arr = losses.detach().cpu().double().numpy() if isinstance(losses, Tensor) else np.asarray(losses, np.float64)
    if arr.ndim != 2:
        raise ValueError(f"HV weights need (K, m) losses, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"HV weights of non-finite losses {arr.tolist()}")
    ref = np.asarray(ref_point, dtype=np.float64)
    if ref.shape != (arr.shape[1],):
        raise ValueError(f"reference point {ref.tolist()} must have {arr.shape[1]} entries (one per objective)")
    ref = np.maximum(ref, ref_factor * arr.max(0))
    fronts = nondominated_fronts(arr)
    grad = np.zeros_like(arr)
    for f in np.unique(fronts):  # a few fronts of K points: CPU work like EPO's LPs
        rows = fronts == f
        grad[rows] = hypervolume_gradient(arr[rows], ref)
    norm = np.linalg.norm(grad, axis=1, keepdims=True)
    return np.divide(grad, norm, out=np.zeros_like(grad), where=norm > 0)


class HVISolver:
    """PHN-HVI (Hoang et al., AAAI 2023): HV-gradient weights plus a cosine penalty towards the rays.

    ``loss = mean_k Σ_j w_kj ℓ_kj − λ·mean_k cos(ℓ_k, r_k)`` (``weighting="intended"``, the paper's objective) or
    ``mean_k (Σ_j w_kj)(Σ_j ℓ_kj)/m − λ·mean_k cos(ℓ_k, r_k)`` (``"as_coded"``: the HVI code's broadcast of a
    (m, 1) weight by an (m,) loss vector, where the weights only rescale the summed losses and the trade-off
    comes from the cosine term). The weights w (:func:`hv_weights`) are constants; the cosine term keeps its
    gradient. Rays of any positive scale give the same cosine.

    Args:
        ref_point: Static reference point of the HV weights (the dynamic one is ``max(ref, 1.1·max ℓ)``).
        penalty: λ of the cosine term (HVI: 5 on Multi-MNIST, 4 on Multi-Fashion(+MNIST)).
        weighting: ``intended`` or ``as_coded``, see above.
    """

    name = "hvi"
    needs_gradients = False

    def __init__(
        self,
        ref_point: Sequence[float],
        penalty: float = 5.0,
        weighting: Literal["intended", "as_coded"] = "intended",
    ) -> None:
        if penalty < 0:
            raise ValueError(f"hvi_penalty must be >= 0, got {penalty}")
        if weighting not in ("intended", "as_coded"):
            raise ValueError(f"hvi_weighting must be 'intended' or 'as_coded', got {weighting!r}")
        self.ref_point = tuple(float(v) for v in ref_point)
        self.penalty = float(penalty)
        self.weighting = weighting

    def __call__(
        self,
        losses: Tensor,
        rays: Tensor,
        gradients: GradientFn | None = None,
        *,
        weight_losses: Tensor | None = None,
        cosine_only: bool = False,
    ) -> SolverOutput:
        """The step's loss from (K, m) ``losses`` at (K, m) ``rays``.

        Args:
            losses: This process's losses (attached to the graph).
            rays: The rays given to the hypernetwork.
            gradients: Unused (HVI needs no per-objective gradients).
            weight_losses: Losses the HV weights are computed from (under DDP the rank mean, so every rank uses
                the same weights); default ``losses``.
            cosine_only: Only ``−mean_k cos(ℓ_k, r_k)`` (HVI's warm-up phase); the weights are still reported.
        """
        source = losses if weight_losses is None else weight_losses
        w = torch.as_tensor(hv_weights(source, self.ref_point), dtype=losses.dtype, device=losses.device)
        cosine = F.cosine_similarity(losses, rays.detach().to(losses), dim=-1).mean()
        if cosine_only:
            return SolverOutput(-cosine, w)
        if self.weighting == "intended":
            hv_term = weighted_loss(losses, w)
        else:
            hv_term = (w.sum(-1) * losses.sum(-1)).mean() / losses.shape[-1]
        return SolverOutput(hv_term - self.penalty * cosine, w)


def make_solver(name: str, epo_eps: float = 1e-4) -> LinearScalarizationSolver | EPOSolver:
    """``"ls"`` or ``"epo"``; ``ValueError`` otherwise."""
    if name == "ls":
        return LinearScalarizationSolver()
    if name == "epo":
        return EPOSolver(eps=epo_eps)
    raise ValueError(f"unknown solver {name!r}; choose 'ls' or 'epo'")
