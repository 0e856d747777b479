"""HyperContinualModule under DDP (2 CPU processes, gloo, ``ddp_spawn``).

On the 1-D regression task sequence: the task sampler gives each rank its slice of every global batch
(``use_distributed_sampler=False``), the regularized subset is drawn identically on every rank, and the
generated-weight placeholders are frozen, so there is no unused-parameter error; hypernetwork, embeddings, stored
targets and the accuracy (MSE) matrix end identical on both ranks and equal (within float tolerance) to one
process with the same global batch.

On a classification sequence: each rank evaluates its own (uneven) shard of every task's validation split, and
the accuracy matrix and the logged ``val/acc_task_j``, inferred-task and ``cl/*`` values, computed from the
``TaskScores`` metric summed over ranks, are those of one process over the whole split.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from datamodules import Regression1DDataModule, TaskSequenceDataModule
from hyperlit.continual import HyperContinualModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_bilevel import DumpState

pytestmark = pytest.mark.distributed

# a picklable factory (ddp_spawn pickles the module), as the CLI builds one
ADAM = functools.partial(torch.optim.Adam, lr=0.01)


def _module() -> HyperContinualModule:
    torch.manual_seed(0)
    return HyperContinualModule(
        num_tasks=2,
        input_dim=1,
        output_dim=1,
        hidden=(8,),
        task_type="regression",
        hnet_hidden=(8,),
        emb_dim=2,
        beta=0.05,
        hnet_optimizer=ADAM,
        emb_optimizer=ADAM,
    )


def _dm(batch_size: int) -> Regression1DDataModule:
    return Regression1DDataModule(num_tasks=2, num_train=32, num_test=10, batch_size=batch_size, steps_per_task=6)


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_continual_ranks_agree_and_match_one_process(tmp_path) -> None:
    init = _module().state_dict()
    ranks = fit_ranks(tmp_path / "ddp", _module(), _dm(batch_size=4), max_epochs=2)
    single = fit_ranks(tmp_path / "single", _module(), _dm(batch_size=8), devices=1, strategy="auto", max_epochs=2)[0]
    for key, value in ranks[0].items():
        torch.testing.assert_close(_tensor(value), _tensor(ranks[1][key]), rtol=0, atol=0, equal_nan=True, msg=key)
    state = ranks[0]
    assert state["current_task"] == [1.0] and state["total_steps"] == [12.0] == single["total_steps"]
    acc = _tensor(state["acc_matrix"]).view(2, 2)
    assert torch.isfinite(acc[0, 0]) and torch.isfinite(acc[1]).all() and torch.isnan(acc[0, 1])
    assert len(state["reg_targets"]) == len(single["reg_targets"]) > 0  # task 0's stored targets
    for key in ("task_embeddings", "acc_matrix", "reg_targets", *(k for k in state if k.startswith("hnet."))):
        torch.testing.assert_close(
            _tensor(state[key]), _tensor(single[key]), rtol=1e-4, atol=1e-5, equal_nan=True, msg=key
        )
    assert not torch.equal(_tensor(state["task_embeddings"]).float(), init["task_embeddings"].reshape(-1))


def test_module_survives_spawn_pickling_and_grown_target_loading() -> None:
    """The two things ``ddp_spawn`` needs: the module (with its generator and its default optimizer factories)
    pickles, and rank 0's weights, whose stored-target buffer has grown during training, load back into the main
    process's fresh module."""
    import pickle

    trained = _module()
    trained.on_task_start(1)  # stores task 0's targets: reg_targets (0, P) -> (1, P)
    torch.randint(0, 9, (3,), generator=trained.generator("reg"))
    copy = pickle.loads(pickle.dumps(trained))
    assert torch.equal(copy.generator("reg").get_state(), trained.generator("reg").get_state())
    default = pickle.loads(pickle.dumps(HyperContinualModule(num_tasks=2, input_dim=1, output_dim=1, hidden=(4,))))
    assert [type(o) for o in default.configure_optimizers()] == [torch.optim.Adam, torch.optim.Adam]
    fresh = _module()
    assert fresh.reg_targets.shape[0] == 0
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.reg_targets, trained.reg_targets, rtol=0, atol=0)
    assert fresh.task == -1  # the restored current_task buffer, not a stale mirror


# -- the accuracy matrix of a classification sequence: DDP == one process over the whole validation split ----------
VAL_SIZE = 21  # per task: shards of 11 and 10 examples
EVAL_BATCH = 5


