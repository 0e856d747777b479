"""SelfTuningModule: hypergradient path, ridge-regression convergence, resume, streams, schedule, CLI, CIFAR-10."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import DigitsDataModule
from hyperlit.hparams import Hyperparameter
from hyperlit.models.stn_cnn import StnAlexNet, StnMLP, StnSmallCNN, alexnet_hyperparameters
from hyperlit.nn.stn import StnLinear, StnNet, convert_to_stn
from hyperlit.streams import HyperStreamDataModule
from hyperlit.tuning import SelfTuningModule
from tests.tuning.test_bilevel import adam, sgd

ROOT = Path(__file__).resolve().parents[2]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- hypergradient path ---------------------------------------------------------------------------------------------
def _mlp_module(**kwargs) -> SelfTuningModule:
    torch.manual_seed(0)
    net = StnMLP(in_features=6, hidden=(12, 12), num_classes=3)
    hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.2)]
    module = SelfTuningModule(net, hyperparameters=hps, plot_schedule=False, **kwargs).double()
    with torch.no_grad():  # a non-trivial response
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 0.5)
    return module


def test_hypergradient_matches_finite_differences_of_the_response_path() -> None:
    module = _mlp_module()
    module.eval()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))

    def f(u: Tensor) -> Tensor:
        return module.hyper_loss((x, y), u.unsqueeze(0).expand(10, -1))

    u0 = module.space.unconstrained.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(u0), u0)
    eps = 1e-6
    fd = torch.stack([(f(u0.detach() + eps * e) - f(u0.detach() - eps * e)) / (2 * eps) for e in torch.eye(len(u0))])
    torch.testing.assert_close(grad, fd.to(grad.dtype), atol=1e-8, rtol=1e-6)
    assert grad.abs().min() > 0  # every hyperparameter gets a hypergradient ...

    # ... and all of it flows through the response path: with the hypernet input detached nothing reaches λ
    lam = module.space.repeat(10)
    out = module.net(x, module.space.hnet_input(lam).detach(), module.hparam_dict(lam))
    loss = torch.nn.functional.cross_entropy(out, y)
    assert torch.autograd.grad(loss, module.space.unconstrained, allow_unused=True) == (None,)
    # with zero response gates (V = 0) the hypergradient vanishes exactly
    with torch.no_grad():
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.zero_()
    (g0,) = torch.autograd.grad(module.hyper_loss((x, y), module.space.repeat(10)), module.space.unconstrained)
    assert torch.count_nonzero(g0) == 0


def test_training_loss_reaches_lambda_only_through_the_hypernet_not_the_masks() -> None:
    module = _mlp_module(seed=3)
    module.train()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    lam = module.space.perturb(10).detach().requires_grad_(True)

    def loss(detach_hnet: bool) -> Tensor:
        gen = torch.Generator().manual_seed(0)  # identical dropout masks in both evaluations
        hnet = module.space.hnet_input(lam)
        out = module.net(x, hnet.detach() if detach_hnet else hnet, module.hparam_dict(lam), generator=gen)
        return torch.nn.functional.cross_entropy(out, y)

    (g_full,) = torch.autograd.grad(loss(False), lam)
    assert g_full.abs().sum() > 0
    # dropout masks were drawn (the rates matter for the value) but carry no gradient
    assert torch.autograd.grad(loss(True), lam, allow_unused=True) == (None,)
    # the regularizer strengths handed to the network are detached
    assert all(not v.requires_grad for v in module.hparam_dict(lam).values())


def test_eval_metrics_use_the_unperturbed_lambda_deterministically() -> None:
    module = _mlp_module()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    module.eval()
    a, b = module.eval_metrics((x, y)), module.eval_metrics((x, y))
    assert torch.equal(a["loss"], b["loss"])
    lam = module.space.repeat(7)
    expected = torch.nn.functional.cross_entropy(module.net(x, module.space.hnet_input(lam)), y)
    torch.testing.assert_close(a["loss"], expected)
    assert 0 <= a["acc"].item() <= 1


# -- ridge regression: convergence to the closed-form optimum -------------------------------------------------------
class RidgeNet(StnNet):
    """A linear model ``y = x·w(λ)`` with STN response, trained with the penalty ``λ_b ‖w_b‖²`` per example."""

    hparam_names = ("l2",)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hdim = 1
        self.lin = StnLinear(dim, 1, hdim=1, bias=False, v_init="zero")
        with torch.no_grad():
            self.lin.weight.zero_()

    def forward(self, x, hnet_input, hparams=None, generator=None) -> Tensor:
        return self.lin(x, hnet_input).squeeze(-1)

    def penalty(self, hnet_input, hparams) -> Tensor:
        s = hnet_input @ self.lin.hyper_bottleneck.T
        w = self.lin.weight + s[:, :1] * self.lin.response_weight  # per-example weights (B, dim)
        return hparams["l2"] * (w**2).sum(1)


def _ridge_problem(d: int = 4, n_train: int = 10, n_val: int = 400, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(n_train + n_val, d, generator=g)
    y = x @ w + torch.randn(n_train + n_val, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_ridge_regression_converges_to_closed_form_optimum(make_trainer) -> None:
    xtr, ytr, xv, yv = _ridge_problem()
    # exact sweep: w(λ) = (XᵀX/n + λI)⁻¹ Xᵀy/n, validation MSE on a fine grid of log λ
    a, b = xtr.double().T @ xtr.double() / len(ytr), xtr.double().T @ ytr.double() / len(ytr)
    logs = torch.linspace(-8, 4, 2401, dtype=torch.float64)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    val = torch.stack(
        [((xv.double() @ torch.linalg.solve(a + l.exp() * eye, b) - yv.double()) ** 2).mean() for l in logs]
    )
    best = logs[val.argmin()].item()
    assert -7 < best < 3  # an interior optimum (here ≈ -0.76)

    rep = 8  # 8 perturbed copies of every training point per φ-step
    loaders = {
        "train": DataLoader(TensorDataset(xtr.repeat(rep, 1), ytr.repeat(rep)), batch_size=len(ytr) * rep),
        "hyper": DataLoader(TensorDataset(xv, yv), batch_size=len(yv)),
    }
    module = SelfTuningModule(
        RidgeNet(xtr.shape[1]),
        hyperparameters=[Hyperparameter("l2", 0.0, math.inf, init=math.exp(-4.0), transform="log")],
        loss="mse",
        plot_schedule=False,
        warmup_steps=150,
        train_steps=1,
        phi_optimizer=adam(0.05),
        hyper_optimizer=adam(0.1),
        sigma_optimizer=adam(0.01),
        seed=1,
    )
    make_trainer(max_epochs=400, limit_val_batches=0).fit(module, train_dataloaders=loaders)
    found = module.space.unconstrained.item()  # log λ
    assert abs(found - best) < 0.25, f"STN log λ {found:.3f} vs closed-form optimum {best:.3f}"
    assert int(module.hyper_steps_done) == 250


# -- resume -----------------------------------------------------------------------------------------------------------
def _digits_module() -> SelfTuningModule:
    net = StnMLP(in_features=64, hidden=(32,), num_classes=10)
    hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.1)]
    return SelfTuningModule(
        net,
        hyperparameters=hps,
        warmup_epochs=1,
        phi_optimizer=sgd(0.05),
        hyper_optimizer=adam(0.03),
        plot_schedule=False,
    )


def test_resume_mid_run_equals_uninterrupted_run(make_trainer, tmp_path) -> None:
    dm = lambda: DigitsDataModule(batch_size=128, fractions=(0.5, 0.2, 0.3))  # noqa: E731
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    torch.manual_seed(0)
    full = _digits_module()
    trainer = make_trainer(
        max_epochs=4, callbacks=[ckpt_cb], enable_checkpointing=True, default_root_dir=tmp_path / "a"
    )
    trainer.fit(full, datamodule=dm())
    mid = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    assert mid, list((tmp_path / "ckpt").iterdir())

    torch.manual_seed(123)  # neither the global RNG nor a fresh initialisation may matter
    resumed = _digits_module()
    trainer2 = make_trainer(max_epochs=4, default_root_dir=tmp_path / "b")
    trainer2.fit(resumed, datamodule=dm(), ckpt_path=mid[0])

    for name in ("phi_steps", "hyper_steps_done", "warmup_phi_steps", "skipped_steps"):
        assert int(getattr(resumed, name)) == int(getattr(full, name)), name
    assert int(full.hyper_steps_done) > 0
    torch.testing.assert_close(resumed.space.unconstrained, full.space.unconstrained, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.space.sigma, full.space.sigma, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for opt_a, opt_b in zip(trainer.optimizers, trainer2.optimizers):
        sa, sb = opt_a.state_dict(), opt_b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for key in sa["state"]:
            for field, value in sa["state"][key].items():
                torch.testing.assert_close(sb["state"][key][field], value, atol=1e-6, rtol=0)
    assert torch.equal(resumed.rng.get_state(), full.rng.get_state())
    assert resumed.schedule == full.schedule
    assert len(trainer.optimizers) == len(trainer2.optimizers) == 3  # φ, λ, σ
    assert trainer2.global_step == trainer.global_step


# -- streams, schedule, validation ------------------------------------------------------------------------------------
class TrainValOnly(pl.LightningDataModule):
    """A user's DataModule with only train/val loaders: wrapped, its val loader becomes the hyper stream."""

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(96, 3, 16, 16, generator=g), torch.randint(0, 10, (96,), generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[64:], self.y[64:]), batch_size=16)


