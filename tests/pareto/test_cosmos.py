"""COSMOS (:mod:`hyperlit.pareto.cosmos`): the ray conditioner, the loss, training, checkpoints, bad input, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from datamodules.tabular import AdultDataModule
from hyperlit.cli import main
from hyperlit.pareto.cosmos import CosmosModule, COSMOSMultiLeNet, RayConditioner, cosmos_loss, ray_upsampler
from tests.datamodules.tabular_fakedata import write_fake_adult

ROOT = Path(__file__).resolve().parents[2]


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def _multitask_loader(n: int = 96, batch_size: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([(x[:, 0] + x[:, 1] > 0).long(), (x[:, 2] - x[:, 3] > 0).long()], -1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class _TwoTaskNet(nn.Module):
    """Two 2-class heads on d + m = 6 + 2 inputs: outputs (B, 2, 2)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Linear(width, 16)
        self.heads = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(torch.relu(self.body(x))).view(x.shape[0], 2, 2)


# -- the conditioner ----------------------------------------------------------------------------------------


def test_multi_lenet_has_the_computed_parameter_count_and_shapes() -> None:
    """COSMOS's Multi-MNIST model with its upsampler: 43,058 parameters (phn.md §10.4); sizes 1 → 4 → 10 → 36."""
    torch.manual_seed(0)
    net = RayConditioner(COSMOSMultiLeNet(), 2)
    assert net.input_kind == "image" and net.target_width == 3
    assert sum(p.numel() for p in net.parameters()) == 43_058
    assert sum(p.numel() for p in ray_upsampler(2).parameters()) == 2 * 2 * (16 + 36)
    assert ray_upsampler(2)(torch.rand(5, 2, 1, 1)).shape == (5, 2, 10, 10)
    out = net(torch.randn(3, 1, 36, 36), torch.tensor([[0.3, 0.7], [0.5, 0.5], [1.0, 0.0], [0.1, 0.9]]))
    assert out.shape == (4, 3, 2, 10)


class _CosmosUpsampler(nn.Module):
    """COSMOS's own ``Upsampler.forward`` for one ray (the ray repeated over the batch, ``nn.Upsample`` to H × W)."""

    def __init__(self, conditioner: RayConditioner, size: tuple[int, int]) -> None:
        super().__init__()
        self.c = conditioner
        self.resize = nn.Upsample(size, mode="nearest")

    def forward(self, x: Tensor, ray: Tensor) -> Tensor:
        a = ray[None].repeat(x.shape[0], 1)
        if self.c.input_kind == "image":
            assert self.c.upsampler is not None
            a = self.resize(self.c.upsampler(a.reshape(x.shape[0], len(ray), 1, 1)))
        return self.c.target(torch.cat((x, a), dim=1))


