"""Functional implicit (IFT) and unrolled hypergradients against the closed-form ridge problem (reference stn.md
§11.7 item 3), finite differences and ``torch.autograd`` references; solver and input errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hyperlit.tuning.hypergrad import (
    ConjugateGradientSolver,
    ExactSolver,
    HypergradientError,
    IdentitySolver,
    NeumannSolver,
    Params,
    implicit_hypergradient,
    largest_hessian_eigenvalue,
    make_hvp,
    unrolled_hypergradient,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- L_T = (1/2n)‖Xw − y‖² + ½ Σ_i e^{λ_i} w_i², L_V = (1/2m)‖X_v w − y_v‖² (+ c·Σ e^λ) -------------------------


@dataclass
class Ridge:
    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    lam: Tensor  # () or (d,)
    c: float = 0.0  # weight of the direct term c·Σ e^λ in L_V

    @property
    def d(self) -> int:
        return self.X.shape[1]

    def train_loss(self, w: Params, lam: Params) -> Tensor:
        r = self.X @ w["w"] - self.y
        return 0.5 * (r @ r) / len(self.y) + 0.5 * (lam["log_wd"].exp() * w["w"] ** 2).sum()

    def val_loss(self, w: Params, lam: Params) -> Tensor:
        r = self.Xv @ w["w"] - self.yv
        return 0.5 * (r @ r) / len(self.yv) + self.c * lam["log_wd"].exp().sum()

    def hessian(self, lam: Tensor | None = None) -> Tensor:
        lam = self.lam if lam is None else lam
        return self.X.T @ self.X / len(self.y) + torch.diag(lam.exp() * torch.ones(self.d, dtype=F64))

    def w_star(self, lam: Tensor | None = None) -> Tensor:
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.y / len(self.y))

    def outer(self, lam: Tensor) -> Tensor:
        """λ ↦ L_V(w*(λ), λ)."""
        return self.val_loss({"w": self.w_star(lam)}, {"log_wd": lam})

    def formula(self) -> Tensor:
        """``dL_V/dλ = c e^λ − e^λ w* ⊙ H⁻¹ ∂L_V/∂w`` (summed over features for a scalar λ)."""
        ws = self.w_star()
        g_w = self.Xv.T @ (self.Xv @ ws - self.yv) / len(self.yv)
        per_feature = -self.lam.exp() * ws * torch.linalg.solve(self.hessian(), g_w)
        if self.lam.ndim == 0:
            return per_feature.sum() + self.c * self.lam.exp()
        return per_feature + self.c * self.lam.exp()

    def finite_difference(self, eps: float = 1e-5) -> Tensor:
        flat = self.lam.reshape(-1)
        out = torch.empty_like(flat)
        for i in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[i] = eps
            out[i] = (self.outer((flat + e).view_as(self.lam)) - self.outer((flat - e).view_as(self.lam))) / (2 * eps)
        return out.view_as(self.lam)

    @property
    def w(self) -> Params:
        return {"w": self.w_star()}

    @property
    def lams(self) -> Params:
        return {"log_wd": self.lam}

    def lam_max(self) -> float:
        return torch.linalg.eigvalsh(self.hessian())[-1].item()


def ridge(per_feature: bool = False, c: float = 0.0, d: int = 5, seed: int = 0) -> Ridge:
    g = torch.Generator().manual_seed(seed)
    n, m = 30, 20
    X = torch.randn(n, d, generator=g, dtype=F64)
    w_true = torch.randn(d, generator=g, dtype=F64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=F64)
    Xv = torch.randn(m, d, generator=g, dtype=F64)
    yv = Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=F64)
    lam = torch.linspace(-2.0, 0.0, d, dtype=F64) if per_feature else torch.tensor(-1.0, dtype=F64)
    return Ridge(X, y, Xv, yv, lam, c)


def err(a: Tensor, b: Tensor) -> float:
    return (a - b).norm().item()


# -- implicit -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_exact_matches_formula_and_finite_differences(per_feature: bool, mode: str) -> None:
    p = ridge(per_feature)
    hg = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ExactSolver(), hvp_mode=mode)
    assert hg.total["log_wd"].shape == p.lam.shape
    torch.testing.assert_close(hg.total["log_wd"], p.formula(), rtol=0, atol=1e-10)
    torch.testing.assert_close(hg.total["log_wd"], p.finite_difference(), rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(hg.direct["log_wd"]) == 0
    assert hg.residual is not None and hg.residual < 1e-12
    assert hg.hvps == p.d + 1 and hg.terms is None
    torch.testing.assert_close(hg.val_loss, p.val_loss(p.w, p.lams))


@pytest.mark.parametrize("per_feature", [False, True])
def test_cg_with_d_iterations_is_exact(per_feature: bool) -> None:
    p = ridge(per_feature)
    exact = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ExactSolver())
    cg = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ConjugateGradientSolver(p.d, tol=0.0))
    torch.testing.assert_close(cg.total["log_wd"], exact.total["log_wd"], rtol=0, atol=1e-10)
    assert cg.terms == p.d and cg.hvps == p.d + 1
    assert cg.residual is not None and cg.residual < 1e-8
    short = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ConjugateGradientSolver(2, tol=0.0))
    assert short.residual is not None and short.residual > 1e-6  # 2 < d iterations: not converged, and says so


def test_cg_damping_solves_the_damped_system() -> None:
    p = ridge()
    b = {"w": torch.randn(p.d, dtype=F64, generator=torch.Generator().manual_seed(1))}
    x, info = ConjugateGradientSolver(p.d, damping=0.3)(make_hvp(p.train_loss, p.w, p.lams), b)
    torch.testing.assert_close(x["w"], torch.linalg.solve(p.hessian() + 0.3 * torch.eye(p.d, dtype=F64), b["w"]))
    xe, _ = ExactSolver(damping=0.3)(make_hvp(p.train_loss, p.w, p.lams), b)
    torch.testing.assert_close(x["w"], xe["w"], rtol=0, atol=1e-10)
    assert info.terms == len(info.term_norms)


def test_cg_stops_at_tolerance() -> None:
    p = ridge(d=8)
    _, info = ConjugateGradientSolver(50, tol=1e-6)(make_hvp(p.train_loss, p.w, p.lams), {"w": p.w_star()})
    assert info.terms is not None and info.terms <= p.d
    assert info.residual is not None and info.residual <= 1e-6


def test_neumann_converges_below_and_diverges_above_two_over_lambda_max() -> None:
    p = ridge(per_feature=True)
    exact = p.formula()
    lm = p.lam_max()
    b = {"w": p.Xv.T @ (p.Xv @ p.w_star() - p.yv) / len(p.yv)}
    hinv_b = torch.linalg.solve(p.hessian(), b["w"])
    rr = "reverse-over-reverse"  # one stored graph reused by every product: the fast mode on tiny CPU problems
    hvp = make_hvp(p.train_loss, p.w, p.lams, rr)

    def errors(alpha: float, ks: list[int]) -> tuple[list[float], list[float]]:
        hyper, inverse = [], []
        for k in ks:
            solver = NeumannSolver(k, alpha)
            hyper.append(
                err(
                    implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, solver, hvp_mode=rr).total["log_wd"],
                    exact,
                )
            )
            inverse.append(err(solver(hvp, b)[0]["w"], hinv_b))
        return hyper, inverse

    ks = [0, 4, 16, 64]
    hyper, inverse = errors(1.0 / lm, ks)
    assert all(a > b for a, b in itertools.pairwise(inverse)), inverse
    assert all(a > b for a, b in itertools.pairwise(hyper)), hyper
    assert hyper[-1] < 1e-10
    hyper, inverse = errors(2.2 / lm, [8, 16, 32, 64])
    assert all(a < b for a, b in itertools.pairwise(inverse)), inverse
    assert all(a < b for a, b in itertools.pairwise(hyper)), hyper
    assert hyper[-1] > 1e3 * abs(exact).max().item()


def test_neumann_counts_terms_and_identity_is_zero_iterations() -> None:
    p = ridge()
    hvp = make_hvp(p.train_loss, p.w, p.lams)
    b = {"w": torch.ones(p.d, dtype=F64)}
    x, info = NeumannSolver(3, 0.1)(hvp, b)
    h = p.hessian()
    m = torch.eye(p.d, dtype=F64) - 0.1 * h
    expected = 0.1 * sum(torch.linalg.matrix_power(m, j) @ b["w"] for j in range(4))
    torch.testing.assert_close(x["w"], expected, rtol=0, atol=1e-12)
    assert (info.hvps, info.terms, len(info.term_norms)) == (3, 4, 4)
    xi, ii = IdentitySolver(0.1)(hvp, b)
    torch.testing.assert_close(xi["w"], 0.1 * b["w"])
    assert (ii.hvps, ii.terms) == (0, 1)
    hg = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, IdentitySolver(0.1))
    assert (hg.hvps, hg.terms, hg.residual) == (1, 1, None)


def test_power_iteration_finds_lambda_max() -> None:
    p = ridge(per_feature=True)
    est = largest_hessian_eigenvalue(make_hvp(p.train_loss, p.w, p.lams, "reverse-over-reverse"), p.w, iterations=100)
    assert est == pytest.approx(p.lam_max(), rel=1e-8)


def test_direct_term_has_the_right_sign() -> None:
    p = ridge(per_feature=True, c=0.05)
    hg = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ExactSolver())
    torch.testing.assert_close(hg.direct["log_wd"], 0.05 * p.lam.exp())
    torch.testing.assert_close(hg.total["log_wd"], p.finite_difference(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hg.total["log_wd"], p.formula(), rtol=0, atol=1e-10)
    # the official code's −(direct + indirect) would be off by 2·direct from the finite differences
    wrong = -(hg.direct["log_wd"] + (hg.direct["log_wd"] - hg.total["log_wd"]))
    assert err(wrong, p.finite_difference()) > 1e-3
    # a hyperparameter that enters only L_V: its hypergradient is the direct term alone
    lams = {**p.lams, "val_only": torch.tensor(0.3, dtype=F64)}

    def val_loss(w: Params, lam: Params) -> Tensor:
        return p.val_loss(w, lam) + lam["val_only"] ** 2

    both = implicit_hypergradient(p.train_loss, val_loss, p.w, lams, ExactSolver())
    unrolled, _ = unrolled_hypergradient(lambda w, lam, k: p.train_loss(w, lam), val_loss, p.w, lams, 2, 0.1)
    for h in (both, unrolled):
        torch.testing.assert_close(h.total["val_only"], torch.tensor(0.6, dtype=F64))
        torch.testing.assert_close(h.direct["val_only"], torch.tensor(0.6, dtype=F64))
    torch.testing.assert_close(both.total["log_wd"], hg.total["log_wd"])


def test_one_hyper_step_lowers_the_validation_loss() -> None:
    p = ridge(per_feature=True)
    hg = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ConjugateGradientSolver(p.d))
    stepped = p.lam - 1.0 * hg.total["log_wd"]
    assert p.outer(stepped) < p.outer(p.lam)
    assert hg.val_loss == pytest.approx(p.outer(p.lam).item())


# -- HVP on a small non-linear net --------------------------------------------------------------------------------


def test_hvp_matches_autograd_on_a_tanh_mlp() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    y = torch.randn(7, 2, generator=g, dtype=F64)
    names = [n for n, _ in net.named_parameters()]
    w = {n: t.detach().clone() for n, t in net.named_parameters()}
    lam = {"log_wd": torch.tensor(-2.0, dtype=F64)}

    def train_loss(w_: Params, lam_: Params) -> Tensor:
        out = functional_call(net, w_, (x,))
        return ((out - y) ** 2).mean() + 0.5 * lam_["log_wd"].exp() * sum((t**2).sum() for t in w_.values())

    v = {n: torch.randn(t.shape, generator=g, dtype=F64) for n, t in w.items()}

    def as_tuple_loss(*ts: Tensor) -> Tensor:
        return train_loss(dict(zip(names, ts)), lam)

    _, ref = torch.autograd.functional.hvp(as_tuple_loss, tuple(w[n] for n in names), tuple(v[n] for n in names))
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
        hv = make_hvp(train_loss, w, lam, mode)(v)
        for n, r in zip(names, ref):
            torch.testing.assert_close(hv[n], r, rtol=1e-10, atol=1e-12)


class _NoForwardAD(torch.autograd.Function):
    """``x²`` with a backward but no ``jvp``: forward-mode AD through it is unavailable."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_missing_forward_ad_points_to_reverse_over_reverse() -> None:
    p = ridge()

    def train_loss(w: Params, lam: Params) -> Tensor:
        return p.train_loss(w, lam) + _NoForwardAD.apply(w["w"]).sum()

    with pytest.raises(RuntimeError, match="hvp_mode='reverse-over-reverse'"):
        implicit_hypergradient(
            train_loss, p.val_loss, p.w, p.lams, NeumannSolver(1, 0.1), hvp_mode="forward-over-reverse"
        )
    hv = make_hvp(train_loss, p.w, p.lams, "reverse-over-reverse")({"w": torch.ones(p.d, dtype=F64)})
    torch.testing.assert_close(hv["w"], (p.hessian() + 2 * torch.eye(p.d, dtype=F64)) @ torch.ones(p.d, dtype=F64))


