"""BatchEnsembleModule and HyperBatchEnsembleModule: the training objectives against closed forms, the fast-weight
learning-rate group, the hypergradient path, the per-member schedule, evaluation metrics and exact resume."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.digits import DigitsDataModule
from hyperlit.checkpoint_io import AtomicCheckpointIO
from hyperlit.ensembles.batch_ensemble import BatchEnsembleModule
from hyperlit.ensembles.hyper_batch import HyperBatchEnsembleModule
from hyperlit.ensembles.metrics import ensemble_nll, gibbs_nll
from hyperlit.models.mlp import MLP
from hyperlit.nn.batch_ensemble import HyperBatchEnsembleLinear, tile_members
from tests.fault_tolerance_helpers import final_state
from tests.test_fault_tolerance import _assert_same_state

sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
adam = functools.partial(torch.optim.Adam, lr=0.03)


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(64, (32,), 10)


def _be(**kwargs: Any) -> BatchEnsembleModule:
    return BatchEnsembleModule(_mlp(), ensemble_size=3, num_classes=10, optimizer=sgd, **kwargs)


def _hbe(**kwargs: Any) -> HyperBatchEnsembleModule:
    defaults: dict[str, Any] = dict(
        ensemble_size=3,
        num_classes=10,
        train_size=1000,
        phi_optimizer=sgd,
        hyper_optimizer=adam,
        sigma_optimizer=adam,
        warmup_steps=2,
        init_spread=0.5,
    )
    defaults.update(kwargs)
    return HyperBatchEnsembleModule(_mlp(), **defaults)


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- BatchEnsembleModule ---------------------------------------------------------------------------------------------
def test_batch_ensemble_loss_is_mean_member_cross_entropy_plus_shared_l2() -> None:
    module = _be(l2=1e-3)
    x, y = _batch()
    loss, logits = module.train_loss(x, y)
    members = module.net.member_outputs(x)  # (K, N, C)
    torch.testing.assert_close(logits, members)
    ce = torch.stack([F.cross_entropy(members[k], y) for k in range(3)]).mean()
    kernels = [p for p in module.net.slow_parameters() if p.dim() > 1]
    assert kernels, "the shared kernels carry the L2"
    l2 = 1e-3 * sum(p.pow(2).sum() for p in kernels)
    torch.testing.assert_close(loss, ce + l2)


def test_fast_weights_step_at_the_multiplied_learning_rate_without_decay() -> None:
    module = BatchEnsembleModule(
        _mlp(),
        ensemble_size=2,
        num_classes=10,
        fast_lr_multiplier=0.25,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01),
    )
    opt = module.configure_optimizers()
    opt = opt[0] if isinstance(opt, list | tuple) else opt
    slow, fast = opt.param_groups
    assert slow["lr"] == pytest.approx(0.1) and slow["weight_decay"] == 0.01
    assert fast["lr"] == pytest.approx(0.025) and fast["weight_decay"] == 0.0
    fast_ids = {id(p) for p in module.net.fast_parameters()}
    assert {id(p) for p in fast["params"]} == fast_ids and not fast_ids & {id(p) for p in slow["params"]}
    x, y = _batch()
    before = [p.detach().clone() for p in fast["params"]]
    loss, _ = module.train_loss(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in fast["params"]]
    opt.step()
    for p, b, g in zip(fast["params"], before, grads):
        torch.testing.assert_close(p.detach(), b - 0.025 * g)


def test_batch_ensemble_trains_on_digits_and_logs_ensemble_metrics(tmp_path, one_thread) -> None:
    pl.seed_everything(0)
    module = _be()
    trainer = _trainer(tmp_path, max_epochs=3)
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) > 0.8
    # Jensen: the averaged prediction's NLL is at most the members' mean NLL; members disagree somewhere
    assert float(metrics["val/nll"]) <= float(metrics["val/gibbs_nll"]) + 1e-6
    assert float(metrics["val/loss"]) == float(metrics["val/nll"])
    assert 0.0 <= float(metrics["val/ece"]) < 0.5 and 0.0 < float(metrics["val/brier"]) < 1.0
    assert int(module.steps) == 3 * trainer.num_training_batches
    probs = torch.cat(trainer.predict(module, dataloaders=dm.test_dataloader()))
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))


def test_wrong_num_classes_is_a_clear_error_at_the_first_evaluation(tmp_path) -> None:
    module = BatchEnsembleModule(_mlp(), ensemble_size=2, num_classes=7, optimizer=sgd)
    with pytest.raises(ValueError, match=r"expected \(K, N, C\)"):
        _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=1).fit(module, datamodule=DigitsDataModule())


# -- HyperBatchEnsembleModule --------------------------------------------------------------------------------------
def _layers(module: HyperBatchEnsembleModule) -> list[HyperBatchEnsembleLinear]:
    return [m for m in module.net.modules() if isinstance(m, HyperBatchEnsembleLinear)]


def test_hyper_batch_train_loss_with_zero_bottleneck_is_gibbs_ce_plus_member_l2() -> None:
    """V = 0: e(λ) = 0, every row's kernel is W (⊙ its rank-1 factors only in the output), so the penalty of a row of
    member k is Σ_layers λ_{k,layer} · (‖W‖² + ‖b_k‖²) / n_train (reference §2.1, regularize_fast_weights=False)."""
    module = _hbe()
    for layer in _layers(module):
        torch.nn.init.zeros_(layer.hyper_bottleneck)
    x, y = _batch()
    lam = module.space.repeat(3 * x.shape[0])
    loss = module.train_loss((x, y), lam)
    members = module.member_logits(x)
    ce = torch.stack([F.cross_entropy(members[k], y) for k in range(3)]).mean()
    values = module.space.constrained()  # (K, H)
    penalty = torch.zeros(())
    for k in range(3):
        for layer, name in zip(_layers(module), module.space.names):
            sq = layer.weight.pow(2).sum() + layer.bias[k].pow(2).sum()
            penalty = penalty + values[k, module.space.slice(name)].squeeze() * sq
    torch.testing.assert_close(loss, ce + penalty / 3 / 1000)


def test_hypergradient_reaches_lambda_only_through_the_response() -> None:
    module = _hbe(tune_sigma=False)
    x, y = _batch()
    for layer in _layers(module):
        torch.nn.init.zeros_(layer.hyper_bottleneck)
    lam = module.sample_hyper_lambda(x.shape[0])
    (g0,) = torch.autograd.grad(module.hyper_loss((x, y), lam), module.space.unconstrained, allow_unused=True)
    assert g0 is None or torch.count_nonzero(g0) == 0  # V = 0: the penalty never enters the held-out loss
    for layer in _layers(module):
        torch.nn.init.normal_(layer.hyper_bottleneck, 0.0, 0.5)
    lam = module.sample_hyper_lambda(x.shape[0])
    (g,) = torch.autograd.grad(module.hyper_loss((x, y), lam), module.space.unconstrained)
    assert g.shape == (3, module.space.dim) and bool((g != 0).all())


def test_hyper_loss_is_the_ensemble_cross_entropy_at_lambda() -> None:
    module = _hbe(tune_sigma=False)
    x, y = _batch()
    lam = module.space.repeat(3 * x.shape[0])
    logits = module.member_logits(x)
    torch.testing.assert_close(module.hyper_loss((x, y), lam), ensemble_nll(logits, y).mean())
    assert ensemble_nll(logits, y).mean() <= gibbs_nll(logits, y).mean() + 1e-6
    # member k's rows are its own λ_k: perturbing member 1's value changes member 1's logits only
    with torch.no_grad():
        module.space.unconstrained[1] += 2.0
    for layer in _layers(module):
        torch.nn.init.normal_(layer.hyper_bottleneck, 0.0, 0.5)
    after = module.member_logits(x)
    with torch.no_grad():
        module.space.unconstrained[1] -= 2.0
    before = module.member_logits(x)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_hyper_batch_fit_tunes_every_member_and_records_its_schedule(tmp_path, one_thread) -> None:
    pl.seed_everything(0)
    module = _hbe()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    start = _hbe().space.unconstrained.detach()
    moved = (module.space.unconstrained.detach() - start).abs()
    assert bool((moved > 0).all()), "every member's λ moves"
    assert int(module.train_size) == 1000  # given explicitly; the datamodule's split is not used
    row = module.schedule[-1]
    names = module.space.names
    assert {f"{n}_m{k}" for n in names for k in range(3)} <= row.keys()
    final = module.space.values()
    for n in names:
        assert [row[f"{n}_m{k}"] for k in range(3)] == pytest.approx(final[n].tolist())
    batches = trainer.num_training_batches
    assert int(module.phi_steps) == 2 * batches
    assert int(module.hyper_steps_done) == (2 * batches - 2) // 3  # one λ-step per 3 weight steps after warm-up
    metrics = trainer.callback_metrics
    assert float(metrics["val/nll"]) <= float(metrics["val/gibbs_nll"]) + 1e-6
    assert float(metrics["val/acc"]) > 0.5


def test_hyper_batch_infers_the_train_size_from_the_training_stream(tmp_path, one_thread) -> None:
    module = _hbe(train_size=None)
    dm = DigitsDataModule(batch_size=32)
    _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=dm)
    assert int(module.train_size) == len(dm.train_dataloader().iterables["train"].dataset) > 500


def test_hyper_batch_resumes_exactly_from_mid_run_checkpoints(tmp_path, one_thread) -> None:
    pl.seed_everything(0)
    model = _hbe()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    kwargs: dict[str, Any] = dict(plugins=[AtomicCheckpointIO()], limit_train_batches=6, limit_val_batches=2)
    trainer = _trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    reference = final_state(trainer, model)
    paths = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    assert len(paths) == 12
    for path in (paths[1], paths[4], paths[8]):  # warm-up, first epoch after warm-up, second epoch
        pl.seed_everything(1)
        resumed = _hbe()
        resumed_trainer = _trainer(tmp_path / "resumed", **kwargs)
        resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)
        _assert_same_state(reference, final_state(resumed_trainer, resumed))


def test_batch_ensemble_resumes_exactly(tmp_path, one_thread) -> None:
    pl.seed_everything(0)
    model = _be()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    kwargs: dict[str, Any] = dict(plugins=[AtomicCheckpointIO()], limit_train_batches=5, limit_val_batches=2)
    trainer = _trainer(tmp_path / "ref", callbacks=[ckpt], enable_checkpointing=True, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    reference = final_state(trainer, model)
    path = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))[1]
    pl.seed_everything(1)
    resumed = BatchEnsembleModule(MLP(64, (32,), 10), ensemble_size=3, num_classes=10, optimizer=sgd, seed=5)
    resumed_trainer = _trainer(tmp_path / "resumed", **kwargs)
    resumed_trainer.fit(resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=path)
    _assert_same_state(reference, final_state(resumed_trainer, resumed))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="fast_lr_multiplier"):
        _be(fast_lr_multiplier=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        BatchEnsembleModule(_mlp(), num_classes=1)
    with pytest.raises(ValueError, match="train_size"):
        _hbe(train_size=0)
    x, _ = _batch(4)
    assert tile_members(x, 3).shape == (12, 64)
    assert math.isfinite(float(_hbe().space.entropy().detach()))


def test_hnet_input_is_log_lambda_rescaled_to_the_l2_range() -> None:
    """UB's LogScaler: λ = low → 0, λ = high → 1, and the gradient of the scaled input w.r.t. log λ is
    1 / (log high − log low); ``hnet_scaling="none"`` passes log λ through (STN's unconstrained input)."""
    module = _hbe(l2_range=(0.1, 100.0))
    lam = torch.log(torch.tensor([[0.1, 100.0], [1.0, 10.0]])).requires_grad_()
    h = module.hnet_input(lam)
    torch.testing.assert_close(h, torch.tensor([[0.0, 1.0], [1 / 3, 2 / 3]]))
    (g,) = torch.autograd.grad(h.sum(), lam)
    torch.testing.assert_close(g, torch.full_like(g, 1 / math.log(1000.0)))
    plain = _hbe(hnet_scaling="none")
    torch.testing.assert_close(plain.hnet_input(lam), lam)
    with pytest.raises(ValueError, match="hnet_scaling"):
        _hbe(hnet_scaling="minmax")
    with pytest.raises(ValueError, match="l2_range"):
        _hbe(l2_range=(0.0, 1.0))
