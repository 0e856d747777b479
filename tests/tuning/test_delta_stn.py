"""DeltaSelfTuningModule (Δ-STN): centred response, linearization, the split of the two updates, the λ-step
hypergradient, optimizers, exact resume, CLI and a short ridge run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import DigitsDataModule
from hyperlit.hparams import Hyperparameter
from hyperlit.models.stn_cnn import StnAlexNet, StnMLP, StnSmallCNN
from hyperlit.nn.stn import StnLinear, StnNet, convert_to_stn
from hyperlit.tuning.delta_stn import DeltaSelfTuningModule
from tests.fault_tolerance_helpers import final_state
from tests.test_fault_tolerance import _assert_same_state
from tests.tuning.test_bilevel import adam, sgd
from tests.tuning.test_stn_module import RidgeNet, _ridge_problem


def _plain_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout2d(0.2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(6, 3),
    )


def _converted(**kwargs) -> tuple[nn.Module, DeltaSelfTuningModule]:
    torch.manual_seed(0)
    plain = _plain_cnn().double()
    with torch.no_grad():  # non-trivial running statistics
        plain[1].running_mean.normal_(0, 0.3)
        plain[1].running_var.uniform_(0.5, 2.0)
    net = convert_to_stn(plain, dropout_hparams={"4": "drop_conv", "8": "drop_fc"}, v_std=0.5)
    module = DeltaSelfTuningModule(net, plot_schedule=False, **kwargs).double()
    with torch.no_grad():  # a non-trivial response
        for layer in module.net.stn_layers():
            layer.response_weight.normal_(0, 0.5)
            layer.response_bias.normal_(0, 0.5)
    return plain, module


def _fixed_gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


# -- the centred response ---------------------------------------------------------------------------------------------
def test_zero_centred_input_or_zero_response_is_the_plain_network() -> None:
    plain, module = _converted()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    plain.eval(), module.eval()
    expected = plain(x)
    # evaluation, prediction and the hyper loss at λ̂ run at ε = 0: the general weights, whatever Θ is
    torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.predict_step(x, 0), expected, atol=1e-6, rtol=0)
    y = torch.randint(0, 3, (5,))
    loss, (logits, _) = module.evaluate((x, y))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.hyper_loss((x, y), module.space.repeat(5)), loss, atol=1e-6, rtol=0)
    assert torch.count_nonzero(module.hnet_input(module.space.repeat(5))) == 0
    # Θ = 0: the plain network at any ε, linearized or not
    eps = torch.randn(5, module.space.dim, dtype=torch.float64)
    assert not torch.allclose(module.net(x, eps), expected, atol=1e-3)
    with torch.no_grad():
        for p in module.response_parameters():
            p.zero_()
    torch.testing.assert_close(module.net(x, eps), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.response_forward(x, eps, {}), expected, atol=1e-6, rtol=0)


def test_centred_input_has_value_epsilon_and_gradient_identity() -> None:
    _, module = _converted()
    lam = module.space.perturb(4)
    eps = module.hnet_input(lam)
    torch.testing.assert_close(eps, (lam - module.space.unconstrained).detach(), atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(eps.sum(), module.space.unconstrained)
    torch.testing.assert_close(g, torch.full_like(g, 4.0))  # d ε / d λ̂ = identity per row
    (gs,) = torch.autograd.grad(module.hnet_input(lam).sum(), module.space.scale)
    assert gs.abs().min() > 0  # and σ through the reparameterised sample


# -- the linearized response ---------------------------------------------------------------------------------------
def test_linearized_prediction_is_first_order_taylor_in_epsilon() -> None:
    _, module = _converted()
    module.train()  # dropout on (the same masks everywhere: one fixed generator per call), BN on batch statistics
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    hp = {
        "drop_conv": torch.full((6,), 0.2, dtype=torch.float64),
        "drop_fc": torch.full((6,), 0.3, dtype=torch.float64),
    }
    eps = torch.randn(6, module.space.dim, dtype=torch.float64)
    bn = module.net.module[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    lin = module.response_forward(x, eps, hp, generator=_fixed_gen())
    # step (b) never touches the running statistics (they are the general network's)
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))

    def f(e: Tensor) -> Tensor:
        return module._detached_call("forward", x, e, hp, generator=_fixed_gen())

    h = 1e-6
    directional = (f(h * eps) - f(-h * eps)) / (2 * h)
    torch.testing.assert_close(lin, f(torch.zeros_like(eps)) + directional, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(lin, f(eps), atol=1e-3)  # the network is not linear in ε


def test_linearized_equals_plain_response_when_the_network_is_linear_in_epsilon() -> None:
    class OneLayer(StnNet):
        hparam_names = ("l2",)

        def __init__(self) -> None:
            super().__init__()
            self.hdim = 1
            self.lin = StnLinear(4, 3, hdim=1, v_std=0.5)

        def forward(self, x, hnet_input, hparams=None, generator=None) -> Tensor:
            return self.lin(x, hnet_input)

    hps = [Hyperparameter("l2", 0.0, math.inf, init=0.1, transform="log")]
    module = DeltaSelfTuningModule(OneLayer(), hyperparameters=hps, plot_schedule=False).double()
    x, eps = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    lin = module.response_forward(x, eps, {})
    module.linearize = False
    torch.testing.assert_close(lin, module.response_forward(x, eps, {}), atol=1e-12, rtol=0)
    torch.testing.assert_close(lin, module.net(x, eps), atol=1e-12, rtol=0)


# -- the two updates -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("linearize", [True, False])
def test_one_backward_gives_w0_the_general_and_theta_the_response_gradient(linearize: bool) -> None:
    _, module = _converted(linearize=linearize)
    module.train()
    x, y = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    general, response = module.phi_parameters(), module.response_parameters()
    hyper = {id(p) for p in module.space.parameters()}
    assert {id(p) for p in general} | {id(p) for p in response} == {
        id(p) for p in module.parameters() if id(p) not in hyper
    }
    assert not {id(p) for p in general} & {id(p) for p in response}
    loss_a = module.general_loss((x, y))
    loss_b = module.response_loss((x, y), module.sample_train_lambda(6))
    g_a = torch.autograd.grad(loss_a, general + response, retain_graph=True)
    g_b = torch.autograd.grad(loss_b, general + response, retain_graph=True, allow_unused=True)
    k = len(general)
    assert all(torch.count_nonzero(g) == 0 for g in g_a[k:])  # at ε = 0, Θ gets exactly zero gradient from L_a
    assert all(g is None for g in g_b[:k])  # L_b never reaches the (detached) general weights
    assert sum(float(g.abs().sum()) for g in g_b[k:]) > 0
    (loss_a + loss_b).backward()
    for p, g in zip(general, g_a[:k]):
        torch.testing.assert_close(p.grad, g, atol=0, rtol=0)
    for p, g in zip(response, g_b[k:]):
        torch.testing.assert_close(p.grad, g, atol=0, rtol=0)


def _mlp_module(**kwargs) -> DeltaSelfTuningModule:
    torch.manual_seed(0)
    net = StnMLP(in_features=64, hidden=(16,), num_classes=10)
    hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.1)]
    return DeltaSelfTuningModule(net, hyperparameters=hps, plot_schedule=False, **kwargs)


@pytest.mark.parametrize("frozen", ["general", "response"])
def test_each_optimizer_moves_only_its_own_parameters(make_trainer, frozen: str) -> None:
    lr = {"general": (0.0, 0.1), "response": (0.1, 0.0)}[frozen]
    module = _mlp_module(
        warmup_steps=2, phi_optimizer=sgd(lr[0], momentum=0.0), response_optimizer=sgd(lr[1], momentum=0.0)
    )
    general = [p.detach().clone() for p in module.phi_parameters()]
    response = [p.detach().clone() for p in module.response_parameters()]
    trainer = make_trainer(limit_train_batches=4, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.phi_steps) == 4 and int(module.hyper_steps_done) == 1
    opts = trainer.optimizers
    assert len(opts) == 4 and opts[3].param_groups[0]["lr"] == lr[1]  # [φ = w₀, λ, σ, Θ]
    assert [id(p) for p in opts[3].param_groups[0]["params"]] == [id(p) for p in module.response_parameters()]
    same_general = all(torch.equal(a, b) for a, b in zip(general, module.phi_parameters()))
    same_response = all(torch.equal(a, b) for a, b in zip(response, module.response_parameters()))
    assert (same_general, same_response) == ((True, False) if frozen == "general" else (False, True))


def test_default_optimizers_are_separate_and_alike(make_trainer) -> None:
    module = _mlp_module(warmup_steps=1)
    trainer = make_trainer(limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    general, response = trainer.optimizers[0], trainer.optimizers[3]
    assert type(general) is type(response) is torch.optim.SGD and response is not general
    for opt in (general, response):
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (0.01, 0.9)


# -- the λ-step ---------------------------------------------------------------------------------------------------
def test_hyper_step_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    net = StnMLP(in_features=5, hidden=(7,), num_classes=3)
    hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.2, init_sigma=0.3)]
    module = DeltaSelfTuningModule(net, hyperparameters=hps, plot_schedule=False).double()
    with torch.no_grad():  # a non-trivial response
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 0.5)
    module.eval()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    noise = torch.randn(8, module.space.dim, dtype=torch.float64)
    u0, s0 = module.space.unconstrained.detach().clone(), module.space.scale.detach().clone()

    def f(u: Tensor, s: Tensor) -> Tensor:  # λ̂ (the centre) stays fixed, as in the λ-step
        return module.hyper_loss((x, y), u + torch.nn.functional.softplus(s) * noise)

    lam = module.space.unconstrained + module.space.sigma * noise  # the reparameterised λ_b of the λ-step
    grad_u, grad_s = torch.autograd.grad(
        module.hyper_loss((x, y), lam), [module.space.unconstrained, module.space.scale]
    )
    h = 1e-6
    eye = torch.eye(len(u0), dtype=torch.float64)
    fd_u = torch.stack([(f(u0 + h * e, s0) - f(u0 - h * e, s0)) / (2 * h) for e in eye])
    fd_s = torch.stack([(f(u0, s0 + h * e) - f(u0, s0 - h * e)) / (2 * h) for e in eye])
    torch.testing.assert_close(grad_u, fd_u, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(grad_s, fd_s, atol=1e-8, rtol=1e-6)
    assert grad_u.abs().min() > 0 and grad_s.abs().min() > 0


# -- every STN network -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("net", "size"),
    [(lambda: StnSmallCNN(image_size=16, filters=(4, 8, 8)), 16), (lambda: StnAlexNet(width=0.0625), 32)],
    ids=["small_cnn", "alexnet"],
)
def test_image_networks_take_both_updates(net, size: int) -> None:
    module = DeltaSelfTuningModule(net(), plot_schedule=False)
    module.train()
    x, y = torch.rand(4, 3, size, size), torch.randint(0, 10, (4,))
    loss = module.train_loss((x, y), module.sample_train_lambda(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.phi_parameters() + module.response_parameters())
    assert sum(float(p.grad.abs().sum()) for p in module.response_parameters()) > 0


def test_configuration_errors() -> None:
    with pytest.raises(TypeError, match="response_optimizer must be a callable"):
        DeltaSelfTuningModule(StnMLP(), response_optimizer=3)  # type: ignore[arg-type]
    frozen = StnMLP()
    for p in frozen.response_parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable response parameters"):
        DeltaSelfTuningModule(frozen)


def test_converted_model_with_batchnorm_fits_and_keeps_the_general_running_statistics(make_trainer) -> None:
    plain = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10))
    net = convert_to_stn(plain, dropout_hparams={"3": "drop"})
    module = DeltaSelfTuningModule(net, warmup_steps=2, hyper_optimizer=adam(0.1), grad_clip=1.0, plot_schedule=False)
    lam0 = module.space.unconstrained.detach().clone()
    make_trainer(limit_train_batches=6, limit_val_batches=1).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.hyper_steps_done) == 2 and not torch.equal(module.space.unconstrained.detach(), lam0)
    # one running-statistics update per batch: the general step's (step b runs on copies of the buffers)
    assert int(module.net.module[1].num_batches_tracked) == 6


def test_non_finite_training_loss_raises_or_skips(make_trainer) -> None:
    def poisoned(**kwargs) -> DeltaSelfTuningModule:
        module = _mlp_module(warmup_steps=1, **kwargs)
        original = module.response_loss
        module.response_loss = lambda batch, lam: original(batch, lam) * float("nan")  # type: ignore[method-assign]
        return module

    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        make_trainer(limit_train_batches=2).fit(poisoned(), datamodule=DigitsDataModule(batch_size=32))
    skipping = poisoned(nan_policy="skip")
    weights = lambda: skipping.phi_parameters() + skipping.response_parameters()  # noqa: E731
    before = [p.detach().clone() for p in weights()]
    with pytest.warns(UserWarning, match="skipped"):
        make_trainer(limit_train_batches=2, limit_val_batches=0).fit(
            skipping, datamodule=DigitsDataModule(batch_size=32)
        )
    assert int(skipping.skipped_steps) == 2 and int(skipping.phi_steps) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # neither update was taken


# -- a short run lowers the validation loss ----------------------------------------------------------------------------
def test_short_ridge_run_lowers_the_validation_loss(make_trainer) -> None:
    """Ridge regression (the STN test's problem, closed-form optimum log λ ≈ -0.76) from log λ = -4: after a warm-up
    at the initial λ, 40 λ-steps move λ up and lower the validation loss of the general weights w₀."""
    xtr, ytr, xv, yv = _ridge_problem()
    module = DeltaSelfTuningModule(
        RidgeNet(xtr.shape[1]),
        hyperparameters=[Hyperparameter("l2", 0.0, math.inf, init=math.exp(-4.0), transform="log")],
        loss="mse",
        plot_schedule=False,
        warmup_steps=40,
        train_steps=1,
        phi_optimizer=adam(0.05),
        response_optimizer=adam(0.05),
        hyper_optimizer=adam(0.1),
        sigma_optimizer=adam(0.01),
        seed=1,
    )
    rep, copies = 8, 100  # 8 perturbed copies of every training point per step; one epoch of 100 batches
    train = DataLoader(TensorDataset(xtr.repeat(rep * copies, 1), ytr.repeat(rep * copies)), batch_size=len(ytr) * rep)
    loaders = {"train": train, "hyper": DataLoader(TensorDataset(xv, yv), batch_size=len(yv))}

    def val_loss() -> float:
        module.eval()
        with torch.no_grad():
            return float(module.evaluate((xv, yv))[0])

    make_trainer(limit_train_batches=40, limit_val_batches=0).fit(module, train_dataloaders=loaders)
    after_warmup = val_loss()  # w₀ fitted at the initial λ
    assert int(module.hyper_steps_done) == 0
    make_trainer(limit_train_batches=40, limit_val_batches=0).fit(module, train_dataloaders=loaders)
    assert int(module.hyper_steps_done) == 40
    assert module.space.unconstrained.item() > -2.5
    assert val_loss() < after_warmup - 0.5


# -- exact resume ---------------------------------------------------------------------------------------------------
def _trainer(root, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        limit_train_batches=6,
        limit_val_batches=1,
        **kwargs,
    )


def test_resume_mid_run_is_exact(tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(0)
        model = _mlp_module(warmup_steps=3, phi_optimizer=sgd(0.05), response_optimizer=adam(0.01))
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = _trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        reference = final_state(trainer, model)
        assert len(reference["optimizers"]) == 4 and int(model.hyper_steps_done) > 0
        paths = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        for path in (paths[1], paths[len(paths) // 2 + 1]):  # in the warm-up; in the λ-phase of the 2nd epoch
            pl.seed_everything(1)
            resumed = _mlp_module(warmup_steps=3, phi_optimizer=sgd(0.05), response_optimizer=adam(0.01))
            resumed_trainer = _trainer(tmp_path / "resumed")
            resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)
            _assert_same_state(reference, final_state(resumed_trainer, resumed))
    finally:
        torch.set_num_threads(threads)


# -- CLI --------------------------------------------------------------------------------------------------------------
def test_model_help_lists_the_new_arguments(capsys) -> None:
    from hyperlit.cli import main

    for model in ("DeltaSelfTuningModule", "hyperlit.tuning.delta_stn.DeltaSelfTuningModule"):
        with pytest.raises(SystemExit) as info:
            main(["fit", "--model", model, "--model.help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for arg in ("--model.linearize", "--model.response_optimizer", "--model.response_lr_scheduler"):
            assert arg in out, (model, arg)
        for arg in ("--model.net NET", "--model.phi_optimizer", "--model.hyperparameters"):  # the inherited ones
            assert arg in out, (model, arg)
