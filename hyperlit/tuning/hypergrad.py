"""Implicit (IFT) and unrolled hypergradients on functional parameters, without Lightning.

Parameters and hyperparameters are plain dicts ``Params = dict[str, Tensor]``; the losses are closures over the
batch (buffers, frozen parameters, dropout masks live in the closure), e.g.
``train_loss(w, lam) = loss(functional_call(model, w, (x,)), y) + penalty(w, lam)``. Every derivative is taken
with :mod:`torch.func` (``grad``, ``jvp``, ``vjp``), so nothing here touches ``.grad`` or builds a persistent graph.

**Implicit differentiation** (:func:`implicit_hypergradient`; Lorraine, Vicol & Duvenaud, AISTATS 2020,
arXiv 1911.02590, Alg. 2; algorithm numbers as in the paper's reimplementations). At an (approximate) minimiser
``w`` of ``L_T(·, λ)`` the implicit function theorem gives

    ``dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) v,   v = H⁻¹ (∂L_V/∂w)ᵀ,   H = ∂²L_T/∂w²``

(both derivatives at ``w``, on the given batch). The first term is the *direct* term (zero unless λ enters
``L_V``), the second the *implicit* term; the sign is ``direct − mixed``, i.e. **not** the official code's
``−(direct + indirect)`` (a known bug there). ``total`` is the gradient to *descend*: ``λ ← λ − η·total`` lowers
``L_V``. Only one inverse-HVP ``v`` and one mixed vector product ``(∂²L_T/∂λ∂w) v`` (a
:func:`torch.func.vjp` of ``∂L_T/∂w`` with respect to λ) are needed, so the cost does not grow with ``dim(λ)``.

Solvers for ``v`` (each a callable ``solver(hvp, b) -> (x, info)`` returning ``x ≈ H⁻¹ b``):

* :class:`ExactSolver` — dense ``H`` from ``d`` HVPs (one per unit vector) and ``torch.linalg.solve`` of
  ``(H + δI) x = b``; tiny models only (refuses ``d > max_dim``). ``hvps = d``, ``terms = None``.
* :class:`NeumannSolver` ``(iterations=i, alpha=α)`` — Alg. 3 of the paper *with* the final α:
  ``x = α Σ_{j=0}^{i} (I − αH)^j b``, i.e. ``i`` iterations give ``i + 1`` terms (``terms = i + 1``,
  ``hvps = i``). It converges to ``H⁻¹ b`` iff ``H ≻ 0`` and ``0 < α < 2/λ_max(H)``; estimate ``λ_max`` with
  :func:`largest_hessian_eigenvalue`.
* :class:`IdentitySolver` ``(alpha)`` — ``NeumannSolver(0, alpha)``: ``x = α b`` (one term, zero HVPs; the
  official code's default ``num_neumann_terms=0``), not "no hypergradient".
* :class:`ConjugateGradientSolver` ``(iterations=K, damping=δ, tol)`` — CG on ``(H + δI) x = b`` from ``x₀ = 0``,
  at most ``K`` iterations (one HVP each; ``terms`` = iterations run), stopping when the recursive residual
  ``‖r‖/‖b‖ ≤ tol``; exact after ``d`` iterations for SPD ``H`` in exact arithmetic. A direction with
  ``pᵀ(H + δI)p ≤ 0`` (indefinite ``H``) raises :class:`HypergradientError`: add damping.

``Hypergradient.hvps`` counts the solver's HVPs **plus one** for the mixed product.

HVPs (:func:`make_hvp`): ``reverse-over-reverse`` (default, ``vjp(grad(L_T))``, one graph stored and reused by every
product; also the only one where an operator lacks forward-mode AD) or ``forward-over-reverse`` (``jvp(grad(L_T))``,
no stored graph, the closure re-run per product: less memory, but on the CPU about ten times slower per Neumann
hypergradient of a 784-10 or 784-50-10 model, see ``docs/benchmarks.md``).

**Unrolled differentiation** (:func:`unrolled_hypergradient`; reverse mode, Franceschi et al., ICML 2017; truncated
to the last ``K`` steps, Shaban et al., AISTATS 2019). ``steps = T`` SGD steps with heavy-ball momentum ``μ``
(PyTorch's convention: ``b_{k+1} = μ b_k + ∇_w L_T(w_k, λ, k)``, ``w_{k+1} = w_k − η b_{k+1}``, ``b_0 = 0``) are run
from ``w₀``; the first ``T − K`` without any graph, the last ``K`` differentiably (nested :func:`torch.func.grad`),
and ``total = d L_V(w_T(λ), λ)/dλ`` through those ``K`` steps (``terms = hvps = K``: reversing one step costs one
HVP and one mixed product). At a fixed point ``w*`` of plain GD with step ``η``, ``K``-step truncated reverse mode
equals the IFT hypergradient with the ``K``-term Neumann series (``i = K − 1``) and ``α = η``.

Errors: bad solver settings raise :class:`ValueError` at construction; a closure that looks up a key missing
from ``w``/``lam`` raises :class:`ValueError` naming the keys; non-finite results and CG breakdown raise
:class:`HypergradientError` (an :class:`ArithmeticError`, so a module's NaN policy can catch it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

__all__ = [
    "ConjugateGradientSolver",
    "ExactSolver",
    "Hypergradient",
    "HypergradientError",
    "IdentitySolver",
    "InverseHVPSolver",
    "NeumannSolver",
    "Params",
    "SolverInfo",
    "implicit_hypergradient",
    "largest_hessian_eigenvalue",
    "make_hvp",
    "unrolled_hypergradient",
]

Params = dict[str, Tensor]
HVPMode = Literal["forward-over-reverse", "reverse-over-reverse"]


class HypergradientError(ArithmeticError):
    """A hypergradient computation broke down (non-finite values, or CG met ``pᵀHp ≤ 0``)."""


@dataclass
class SolverInfo:
    """Diagnostics of one inverse-HVP solve.

    Attributes:
        hvps: Hessian-vector products spent.
        terms: Neumann terms (iterations + 1) or CG iterations run; ``None`` for the exact solver.
        residual: ``‖(H + δI)x − b‖/‖b‖`` where the solver knows it (exact: computed; CG: the recursive residual).
        term_norms: Neumann: ``‖(I − αH)^j b‖`` for ``j = 0..i``; CG: ``‖r_k‖/‖b‖`` after each iteration.
    """

    hvps: int
    terms: int | None
    residual: float | None = None
    term_norms: list[float] = field(default_factory=list)


@dataclass
class Hypergradient:
    """A hypergradient and its diagnostics.

    Attributes:
        total: ``dL_V/dλ`` (direct + implicit/unrolled part), same keys and shapes as ``lam``.
        direct: ``∂L_V/∂λ`` at fixed ``w`` (zeros where λ does not enter ``L_V``).
        val_loss: ``L_V`` at the ``w`` used (detached).
        hvps: Hessian(-like)-vector products spent (implicit: solver HVPs + 1 mixed product; unrolled: ``K``).
        residual: ``‖(H + δI)x − b‖/‖b‖`` of the inverse-HVP when the solver knows it (exact/CG).
        terms: Neumann terms (iterations + 1) / CG iterations / unrolled steps differentiated.
        solver_info: The solver's :class:`SolverInfo` (implicit only).
        velocity: The final (detached) momentum buffer of :func:`unrolled_hypergradient` (``None`` otherwise), to
            continue the inner optimizer from ``w_T``.
    """

    total: Params
    direct: Params
    val_loss: Tensor
    hvps: int
    residual: float | None
    terms: int | None
    solver_info: SolverInfo | None = None
    velocity: Params | None = None


class InverseHVPSolver(Protocol):
    """``solver(hvp, b) -> (x, info)`` with ``x ≈ H⁻¹ b`` (or ``(H + δI)⁻¹ b``), ``hvp(v) = H v``."""

    def __call__(self, hvp: Callable[[Params], Params], b: Params) -> tuple[Params, SolverInfo]: ...


# ----------------------------------------------------------------------------------------------- dict algebra
def _axpy(a: float, x: Params, y: Params) -> Params:
    """``a·x + y``."""
    return {k: y[k] + a * x[k] for k in y}


def _dot(x: Params, y: Params) -> Tensor:
    return sum((x[k] * y[k]).sum() for k in x)  # type: ignore[return-value]


def _norm(x: Params) -> Tensor:
    return torch.sqrt(_dot(x, x))


def _all_finite(x: Params) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in x.values()]).all())


def _detach(p: Params, what: str) -> Params:
    if not isinstance(p, dict) or not p:
        raise ValueError(f"{what} must be a non-empty dict of tensors (Params), got {type(p).__name__}")
    for k, t in p.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{what}[{k!r}] must be a floating-point tensor, got {t!r:.80}")
    return {k: t.detach() for k, t in p.items()}


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@contextmanager
def _keyed(what: str, w: Params, lam: Params) -> Iterator[None]:
    """Turn a ``KeyError`` raised by a closure into a :class:`ValueError` that names the available keys."""
    try:
        yield
    except KeyError as exc:
        raise ValueError(
            f"{what} looked up the key {exc} that is not in its arguments: w has {sorted(w)}, lam has "
            f"{sorted(lam)}; make the closure read its weights/hyperparameters from the dicts it is given, with "
            "the same keys"
        ) from exc


# ------------------------------------------------------------------------------------------------------ HVPs
def make_hvp(
    train_loss: Callable[[Params, Params], Tensor],
    w: Params,
    lam: Params,
    mode: HVPMode = "reverse-over-reverse",
) -> Callable[[Params], Params]:
    """``v ↦ H v`` with ``H = ∂²L_T/∂w²`` at ``(w, lam)``, through :mod:`torch.func`.

    ``reverse-over-reverse`` (default) is ``vjp(grad(L_T))``: one forward/backward kept in memory and reused for
    every product (it also works where an operator lacks forward-mode AD). ``forward-over-reverse`` is
    ``jvp(grad(L_T))``: no graph is stored, but the closure is re-run at every product (a stochastic closure, e.g.
    fresh dropout masks, changes ``H`` between products: fix its randomness); where an operator lacks forward-mode
    AD it raises a :class:`RuntimeError` that says so.

    Args:
        train_loss: ``(w, lam) -> scalar``.
        w: The weights at which ``H`` is taken.
        lam: The hyperparameters (held fixed).
        mode: ``"forward-over-reverse"`` or ``"reverse-over-reverse"``.
    """
    w = _detach(w, "w")
    lam = _detach(lam, "lam")

    def grad_w(w_: Params) -> Params:
        with _keyed("train_loss", w, lam):
            return grad(train_loss)(w_, lam)

    if mode == "forward-over-reverse":

        def hvp(v: Params) -> Params:
            try:
                return jvp(grad_w, (w,), ({k: v[k] for k in w},))[1]
            except RuntimeError as err:
                raise RuntimeError(
                    f"the forward-over-reverse Hessian-vector product failed ({err}); some operators lack forward-mode "
                    "AD of their backward (e.g. F.mse_loss in recent torch): pass "
                    "hvp_mode='reverse-over-reverse'"
                ) from err

        return hvp
    if mode == "reverse-over-reverse":
        _, vjp_fn = vjp(grad_w, w)

        def hvp_rr(v: Params) -> Params:
            return vjp_fn({k: v[k] for k in w})[0]

        return hvp_rr
    raise ValueError(f"mode must be 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}")


def largest_hessian_eigenvalue(
    hvp: Callable[[Params], Params], like: Params, iterations: int = 20, seed: int = 0
) -> float:
    """Power iteration for the largest-magnitude eigenvalue of ``H`` (``λ_max`` when ``H ⪰ 0``).

    Pick the Neumann step ``α < 2/λ_max(H)`` (the series diverges above). Costs ``iterations`` HVPs.

    Args:
        hvp: ``v ↦ H v`` (e.g. from :func:`make_hvp`).
        like: Params with the shapes, dtypes and devices of ``v``.
        iterations: Power iterations (>= 1).
        seed: Seed of the (CPU) generator for the random start vector.

    Returns:
        The Rayleigh quotient ``vᵀHv`` of the last unit iterate ``v``.
    """
    _check_count("iterations", iterations, 1)
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in like.items()}
    n = _norm(v)
    v = {k: t / n for k, t in v.items()}
    rayleigh = torch.zeros(())
    for _ in range(iterations):
        hv = hvp(v)
        rayleigh = _dot(v, hv)
        n = _norm(hv)
        if not bool(n > 0):
            return 0.0
        v = {k: t / n for k, t in hv.items()}
    if not math.isfinite(float(rayleigh)):
        raise HypergradientError(f"power iteration produced a non-finite eigenvalue estimate {float(rayleigh)}")
    return float(rayleigh)


# --------------------------------------------------------------------------------------------------- solvers
class NeumannSolver:
    """``x = α Σ_{j=0}^{i} (I − αH)^j b`` (Lorraine et al. 2020, Alg. 3, with the final α).

    Args:
        iterations: ``i`` (>= 0); ``i`` iterations = ``i`` HVPs = ``i + 1`` terms.
        alpha: Step ``α > 0``; converges iff ``H ≻ 0`` and ``α < 2/λ_max(H)``.
    """

    def __init__(self, iterations: int, alpha: float) -> None:
        _check_count("iterations", iterations, 0)
        _check_positive("alpha", alpha)
        self.iterations = iterations
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(iterations={self.iterations}, alpha={self.alpha})"

    def __call__(self, hvp: Callable[[Params], Params], b: Params) -> tuple[Params, SolverInfo]:
        v = dict(b)
        p = dict(b)
        norms = [_norm(v)]
        for _ in range(self.iterations):
            v = _axpy(-self.alpha, hvp(v), v)
            p = {k: p[k] + v[k] for k in p}
            norms.append(_norm(v))
        x = {k: self.alpha * t for k, t in p.items()}
        term_norms = torch.stack(norms).tolist()
        if not _all_finite(x):
            raise HypergradientError(
                f"the Neumann series is non-finite after {self.iterations} iterations (alpha={self.alpha}); "
                "use alpha < 2/λ_max(H) (see largest_hessian_eigenvalue) or fewer iterations"
            )
        return x, SolverInfo(hvps=self.iterations, terms=self.iterations + 1, term_norms=term_norms)


class IdentitySolver(NeumannSolver):
    """``x = α b``: the Neumann series with zero iterations (one term, no HVP).

    Args:
        alpha: Step ``α > 0``.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__(0, alpha)

    def __repr__(self) -> str:
        return f"IdentitySolver(alpha={self.alpha})"