# -- unrolled -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7])
def test_truncated_reverse_at_the_optimum_equals_neumann(k: int) -> None:
    p = ridge(per_feature=True)
    alpha = 1.0 / p.lam_max()
    neumann = implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, NeumannSolver(k - 1, alpha))

    def train_loss(w: Params, lam: Params, step: int) -> Tensor:
        return p.train_loss(w, lam)

    full, w_t = unrolled_hypergradient(train_loss, p.val_loss, p.w, p.lams, steps=k, lr=alpha)
    truncated, _ = unrolled_hypergradient(train_loss, p.val_loss, p.w, p.lams, steps=k + 4, lr=alpha, truncate=k)
    for hg in (full, truncated):
        torch.testing.assert_close(hg.total["log_wd"], neumann.total["log_wd"], rtol=0, atol=1e-8)
        assert hg.terms == k and hg.hvps == k
    torch.testing.assert_close(w_t["w"], p.w_star(), rtol=0, atol=1e-12)


def test_unrolled_gd_approaches_ift_as_steps_grow() -> None:
    p = ridge(per_feature=True)
    exact = p.formula()
    eig = torch.linalg.eigvalsh(p.hessian())
    lr = 2.0 / (eig[0] + eig[-1]).item()  # the fastest plain-GD step
    w0 = {"w": torch.zeros(p.d, dtype=F64)}
    errors = []
    for steps in (4, 8, 16, 32):
        hg, _ = unrolled_hypergradient(lambda w, lam, k: p.train_loss(w, lam), p.val_loss, w0, p.lams, steps, lr)
        errors.append(err(hg.total["log_wd"], exact))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-8