@pytest.mark.parametrize("kind", ["tabular", "image"])
def test_r_rays_in_one_call_equal_r_single_ray_calls_of_cosmos_own_forward(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "tabular":
        net = RayConditioner(nn.Sequential(nn.Linear(5 + 3, 7), nn.ReLU(), nn.Linear(7, 2)), 3)
        x = torch.randn(4, 5)
        rays = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1.0, 0.0, 0.0]])
    else:
        net = RayConditioner(COSMOSMultiLeNet(in_channels=2, num_objectives=3, num_tasks=3), 3)
        x = torch.randn(4, 2, 36, 36)
        rays = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    assert net.input_kind == kind
    batched = net(x, rays)
    reference = _CosmosUpsampler(net, (36, 36))
    for k in range(len(rays)):
        torch.testing.assert_close(batched[k], net(x, rays[k : k + 1])[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[k], reference(x, rays[k]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # the ray changes the outputs


# -- the loss -------------------------------------------------------------------------------------------------


def test_cosine_term_gradient_matches_finite_differences_and_the_closed_form() -> None:
    torch.manual_seed(0)
    rays = torch.tensor([[0.2, 0.8], [0.7, 0.3]], dtype=torch.float64)
    losses = (torch.rand(2, 2, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda ls: cosmos_loss(ls, rays, 2.0)[0], (losses,))
    loss, cos = cosmos_loss(losses, rays, 2.0)
    (grad,) = torch.autograd.grad(loss, losses)
    # d cos(ℓ, r)/dℓ = r/(|ℓ||r|) − (ℓ·r) ℓ/(|ℓ|³|r|); the loss is the mean over the K = 2 rays
    ln, rn = losses.norm(dim=-1, keepdim=True), rays.norm(dim=-1, keepdim=True)
    dcos = rays / (ln * rn) - (losses * rays).sum(-1, keepdim=True) * losses / (ln**3 * rn)
    torch.testing.assert_close(grad, (rays - 2.0 * dcos) / 2)
    torch.testing.assert_close(cos, F.cosine_similarity(losses, rays, dim=-1))

    # through a tiny conditioned network: the gradient w.r.t. its parameters against finite differences
    net = RayConditioner(nn.Linear(3 + 2, 2), 2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    w0, b0 = net.target.weight.detach().clone(), net.target.bias.detach().clone()

    def full(w: Tensor, b: Tensor) -> Tensor:
        out = torch.func.functional_call(net, {"target.weight": w, "target.bias": b}, (x, rays))
        return cosmos_loss(((out - y) ** 2).mean(1), rays, 2.0)[0]  # (K, m) per-column squared errors

    assert torch.autograd.gradcheck(full, (w0.requires_grad_(True), b0.requires_grad_(True)))


def test_rank_mean_cosine_gives_the_global_gradient_after_averaging() -> None:
    """Two "ranks" with their own halves of a batch: the average of their surrogate gradients (cosine at the rank
    mean of the losses) is the gradient of the loss of the mean losses, what one process computes."""
    torch.manual_seed(1)
    rays = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    theta = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    xa, xb = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)

    def losses(x: Tensor) -> Tensor:
        return ((x @ theta) ** 2).mean(0)[None] + 0.1  # (K=1, m=2) batch means

    la, lb = losses(xa), losses(xb)
    mean = ((la + lb) / 2).detach()
    ga = torch.autograd.grad(cosmos_loss(la, rays, 2.0, mean)[0], theta)[0]
    gb = torch.autograd.grad(cosmos_loss(lb, rays, 2.0, mean)[0], theta)[0]
    (global_grad,) = torch.autograd.grad(cosmos_loss(losses(torch.cat([xa, xb])), rays, 2.0)[0], theta)
    torch.testing.assert_close((ga + gb) / 2, global_grad)
    local = torch.autograd.grad(cosmos_loss(losses(xa), rays, 2.0)[0], theta)[0]
    assert not torch.allclose((local + gb) / 2, global_grad)  # without the rank mean it would differ


# -- the module -----------------------------------------------------------------------------------------------


def test_training_raises_the_validation_hypervolume(make_trainer) -> None:
    torch.manual_seed(0)
    dl = _multitask_loader()
    model = CosmosModule(
        objectives=("ce_0", "ce_1"),
        target=_TwoTaskNet(),
        alpha=1.2,
        cosine_penalty=2.0,
        rays_per_step=2,
        num_test_rays=5,
        ref_point=(2.0, 2.0),
        eval_metric="relaxed",
        optimizer=adam(1e-2),
    )
    assert model.conditioner.input_kind == "tabular"
    before = model.evaluate(dl)
    trainer = make_trainer(max_epochs=4, log_every_n_steps=1)
    trainer.fit(model, dl, dl)
    assert int(model.ray_step) == 12 and trainer.global_step == 12
    after = model.evaluate(dl)
    assert after.hv > before.hv + 0.2, (before.hv, after.hv)
    assert model.last_front is not None and model.last_front.hv == pytest.approx(after.hv, abs=1e-6)
    assert float(trainer.callback_metrics["val/hv"]) == pytest.approx(after.hv, abs=1e-6)
    assert {"train/loss", "train/cos", "train/ce_0"} <= set(trainer.callback_metrics)


def test_one_image_step_with_four_rays_is_finite_and_moves_the_upsampler(make_trainer) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 36, 36, generator=g)
    y = torch.randint(0, 10, (32, 2), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = CosmosModule(
        objectives=("ce_0", "ce_1"), target=COSMOSMultiLeNet(), alpha=1.2, cosine_penalty=2.0, rays_per_step=4
    )
    up0 = [p.detach().clone() for p in model.conditioner.upsampler.parameters()]  # type: ignore[union-attr]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, dl)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    up1 = list(model.conditioner.upsampler.parameters())  # type: ignore[union-attr]
    assert all(not torch.equal(a, b) for a, b in zip(up0, up1))


@pytest.fixture(scope="module")
def adult_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_adult(root, n_train=160, n_test=60)
    return root


def _dm(adult_dir: Path) -> AdultDataModule:
    return AdultDataModule(data_dir=str(adult_dir), verify_row_counts=False, batch_size=32)


def test_checkpoint_round_trip_and_prediction(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    torch.manual_seed(0)
    model = CosmosModule(test_ray_partitions=5, optimizer=adam(1e-3), seed=4)
    assert not model.built
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, callbacks=[ckpt], enable_checkpointing=True)
    dm = _dm(adult_dir)
    trainer.fit(model, datamodule=dm)
    d = dm.input_dim
    assert model.in_dim == d and model.conditioner.target_width == d + 3  # the default MLP takes d + m
    loaded = CosmosModule.load_from_checkpoint(ckpt.last_model_path)
    assert loaded.in_dim == d and int(loaded.ray_step) == 3
    x = torch.randn(7, d)
    rays = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    torch.testing.assert_close(loaded._outputs(loaded.weights_for_rays(rays), x), model._outputs({"rays": rays}, x))
    torch.testing.assert_close(loaded(x, [0.2, 0.3, 0.5]), model(x, [0.2, 0.3, 0.5]))

    # predictions at one ray and at several (PHN's predict_step over the conditioned network)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    loaded.predict_rays = rays.tolist()
    preds = CosmosModule.gather_predictions(make_trainer().predict(loaded, loader))
    assert preds["predictions"].shape == (2, 7)
    torch.testing.assert_close(preds["predictions"], torch.sigmoid(model._outputs({"rays": rays}, x)[..., 0]))
    loaded.predict_rays = None
    loaded.predict_ray = [0.6, 0.2, 0.2]
    one = CosmosModule.gather_predictions(make_trainer().predict(loaded, loader))
    torch.testing.assert_close(one["predictions"], preds["predictions"][1])

    # an image target given again to load_from_checkpoint
    g = torch.Generator().manual_seed(0)
    images = DataLoader(
        TensorDataset(torch.rand(8, 1, 36, 36, generator=g), torch.randint(0, 10, (8, 2))), batch_size=4
    )
    image = CosmosModule(objectives=("ce_0", "ce_1"), target=COSMOSMultiLeNet(), num_test_rays=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "image", save_last=True)
    make_trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(image, images, images)
    assert "target" not in image.hparams
    back = CosmosModule.load_from_checkpoint(ckpt.last_model_path, target=COSMOSMultiLeNet())
    imgs = torch.randn(2, 1, 36, 36)
    torch.testing.assert_close(back(imgs, [0.4, 0.6]), image(imgs, [0.4, 0.6]))
    assert int(back.ray_step) == 2


def test_resume_repeats_the_uninterrupted_run(tmp_path: Path, adult_dir: Path, make_trainer) -> None:
    """Rays come from (seed, ray_step), a checkpointed counter: a resumed run is the uninterrupted one."""

    def run(epochs: int, ckpt_path: str | None = None, save: Path | None = None) -> CosmosModule:
        torch.manual_seed(0)
        model = CosmosModule(optimizer=adam(1e-3), test_ray_partitions=4, rays_per_step=2)
        trainer = make_trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1)
        trainer.fit(model, datamodule=_dm(adult_dir), ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return model

    full = run(2)
    run(1, save=tmp_path / "half.ckpt")
    resumed = run(2, ckpt_path=str(tmp_path / "half.ckpt"))
    assert int(resumed.ray_step) == int(full.ray_step) == 6
    for (name, a), b in zip(full.conditioner.named_parameters(), resumed.conditioner.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_bad_rays_and_targets_are_named(adult_dir: Path, make_trainer) -> None:
    model = CosmosModule(in_dim=4)
    with pytest.raises(ValueError, match="must have 3 entries"):
        model(torch.randn(2, 4), [0.5, 0.5])
    with pytest.raises(ValueError, match="must have 3 entries"):
        CosmosModule(in_dim=4, eval_rays=[[0.5, 0.5]])
    with pytest.raises(ValueError, match="must have 3 entries"):
        model.predict_ray = [0.5, 0.5]
    with pytest.raises(ValueError, match=r"rays must be \(R, m\) = \(R, 3\)"):
        model.conditioner(torch.randn(2, 4), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"takes 7 input features.*d=7 plus the ray's m=3: build it with 10"):
        model.conditioner(torch.randn(2, 4 + 3), torch.tensor([[0.2, 0.3, 0.5]]))
    # a target of the wrong width: at construction when in_dim is known, at setup from the DataModule
    with pytest.raises(ValueError, match=r"first layer takes 10 input features.*d=4 plus the ray's m=3.*with 7"):
        CosmosModule(in_dim=4, target=nn.Linear(10, 1))
    dm = _dm(adult_dir)
    wrong = CosmosModule(target=nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)))
    with pytest.raises(ValueError, match=r"first layer takes 5 input features, but COSMOS feeds it the data's d="):
        make_trainer(limit_train_batches=1).fit(wrong, datamodule=dm)
    # images: the channels are known at the first step
    image = CosmosModule(objectives=("ce_0", "ce_1"), target=COSMOSMultiLeNet(in_channels=3))
    dl = DataLoader(TensorDataset(torch.rand(4, 1, 36, 36), torch.randint(0, 10, (4, 2))), batch_size=4)
    with pytest.raises(ValueError, match=r"takes 5 input channels.*C=1 plus the ray's m=2: build it with 3"):
        make_trainer(limit_val_batches=0).fit(image, dl)
    with pytest.raises(ValueError, match=r"tabular COSMOS takes \(B, d\) inputs"):
        model.conditioner(torch.randn(2, 1, 2, 2), torch.tensor([[0.2, 0.3, 0.5]]))
    with pytest.raises(ValueError, match=r"batch-norm layers.*mix the rays"):
        CosmosModule(target=nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4, track_running_stats=False)), in_dim=4)
    with pytest.raises(ValueError, match=r"cannot tell whether.*input_kind"):
        RayConditioner(nn.ReLU(), 2)
    with pytest.raises(ValueError, match="cosine_penalty must be >= 0"):
        CosmosModule(cosine_penalty=-1.0)
    with pytest.raises(ValueError, match="input_kind must be"):
        CosmosModule(input_kind="video")  # type: ignore[arg-type]


def test_cosmos_adult_config_runs_from_the_command_line(tmp_path: Path, adult_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "cosmos_adult.yaml"),
            "--data.init_args.data_dir",
            str(adult_dir),
            "--data.init_args.verify_row_counts",
            "false",
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--model.test_ray_partitions",
            "5",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    best = sorted((tmp_path / "run").rglob("best-hv-*.ckpt"))
    assert len(best) == 1
    hparams = torch.load(best[0], weights_only=False)["hyper_parameters"]
    assert hparams["cosine_penalty"] == 0.01 and hparams["alpha"] == 0.5 and hparams["in_dim"] > 0
    model = CosmosModule.load_from_checkpoint(best[0])
    assert int(model.ray_step) > 0 and model.conditioner.target_width == hparams["in_dim"] + 3
