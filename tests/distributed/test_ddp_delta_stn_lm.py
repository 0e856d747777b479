"""DeltaStnLanguageModelModule under DDP (2 CPU processes, gloo, ``ddp_spawn``) on PTB-format generated files: the one
backward of ``L_a + L_b`` (step (b) through :func:`torch.func.jvp` and ``functional_call``) goes through DDP's reducer
without unused-parameter errors, w₀, Θ and λ move and both ranks end bit-identical; with σ ≈ 0 and dropout ≈ 0 (the
per-rank random draws cannot matter) two processes equal one process with the same global batch (``slow``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.ptb import PTBDataModule
from hyperlit.tuning.delta_stn_lm import DeltaStnLanguageModelModule
from tests.datamodules.ptb_fakedata import write_fake_ptb
from tests.distributed.helpers import fit_ranks
from tests.tuning.test_bilevel import adam, sgd

pytestmark = pytest.mark.distributed

GLOBAL_STREAMS, BPTT = 4, 5
MOVES = ("space.unconstrained", "net.encoder.weight", "net.rnns.0.weight_hh", "net.rnns.1.response_weight_hh")


@pytest.fixture(scope="module")
def ptb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_ptb(tmp_path_factory.mktemp("ptb_ddp_delta"), n_train=80, n_valid=30, n_test=10)


def _model(vocab: int, sigma: float) -> DeltaStnLanguageModelModule:
    torch.manual_seed(0)
    module = DeltaStnLanguageModelModule(
        vocab_size=vocab,
        embedding_size=6,
        hidden_size=6,
        tune=["alpha", "beta", "dropouto"],
        init={"alpha": 0.5, "beta": 0.5, "dropouto": 0.1 if sigma > 1e-3 else 1e-8},
        init_sigma=sigma,
        fixed={"dropouti": 0.0, "dropouth": 0.0, "dropoute": 0.0, "wdrop": 0.0},
        warmup_epochs=0,
        warmup_steps=2,
        phi_optimizer=sgd(2.0, 0.0),
        response_optimizer=sgd(2.0, 0.0),
        hyper_optimizer=adam(0.05),
        nonmono=None,
        plot_schedule=False,
    )
    with torch.no_grad():  # a non-zero response, so λ gets a gradient
        for layer in module.net.stn_layers():
            layer.hyper_bottleneck.normal_(0, 0.5)
    return module


def _run(directory: Path, root: Path, devices: int, sigma: float) -> dict[int, dict[str, list[float]]]:
    dm = PTBDataModule(
        data_dir=str(root),
        cache_dir=str(directory / "hf"),
        batch_size=GLOBAL_STREAMS // devices,
        bptt=BPTT,
        eval_batch_size=GLOBAL_STREAMS // devices,
    )
    dm.setup("fit")
    strategy = "ddp_spawn" if devices > 1 else "auto"
    return fit_ranks(
        directory,
        _model(dm.vocab_size, sigma),
        dm,
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=1,
    )


def _check_ranks(ranks: dict[int, dict[str, list[float]]], root: Path, tmp_path: Path, sigma: float) -> None:
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    assert state["phi_steps"] == [6.0] and state["hyper_steps_done"] == [2.0] and state["skipped_steps"] == [0.0]
    dm = PTBDataModule(data_dir=str(root), cache_dir=str(tmp_path / "hf0"))
    dm.setup("fit")
    init = {k: v.reshape(-1) for k, v in _model(dm.vocab_size, sigma).state_dict().items()}
    for key in MOVES if sigma > 1e-3 else MOVES[:-1]:  # Θ barely moves at σ ≈ 0 (ε ≈ 0)
        assert not torch.equal(torch.tensor(state[key]), init[key]), f"{key} did not move"


@pytest.mark.slow  # ~33 s: the Δ-STN DDP path is also covered by the default test of test_ddp_delta_stn.py
def test_delta_stn_lm_ranks_identical(tmp_path: Path, ptb_root: Path) -> None:
    """σ = 0.5 and dropout: per-rank perturbations and masks differ, DDP's reduced gradients keep ranks equal."""
    _check_ranks(_run(tmp_path / "ddp", ptb_root, devices=2, sigma=0.5), ptb_root, tmp_path, sigma=0.5)


@pytest.mark.slow
def test_delta_stn_lm_two_processes_equal_one(tmp_path: Path, ptb_root: Path) -> None:
    ranks = _run(tmp_path / "ddp", ptb_root, devices=2, sigma=1e-7)
    _check_ranks(ranks, ptb_root, tmp_path, sigma=1e-7)
    single = _run(tmp_path / "single", ptb_root, devices=1, sigma=1e-7)[0]
    for key in ("space.unconstrained", *(k for k in single if k.startswith("net."))):
        torch.testing.assert_close(
            torch.tensor(ranks[0][key], dtype=torch.float64),
            torch.tensor(single[key], dtype=torch.float64),
            atol=1e-5,
            rtol=1e-4,
            msg=key,
        )