def test_unrolled_matches_finite_differences_with_momentum_and_direct_term() -> None:
    """The unrolled map λ ↦ L_V(w_T(λ), λ) itself, differentiated through 6 heavy-ball steps."""
    p = ridge(per_feature=True, c=0.05)
    w0 = {"w": torch.zeros(p.d, dtype=F64)}

    def train_loss(w: Params, lam: Params, k: int) -> Tensor:
        return p.train_loss(w, lam) * (1.0 + 0.1 * k)  # a different "batch" per step

    def run(lam: Tensor):
        return unrolled_hypergradient(train_loss, p.val_loss, w0, {"log_wd": lam}, steps=6, lr=0.3, momentum=0.9)

    hg, _ = run(p.lam)
    eps = 1e-6
    fd = torch.stack(
        [
            (run(p.lam + eps * e)[0].val_loss - run(p.lam - eps * e)[0].val_loss) / (2 * eps)
            for e in torch.eye(p.d, dtype=F64)
        ]
    )
    torch.testing.assert_close(hg.total["log_wd"], fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hg.direct["log_wd"], 0.05 * p.lam.exp())


def test_unrolled_matches_an_autograd_reference_and_resumes_momentum() -> None:
    p = ridge(per_feature=True)
    w0 = {"w": torch.zeros(p.d, dtype=F64)}
    lr, mu, steps, k = 0.2, 0.8, 7, 3

    def train_loss(w: Params, lam: Params, step: int) -> Tensor:
        return p.train_loss(w, lam) * (1.0 + 0.05 * step)

    hg, w_t = unrolled_hypergradient(train_loss, p.val_loss, w0, p.lams, steps, lr, momentum=mu, truncate=k)
    # reference: plain autograd, torch.optim.SGD's update rule, graph only through the last k steps
    lam = p.lam.clone().requires_grad_(True)
    w, buf = torch.zeros(p.d, dtype=F64), torch.zeros(p.d, dtype=F64)
    for step in range(steps):
        differentiable = step >= steps - k
        if not differentiable:
            w, buf, lam_in = w.detach().requires_grad_(True), buf.detach(), lam.detach()
        else:
            lam_in = lam
        if not w.requires_grad:
            w.requires_grad_(True)
        (g,) = torch.autograd.grad(train_loss({"w": w}, {"log_wd": lam_in}, step), w, create_graph=differentiable)
        buf = mu * buf + g
        w = w - lr * buf
        if not differentiable:
            w, buf = w.detach(), buf.detach()
    (ref,) = torch.autograd.grad(p.val_loss({"w": w}, {"log_wd": lam}), lam)
    torch.testing.assert_close(hg.total["log_wd"], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_t["w"], w.detach())
    assert hg.velocity is not None
    torch.testing.assert_close(hg.velocity["w"], buf.detach())
    # continuing from (w_T, velocity) == one longer run
    first, w_a = unrolled_hypergradient(train_loss, p.val_loss, w0, p.lams, 3, lr, momentum=mu)
    _, w_b = unrolled_hypergradient(
        lambda w, lam, s: train_loss(w, lam, s + 3),
        p.val_loss,
        w_a,
        p.lams,
        4,
        lr,
        momentum=mu,
        velocity=first.velocity,
    )
    torch.testing.assert_close(w_b["w"], w_t["w"], rtol=0, atol=1e-12)