class ConjugateGradientSolver:
    """Conjugate gradient on ``(H + δI) x = b`` from ``x₀ = 0`` (one HVP per iteration).

    Args:
        iterations: At most this many iterations (>= 1); ``d`` suffice for SPD ``H`` in exact arithmetic.
        damping: ``δ >= 0`` added to the diagonal (makes a mildly indefinite ``H`` usable).
        tol: Stop when the recursive residual ``‖r‖/‖b‖ <= tol``.
    """

    def __init__(self, iterations: int, damping: float = 0.0, tol: float = 1e-10) -> None:
        _check_count("iterations", iterations, 1)
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        self.iterations = iterations
        self.damping = float(damping)
        self.tol = float(tol)

    def __repr__(self) -> str:
        return f"ConjugateGradientSolver(iterations={self.iterations}, damping={self.damping}, tol={self.tol})"

    def __call__(self, hvp: Callable[[Params], Params], b: Params) -> tuple[Params, SolverInfo]:
        x = {k: torch.zeros_like(t) for k, t in b.items()}
        b_norm = float(_norm(b))
        if not math.isfinite(b_norm):
            raise HypergradientError(f"CG right-hand side ∂L_V/∂w is non-finite (norm {b_norm})")
        if b_norm == 0.0:
            return x, SolverInfo(hvps=0, terms=0, residual=0.0)
        r = dict(b)
        p = dict(b)
        rr = _dot(r, r)
        norms: list[float] = []
        done = 0
        rel = 1.0
        for k in range(self.iterations):
            hp = hvp(p)
            if self.damping:
                hp = _axpy(self.damping, p, hp)
            php = _dot(p, hp)
            php_f = float(php)
            done = k + 1
            if not math.isfinite(php_f) or php_f <= 0.0:
                raise HypergradientError(
                    f"CG iteration {k}: pᵀ(H + δI)p = {php_f:.3e} <= 0 or non-finite: H is not positive definite "
                    f"along a search direction (damping={self.damping}); increase damping, start from w nearer a "
                    "minimum, or use NeumannSolver"
                )
            a = rr / php
            x = {n: x[n] + a * p[n] for n in x}
            r = {n: r[n] - a * hp[n] for n in r}
            rr_new = _dot(r, r)
            rel = float(torch.sqrt(rr_new)) / b_norm
            norms.append(rel)
            if rel <= self.tol:
                break
            beta = rr_new / rr
            p = {n: r[n] + beta * p[n] for n in p}
            rr = rr_new
        if not _all_finite(x):
            raise HypergradientError(f"CG produced non-finite values after {done} iterations")
        return x, SolverInfo(hvps=done, terms=done, residual=rel, term_norms=norms)


