"""ParetoHyperNetModule under DDP (2 CPU processes, gloo, ``ddp_spawn``), PHN-LS, PHN-EPO and PHN-HVI.

* Rays come from ``(seed, ray_step)``: every rank records the rays it trained on, and they agree step by step.
* EPO solves its LP on the all-reduced (rank-mean) losses and per-objective gradients
  (:meth:`~hyperlit.pareto.module.ParetoModuleBase.all_reduce_for_epo`): the local losses differ between ranks,
  the LP inputs and its weights β do not, so both ranks take the same step.
* The hypernetwork ends bit-identical on both ranks, and with the same global batch (order-preserving shards,
  rank r takes examples r, r + 2, ...) the 2-process run equals one process within ``atol=1e-5, rtol=1e-4``:
  the multi-task cross-entropies are batch means, so the rank mean of the per-rank losses/gradients is the
  global batch's. (The fairness gaps are not batch means; that case is checked for rank agreement only.)
* PHN-HVI computes its HV weights from the all-reduced losses
  (:meth:`~hyperlit.pareto.module.ParetoModuleBase.all_reduce_for_hvi`) and its cosine penalty from the rank-mean
  losses with the gradient through the rank's own: identical weights on the ranks, the single-process result.
* No unused-parameter error: the target runs functionally, its own parameters are frozen.
* The validation front (:class:`~hyperlit.pareto.front_metric.FrontStatistics`, a sum state reduced by
  torchmetrics) is the whole split's: ``val/hv``, ``val/uniformity`` and the objective means logged by both ranks
  of a 2-process ``validate`` over uneven shards equal the single-process values.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from hyperlit.pareto import ParetoHyperNetModule
from hyperlit.pareto.solvers import SolverOutput
from tests.distributed.helpers import fit_ranks

pytestmark = pytest.mark.distributed

N_TRAIN, N_VAL, GLOBAL_BATCH = 48, 16, 8  # 6 steps per epoch


class TwoTaskNet(nn.Module):
    """Target network with two 3-class heads: outputs (B, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.heads = nn.Linear(8, 2 * 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(torch.tanh(self.body(x))).view(x.shape[0], 2, 3)


class RecordingPHN(ParetoHyperNetModule):
    """Records per step the rays, the local and the all-reduced LP inputs and the solver weights; writes them
    to ``<trace_dir>/trace<rank>.json`` at the end of training."""

    def __init__(self, trace_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trace_dir = trace_dir
        self.trace: dict[str, list[Any]] = {
            "rays": [],
            "local_losses": [],
            "lp_losses": [],
            "lp_gram": [],
            "w": [],
            "step_losses": [],
        }

    def training_rays(self) -> Tensor:
        rays = super().training_rays()
        self.trace["rays"].append(rays.tolist())
        return rays

    def all_reduce_for_epo(self, losses: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        self.trace["local_losses"].append(losses.tolist())
        lp_losses, lp_grads = super().all_reduce_for_epo(losses, grads)
        self.trace["lp_losses"].append(lp_losses.tolist())
        self.trace["lp_gram"].append((lp_grads @ lp_grads.transpose(-1, -2)).tolist())
        return lp_losses, lp_grads

    def all_reduce_for_hvi(self, losses: Tensor) -> Tensor:
        self.trace["local_losses"].append(losses.tolist())
        reduced = super().all_reduce_for_hvi(losses)
        self.trace["lp_losses"].append(reduced.tolist())
        return reduced

    def _apply_step(self, out: SolverOutput, losses: Tensor, batch_size: int) -> None:
        self.trace["w"].append(out.weights.tolist())
        self.trace["step_losses"].append(losses.tolist())
        super()._apply_step(out, losses, batch_size)

    def on_train_end(self) -> None:
        rank = self.trainer.global_rank
        self.trace["val_hv"] = [float(self.trainer.callback_metrics["val/hv"])]
        Path(self.trace_dir, f"trace{rank}.json").write_text(json.dumps(self.trace))


def _multitask_data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 6, generator=g)
    t0 = torch.bucketize(x[:, 0] + x[:, 1], torch.tensor([-0.5, 0.5]))
    t1 = torch.bucketize(x[:, 2] - x[:, 3], torch.tensor([-0.5, 0.5]))
    targets = torch.stack([t0, t1], dim=1)
    return TensorDataset(x[:N_TRAIN], targets[:N_TRAIN]), TensorDataset(x[N_TRAIN:], targets[N_TRAIN:])


def _fairness_data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    n = N_TRAIN + N_VAL
    x = torch.randn(n, 5, generator=g)
    group = (torch.rand(n, generator=g) < 0.4).long()
    y = ((x[:, 0] + 0.8 * group + 0.5 * torch.randn(n, generator=g)) > 0.3).float()
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN], group[:N_TRAIN]), TensorDataset(
        x[N_TRAIN:], y[N_TRAIN:], group[N_TRAIN:]
    )


class ShardedTensors(pl.LightningDataModule):
    """Order-preserving shards of fixed tensors: a 2-rank step sees exactly the single-process step's examples."""

    def __init__(self, kind: str, per_rank_batch: int) -> None:
        super().__init__()
        self.per_rank_batch = per_rank_batch
        self.train, self.val = _multitask_data() if kind == "multitask" else _fairness_data()
        self.input_dim = self.train.tensors[0].shape[1]

    def _loader(self, dataset: TensorDataset) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.per_rank_batch, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)


