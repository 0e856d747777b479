"""SelfTuningModule under DDP (2 CPU processes, gloo, ``ddp_spawn``): warm-up, φ-steps and λ-steps (σ tuned,
per-example dropout) run without unused-parameter errors, and λ, σ, every weight and the counters are identical
on both ranks afterwards (φ reduced by DDP, λ/σ by hand)."""

from __future__ import annotations

import pytest
import torch

from hyperlit.hparams import Hyperparameter
from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning import SelfTuningModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_bilevel import ShardedStreams
from tests.tuning.test_bilevel import adam

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 23-36 s on 2 shared cores


def _stn() -> SelfTuningModule:
    torch.manual_seed(0)
    net = StnMLP(in_features=5, hidden=(8,), num_classes=1)
    hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.1, init_sigma=0.5)]
    return SelfTuningModule(
        net,
        hyperparameters=hps,
        loss="mse",
        warmup_steps=2,
        phi_optimizer=adam(0.01),
        hyper_optimizer=adam(0.05),
        sigma_optimizer=adam(0.05),
        plot_schedule=False,
    )


def test_stn_ranks_agree_after_all_phases(tmp_path) -> None:
    init = _stn().state_dict()
    ranks = fit_ranks(tmp_path, _stn(), ShardedStreams(per_rank_batch=4))
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    # 64 examples / (2 ranks x 4) = 8 steps per epoch, 3 epochs; 2 warm-up φ-steps, then T_train=2 : T_val=1
    assert state["phi_steps"] == [24.0] and state["warmup_phi_steps"] == [2.0]
    assert state["hyper_steps_done"] == [11.0] and state["skipped_steps"] == [0.0]
    for key in ("space.unconstrained", "space.scale", "net.layers.0.weight", "net.layers.0.hyper_bottleneck"):
        assert not torch.equal(torch.tensor(state[key]), init[key].reshape(-1)), f"{key} did not move"