class ExactSolver:
    """Dense ``(H + δI)⁻¹ b``: ``H`` from ``d`` HVPs (one per unit vector), then ``torch.linalg.solve``.

    Args:
        damping: ``δ >= 0`` added to the diagonal.
        max_dim: Refuse problems with more than this many weights (the dense ``H`` has ``d²`` entries).
    """

    def __init__(self, damping: float = 0.0, max_dim: int = 4096) -> None:
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        _check_count("max_dim", max_dim, 1)
        self.damping = float(damping)
        self.max_dim = max_dim

    def __repr__(self) -> str:
        return f"ExactSolver(damping={self.damping}, max_dim={self.max_dim})"

    def __call__(self, hvp: Callable[[Params], Params], b: Params) -> tuple[Params, SolverInfo]:
        keys = list(b)
        sizes = [b[k].numel() for k in keys]
        d = sum(sizes)
        if d > self.max_dim:
            raise ValueError(
                f"ExactSolver builds a dense {d}x{d} Hessian, more than max_dim={self.max_dim}; use "
                "ConjugateGradientSolver or NeumannSolver for models of this size (or raise max_dim)"
            )
        flat_b = torch.cat([b[k].reshape(-1) for k in keys])

        def unflat(vec: Tensor) -> Params:
            return {k: t.view_as(b[k]) for k, t in zip(keys, vec.split(sizes))}

        eye = torch.eye(d, dtype=flat_b.dtype, device=flat_b.device)
        cols = [torch.cat([h[k].reshape(-1) for k in keys]) for h in (hvp(unflat(eye[i])) for i in range(d))]
        hess = torch.stack(cols, dim=1)
        hess = 0.5 * (hess + hess.T) + self.damping * eye
        if not bool(torch.isfinite(hess).all()):
            raise HypergradientError("the dense Hessian has non-finite entries")
        try:
            x = torch.linalg.solve(hess, flat_b)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise HypergradientError(
                f"the Hessian (+ damping {self.damping}) is singular; add damping ({err})"
            ) from err
        b_norm = float(flat_b.norm())
        residual = float((hess @ x - flat_b).norm()) / b_norm if b_norm > 0 else 0.0
        if not bool(torch.isfinite(x).all()):
            raise HypergradientError("the exact inverse-HVP is non-finite; add damping")
        return unflat(x), SolverInfo(hvps=d, terms=None, residual=residual)