def _phn(trace_dir: Path, solver: str, kind: str = "multitask", **extra: Any) -> RecordingPHN:
    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        solver=solver,
        rays_per_step=2,
        alpha=1.0,
        hnet_hidden=(16,),
        optimizer=partial(torch.optim.Adam, lr=3e-3),  # ddp_spawn pickles the module: no local lambda
        seed=3,
        **extra,
    )
    if kind == "multitask":
        return RecordingPHN(str(trace_dir), objectives=("ce_0", "ce_1"), target=TwoTaskNet(), **common)
    return RecordingPHN(str(trace_dir), objectives=("bce", "fpr_gap", "fnr_gap"), target_hidden=(8,), **common)


def _run(directory: Path, solver: str, devices: int, kind: str = "multitask", **extra: Any) -> tuple[dict, dict]:
    directory.mkdir(parents=True)
    dm = ShardedTensors(kind, per_rank_batch=GLOBAL_BATCH // devices)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    states = fit_ranks(
        directory, _phn(directory, solver, kind, **extra), dm, devices=devices, strategy=strategy, max_epochs=2
    )
    traces = {r: json.loads((directory / f"trace{r}.json").read_text()) for r in range(devices)}
    return states, traces


def _t(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# each case: one 2-process spawn + one 1-process fit, 28 s on 2 idle cores (56-63 s at load 6); EPO, the case with
# hand-made all-reduces, runs by default, LS (plain DDP gradient averaging) and HVI (one all-reduce of the losses)
# with the slow tests
@pytest.mark.parametrize(
    "solver", [pytest.param("ls", marks=pytest.mark.slow), "epo", pytest.param("hvi", marks=pytest.mark.slow)]
)
def test_phn_ranks_agree_and_match_one_process(tmp_path: Path, solver: str) -> None:
    extra: dict[str, Any] = {"ray_sampling": "stratified", "hvi_penalty": 1.0} if solver == "hvi" else {}
    init = {k: v.reshape(-1) for k, v in _phn(tmp_path, solver, **extra).state_dict().items()}
    ranks, traces = _run(tmp_path / "ddp", solver, devices=2, **extra)
    single, single_trace = _run(tmp_path / "single", solver, devices=1, **extra)
    single, single_trace = single[0], single_trace[0]

    # hypernetwork weights and counters bit-identical on both ranks
    assert ranks[0].keys() == ranks[1].keys()
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    assert state["ray_step"] == [12.0] == single["ray_step"]  # 48 / 8 = 6 global steps per epoch, 2 epochs

    # the ranks trained on the same rays at every step, the rays of the single-process run
    assert len(traces[0]["rays"]) == 12
    assert traces[0]["rays"] == traces[1]["rays"] == single_trace["rays"]
    assert len({json.dumps(r) for r in traces[0]["rays"]}) == 12  # a fresh ray pair every step
    assert traces[0]["w"] == traces[1]["w"]  # identical solver weights (LS: the rays; EPO: m·β; HVI: HV weights)
    torch.testing.assert_close(_t(traces[0]["w"]), _t(single_trace["w"]), atol=1e-5, rtol=1e-4)

    if solver == "epo":
        assert state["epo_solves"] == [24.0] == single["epo_solves"]  # K = 2 LPs per step
        local0, local1 = _t(traces[0]["local_losses"]), _t(traces[1]["local_losses"])
        assert not torch.allclose(local0, local1)  # each rank's shard gives its own losses ...
        assert traces[0]["lp_losses"] == traces[1]["lp_losses"]  # ... the LP sees their rank mean
        assert traces[0]["lp_gram"] == traces[1]["lp_gram"]
        # the reduction did not overwrite the rank's own losses in place (they are what it backpropagates/logs)
        assert (
            traces[0]["step_losses"] == traces[0]["local_losses"]
            and traces[1]["step_losses"] == traces[1]["local_losses"]
        )
        torch.testing.assert_close(_t(traces[0]["lp_losses"]), (local0 + local1) / 2, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_t(traces[0]["lp_losses"]), _t(single_trace["lp_losses"]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_t(traces[0]["lp_gram"]), _t(single_trace["lp_gram"]), atol=1e-5, rtol=1e-4)
        assert not torch.equal(_t(traces[0]["w"]), _t(traces[0]["rays"]) * 2)  # the LP did not just return m·r
    elif solver == "hvi":
        local0, local1 = _t(traces[0]["local_losses"]), _t(traces[1]["local_losses"])
        assert len(local0) == 12 and not torch.allclose(local0, local1)
        assert traces[0]["lp_losses"] == traces[1]["lp_losses"]  # the HV weights' losses: the rank mean
        torch.testing.assert_close(_t(traces[0]["lp_losses"]), (local0 + local1) / 2, atol=1e-6, rtol=1e-6)
        assert traces[0]["step_losses"] == traces[0]["local_losses"]  # logged/backpropagated: the rank's own
        w = _t(traces[0]["w"])
        assert (w >= 0).all() and torch.allclose(w.norm(dim=-1), torch.ones(12, 2, dtype=w.dtype), atol=1e-6)
    else:
        assert traces[0]["local_losses"] == []  # LS needs no per-objective gradients

    # the same result as one process with the same global batch; validation front reduced over ranks
    hnet = [k for k in state if k.startswith("hnet.")]
    assert hnet
    for key in hnet:
        torch.testing.assert_close(_t(state[key]), _t(single[key]), atol=1e-5, rtol=1e-4, msg=key)
        if init[key].abs().sum() > 0:
            assert not torch.equal(_t(state[key]).float(), init[key]), f"{key} did not move"
    assert traces[0]["val_hv"] == traces[1]["val_hv"]
    assert traces[0]["val_hv"][0] == pytest.approx(single_trace["val_hv"][0], abs=1e-5)


@pytest.mark.slow  # a third 2-process run; the two above cover the default run
def test_phn_epo_fairness_ranks_agree(tmp_path: Path) -> None:
    """The fairness gaps are not batch means, so 2 ranks differ from one process; they still agree exactly (here
    with the LP on gradients w.r.t. the generated target weights, ``epo_gradients="target"``)."""
    ranks, traces = _run(tmp_path / "ddp", "epo", devices=2, kind="fairness", epo_gradients="target")
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    assert traces[0]["rays"] == traces[1]["rays"] and len(traces[0]["rays"]) == 12
    assert not torch.allclose(_t(traces[0]["local_losses"]), _t(traces[1]["local_losses"]))
    assert traces[0]["lp_losses"] == traces[1]["lp_losses"] and traces[0]["w"] == traces[1]["w"]
    assert ranks[0]["epo_solves"] == [24.0]
    assert all(torch.isfinite(_t(v)).all() for k, v in ranks[0].items() if k.startswith("hnet."))


class DumpValMetrics(pl.Callback):
    """Write what each rank logged for validation, and the front it computed itself (``last_front``, before the
    logging sync), to ``<dir>/val<rank>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        front = pl_module.last_front
        assert front is not None
        logged.update({f"own/{k}": v for k, v in front.scalars().items()})
        Path(self.directory, f"val{trainer.global_rank}.json").write_text(json.dumps(logged))


class UnevenValShards(pl.LightningDataModule):
    """The fairness validation split (odd size) cut into unpadded shards: rank r takes examples r, r + W, …"""

    def __init__(self, n_val: int = 21, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(n_val, 5, generator=g)
        group = (torch.rand(n_val, generator=g) < 0.4).long()
        y = ((x[:, 0] + 0.8 * group + 0.5 * torch.randn(n_val, generator=g)) > 0.3).float()
        self.val = TensorDataset(x, y, group)
        self.batch_size = batch_size
        self.input_dim = 5

    def val_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        shard = Subset(self.val, range(rank, len(self.val), world))  # 11 and 10 examples: no padding duplicates
        return DataLoader(shard, batch_size=self.batch_size)


def test_val_front_under_ddp_equals_one_process(tmp_path: Path, make_trainer: Any) -> None:
    """The fairness gaps are ratios of split-level counts, so only summed statistics give the split's front: both
    ranks of a 2-process ``validate`` log the single-process ``val/hv``, ``val/uniformity`` and objective means."""
    torch.manual_seed(0)
    model = ParetoHyperNetModule(in_dim=5, target_hidden=(8,), hnet_hidden=(16,), test_ray_partitions=5, seed=1)
    logged = {}
    for devices in (2, 1):
        directory = tmp_path / f"devices{devices}"
        directory.mkdir()
        strategy = "ddp_spawn" if devices > 1 else "auto"
        trainer = make_trainer(
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
            callbacks=[DumpValMetrics(str(directory))],
        )
        trainer.validate(model, datamodule=UnevenValShards(), verbose=False)
        logged[devices] = [json.loads((directory / f"val{r}.json").read_text()) for r in range(devices)]
    (rank0, rank1), (single,) = logged[2], logged[1]
    names = ("hv", "uniformity", "bce_mean", "fpr_gap_mean", "fnr_gap_mean")
    keys = {f"{prefix}/{name}" for prefix in ("val", "own") for name in names}
    assert set(rank0) == set(rank1) == set(single) == keys
    assert rank0 == rank1  # compute() summed the states over ranks: the same front on every rank
    for name in names:
        assert rank0[f"own/{name}"] == pytest.approx(rank0[f"val/{name}"], abs=1e-7), name  # logged as computed
        assert rank0[f"val/{name}"] == pytest.approx(single[f"val/{name}"], abs=1e-6), name
    assert 0 < single["val/hv"] < 1 and single["val/fpr_gap_mean"] > 0
    # and one process logs what evaluate() (no Trainer) gives on the whole split
    front = model.evaluate(DataLoader(UnevenValShards().val, batch_size=7))
    assert single["val/hv"] == pytest.approx(front.hv, abs=1e-6)
    assert single["val/uniformity"] == pytest.approx(front.uniformity, abs=1e-6)
