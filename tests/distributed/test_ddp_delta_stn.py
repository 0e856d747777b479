"""DeltaSelfTuningModule under DDP (2 CPU processes, gloo, ``ddp_spawn``): the one backward of ``L_a + L_b`` goes
through DDP's reducer without unused-parameter errors (w₀ and Θ reduced by DDP, λ/σ by hand), both ranks end
identical, and with σ ≈ 0 (so the per-rank perturbations do not matter) two processes equal one process with the
same global batch."""

from __future__ import annotations

import math

import pytest
import torch

from hyperlit.hparams import Hyperparameter
from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning.delta_stn import DeltaSelfTuningModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_bilevel import ShardedStreams
from tests.tuning.test_bilevel import adam, sgd
from tests.tuning.test_stn_module import RidgeNet

pytestmark = pytest.mark.distributed


def _ridge() -> DeltaSelfTuningModule:
    torch.manual_seed(0)
    net = RidgeNet(5)
    with torch.no_grad():  # a non-zero response, so the hypergradient is not zero
        net.lin.hyper_bottleneck.normal_(0, 0.5)
    hp = [Hyperparameter("l2", 0.0, math.inf, init=0.1, transform="log", init_sigma=1e-7)]
    return DeltaSelfTuningModule(
        net,
        hyperparameters=hp,
        loss="mse",
        warmup_steps=2,
        tune_sigma=False,
        phi_optimizer=sgd(0.02),
        response_optimizer=sgd(0.02),
        hyper_optimizer=adam(0.05),
        plot_schedule=False,
    )


def test_delta_stn_two_processes_equal_one(tmp_path) -> None:
    ddp = fit_ranks(tmp_path / "ddp", _ridge(), ShardedStreams(per_rank_batch=4))
    single = fit_ranks(tmp_path / "single", _ridge(), ShardedStreams(per_rank_batch=8), devices=1, strategy="auto")[0]
    for key, value in ddp[0].items():
        assert value == ddp[1][key], key
    # 64 examples / 8 per step = 8 steps per epoch, 3 epochs; 2 warm-up φ-steps, then T_train=2 : T_val=1
    assert ddp[0]["phi_steps"] == single["phi_steps"] == [24.0]
    assert ddp[0]["hyper_steps_done"] == single["hyper_steps_done"] == [11.0]
    for key in ("space.unconstrained", "net.lin.weight", "net.lin.response_weight", "net.lin.hyper_bottleneck"):
        torch.testing.assert_close(torch.tensor(ddp[0][key]), torch.tensor(single[key]), atol=1e-5, rtol=1e-4)
    init = _ridge().state_dict()
    for key in ("space.unconstrained", "net.lin.weight"):
        assert not torch.equal(torch.tensor(ddp[0][key]), init[key].reshape(-1)), f"{key} did not move"


@pytest.mark.slow  # about 25 s on 2 shared cores
def test_delta_stn_ranks_agree_with_dropout_and_tuned_sigma(tmp_path) -> None:
    def module() -> DeltaSelfTuningModule:
        torch.manual_seed(0)
        net = StnMLP(in_features=5, hidden=(8,), num_classes=1)
        hps = [*net.default_hyperparameters(), Hyperparameter("indropout", 0.0, 1.0, init=0.1, init_sigma=0.5)]
        return DeltaSelfTuningModule(
            net,
            hyperparameters=hps,
            loss="mse",
            warmup_steps=2,
            phi_optimizer=adam(0.01),
            response_optimizer=adam(0.01),
            hyper_optimizer=adam(0.05),
            sigma_optimizer=adam(0.05),
            plot_schedule=False,
        )

    init = module().state_dict()
    ranks = fit_ranks(tmp_path, module(), ShardedStreams(per_rank_batch=4))
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    assert state["phi_steps"] == [24.0] and state["hyper_steps_done"] == [11.0]
    for key in ("space.unconstrained", "space.scale", "net.layers.0.weight", "net.layers.0.hyper_bottleneck"):
        assert not torch.equal(torch.tensor(state[key]), init[key].reshape(-1)), f"{key} did not move"
