"""BatchEnsembleModule and HyperBatchEnsembleModule under DDP (2 CPU processes, gloo, ``ddp_spawn``): both ranks
end identical, and two processes equal one process with the same global batch (the hyper-batch ensemble with
σ ≈ 0, so the per-rank perturbations do not matter; λ_k reduced by hand, the weights by DDP)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hyperlit.ensembles.batch_ensemble import BatchEnsembleModule
from hyperlit.ensembles.hyper_batch import HyperBatchEnsembleModule
from hyperlit.hparams import Hyperparameter
from hyperlit.models.mlp import MLP
from tests.distributed.helpers import fit_ranks

pytestmark = pytest.mark.distributed


def _data(n: int = 64) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


class ShardedClassification(pl.LightningDataModule):
    """Order-preserving shards (rank r takes examples r, r + W, ...): a 2-rank step sees exactly the examples of the
    single-process step with the doubled batch; ``streams=True`` serves ``{"train", "hyper"}``."""

    def __init__(self, per_rank_batch: int, streams: bool) -> None:
        super().__init__()
        self.per_rank_batch, self.streams = per_rank_batch, streams
        self.train, self.hyper = _data()

    def _loader(self, dataset: TensorDataset) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.per_rank_batch, sampler=sampler)

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        if self.streams:
            return {"train": self._loader(self.train), "hyper": self._loader(self.hyper)}
        return self._loader(self.train)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(5, (8,), 3)


def _be() -> BatchEnsembleModule:
    return BatchEnsembleModule(
        _mlp(), ensemble_size=2, num_classes=3, l2=1e-3, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )


def _hbe() -> HyperBatchEnsembleModule:
    net = _mlp()
    hps = [Hyperparameter(f"l2_net_{i}", 0.0, float("inf"), init=5.0, transform="log", init_sigma=1e-7) for i in (0, 2)]
    module = HyperBatchEnsembleModule(
        net,
        ensemble_size=2,
        num_classes=3,
        hyperparameters=hps,
        train_size=64,
        init_spread=0.5,
        warmup_steps=2,
        train_steps=2,
        tune_sigma=False,
        phi_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        sigma_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
    )
    with torch.no_grad():  # a non-zero response, so λ's hypergradient is not zero
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 0.5)
    return module


@pytest.mark.slow  # about 20 s on 2 shared cores (the default suite keeps the deep ensemble's DDP test)
def test_batch_ensemble_two_processes_equal_one(tmp_path) -> None:
    ddp = fit_ranks(tmp_path / "ddp", _be(), ShardedClassification(4, streams=False))
    single = fit_ranks(tmp_path / "one", _be(), ShardedClassification(8, streams=False), devices=1, strategy="auto")
    for key, value in ddp[0].items():
        assert value == ddp[1][key], key
    assert ddp[0]["steps"] == single[0]["steps"] == [24.0]  # 64 examples / 8 per global step, 3 epochs
    for key, value in single[0].items():
        torch.testing.assert_close(torch.tensor(ddp[0][key]), torch.tensor(value), atol=1e-5, rtol=1e-4)
    init = _be().state_dict()
    for key in ("net.module.net.0.weight", "net.module.net.0.input_scale"):
        assert not torch.equal(torch.tensor(ddp[0][key]), init[key].reshape(-1)), f"{key} did not move"


@pytest.mark.slow  # about 20 s on 2 shared cores
def test_hyper_batch_ensemble_two_processes_equal_one(tmp_path) -> None:
    ddp = fit_ranks(tmp_path / "ddp", _hbe(), ShardedClassification(4, streams=True))
    single = fit_ranks(tmp_path / "one", _hbe(), ShardedClassification(8, streams=True), devices=1, strategy="auto")
    for key, value in ddp[0].items():
        assert value == ddp[1][key], key
    # 8 global steps per epoch, 3 epochs; 2 warm-up weight steps, then 2 weight steps per λ-step
    assert ddp[0]["phi_steps"] == single[0]["phi_steps"] == [24.0]
    assert ddp[0]["hyper_steps_done"] == single[0]["hyper_steps_done"] == [11.0]
    for key in ("space.unconstrained", "net.module.net.0.weight", "net.module.net.0.hyper_bottleneck"):
        torch.testing.assert_close(torch.tensor(ddp[0][key]), torch.tensor(single[0][key]), atol=1e-5, rtol=1e-4)
    init = _hbe().space.unconstrained.detach().reshape(-1)
    assert not torch.equal(torch.tensor(ddp[0]["space.unconstrained"]), init), "λ did not move"