# -------------------------------------------------------------------------------------------- hypergradients
def _val_grads(val_loss: Callable[[Params, Params], Tensor], w: Params, lam: Params) -> tuple[Params, Params, Tensor]:
    with _keyed("val_loss", w, lam):
        (g_w, g_lam), value = grad_and_value(val_loss, argnums=(0, 1))(w, lam)
    return g_w, g_lam, value.detach()


def implicit_hypergradient(
    train_loss: Callable[[Params, Params], Tensor],
    val_loss: Callable[[Params, Params], Tensor],
    w: Params,
    lam: Params,
    solver: InverseHVPSolver,
    *,
    hvp_mode: HVPMode = "reverse-over-reverse",
) -> Hypergradient:
    """IFT hypergradient ``dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂w) H⁻¹ (∂L_V/∂w)ᵀ`` (Lorraine et al. 2020, Alg. 2).

    Args:
        train_loss: ``(w, lam) -> scalar`` on the train batch of this hyper step (deterministic: fix dropout masks).
        val_loss: ``(w, lam) -> scalar`` on the validation batch.
        w: Weights, ideally near a minimum of ``L_T(·, lam)`` (the IFT assumes ``∂L_T/∂w = 0``).
        lam: Hyperparameters.
        solver: An :class:`InverseHVPSolver`, e.g. :class:`NeumannSolver` or :class:`ConjugateGradientSolver`.
        hvp_mode: See :func:`make_hvp`.

    Returns:
        A :class:`Hypergradient` (all tensors detached); descend ``total``.
    """
    w = _detach(w, "w")
    lam = _detach(lam, "lam")
    g_w, direct, value = _val_grads(val_loss, w, lam)
    hvp = make_hvp(train_loss, w, lam, hvp_mode)
    v, info = solver(hvp, g_w)
    if set(v) != set(w):
        raise ValueError(f"the solver returned keys {sorted(v)}, expected the keys of w {sorted(w)}")

    def grad_w_of_lam(lam_: Params) -> Params:
        with _keyed("train_loss", w, lam):
            return grad(train_loss)(w, lam_)

    _, mixed_fn = vjp(grad_w_of_lam, lam)
    (mixed,) = mixed_fn(v)
    total = {k: direct[k] - mixed[k] for k in lam}
    if not _all_finite(total):
        raise HypergradientError(f"the implicit hypergradient is non-finite (solver {solver!r})")
    return Hypergradient(
        total=total,
        direct=direct,
        val_loss=value,
        hvps=info.hvps + 1,
        residual=info.residual,
        terms=info.terms,
        solver_info=info,
    )