class Blobs(TaskSequenceDataModule):
    """Two 3-class tasks of Gaussian blobs in 4 dimensions (each task its own class means), generated."""

    classes_per_task = 3

    def __init__(self, batch_size: int, num_train: int = 48, **kwargs: Any) -> None:
        super().__init__(num_tasks=2, steps_per_task=6, batch_size=batch_size, data_dir=".", **kwargs)
        self.input_dim = 4
        g = torch.Generator().manual_seed(0)
        self.data: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "val": [], "test": []}
        for _ in range(self.num_tasks):
            means = 1.5 * torch.randn(3, 4, generator=g)
            for split, n in (("train", num_train), ("val", VAL_SIZE), ("test", VAL_SIZE)):
                y = torch.randint(0, 3, (n,), generator=g)
                self.data[split].append((means[y] + torch.randn(n, 4, generator=g), y))

    def setup(self, stage: str | None = None) -> None:
        pass

    def task_size(self, task: int, split: str) -> int:
        return len(self.data[split][task][1])

    def task_batch(self, task: int, split: str, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.data[split][task]
        return x[idx], y[idx]


class DumpLogged(pl.Callback):
    """Write every rank's logged ``val/*`` and ``cl/*`` values of each validation to ``<dir>/logged<r>.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.epochs: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "cl/"))}
        self.epochs.append({"logged": logged, "num_val_batches": [int(n) for n in trainer.num_val_batches]})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(f"{self.directory}/logged{trainer.global_rank}.json", "w") as fh:
            json.dump(self.epochs, fh)


def _classifier() -> HyperContinualModule:
    torch.manual_seed(0)
    return HyperContinualModule(
        num_tasks=2,
        input_dim=4,
        output_dim=3,
        hidden=(8,),
        heads="multihead",
        hnet_hidden=(8,),
        emb_dim=2,
        beta=0.05,
        hnet_optimizer=ADAM,
        emb_optimizer=ADAM,
        infer_task=True,
    )


def _fit_logged(directory: Path, devices: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    directory.mkdir(parents=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=directory,
        callbacks=[DumpState(str(directory)), DumpLogged(str(directory))],
    )
    trainer.fit(_classifier(), datamodule=Blobs(batch_size=8 // devices, eval_batch_size=EVAL_BATCH))
    states = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(devices)]
    logged = [json.loads((directory / f"logged{r}.json").read_text()) for r in range(devices)]
    return states, logged


def test_accuracy_matrix_and_logged_scores_match_one_process(tmp_path) -> None:
    ddp_states, ddp_logged = _fit_logged(tmp_path / "ddp", devices=2)
    (single_state,), (single_logged,) = _fit_logged(tmp_path / "single", devices=1)
    # each rank evaluated its own shard: 11 and 10 of the 21 examples per task, in batches of 5
    assert [e["num_val_batches"] for e in ddp_logged[0]] == [[3, 3]] * 2
    assert [e["num_val_batches"] for e in ddp_logged[1]] == [[2, 2]] * 2
    assert [e["num_val_batches"] for e in single_logged] == [[5, 5]] * 2
    # ... yet both ranks hold and log the same values: the synced scores of the whole split
    for key in ("acc_matrix", "inferred_acc_matrix", "task_inference_matrix"):
        assert ddp_states[0][key] == ddp_states[1][key], key
    assert [e["logged"] for e in ddp_logged[0]] == [e["logged"] for e in ddp_logged[1]]
    acc = _tensor(ddp_states[0]["acc_matrix"]).view(2, 2)
    assert torch.isfinite(acc.tril()).all() and torch.isnan(acc[0, 1])
    counts = acc.tril()[torch.isfinite(acc.tril())] * VAL_SIZE  # accuracies are k / 21: over the whole split
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)
    # and they are the single process's
    for key in ("acc_matrix", "inferred_acc_matrix", "task_inference_matrix"):
        torch.testing.assert_close(
            _tensor(ddp_states[0][key]), _tensor(single_state[key]), rtol=0, atol=1e-6, equal_nan=True, msg=key
        )
    for epoch, (ddp, single) in enumerate(zip(ddp_logged[0], single_logged)):
        assert ddp["logged"].keys() == single["logged"].keys()
        names = [f"val/acc_task_{j}" for j in range(epoch + 1)]
        names += ["val/acc_mean_seen", "val/acc_inferred_mean_seen", "val/task_inference_acc", "cl/final_mean"]
        assert set(names) <= ddp["logged"].keys()
        for j in range(epoch + 1):  # the logged row is the accuracy matrix's
            assert ddp["logged"][f"val/acc_task_{j}"] == pytest.approx(float(acc[epoch, j]), abs=1e-6)
        for name, value in single["logged"].items():
            if name.startswith("cl/drift"):  # generated weights: equal up to float differences of training
                assert ddp["logged"][name] == pytest.approx(value, rel=1e-3, abs=1e-6), (epoch, name)
            elif not math.isnan(value):  # scores, the summary of R, compression, memory
                assert ddp["logged"][name] == pytest.approx(value, abs=1e-6), (epoch, name)
