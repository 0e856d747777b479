"""ParetoHyperNetModule and ParetoBaselineModule under a Trainer (tiny Adult-format files)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules.tabular import AdultDataModule
from hyperlit.pareto import ParetoBaselineModule, ParetoHyperNetModule
from tests.datamodules.tabular_fakedata import write_fake_adult


def adam(lr: float) -> OptimizerCallable:
    return lambda params: torch.optim.Adam(params, lr=lr)


@pytest.fixture(scope="module")
def adult_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_adult(root, n_train=320, n_test=120)
    return root


def _dm(adult_dir: Path) -> AdultDataModule:
    return AdultDataModule(data_dir=str(adult_dir), verify_row_counts=False, batch_size=32)


def test_fit_logs_hv_checkpoints_best_and_round_trips(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    pl.seed_everything(0)
    model = ParetoHyperNetModule(solver="epo", optimizer=adam(1e-3), test_ray_partitions=6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/hv", mode="max", save_top_k=1, save_last=True)
    trainer = make_trainer(
        max_epochs=3,
        limit_train_batches=4,
        callbacks=[ckpt],
        logger=CSVLogger(tmp_path),
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=_dm(adult_dir))
    assert int(model.ray_step) == 12 and int(model.epo_solves) == 12  # own counters: one ray/LP per step
    assert trainer.global_step == 12
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")  # type: ignore[union-attr]
    hvs = metrics["val/hv"].dropna().tolist()
    assert len(hvs) == 3 and all(0 < h < 1 for h in hvs)
    assert ckpt.best_model_score is not None and float(ckpt.best_model_score) == pytest.approx(max(hvs))
    assert model.last_front is not None and model.last_front.ref_point == (1.0, 1.0, 1.0)
    assert len(model.last_front.rays) == 10  # interior Das–Dennis points, 6 partitions

    # round trip: the architecture (in_dim inferred from the DataModule) and the counters come back
    loaded = ParetoHyperNetModule.load_from_checkpoint(ckpt.last_model_path)
    assert loaded.in_dim == model.in_dim and int(loaded.ray_step) == 12
    rays = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    for name, w in model.weights_for_rays(rays).items():
        torch.testing.assert_close(loaded.weights_for_rays(rays)[name], w)
    assert "predict_ray" not in torch.load(ckpt.last_model_path, weights_only=False)["hyper_parameters"]


def test_resume_repeats_the_uninterrupted_run(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    """Rays come from (seed, ray_step) and batches from (split_seed, epoch): a resumed run is bit-identical."""

    def run(epochs: int, ckpt_path: str | None = None, save: Path | None = None) -> ParetoHyperNetModule:
        pl.seed_everything(0)
        model = ParetoHyperNetModule(solver="ls", optimizer=adam(1e-3), test_ray_partitions=4)
        trainer = make_trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1)
        trainer.fit(model, datamodule=_dm(adult_dir), ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return model

    full = run(2)
    run(1, save=tmp_path / "half.ckpt")
    resumed = run(2, ckpt_path=str(tmp_path / "half.ckpt"))
    assert int(resumed.ray_step) == int(full.ray_step) == 6
    for (name, a), b in zip(full.hnet.named_parameters(), resumed.hnet.parameters()):  # type: ignore[union-attr]
        torch.testing.assert_close(a, b, msg=name)


def test_network_for_ray_predict_and_bad_rays(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    dm = _dm(adult_dir)
    model = ParetoHyperNetModule(solver="ls", optimizer=adam(1e-3), predict_ray=[0.5, 0.25, 0.25])
    make_trainer(limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=dm)
    ray = [0.5, 0.25, 0.25]
    net = model.network_for_ray(ray)
    assert type(net).__name__ == "MLP" and all(p.requires_grad for p in net.parameters())
    assert not any(isinstance(m, type(model.hnet)) for m in net.modules())
    x = dm.test_set.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(net(x).squeeze(-1), model(x, ray).squeeze(-1))
        expected = torch.sigmoid(net(dm.test_set.tensors[0]).squeeze(-1))
    preds = make_trainer().predict(model, datamodule=dm)
    assert preds[0]["ray"].tolist() == pytest.approx(ray)  # type: ignore[index]
    torch.testing.assert_close(torch.cat([p["predictions"] for p in preds]), expected)  # type: ignore[index]
    # several rays at once: (R, N) predictions, row r = the network of ray r
    model.predict_ray = None
    model.predict_rays = [ray, [0.2, 0.4, 0.4]]
    multi = ParetoHyperNetModule.gather_predictions(make_trainer().predict(model, datamodule=dm))  # type: ignore[arg-type]
    assert multi["rays"].shape == (2, 3) and multi["predictions"].shape == (2, len(expected))
    torch.testing.assert_close(multi["predictions"][0], expected)
    with torch.no_grad():
        other = torch.sigmoid(model.network_for_ray([0.2, 0.4, 0.4])(dm.test_set.tensors[0]).squeeze(-1))
    torch.testing.assert_close(multi["predictions"][1], other)
    model.predict_ray = ray
    with pytest.raises(ValueError, match="both predict_ray and predict_rays are set"):
        model.predict_step((x,), 0)
    with pytest.raises(ValueError, match=r"predict_ray .* or predict_rays .*, not both"):
        ParetoHyperNetModule(in_dim=4, predict_ray=ray, predict_rays=[ray])
    with pytest.raises(ValueError, match=r"sums to 1\.2"):
        model.predict_rays = [[0.6, 0.3, 0.3]]
    model.predict_rays = None
    with pytest.raises(ValueError, match=r"sums to 1\.2"):
        model.network_for_ray([0.6, 0.3, 0.3])
    with pytest.raises(ValueError, match="negative"):
        model.predict_ray = [1.5, -0.25, -0.25]
    with pytest.raises(ValueError, match="must have 3 entries"):
        model(x, [0.5, 0.5])
    with pytest.raises(ValueError, match="must have 3 entries"):
        ParetoHyperNetModule(in_dim=4, predict_ray=[1.0])
    model.predict_ray = None
    with pytest.raises(ValueError, match="predict_ray"):
        model.predict_step((x,), 0)


def test_epo_lp_sees_all_reduced_gradients(adult_dir: Path, make_trainer) -> None:
    model = ParetoHyperNetModule(in_dim=3, solver="epo", epo_gradients="target")
    reduced = []
    model._trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=2,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: reduced.append(reduce_op) or t * 0 + 7.0),
    )
    losses, grads = model.all_reduce_for_epo(torch.rand(1, 3), torch.rand(1, 3, 5))
    assert reduced == ["mean", "mean"] and torch.all(losses == 7) and torch.all(grads == 7)
    # the module hands its gradients through that hook before the LP (one call per step)
    calls = []
    original = ParetoHyperNetModule.all_reduce_for_epo

    def spy(self, losses, grads):  # type: ignore[no-untyped-def]
        calls.append(grads.shape)
        return original(self, losses, grads)

    model = ParetoHyperNetModule(solver="epo", optimizer=adam(1e-3))
    model.all_reduce_for_epo = spy.__get__(model)  # type: ignore[method-assign]
    make_trainer(limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=_dm(adult_dir))
    assert len(calls) == 2 and calls[0][:2] == (1, 3) and calls[0][2] == model.hnet.num_parameters()  # type: ignore[union-attr]


def test_chunked_hypernet_k_rays_and_training_reduces_losses(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    pl.seed_everything(0)
    dm = _dm(adult_dir)
    model = ParetoHyperNetModule(
        objectives=("bce", "fpr_gap"),
        solver="epo",
        rays_per_step=3,
        chunk_size=300,
        hnet_hidden=(32,),
        optimizer=adam(3e-3),
    )
    dm.setup("fit")
    model.in_dim = dm.input_dim
    model.hparams["in_dim"] = dm.input_dim
    model._build()
    assert model.hnet.chunk_embeddings is not None  # type: ignore[union-attr]
    before = model.evaluate(dm.val_dataloader())
    make_trainer(max_epochs=4).fit(model, datamodule=dm)
    after = model.evaluate(dm.val_dataloader())
    assert int(model.epo_solves) == 3 * int(model.ray_step)
    assert after.losses[:, 0].mean() < before.losses[:, 0].mean()  # BCE goes down over the whole front
    assert after.rays.shape == (25, 2)


class _TwoTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.heads = nn.Linear(16, 2 * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(torch.relu(self.body(x))).view(x.shape[0], 2, 3)


def test_multitask_objectives_with_a_custom_target(tmp_path: Path, make_trainer) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = torch.stack([(x[:, 0] > 0).long() + (x[:, 1] > 1).long(), (x[:, 2] > 0).long()], -1)
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    model = ParetoHyperNetModule(target=_TwoTaskNet(), objectives=("ce_0", "ce_1"), solver="epo", optimizer=adam(3e-3))
    make_trainer(max_epochs=3).fit(model, dl, dl)
    assert model.last_front is not None and model.last_front.losses.shape == (25, 2)
    assert (model.last_front.losses <= 1).all()  # error rates
    assert "target" not in model.hparams
    # the Trainer's validation (FrontStatistics summed over batches) is evaluate() on the same loader
    logged = make_trainer().validate(model, dl, verbose=False)[0]
    front = model.evaluate(dl)
    assert logged["val/hv"] == pytest.approx(front.hv, abs=1e-6) and front.hv > 0
    assert logged["val/uniformity"] == pytest.approx(front.uniformity, abs=1e-6)
    assert model.last_front.names == ("err_0", "err_1") and "val/ce_0_mean" not in logged  # hard: error rates
    for j, name in enumerate(("err_0", "err_1")):
        assert logged[f"val/{name}_mean"] == pytest.approx(float(front.losses[:, j].mean()), abs=1e-6)
    assert torch.equal(model.last_front.losses, front.losses)


def test_baselines_train_each_model_on_its_own(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    """R stacked per-ray models = R separate runs (same init and data): the rows never interact."""
    rays = [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]
    stacked = ParetoBaselineModule(rays=rays, solver="epo", optimizer=adam(1e-3), seed=5)
    make_trainer(limit_train_batches=3, limit_val_batches=1).fit(stacked, datamodule=_dm(adult_dir))
    assert int(stacked.epo_solves) == 6 and stacked.last_front is not None
    for k, ray in enumerate(rays):
        single = ParetoBaselineModule(rays=[ray], solver="epo", optimizer=adam(1e-3), seed=5 + k)
        make_trainer(limit_train_batches=3, limit_val_batches=0).fit(single, datamodule=_dm(adult_dir))
        torch.testing.assert_close(stacked.weights[k], single.weights[0], rtol=1e-5, atol=1e-6)  # type: ignore[index]
    net = stacked.network(1)
    x = torch.randn(4, stacked.in_dim)  # type: ignore[arg-type]
    torch.testing.assert_close(net(x), stacked._outputs(stacked.eval_weights(), x)[1])
    with pytest.raises(ValueError, match="strictly positive"):
        ParetoBaselineModule(rays=[[1.0, 0.0, 0.0]], solver="epo")
    assert ParetoBaselineModule(in_dim=3).num_models == 10


def test_in_dim_mismatch_with_the_datamodule_is_named(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    with pytest.raises(ValueError, match=r"model\.in_dim=3 but the DataModule's input_dim is \d+"):
        make_trainer(limit_train_batches=1).fit(ParetoHyperNetModule(in_dim=3), datamodule=_dm(adult_dir))


def test_optimizer_and_schedule_factories(tmp_path: Path, make_trainer) -> None:
    """One optimizer over φ (PHN) or over the (R, P) weights (baselines), built from the factory arguments."""
    default = ParetoHyperNetModule(in_dim=3)
    (opt,) = default.configure_optimizers()  # a fixed list: [optimizer(φ)]
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 0.0
    assert [p for g in opt.param_groups for p in g["params"]] == list(default.hnet.parameters())  # type: ignore[union-attr]

    model = ParetoHyperNetModule(
        in_dim=3,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    (sgd,), (sched,) = model.configure_optimizers()
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    g = torch.Generator().manual_seed(0)
    x, y, group = torch.randn(16, 3, generator=g), (torch.rand(16, generator=g) < 0.5).float(), torch.arange(16) % 2
    trainer = make_trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=3)
    trainer.fit(model, DataLoader(TensorDataset(x, y, group), batch_size=8))
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # stepped once per epoch
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")  # type: ignore[union-attr]
    assert metrics["train/loss"].notna().sum() == 1  # 4 steps, written on the 3rd only (should_log_step)
    assert {"train/bce", "train/fpr_gap", "train/fnr_gap", "train/epo_fallbacks"} <= set(metrics.columns)

    base = ParetoBaselineModule(in_dim=3, rays=[[0.5, 0.25, 0.25]], optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    (opt,) = base.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["params"] == [base.weights]
    with pytest.raises(TypeError, match=r"optimizer must build a torch\.optim\.Optimizer"):
        ParetoHyperNetModule(in_dim=3, optimizer=lambda p: nn.Linear(1, 1)).configure_optimizers()
    with pytest.raises(TypeError, match="lr_scheduler must build"):
        ParetoHyperNetModule(in_dim=3, lr_scheduler=lambda o: o).configure_optimizers()


def _checkpoint(model: ParetoHyperNetModule | ParetoBaselineModule) -> dict:
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    return ckpt


def test_checkpoint_identity_and_lazy_build() -> None:
    """A checkpoint builds an unbuilt module from its ``in_dim`` (prepare_state_dict); another module, other
    objectives or other baseline rays are refused before any tensor is copied."""
    from hyperlit.checkpoint import CheckpointMismatchError

    torch.manual_seed(0)
    trained = ParetoHyperNetModule(in_dim=5, hnet_hidden=(8,))
    ckpt = _checkpoint(trained)
    lazy = ParetoHyperNetModule(hnet_hidden=(8,))
    assert not lazy.built
    lazy.on_load_checkpoint(ckpt)
    lazy.load_state_dict(ckpt["state_dict"])
    assert lazy.in_dim == 5 and lazy.hparams["in_dim"] == 5
    for name, w in trained.weights_for_rays(torch.tensor([[0.2, 0.3, 0.5]])).items():
        torch.testing.assert_close(lazy.weights_for_rays(torch.tensor([[0.2, 0.3, 0.5]]))[name], w)
    with pytest.raises(CheckpointMismatchError, match="objectives"):
        ParetoHyperNetModule(in_dim=5, hnet_hidden=(8,), objectives=("bce", "fpr_gap")).on_load_checkpoint(ckpt)
    with pytest.raises(CheckpointMismatchError, match="written by ParetoHyperNetModule"):
        ParetoBaselineModule(in_dim=5).on_load_checkpoint(ckpt)
    base = _checkpoint(ParetoBaselineModule(in_dim=5, rays=[[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]))
    with pytest.raises(CheckpointMismatchError, match="rays"):
        ParetoBaselineModule(in_dim=5, rays=[[0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]).on_load_checkpoint(base)


@pytest.mark.parametrize("kind", ["phn", "baseline"])
def test_progress_bar_shows_the_training_loss_and_the_hypervolume(kind: str, make_trainer) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.stack([(x[:, 0] > 0).long(), (x[:, 2] > 0).long()], -1)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    common = dict(target=_TwoTaskNet(), objectives=("ce_0", "ce_1"), solver="ls", optimizer=adam(3e-3))
    if kind == "phn":
        model: ParetoHyperNetModule | ParetoBaselineModule = ParetoHyperNetModule(num_test_rays=5, **common)
    else:
        model = ParetoBaselineModule(num_rays=3, **common)
    trainer = make_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(model, dl, dl)
    bar = trainer.progress_bar_metrics
    assert set(bar) == {"train/loss", "val/hv"}, bar
    assert model.last_front is not None and bar["val/hv"] == pytest.approx(model.last_front.hv, abs=1e-6)
    assert bar["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert "train/ce_0" in trainer.callback_metrics and "val/uniformity" in trainer.callback_metrics  # not on the bar


@pytest.mark.parametrize("cls", [ParetoHyperNetModule, ParetoBaselineModule])
def test_target_with_tracked_batchnorm_is_refused_at_setup(cls, make_trainer) -> None:
    """BatchNorm running statistics cannot be updated by the vmapped weight sets: a clear error at construction."""
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64, 2))
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    target = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4), nn.Unflatten(1, (2, 2)))
    kwargs = {"rays": [[0.5, 0.5]]} if cls is ParetoBaselineModule else {}
    with pytest.raises(ValueError, match=r"normalisation layers \['1'\] track running statistics.*LayerNorm"):
        cls(target=target, objectives=("ce_0", "ce_1"), optimizer=adam(1e-3), **kwargs)  # refused at construction
    target[1] = nn.BatchNorm1d(8, track_running_stats=False)  # batch statistics only: accepted and trained
    model = cls(target=target, objectives=("ce_0", "ce_1"), optimizer=adam(1e-3), **kwargs)
    make_trainer(max_epochs=1).fit(model, dl, dl)
    assert model.last_front is not None