def unrolled_hypergradient(
    train_loss: Callable[[Params, Params, int], Tensor],
    val_loss: Callable[[Params, Params], Tensor],
    w0: Params,
    lam: Params,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    truncate: int | None = None,
    *,
    velocity: Params | None = None,
) -> tuple[Hypergradient, Params]:
    """Hypergradient of ``L_V(w_T(λ), λ)`` through ``steps`` SGD(+heavy-ball) steps, truncated to the last ``K``.

    ``truncate=None`` differentiates all ``T`` steps (reverse mode, Franceschi et al. 2017); ``truncate=K`` runs
    the first ``T − K`` steps without a graph (Shaban et al. 2019). Memory grows with ``K``.

    Args:
        train_loss: ``(w, lam, k) -> scalar``, the training loss on the batch of inner step ``k`` (0-based).
        val_loss: ``(w, lam) -> scalar``.
        w0: Starting weights.
        lam: Hyperparameters.
        steps: ``T >= 1`` inner steps.
        lr: Inner step size ``η > 0``.
        momentum: Heavy-ball ``μ`` in ``[0, 1)`` (PyTorch SGD convention, no dampening).
        truncate: ``K`` in ``[1, T]`` or ``None`` (= ``T``).
        velocity: Initial momentum buffer (default zeros), e.g. ``Hypergradient.velocity`` of the previous call.

    Returns:
        ``(hypergradient, w_T)`` with ``w_T`` detached; ``hypergradient.velocity`` is the final momentum buffer.
    """
    _check_count("steps", steps, 1)
    _check_positive("lr", lr)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    k_diff = steps if truncate is None else truncate
    if isinstance(k_diff, bool) or not isinstance(k_diff, int) or not 1 <= k_diff <= steps:
        raise ValueError(f"truncate must be None or an int in [1, steps={steps}], got {truncate!r}")
    w = _detach(w0, "w0")
    lam = _detach(lam, "lam")
    if velocity is None:
        buf = {k: torch.zeros_like(t) for k, t in w.items()}
    else:
        buf = _detach(velocity, "velocity")
        if set(buf) != set(w):
            raise ValueError(f"velocity has keys {sorted(buf)}, expected the keys of w0 {sorted(w)}")

    def step(w_: Params, b_: Params, lam_: Params, k: int) -> tuple[Params, Params]:
        with _keyed("train_loss", w_, lam_):
            g = grad(train_loss)(w_, lam_, k)
        b_new = {n: momentum * b_[n] + g[n] for n in w_} if momentum else g
        return {n: w_[n] - lr * b_new[n] for n in w_}, b_new

    first = steps - k_diff
    for k in range(first):  # no graph: inputs are detached and grad() returns detached tensors
        w, buf = step(w, buf, lam, k)

    def outer(lam_: Params) -> tuple[Tensor, tuple[Params, Params]]:
        w_, b_ = w, buf
        for k in range(first, steps):
            w_, b_ = step(w_, b_, lam_, k)
        with _keyed("val_loss", w_, lam_):
            value = val_loss(w_, lam_)
        return value, (w_, b_)

    total, (value, (w_final, buf_final)) = grad_and_value(outer, has_aux=True)(lam)
    w_final = {k: t.detach() for k, t in w_final.items()}
    buf_final = {k: t.detach() for k, t in buf_final.items()}
    _, direct, _ = _val_grads(val_loss, w_final, lam)
    if not _all_finite(total):
        raise HypergradientError(
            f"the unrolled hypergradient is non-finite (steps={steps}, truncate={k_diff}, lr={lr}); lower lr"
        )
    hg = Hypergradient(
        total=dict(total),
        direct=direct,
        val_loss=value.detach(),
        hvps=k_diff,
        residual=None,
        terms=k_diff,
        velocity=buf_final,
    )
    return hg, w_final
