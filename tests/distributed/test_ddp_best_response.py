"""BestResponseModule (local mode) under DDP (2 CPU processes, gloo, ``ddp_spawn``): the target network is run
functionally (its own parameters are frozen placeholders), so neither the φ-steps on the hypernetwork nor the
λ-steps leave DDP parameters without gradients; the hypernetwork, λ̂ and the counters end identical on both ranks
although each rank samples its own λ ~ N(λ̂, σ²)."""

from __future__ import annotations

import pytest
import torch

from hyperlit.tuning.best_response import BestResponseModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_bilevel import ShardedStreams
from tests.tuning.test_bilevel import adam

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 22-32 s on 2 shared cores


def _module() -> BestResponseModule:
    torch.manual_seed(0)
    return BestResponseModule(
        mode="local",
        input_dim=5,
        hidden_sizes=(),
        num_classes=1,
        loss="mse",
        init_log_penalty=-1.0,
        sample_std=0.5,
        warmup_steps=2,
        phi_optimizer=adam(0.01),
        hyper_optimizer=adam(0.05),
        plot_schedule=False,
    )


def test_best_response_ranks_agree_after_all_phases(tmp_path) -> None:
    init = _module().state_dict()
    ranks = fit_ranks(tmp_path, _module(), ShardedStreams(per_rank_batch=4))
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    # 8 steps per epoch x 3 epochs; 2 warm-up φ-steps, then one λ-step per φ-step
    assert state["phi_steps"] == [24.0] and state["warmup_phi_steps"] == [2.0]
    assert state["hyper_steps_done"] == [22.0] and state["skipped_steps"] == [0.0]
    hnet = [k for k in state if k.startswith("hnet.")]
    assert hnet
    for key in ("space.unconstrained", *hnet):
        if init[key].abs().sum() > 0 or key == "space.unconstrained":
            assert not torch.equal(torch.tensor(state[key]), init[key].reshape(-1)), f"{key} did not move"