def test_small_cnn_with_train_val_datamodule_writes_schedule(make_trainer, tmp_path) -> None:
    net = StnSmallCNN(image_size=16, filters=(4, 8, 8))
    module = SelfTuningModule(net, warmup_steps=2, hyper_optimizer=adam(0.05))
    assert module.space.names == [h.name for h in net.default_hyperparameters()] and net.hdim == 11
    lam0 = module.space.values()
    trainer = make_trainer(max_epochs=2, logger=pl.loggers.CSVLogger(tmp_path))
    trainer.fit(module, datamodule=HyperStreamDataModule(TrainValOnly()))
    assert int(module.phi_steps) == 8 and int(module.hyper_steps_done) == 3
    assert module.space.values() != lam0
    log_dir = Path(trainer.log_dir)
    rows = _read_csv(log_dir / "hparam_schedule.csv")
    assert len(rows) == 3
    assert {"dropout0", "sigma_unconstrained_dropout0", "cutholes", "hyper_step"} <= set(rows[0])
    assert float(rows[-1]["cutlength"]) == module.space.values()["cutlength"]
    assert (log_dir / "hparam_schedule.png").stat().st_size > 1000
    assert {"val/loss", "val/acc", "hparam/dropout0", "sigma_unconstrained/cutholes"} <= set(trainer.callback_metrics)