# -- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NeumannSolver(3, 0.0), "alpha must be a finite number > 0"),
        (lambda: NeumannSolver(3, -0.1), "alpha must be a finite number > 0"),
        (lambda: IdentitySolver(float("nan")), "alpha must be a finite number > 0"),
        (lambda: NeumannSolver(-1, 0.1), "iterations must be an int >= 0"),
        (lambda: NeumannSolver(2.5, 0.1), "iterations must be an int >= 0"),
        (lambda: ConjugateGradientSolver(0), "iterations must be an int >= 1"),
        (lambda: ConjugateGradientSolver(3, damping=-1.0), "damping must be"),
        (lambda: ExactSolver(damping=float("inf")), "damping must be"),
        (lambda: ConjugateGradientSolver(3, tol=-1.0), "tol must be"),
        (
            lambda: largest_hessian_eigenvalue(dict, {"w": torch.ones(2)}, iterations=0),
            "iterations must be an int >= 1",
        ),
    ],
)
def test_bad_solver_settings_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_key_mismatch_raises() -> None:
    p = ridge()

    def wrong_train(w: Params, lam: Params) -> Tensor:
        return p.train_loss(w, {"log_wd": lam["weight_decay"]})

    def wrong_val(w: Params, lam: Params) -> Tensor:
        return p.val_loss({"w": w["weights"]}, lam)

    with pytest.raises(ValueError, match=r"train_loss looked up the key 'weight_decay'.*lam has \['log_wd'\]"):
        implicit_hypergradient(wrong_train, p.val_loss, p.w, p.lams, NeumannSolver(2, 0.1))
    with pytest.raises(ValueError, match=r"val_loss looked up the key 'weights'.*w has \['w'\]"):
        implicit_hypergradient(p.train_loss, wrong_val, p.w, p.lams, NeumannSolver(2, 0.1))
    with pytest.raises(ValueError, match="train_loss looked up the key 'weight_decay'"):
        unrolled_hypergradient(lambda w, lam, k: wrong_train(w, lam), p.val_loss, p.w, p.lams, 2, 0.1)


