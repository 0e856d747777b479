"""ImplicitDifferentiationModule / UnrolledDifferentiationModule and TrainingHyperparameters.

Ridge regression (§11.7 of the reference): ``f_w(x) = xᵀw`` (``nn.Linear(d, 1, bias=False)``, float64),
``L_T = (1/n)‖Xw − y‖² + ½ Σ_i e^{λ_i} w_i²`` (mse per example), ``H = 2XᵀX/n + diag(e^λ)``,
``w*(λ) = H⁻¹ 2Xᵀy/n``, ``L_V = (1/m)‖X_v w − y_v‖²`` and ``dL_V/dλ_i = −e^{λ_i} w_i (H⁻¹ ∇_w L_V)_i``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.tuning.implicit import ImplicitDifferentiationModule, UnrolledDifferentiationModule
from hyperlit.tuning.training_hparams import TrainingHyperparameters

D, N, M = 4, 32, 24


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ridge_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + M, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.7 * torch.randn(N + M, generator=g).double()
    return x[:N], y[:N], x[N:], y[N:]


def _hessian(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0] + torch.diag(lam.exp().expand(D))


def _w_star(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(_hessian(x, lam), 2 * x.T @ y / x.shape[0])


def _val_grad(xv: torch.Tensor, yv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 2 * xv.T @ (xv @ w - yv) / xv.shape[0]


def _loaders(x, y, xv, yv) -> dict[str, DataLoader]:
    return {
        "train": DataLoader(TensorDataset(x, y), batch_size=x.shape[0]),
        "hyper": DataLoader(TensorDataset(xv, yv), batch_size=xv.shape[0]),
    }


def _trainer(**kwargs: Any) -> pl.Trainer:
    base: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**base, **kwargs})


def _linear_at(w: torch.Tensor) -> nn.Linear:
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, D))
    return model


def sgd(lr: float, momentum: float = 0.0) -> Any:
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


LAM0 = torch.tensor([-1.0, -0.5, 0.0, -2.0], dtype=torch.float64)


def _ridge_module(cls: type, weight_decay: str, w: torch.Tensor, **kwargs: Any) -> Any:
    module = cls(_linear_at(w), loss="mse", weight_decay=weight_decay, hyper_optimizer=sgd(0.5), **kwargs)
    module.double()
    with torch.no_grad():
        module.hp.log_weight_decay.copy_(LAM0 if weight_decay == "per_weight" else LAM0[:1])
    return module


# -- the ridge hypergradient -------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("weight_decay", ["global", "per_weight"])
def test_first_hyper_step_equals_the_closed_form(solver: str, weight_decay: str) -> None:
    """At w = w*(λ) (a zero training gradient, so the hyper batch's inner step leaves w there) the module's first
    hypergradient equals ``−e^λ w ⊙ H⁻¹∇L_V`` (summed over i for one global λ) and central finite differences of
    ``λ ↦ L_V(w*(λ))``; λ's SGD step is ``−0.5 ×`` the hypergradient."""
    x, y, xv, yv = _ridge_data()
    lam = LAM0 if weight_decay == "per_weight" else LAM0[:1]
    w_star = _w_star(x, y, lam)
    module = _ridge_module(
        ImplicitDifferentiationModule, weight_decay, w_star, solver=solver, iterations=D, optimizer=sgd(0.01)
    )
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    per_weight = -lam.exp() * w_star * torch.linalg.solve(_hessian(x, lam), _val_grad(xv, yv, w_star))
    expected = per_weight if weight_decay == "per_weight" else per_weight.sum(0, keepdim=True)
    hg = module.last_hypergradient
    assert hg is not None and int(module.hyper_steps_done) == 1 and int(module.inner_steps) == 1
    torch.testing.assert_close(hg.total["log_weight_decay"], expected, rtol=1e-9, atol=1e-12)
    assert float(hg.direct["log_weight_decay"].abs().max()) == 0.0  # λ does not enter L_V
    assert hg.residual is not None and hg.residual < 1e-9

    def val_at(lam_: torch.Tensor) -> float:
        w = _w_star(x, y, lam_)
        return float((xv @ w - yv).square().mean())

    eps = 1e-5
    fd = torch.stack(
        [
            torch.tensor((val_at(lam + eps * e) - val_at(lam - eps * e)) / (2 * eps))
            for e in torch.eye(len(lam)).double()
        ]
    )
    torch.testing.assert_close(hg.total["log_weight_decay"], fd.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(module.hp.log_weight_decay.detach(), lam - 0.5 * expected, rtol=1e-9, atol=1e-12)


def test_neumann_and_identity_solvers_follow_the_series_with_alpha_from_the_lr() -> None:
    """``alpha="lr"``: the Neumann series with α = w's learning rate (IHO's choice): ``α Σ_{j=0}^{i} (I − αH)^j b``;
    ``identity`` is its first term."""
    x, y, xv, yv = _ridge_data()
    w_star = _w_star(x, y, LAM0)
    hess, b = _hessian(x, LAM0), _val_grad(xv, yv, w_star)
    alpha = 0.05
    for solver, iterations in (("neumann", 3), ("identity", 0)):
        module = _ridge_module(
            ImplicitDifferentiationModule,
            "per_weight",
            w_star,
            solver=solver,
            iterations=iterations,
            alpha="lr",
            optimizer=sgd(alpha),
        )
        _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
            module, train_dataloaders=_loaders(x, y, xv, yv)
        )
        series = sum(
            torch.linalg.matrix_power(torch.eye(D).double() - alpha * hess, j) @ b for j in range(iterations + 1)
        )
        expected = -LAM0.exp() * w_star * (alpha * series)
        hg = module.last_hypergradient
        torch.testing.assert_close(hg.total["log_weight_decay"], expected, rtol=1e-9, atol=1e-12)
        assert hg.terms == iterations + 1


def test_damping_shifts_the_hessian() -> None:
    x, y, xv, yv = _ridge_data()
    w_star = _w_star(x, y, LAM0)
    module = _ridge_module(
        ImplicitDifferentiationModule, "per_weight", w_star, solver="exact", damping=0.3, optimizer=sgd(0.01)
    )
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    damped = _hessian(x, LAM0) + 0.3 * torch.eye(D).double()
    expected = -LAM0.exp() * w_star * torch.linalg.solve(damped, _val_grad(xv, yv, w_star))
    torch.testing.assert_close(module.last_hypergradient.total["log_weight_decay"], expected, rtol=1e-9, atol=1e-12)


def test_unrolled_from_w_star_equals_the_k_term_neumann_series() -> None:
    """K differentiable GD steps from the fixed point w* (momentum 0, step η) give the IFT hypergradient with the
    K-term Neumann series and α = η; the weights stay at w*."""
    x, y, xv, yv = _ridge_data()
    w_star = _w_star(x, y, LAM0)
    eta, k = 0.05, 4
    module = _ridge_module(UnrolledDifferentiationModule, "per_weight", w_star, steps=k, inner_lr=eta, momentum=0.0)
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    hess, b = _hessian(x, LAM0), _val_grad(xv, yv, w_star)
    series = sum(torch.linalg.matrix_power(torch.eye(D).double() - eta * hess, j) @ b for j in range(k))
    expected = -LAM0.exp() * w_star * (eta * series)
    torch.testing.assert_close(module.last_hypergradient.total["log_weight_decay"], expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(module.model.weight.detach().reshape(-1), w_star, rtol=1e-10, atol=1e-12)


def test_unrolled_with_momentum_equals_finite_differences_and_moves_the_weights() -> None:
    """From w0 = 0: ``dL_V(w_T(λ))/dλ`` through T heavy-ball steps equals central finite differences of the same
    T steps run in the test; the module ends at w_T with the final velocity in SGD's momentum buffer."""
    x, y, xv, yv = _ridge_data()
    eta, mu, steps = 0.05, 0.5, 3
    w0 = torch.zeros(D, dtype=torch.float64)
    module = _ridge_module(UnrolledDifferentiationModule, "per_weight", w0, steps=steps, inner_lr=eta, momentum=mu)
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )

    def run(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = w0.clone(), torch.zeros(D, dtype=torch.float64)
        for _ in range(steps):
            b = mu * b + _hessian(x, lam) @ w - 2 * x.T @ y / N
            w = w - eta * b
        return w, b

    eps = 1e-6
    fd = torch.stack(
        [
            ((xv @ run(LAM0 + eps * e)[0] - yv).square().mean() - (xv @ run(LAM0 - eps * e)[0] - yv).square().mean())
            / (2 * eps)
            for e in torch.eye(D).double()
        ]
    )
    torch.testing.assert_close(module.last_hypergradient.total["log_weight_decay"], fd, rtol=1e-6, atol=1e-9)
    w_t, b_t = run(LAM0)
    torch.testing.assert_close(module.model.weight.detach().reshape(-1), w_t, rtol=1e-10, atol=1e-12)
    opt_w = module.trainer.optimizers[0]
    torch.testing.assert_close(
        opt_w.state[module.model.weight]["momentum_buffer"].reshape(-1), b_t, rtol=1e-10, atol=1e-12
    )


# -- the training hyperparameters ----------------------------------------------------------------------------------
def test_penalty_per_group_matches_its_formula() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    w = dict(model.named_parameters())
    squares = torch.stack([p.detach().square().sum() for p in w.values()])
    flat = torch.cat([p.detach().reshape(-1) for p in w.values()])
    for mode, size in (("global", 1), ("per_layer", 4), ("per_weight", flat.numel())):
        hp = TrainingHyperparameters(model, weight_decay=mode, init_log_decay=0.0)
        lam = torch.linspace(-1.0, 1.0, size)
        with torch.no_grad():
            hp.log_weight_decay.copy_(lam)
        got = hp.penalty(w)
        if mode == "global":
            expected = 0.5 * lam.exp()[0] * squares.sum()
        elif mode == "per_layer":
            expected = 0.5 * (lam.exp() * squares).sum()
        else:
            expected = 0.5 * (lam.exp() * flat.square()).sum()
        torch.testing.assert_close(got, expected)
        assert hp.shapes() == {"log_weight_decay": (size,)}


def test_example_weights_are_mean_normalised_class_and_net_weights() -> None:
    """``ω_i = u_i / mean_j u_j`` with ``u_i = C·softmax(κ)_{y_i} · sigmoid(r_θ(x_i))``; L_T = mean(ω ℓ) + R."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    hp = TrainingHyperparameters(model, weight_decay="global", class_weights=True, num_classes=3, reweighting_net=net)
    assert float(net[2].weight.detach().abs().sum()) == 0.0  # the last layer starts at zero: every ω_i = 1
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = torch.rand(6)
    torch.testing.assert_close(hp.weights(x, y, loss), torch.ones(6))
    with torch.no_grad():
        hp.class_logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
        net[2].weight.normal_()
    u = 3 * torch.softmax(hp.class_logits.detach(), 0)[y] * torch.sigmoid(net(x)[:, 0].detach())
    omega = hp.weights(x, y, loss)
    torch.testing.assert_close(omega, u / u.mean())
    w = dict(model.named_parameters())
    torch.testing.assert_close(hp.train_objective(loss, x, y, w), (omega * loss).mean() + hp.penalty(w))
    assert set(hp.params()) == {
        "log_weight_decay",
        "class_logits",
        *(f"reweighting_net.{n}" for n, _ in net.named_parameters()),
    }
    # the loss-input variant sees the detached per-example loss as a (B, 1) column
    hp_loss = TrainingHyperparameters(model, "none", reweighting_net=nn.Linear(1, 1), reweight_input="loss")
    with torch.no_grad():
        hp_loss.reweighting_net.weight.fill_(2.0)
    s = torch.sigmoid(2.0 * loss)
    torch.testing.assert_close(hp_loss.weights(x, y, loss), s / s.mean())


def test_bad_training_hyperparameters_are_refused() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="weight_decay must be"):
        TrainingHyperparameters(model, weight_decay="l1")
    with pytest.raises(ValueError, match="class_weights needs num_classes"):
        TrainingHyperparameters(model, class_weights=True)
    with pytest.raises(ValueError, match="no hyperparameter to tune"):
        TrainingHyperparameters(model, weight_decay="none")
    with pytest.raises(ValueError, match="reweight_input"):
        TrainingHyperparameters(model, reweight_input="y")
    hp = TrainingHyperparameters(model, "none", reweighting_net=nn.Linear(2, 3))
    with pytest.raises(ValueError, match="one logit per example"):
        hp.weights(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.rand(4))
    hp = TrainingHyperparameters(model, "none", class_weights=True, num_classes=2)
    with pytest.raises(ValueError, match="integer class labels"):
        hp.weights(torch.randn(4, 2), torch.rand(4), torch.rand(4))


# -- the modules' arguments and errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ImplicitDifferentiationModule, {"solver": "lbfgs"}, "solver must be"),
        (ImplicitDifferentiationModule, {"alpha": 0.0}, "alpha must be"),
        (ImplicitDifferentiationModule, {"alpha": "lr2"}, "alpha must be"),
        (ImplicitDifferentiationModule, {"solver": "cg", "iterations": 0}, "iterations must be an int >= 1"),
        (ImplicitDifferentiationModule, {"iterations": -1}, "iterations must be an int >= 0"),
        (ImplicitDifferentiationModule, {"damping": -1.0}, "damping must be"),
        (ImplicitDifferentiationModule, {"hvp_mode": "forward"}, "hvp_mode must be"),
        (ImplicitDifferentiationModule, {"loss": "hinge"}, "loss must be"),
        (ImplicitDifferentiationModule, {"warmup_steps": -1}, "warmup_steps must be"),
        (ImplicitDifferentiationModule, {"hyper_every": 0}, "hyper_every must be"),
        (ImplicitDifferentiationModule, {"nan_policy": "ignore"}, "nan_policy must be"),
        (UnrolledDifferentiationModule, {"steps": 0}, "steps must be"),
        (UnrolledDifferentiationModule, {"steps": 2, "truncate": 3}, "truncate must be"),
        (UnrolledDifferentiationModule, {"momentum": 1.0}, "momentum must be"),
        (UnrolledDifferentiationModule, {"inner_lr": 0.0}, "inner_lr must be"),
        (UnrolledDifferentiationModule, {"optimizer": sgd(0.1)}, "set inner_lr and momentum"),
    ],
)
def test_bad_module_arguments_are_refused(cls: type, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(nn.Linear(2, 2), **kwargs)


def test_bad_optimizer_factory_and_model_are_refused() -> None:
    with pytest.raises(TypeError, match="hyper_optimizer must be a callable"):
        ImplicitDifferentiationModule(nn.Linear(2, 2), hyper_optimizer=0.1)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        ImplicitDifferentiationModule("linear")


def test_plain_batches_and_float_labels_fail_at_the_first_step() -> None:
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(TypeError, match=r"'train': \.\.\., 'hyper'"):
        _trainer(max_epochs=1).fit(ImplicitDifferentiationModule(nn.Linear(3, 2)), DataLoader(TensorDataset(x, y)))
    loaders = {"train": DataLoader(TensorDataset(x, y.float()), batch_size=4), "hyper": DataLoader(TensorDataset(x, y))}
    with pytest.raises(ValueError, match="integer class labels"):
        _trainer(max_epochs=1).fit(ImplicitDifferentiationModule(nn.Linear(3, 2)), train_dataloaders=loaders)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_hypergradient_raises_or_is_skipped(policy: str) -> None:
    """A NaN in the hyper batch: ``raise`` stops with the step; ``skip`` leaves λ as it was and counts the step."""
    x, y, xv, yv = _ridge_data()
    xv = xv.clone()
    xv[0, 0] = float("nan")
    module = _ridge_module(
        ImplicitDifferentiationModule, "global", torch.zeros(D, dtype=torch.float64), nan_policy=policy
    )
    trainer = _trainer(max_epochs=2, limit_val_batches=0)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="hypergradient breakdown at hyper step 1"):
            trainer.fit(module, train_dataloaders=_loaders(x, y, xv, yv))
        return
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.fit(module, train_dataloaders=_loaders(x, y, xv, yv))
    assert int(module.skipped_steps) == 2 and int(module.hyper_steps_done) == 2 and int(module.inner_steps) == 2
    torch.testing.assert_close(module.hp.log_weight_decay.detach(), LAM0[:1])


def test_warmup_and_hyper_every_schedule_the_hyper_batches() -> None:
    """Batches 1-3 are warm-up inner steps; then every second batch is a hyper batch (batches 5, 7, 9)."""
    x, y, xv, yv = _ridge_data()
    module = _ridge_module(
        ImplicitDifferentiationModule,
        "global",
        torch.zeros(D, dtype=torch.float64),
        warmup_steps=3,
        hyper_every=2,
        optimizer=sgd(0.05),
    )
    seen: list[int] = []
    original = module.apply_hypergradient

    def record(*args: Any) -> None:
        seen.append(int(module.inner_steps))
        original(*args)

    module.apply_hypergradient = record  # type: ignore[method-assign]
    _trainer(max_epochs=9, limit_val_batches=0).fit(module, train_dataloaders=_loaders(x, y, xv, yv))
    assert seen == [5, 7, 9] and int(module.hyper_steps_done) == 3


def test_checkpoint_of_another_search_space_is_refused(tmp_path) -> None:
    from hyperlit.checkpoint import CheckpointMismatchError

    x, y, xv, yv = _ridge_data()
    module = _ridge_module(ImplicitDifferentiationModule, "global", torch.zeros(D, dtype=torch.float64))
    trainer = _trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_loaders(x, y, xv, yv))
    trainer.save_checkpoint(tmp_path / "global.ckpt")
    other = _ridge_module(ImplicitDifferentiationModule, "per_weight", torch.zeros(D, dtype=torch.float64))
    with pytest.raises(CheckpointMismatchError, match="hyperparameters"):
        _trainer(max_epochs=2, limit_val_batches=0).fit(
            other, train_dataloaders=_loaders(x, y, xv, yv), ckpt_path=tmp_path / "global.ckpt"
        )


# -- per-weight decay on an MNIST-shaped set ---------------------------------------------------------------------------
def _mnist_shaped(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """784 noisy features, 10 classes; the class raises one feature: 30 training examples overfit the noise."""
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 784, generator=g)
    x[torch.arange(n), y] += 2.0
    return x, y


@pytest.mark.parametrize("cls", [ImplicitDifferentiationModule, UnrolledDifferentiationModule])
def test_per_weight_decay_lowers_the_held_out_loss(cls: type) -> None:
    """7,850 decays (a 784-10 linear model) tuned on a 100-example hyper split lower the loss on 500 unseen
    examples below the same run with λ frozen (its λ optimizer's lr is 0)."""
    from hyperlit.models.mlp import MLP

    g = torch.Generator().manual_seed(0)
    (xt, yt), (xv, yv), (xs, ys) = (_mnist_shaped(n, g) for n in (30, 100, 500))
    loaders = {
        "train": DataLoader(TensorDataset(xt, yt), batch_size=30),
        "hyper": DataLoader(TensorDataset(xv, yv), batch_size=100),
    }
    settings: dict[str, Any] = (
        {"solver": "neumann", "iterations": 3, "alpha": 0.1, "optimizer": sgd(0.1, 0.9)}
        if cls is ImplicitDifferentiationModule
        else {"steps": 3, "inner_lr": 0.1, "momentum": 0.9}
    )
    held_out = {}
    for name, hyper_lr in (("frozen", 0.0), ("tuned", 0.1)):
        torch.manual_seed(0)
        hyper_opt = sgd(0.0) if hyper_lr == 0 else functools.partial(torch.optim.Adam, lr=hyper_lr)
        module = cls(
            MLP(784, (), 10), weight_decay="per_weight", warmup_steps=10, hyper_optimizer=hyper_opt, **settings
        )
        _trainer(max_epochs=40, limit_val_batches=0).fit(module, train_dataloaders=loaders)
        assert module.hp.numel() == 7850 and int(module.hyper_steps_done) == 30
        with torch.no_grad():
            held_out[name] = float(nn.functional.cross_entropy(module(xs), ys))
    assert held_out["tuned"] < held_out["frozen"] - 0.02, held_out


# -- exact resume ---------------------------------------------------------------------------------------------------------
def _digits_module(cls: type) -> Any:
    from hyperlit.models.mlp import MLP

    settings: dict[str, Any] = (
        {"solver": "cg", "iterations": 3, "damping": 1.0, "optimizer": sgd(0.05, 0.9)}
        if cls is ImplicitDifferentiationModule
        else {"steps": 2, "truncate": 1, "inner_lr": 0.05, "momentum": 0.9}
    )
    return cls(
        MLP(64, (8,), 10),
        weight_decay="per_layer",
        init_log_decay=-4.0,
        class_weights=True,
        num_classes=10,
        warmup_steps=3,
        hyper_every=2,
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        **settings,
    )


@pytest.mark.parametrize("cls", [ImplicitDifferentiationModule, UnrolledDifferentiationModule])
def test_resumes_exactly_from_mid_epoch_checkpoints(cls: type, tmp_path) -> None:
    """A checkpoint after every batch (2 epochs × 6); resuming from the warm-up, the first hyper batch and mid-epoch
    2 ends in the uninterrupted run's state (weights, λ, counters, both optimizers' states, generators)."""
    from datamodules.digits import DigitsDataModule
    from hyperlit.checkpoint_io import AtomicCheckpointIO
    from tests.fault_tolerance_helpers import final_state
    from tests.test_fault_tolerance import _assert_same_state

    def trainer(root, **kwargs: Any) -> pl.Trainer:
        return _trainer(
            max_epochs=2,
            limit_train_batches=6,
            limit_val_batches=1,
            default_root_dir=root,
            plugins=[AtomicCheckpointIO()],
            **kwargs,
        )

    pl.seed_everything(0)
    model = _digits_module(cls)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    reference_trainer = trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True)
    reference_trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    reference = final_state(reference_trainer, model)
    assert int(model.hyper_steps_done) == 4 and int(model.inner_steps) == 12
    paths = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    assert len(paths) == 12
    for path in (paths[1], paths[3], paths[8]):
        pl.seed_everything(1)  # another initialisation: everything must come from the checkpoint
        resumed = _digits_module(cls)
        resumed_trainer = trainer(tmp_path / "resumed")
        resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)
        _assert_same_state(reference, final_state(resumed_trainer, resumed))


# -- command line ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ImplicitDifferentiationModule, UnrolledDifferentiationModule])
def test_cli_help_lists_every_argument(cls: type, capsys) -> None:
    import inspect

    from hyperlit.cli import main
    from hyperlit.tuning.implicit import HypergradientModule

    with pytest.raises(SystemExit):
        main(["fit", "--model.help", f"hyperlit.tuning.implicit.{cls.__name__}"])
    shown = set(re.findall(r"^  --model\.([a-z_]+) ", capsys.readouterr().out, flags=re.M))
    own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    loop = set(inspect.signature(HypergradientModule.__init__).parameters) - {"self"}
    if cls is UnrolledDifferentiationModule:
        loop -= {"optimizer"}
    assert own | loop <= shown, sorted((own | loop) - shown)


def test_neumann_damping_enters_through_the_hvp() -> None:
    """``damping=δ`` with the Neumann series: ``α Σ_{j=0}^{i} (I − α(H + δI))^j b``."""
    x, y, xv, yv = _ridge_data()
    w_star = _w_star(x, y, LAM0)
    module = _ridge_module(
        ImplicitDifferentiationModule,
        "per_weight",
        w_star,
        solver="neumann",
        iterations=3,
        alpha=0.05,
        damping=0.4,
        optimizer=sgd(0.01),
    )
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    damped, b = _hessian(x, LAM0) + 0.4 * torch.eye(D).double(), _val_grad(xv, yv, w_star)
    series = sum(torch.linalg.matrix_power(torch.eye(D).double() - 0.05 * damped, j) @ b for j in range(4))
    expected = -LAM0.exp() * w_star * (0.05 * series)
    torch.testing.assert_close(module.last_hypergradient.total["log_weight_decay"], expected, rtol=1e-9, atol=1e-12)


def test_a_warmup_outlasting_the_run_warns_and_an_empty_hyper_stream_fails() -> None:
    x, y, xv, yv = _ridge_data()
    module = _ridge_module(ImplicitDifferentiationModule, "global", torch.zeros(D, dtype=torch.float64), warmup_steps=5)
    with pytest.warns(UserWarning, match="λ never moves"):
        _trainer(max_steps=4, limit_val_batches=0).fit(module, train_dataloaders=_loaders(x, y, xv, yv))
    assert int(module.hyper_steps_done) == 0
    empty = {"train": _loaders(x, y, xv, yv)["train"], "hyper": DataLoader(TensorDataset(xv[:0], yv[:0]))}
    with pytest.raises(ValueError, match=r"the hyper stream .* has no batches"):
        _trainer(max_epochs=1, limit_val_batches=0).fit(
            _ridge_module(ImplicitDifferentiationModule, "global", torch.zeros(D, dtype=torch.float64)),
            train_dataloaders=empty,
        )


def test_truncated_unrolling_differentiates_only_the_last_steps() -> None:
    """``truncate=1`` of 3 heavy-ball steps from w0 = 0: only the last step depends on λ, so
    ``dL_V/dλ_i = ∇L_V(w_3)_i · (−η e^{λ_i} w_{2,i})``."""
    x, y, xv, yv = _ridge_data()
    eta, mu = 0.05, 0.5
    w0 = torch.zeros(D, dtype=torch.float64)
    module = _ridge_module(
        UnrolledDifferentiationModule, "per_weight", w0, steps=3, truncate=1, inner_lr=eta, momentum=mu
    )
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    ws, w, b = [w0], w0.clone(), torch.zeros(D, dtype=torch.float64)
    for _ in range(3):
        b = mu * b + _hessian(x, LAM0) @ w - 2 * x.T @ y / N
        w = w - eta * b
        ws.append(w)
    expected = _val_grad(xv, yv, ws[3]) * (-eta * LAM0.exp() * ws[2])
    hg = module.last_hypergradient
    torch.testing.assert_close(hg.total["log_weight_decay"], expected, rtol=1e-9, atol=1e-12)
    assert hg.terms == 1


def test_hyper_steps_log_the_values_and_the_diagnostics() -> None:
    x, y, xv, yv = _ridge_data()
    module = _ridge_module(
        ImplicitDifferentiationModule, "per_weight", torch.zeros(D, dtype=torch.float64), solver="cg", iterations=2
    )
    trainer = _trainer(max_epochs=2, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loaders(x, y, xv, yv))
    logged = trainer.callback_metrics
    assert {"hyper/loss", "train/loss", "hypergrad/norm", "hypergrad/residual"} <= set(logged)
    torch.testing.assert_close(
        float(logged["hparam/weight_decay_mean"]), float(module.hp.log_weight_decay.detach().exp().mean())
    )
    assert float(logged["hypergrad/hvps"]) == 3.0 and float(logged["hypergrad/terms"]) == 2.0  # 2 CG + 1 mixed
    norm = torch.linalg.vector_norm(module.last_hypergradient.total["log_weight_decay"])
    torch.testing.assert_close(float(logged["hypergrad/norm"]), float(norm))


def test_reweighting_net_gets_the_purely_implicit_hypergradient() -> None:
    """A reweighting net ``s_i = sigmoid(θᵀx_i + c)`` on weighted ridge (``ω_i = s_i / mean s``):
    ``H = 2XᵀΩX/n + diag(e^λ)``, ``w* = H⁻¹ 2XᵀΩy/n``; the module's hypergradient for (θ, c) at w* equals central
    finite differences of ``(θ, c) ↦ L_V(w*(θ, c))``, and its direct part is zero."""
    x, y, xv, yv = _ridge_data()
    theta = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=torch.float64)
    bias = torch.tensor([0.2], dtype=torch.float64)

    def w_star(th: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x @ th.reshape(-1) + c)
        omega = s / s.mean()
        hess = 2 * x.T @ (omega[:, None] * x) / N + torch.diag(LAM0.exp())
        return torch.linalg.solve(hess, 2 * x.T @ (omega * y) / N)

    w0 = w_star(theta, bias)
    module = ImplicitDifferentiationModule(
        _linear_at(w0),
        loss="mse",
        weight_decay="per_weight",
        reweighting_net=nn.Linear(D, 1).double(),
        solver="exact",
        optimizer=sgd(0.01),
        hyper_optimizer=sgd(0.1),
    ).double()
    with torch.no_grad():
        module.hp.log_weight_decay.copy_(LAM0)
        module.hp.reweighting_net.weight.copy_(theta)
        module.hp.reweighting_net.bias.copy_(bias)
    _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        module, train_dataloaders=_loaders(x, y, xv, yv)
    )
    hg = module.last_hypergradient

    def val(th: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (xv @ w_star(th, c) - yv).square().mean()

    eps = 1e-6
    fd_theta = torch.stack(
        [
            (val(theta + eps * e.reshape(1, D), bias) - val(theta - eps * e.reshape(1, D), bias)) / (2 * eps)
            for e in torch.eye(D).double()
        ]
    ).reshape(1, D)
    fd_bias = ((val(theta, bias + eps) - val(theta, bias - eps)) / (2 * eps)).reshape(1)
    torch.testing.assert_close(hg.total["reweighting_net.weight"], fd_theta, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hg.total["reweighting_net.bias"], fd_bias, rtol=1e-6, atol=1e-9)
    assert all(float(t.abs().max()) == 0.0 for t in hg.direct.values())
    assert float(hg.total["reweighting_net.weight"].abs().max()) > 0