def test_schedule_figure_goes_to_tensorboard(make_trainer, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = SelfTuningModule(StnMLP(hidden=(16,)), warmup_steps=2)
    logger = pl.loggers.TensorBoardLogger(tmp_path)
    make_trainer(limit_train_batches=6, limit_val_batches=1, logger=logger, log_every_n_steps=1).fit(
        module, datamodule=DigitsDataModule(batch_size=32)
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "hparam_schedule" in events.Tags()["images"]
    assert {"hparam/dropout0", "sigma_unconstrained/dropout0"} <= set(events.Tags()["scalars"])
    assert (Path(logger.log_dir) / "hparam_schedule.png").exists()


def test_summary_and_plot_say_sigma_is_on_the_unconstrained_scale() -> None:
    from hyperlit.callbacks.hparam_schedule import plot_schedule
    from hyperlit.tuning import BestResponseModule

    module = SelfTuningModule(StnMLP(hidden=(16,)), plot_schedule=False)
    value, sigma = module.space.values()["dropout0"], module.space.sigmas()["dropout0"]
    assert module.hyperparameter_summary() == f"dropout0={value:.4g} [σ (unconstrained scale)={sigma:.3g}]"
    vector = BestResponseModule(input_dim=3, num_classes=2, penalty="per_weight", sample_std=0.1, plot_schedule=False)
    strength = math.exp(-3.5)
    assert vector.hyperparameter_summary() == (
        f"weight_decay=mean {strength:.4g} [{strength:.4g}, {strength:.4g}] [σ (unconstrained scale)=mean 0.1]"
    )
    fig = plot_schedule([{"hyper_step": 1.0, "dropout0": 0.1, "sigma_unconstrained_dropout0": 0.5}])
    assert fig.axes[0].get_title() == "dropout0  (σ unconstr.=0.5)"


def test_alexnet_default_space_is_the_papers_fifteen() -> None:
    names = [h.name for h in alexnet_hyperparameters()]
    assert names == [
        "dropout0", "dropout1", "dropout2", "dropout3", "dropout4", "hue", "contrast", "sat", "bright",
        "indropout", "inscale", "cutlength", "cutholes", "fcdropout0", "fcdropout1",
    ]  # fmt: skip
    module = SelfTuningModule(StnAlexNet(width=0.0625), plot_schedule=False)
    values = module.space.values()
    assert values["cutlength"] == 4.0 and values["cutholes"] == 1.0
    assert values["dropout0"] == pytest.approx(0.05, abs=1e-6) and values["hue"] == pytest.approx(0.05, abs=1e-6)
    ranges = {h.name: (h.low, h.high) for h in alexnet_hyperparameters()}
    assert ranges["cutlength"] == (0.0, 24.0) and ranges["fcdropout1"] == (0.0, 0.9) and ranges["inscale"] == (0.0, 0.3)
    x = torch.rand(4, 3, 32, 32)
    module.train()
    loss = module.train_loss((x, torch.randint(0, 10, (4,))), module.sample_train_lambda(4))
    assert torch.isfinite(loss)


def test_configuration_errors() -> None:
    with pytest.raises(KeyError, match="available"):
        SelfTuningModule(StnMLP(), tune=["dropout0", "droput1"])
    with pytest.raises(KeyError, match="does not use"):
        SelfTuningModule(StnMLP(), hyperparameters=[Hyperparameter("weight_decay", 0.0, 1.0, init=0.1)])
    with pytest.raises(ValueError, match="hdim=3"):
        SelfTuningModule(StnMLP(hdim=3))
    with pytest.raises(TypeError, match="StnNet"):
        SelfTuningModule(torch.nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="fixed"):
        StnMLP(fixed={"dropout7": 0.1})
    # an initial value outside its range is rejected by the space
    with pytest.raises(ValueError, match="outside its range"):
        SelfTuningModule(StnMLP(), hyperparameters=[Hyperparameter("dropout0", 0.0, 0.9, init=0.95)])
    subset = SelfTuningModule(StnSmallCNN(), tune=["cutholes", "dropout1"], plot_schedule=False)
    assert subset.space.names == ["cutholes", "dropout1"] and subset.net.hdim == 2


def test_nan_guard_on_the_hyper_loss(make_trainer) -> None:
    def poisoned() -> SelfTuningModule:
        module = _digits_module()
        module.warmup_epochs = 0
        original = module.hyper_loss
        module.hyper_loss = lambda batch, lam: original(batch, lam) * float("nan")  # type: ignore[method-assign]
        return module

    with pytest.raises(FloatingPointError, match="non-finite hyper"):
        make_trainer(limit_train_batches=3).fit(poisoned(), datamodule=DigitsDataModule(batch_size=64))
    skipping = poisoned()
    skipping.nan_policy = "skip"
    lam0 = skipping.space.unconstrained.detach().clone()
    with pytest.warns(UserWarning, match="skipped"):
        make_trainer(limit_train_batches=4).fit(skipping, datamodule=DigitsDataModule(batch_size=64))
    assert int(skipping.skipped_steps) == 2 and torch.equal(skipping.space.unconstrained.detach(), lam0)


def test_validate_then_fit_with_the_same_metrics(make_trainer) -> None:
    """``trainer.validate`` (inference mode) before ``fit`` (no-grad validation): the torchmetrics states are reset
    in each loop's own mode, so the second loop can update them; the epoch value is the whole split's."""
    module = SelfTuningModule(StnMLP(hidden=(8,)), warmup_steps=1, plot_schedule=False)
    trainer = make_trainer(limit_train_batches=3, limit_val_batches=2)
    (before,) = trainer.validate(module, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    (after,) = trainer.validate(module, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    assert after["val/loss"] == pytest.approx(float(trainer.callback_metrics["val/loss"]))
    assert after["val/loss"] != before["val/loss"] and 0 <= after["val/acc"] <= 1


def test_converted_user_model_is_tunable(make_trainer) -> None:
    plain = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 10)
    )
    module = SelfTuningModule(
        convert_to_stn(plain, dropout_hparams={"2": "drop"}), warmup_steps=2, hyper_optimizer=adam(0.1)
    )
    lam0 = module.space.unconstrained.detach().clone()
    make_trainer(limit_train_batches=6).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.hyper_steps_done) == 2 and not torch.equal(module.space.unconstrained.detach(), lam0)


# -- CLI ----------------------------------------------------------------------------------------------------------------
def test_quickstart_config_print_and_short_fit(tmp_path, capsys) -> None:
    from hyperlit.cli import main

    config = str(ROOT / "examples" / "quickstart.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] == "hyperlit.tuning.SelfTuningModule"
    assert cfg["model"]["init_args"]["net"]["class_path"] == "hyperlit.models.StnMLP"
    assert cfg["data"]["class_path"] == "datamodules.DigitsDataModule"
    args = [sys.executable, "-m", "hyperlit", "fit", "--config", config, "--trainer.max_epochs", "2"]
    args += ["--trainer.limit_train_batches", "4", "--trainer.enable_progress_bar", "false"]
    args += ["--model.init_args.warmup_epochs", "1", "--trainer.default_root_dir", str(tmp_path)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr  # rank-zero messages go through Lightning's logger (stderr)
    assert "Tuned hyperparameters: dropout0=" in out and "[σ (unconstrained scale)=" in out
    assert "Final validation loss:" in out
    assert list(tmp_path.glob("lightning_logs/version_0/hparam_schedule.csv"))


@pytest.mark.slow
def test_cifar10_partial_fit_improves_hyper_loss_and_moves_lambda(tmp_path, real_data_dir) -> None:
    """``hyperlit fit`` on the shared partial CIFAR-10 copy, a few hundred steps (CPU config, shortened)."""
    config = str(ROOT / "examples" / "stn_cifar10_cpu.yaml")
    args = [
        sys.executable,
        "-m",
        "hyperlit",
        "fit",
        "--config",
        config,
        "--data.init_args.data_dir",
        str(real_data_dir),
    ]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log_dir,) = tmp_path.glob("lightning_logs/version_0")
    rows = _read_csv(log_dir / "hparam_schedule.csv")
    assert len(rows) >= 100
    metrics = _read_csv(log_dir / "metrics.csv")
    hyper = [float(r["hyper/loss_step"]) for r in metrics if r.get("hyper/loss_step")]
    k = max(1, len(hyper) // 5)
    assert sum(hyper[-k:]) / k < sum(hyper[:k]) / k - 0.05  # the held-out loss decreases
    first, last = rows[0], rows[-1]
    moved = [n for n in ("dropout0", "dropout1", "indropout", "hue") if abs(float(last[n]) - float(first[n])) > 1e-3]
    assert moved, (first, last)