def test_indefinite_hessian_in_cg_raises() -> None:
    a = torch.diag(torch.tensor([1.0, -2.0, 0.5], dtype=F64))

    def train_loss(w: Params, lam: Params) -> Tensor:
        return 0.5 * w["w"] @ a @ w["w"] + lam["l"] * w["w"].sum()

    def val_loss(w: Params, lam: Params) -> Tensor:
        return w["w"].sum()

    w = {"w": torch.zeros(3, dtype=F64)}
    lam = {"l": torch.tensor(0.0, dtype=F64)}
    with pytest.raises(HypergradientError, match="not positive definite"):
        implicit_hypergradient(train_loss, val_loss, w, lam, ConjugateGradientSolver(3))
    # enough damping makes H + δI positive definite: then CG is exact
    hg = implicit_hypergradient(train_loss, val_loss, w, lam, ConjugateGradientSolver(3, damping=3.0))
    expected = -(torch.ones(3, dtype=F64) / (torch.diagonal(a) + 3.0)).sum()
    torch.testing.assert_close(hg.total["l"], expected)


def test_divergent_neumann_and_too_large_exact_raise() -> None:
    p = ridge()
    with pytest.raises(HypergradientError, match="Neumann series is non-finite"):
        implicit_hypergradient(
            p.train_loss, p.val_loss, p.w, p.lams, NeumannSolver(60, 1e6), hvp_mode="reverse-over-reverse"
        )
    with pytest.raises(ValueError, match="more than max_dim=3"):
        implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, ExactSolver(max_dim=3))
    with pytest.raises(ValueError, match="mode must be"):
        make_hvp(p.train_loss, p.w, p.lams, "forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty dict of tensors"):
        implicit_hypergradient(p.train_loss, p.val_loss, {}, p.lams, ExactSolver())

    def wrong_keys(hvp, b: Params):
        return {"v": b["w"]}, NeumannSolver(0, 1.0)(hvp, b)[1]

    with pytest.raises(ValueError, match=r"the solver returned keys \['v'\], expected the keys of w \['w'\]"):
        implicit_hypergradient(p.train_loss, p.val_loss, p.w, p.lams, wrong_keys)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"truncate": 0}, r"truncate must be None or an int in \[1, steps=4\]"),
        ({"truncate": 5}, r"truncate must be None or an int in \[1, steps=4\]"),
        ({"velocity": {"v": torch.zeros(5, dtype=F64)}}, "velocity has keys"),
    ],
)
def test_bad_unrolled_settings_raise(kwargs: dict, match: str) -> None:
    p = ridge()
    args = {"steps": 4, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        unrolled_hypergradient(lambda w, lam, k: p.train_loss(w, lam), p.val_loss, p.w, p.lams, **args)
