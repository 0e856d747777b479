"""CosmosModule under DDP (2 CPU processes, gloo, ``ddp_spawn``) against one process at the same global batch.

* Rays come from ``(seed, ray_step)``: every rank records the rays it trained on, and they agree step by step with
  the single-process run.
* The conditioned network's parameters are ordinary ones (DDP's reducer averages their gradients); the cosine term
  is taken of the rank-mean losses (:func:`~hyperlit.pareto.cosmos.cosmos_loss` with ``mean_losses``), so with the
  multi-task cross-entropies (batch means) and order-preserving shards the 2-process run equals one process on the
  2B batch within ``atol=1e-5, rtol=1e-4``, and the ranks end bit-identical.
* The validation front is the whole split's on both ranks (``val/hv`` equal to the single-process value).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hyperlit.pareto.cosmos import CosmosModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_pareto import GLOBAL_BATCH, ShardedTensors

pytestmark = pytest.mark.distributed


class ConditionedTwoTaskNet(nn.Module):
    """Two 3-class heads on the 6 features plus the 2 ray entries: outputs (B, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6 + 2, 8)
        self.heads = nn.Linear(8, 2 * 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(torch.tanh(self.body(x))).view(x.shape[0], 2, 3)


class RecordingCosmos(CosmosModule):
    """Records each step's rays and local losses; writes them and the final ``val/hv`` to ``trace<rank>.json``."""

    def __init__(self, trace_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trace_dir = trace_dir
        self.trace: dict[str, list[Any]] = {"rays": [], "losses": []}

    def training_rays(self) -> Tensor:
        rays = super().training_rays()
        self.trace["rays"].append(rays.tolist())
        return rays

    def _apply_step(self, out: Any, losses: Tensor, batch_size: int) -> None:
        self.trace["losses"].append(losses.tolist())
        super()._apply_step(out, losses, batch_size)

    def on_train_end(self) -> None:
        self.trace["val_hv"] = [float(self.trainer.callback_metrics["val/hv"])]
        Path(self.trace_dir, f"trace{self.trainer.global_rank}.json").write_text(json.dumps(self.trace))


def _cosmos(trace_dir: Path) -> RecordingCosmos:
    torch.manual_seed(0)
    return RecordingCosmos(
        str(trace_dir),
        objectives=("ce_0", "ce_1"),
        target=ConditionedTwoTaskNet(),
        alpha=1.2,
        cosine_penalty=2.0,  # large, so the rank-mean cosine matters
        rays_per_step=2,
        num_test_rays=5,
        ref_point=(2.0, 2.0),
        optimizer=partial(torch.optim.Adam, lr=3e-3),  # ddp_spawn pickles the module: no local lambda
        seed=3,
    )


def _run(directory: Path, devices: int) -> tuple[dict, dict]:
    directory.mkdir(parents=True)
    dm = ShardedTensors("multitask", per_rank_batch=GLOBAL_BATCH // devices)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    states = fit_ranks(directory, _cosmos(directory), dm, devices=devices, strategy=strategy, max_epochs=2)
    traces = {r: json.loads((directory / f"trace{r}.json").read_text()) for r in range(devices)}
    return states, traces


def _t(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_cosmos_ranks_agree_and_match_one_process(tmp_path: Path) -> None:
    init = {k: v.reshape(-1) for k, v in _cosmos(tmp_path).state_dict().items()}
    ranks, traces = _run(tmp_path / "ddp", devices=2)
    singles, single_traces = _run(tmp_path / "single", devices=1)
    single, single_trace = singles[0], single_traces[0]

    assert ranks[0].keys() == ranks[1].keys()
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key  # bit-identical on both ranks
    assert ranks[0]["ray_step"] == [12.0] == single["ray_step"]  # 48 / 8 = 6 global steps per epoch, 2 epochs
    assert traces[0]["rays"] == traces[1]["rays"] == single_trace["rays"] and len(traces[0]["rays"]) == 12
    local0, local1 = _t(traces[0]["losses"]), _t(traces[1]["losses"])
    assert not torch.allclose(local0, local1)  # each rank's shard gives its own losses ...
    torch.testing.assert_close((local0 + local1) / 2, _t(single_trace["losses"]), atol=1e-5, rtol=1e-4)  # ... mean

    params = [k for k in ranks[0] if k.startswith("target.")]
    assert len(params) == 4
    for key in params:
        torch.testing.assert_close(_t(ranks[0][key]), _t(single[key]), atol=1e-5, rtol=1e-4, msg=key)
        assert not torch.equal(_t(ranks[0][key]).float(), init[key]), f"{key} did not move"
    assert traces[0]["val_hv"] == traces[1]["val_hv"]
    assert traces[0]["val_hv"][0] == pytest.approx(single_trace["val_hv"][0], abs=1e-5)
