"""HyperContinualModule under DDP (2 CPU processes, gloo, ``ddp_spawn``) on the 1-D regression task sequence:
the task sampler gives each rank its slice of every global batch (``use_distributed_sampler=False``), the
regularized subset is drawn identically on every rank, and the generated-weight placeholders are frozen, so there
is no unused-parameter error; hypernetwork, embeddings, stored targets and the accuracy (MSE) matrix end identical
on both ranks and equal (within float tolerance) to one process with the same global batch."""

from __future__ import annotations

import pytest
import torch

from datamodules.regression1d import Regression1DDataModule
from hyperlit.continual import HyperContinualModule
from tests.distributed.helpers import fit_ranks

pytestmark = pytest.mark.distributed


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
        lr=0.01,
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
    """The two things ``ddp_spawn`` needs: the module (with its generator) pickles, and rank 0's weights, whose
    stored-target buffer has grown during training, load back into the main process's fresh module."""
    import pickle

    trained = _module()
    trained.on_task_start(1)  # stores task 0's targets: reg_targets (0, P) -> (1, P)
    torch.randint(0, 9, (3,), generator=trained._reg_generator)
    copy = pickle.loads(pickle.dumps(trained))
    assert torch.equal(copy._reg_generator.get_state(), trained._reg_generator.get_state())
    fresh = _module()
    assert fresh.reg_targets.shape[0] == 0
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.reg_targets, trained.reg_targets, rtol=0, atol=0)
