"""ImplicitDifferentiationModule and UnrolledDifferentiationModule under DDP (2 CPU processes, gloo, ``ddp_spawn``):
the same result as one process on the same global batches (order-preserving shards of 4 per rank against batches
of 8), and identical weights, λ and counters on both ranks.

Implicit: every HVP and ``∂L_V/∂w`` are averaged over ranks inside the solve, the rank-local hypergradients before
λ's step. Unrolled: a hyper batch gathers both ranks' batches and every rank runs the unrolled steps on them."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

from hyperlit.tuning.implicit import ImplicitDifferentiationModule, UnrolledDifferentiationModule
from tests.distributed.helpers import fit_ranks
from tests.distributed.test_ddp_bilevel import ShardedStreams

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _module(cls: type) -> Any:
    torch.manual_seed(0)
    settings: dict[str, Any] = (
        {"solver": "cg", "iterations": 3, "optimizer": functools.partial(torch.optim.SGD, lr=0.02, momentum=0.5)}
        if cls is ImplicitDifferentiationModule
        else {"steps": 2, "inner_lr": 0.02, "momentum": 0.5}
    )
    return cls(
        nn.Linear(5, 1),
        loss="mse",
        weight_decay="per_weight",
        init_log_decay=-1.0,
        warmup_steps=2,
        hyper_every=2,
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        **settings,
    )


@pytest.mark.parametrize("cls", [ImplicitDifferentiationModule, UnrolledDifferentiationModule])
def test_two_ranks_equal_one_process_on_the_global_batches(cls: type, tmp_path) -> None:
    init = _module(cls).state_dict()
    ddp = fit_ranks(tmp_path / "ddp", _module(cls), ShardedStreams(per_rank_batch=4))
    single = fit_ranks(tmp_path / "single", _module(cls), ShardedStreams(per_rank_batch=8), devices=1, strategy="auto")[
        0
    ]
    for key, value in ddp[0].items():
        assert value == ddp[1][key], key
    # 64 examples / 8 = 8 batches per epoch, 3 epochs; 2 warm-up steps, then every second batch a hyper batch
    assert ddp[0]["inner_steps"] == single["inner_steps"] == [24.0]
    assert ddp[0]["hyper_steps_done"] == single["hyper_steps_done"] == [11.0]
    for key in ("hp.log_weight_decay", "model.weight", "model.bias"):
        torch.testing.assert_close(torch.tensor(ddp[0][key]), torch.tensor(single[key]), atol=1e-5, rtol=1e-4)
        assert not torch.equal(torch.tensor(single[key]), init[key].reshape(-1)), f"{key} did not move"
