"""StnLanguageModelModule under DDP (2 CPU processes, gloo, ``ddp_spawn``) on PTB-format generated files.

* Shards: with W ranks of ``batch_size`` B the corpus is cut into W·B contiguous streams and rank r reads streams
  r·B … (r+1)·B − 1 in order (:class:`datamodules.ptb.PTBDataModule`); every rank records the training and hyper
  windows it read, and they are checked against the corpus and against one process with batch W·B.
* λ, σ, the LSTM/hypernet weights and the counters end bit-identical on both ranks (φ reduced by DDP, λ by the
  bilevel loop), with no unused-parameter error in the warm-up, φ- or λ-steps.
* With the same global batch (2 ranks × 2 streams vs. 1 process × 4 streams) the result equals one process within
  ``atol=1e-5, rtol=1e-4``: dropout rates start at 1e-8 (masks are all ones in float32) and σ at 1e-7, so the
  per-rank random draws cannot make the runs differ; the cross-entropy, AR and TAR terms are means over equal-sized
  shards, so the rank mean of the gradients is the global batch's gradient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from datamodules.ptb import PTBDataModule
from hyperlit.tuning.stn_lm import StnLanguageModelModule, unpack_window
from tests.datamodules.ptb_fakedata import write_fake_ptb
from tests.distributed.helpers import fit_ranks
from tests.tuning.test_bilevel import adam, sgd

# one 2-process spawn + one 1-process fit: 69-78 s at load 5-6 on the 2 shared cores (about 25 s of CPU), so with
# the slow tests; the default run covers the STN LM under DDP with the CLI run in test_ddp_cli_modules.py
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL_STREAMS, BPTT = 4, 6
TUNE = ["alpha", "beta", "dropouto", "dropoute"]


class RecordingStnLM(StnLanguageModelModule):
    """Records the token windows of every φ- and λ-step and the hyperparameters after each λ-step; writes
    ``<trace_dir>/trace<rank>.json`` at the end of training."""

    def __init__(self, trace_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trace_dir = trace_dir
        self.trace: dict[str, list[Any]] = {"train": [], "hyper": []}

    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        inputs, _, index = unpack_window(batch)
        self.trace["train"].append([index, inputs.tolist()])
        return super().train_loss(batch, lam)

    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        inputs, _, index = unpack_window(batch)
        self.trace["hyper"].append([index, inputs.tolist()])
        return super().hyper_loss(batch, lam)

    def on_train_end(self) -> None:
        self.trace["val_loss"] = [float(self.trainer.callback_metrics["val/loss"])]
        Path(self.trace_dir, f"trace{self.trainer.global_rank}.json").write_text(json.dumps(self.trace))


@pytest.fixture(scope="module")
def ptb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_ptb(tmp_path_factory.mktemp("ptb_ddp"), n_train=120, n_valid=40, n_test=10)


def _dm(root: Path, cache: Path, streams: int) -> PTBDataModule:
    return PTBDataModule(
        data_dir=str(root), cache_dir=str(cache), batch_size=streams, bptt=BPTT, eval_batch_size=streams
    )


def _model(trace_dir: Path, vocab: int) -> RecordingStnLM:
    torch.manual_seed(0)
    return RecordingStnLM(
        str(trace_dir),
        vocab_size=vocab,
        embedding_size=8,
        hidden_size=8,
        tune=TUNE,
        init={"alpha": 0.5, "beta": 0.5, "dropouto": 1e-8, "dropoute": 1e-8},
        init_sigma=1e-7,
        fixed={"dropouti": 0.0, "dropouth": 0.0, "wdrop": 0.0},
        warmup_epochs=0,
        warmup_steps=2,
        phi_optimizer=sgd(2.0, 0.0),
        hyper_optimizer=adam(0.05),
        nonmono=None,
        plot_schedule=False,  # its on_train_end reads trainer.log_dir (a collective) on rank 0 only
    )


def _run(directory: Path, root: Path, devices: int) -> tuple[dict, dict, PTBDataModule]:
    directory.mkdir(parents=True)
    dm = _dm(root, directory / "hf", GLOBAL_STREAMS // devices)
    model = _model(directory, dm.vocab_size)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    states = fit_ranks(directory, model, dm, devices=devices, strategy=strategy, max_epochs=1, limit_train_batches=9)
    traces = {r: json.loads((directory / f"trace{r}.json").read_text()) for r in range(devices)}
    return states, traces, dm


def _windows(trace: list[Any]) -> Tensor:
    """(steps, T, B) token ids of the recorded windows."""
    return torch.tensor([w for _, w in trace])


def _t(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_stn_lm_contiguous_shards_identical_ranks_and_one_process(tmp_path: Path, ptb_root: Path) -> None:
    ranks, traces, dm = _run(tmp_path / "ddp", ptb_root, devices=2)
    single, single_trace, _ = _run(tmp_path / "single", ptb_root, devices=1)
    single, single_trace = single[0], single_trace[0]
    init = {k: v.reshape(-1) for k, v in _model(tmp_path, dm.vocab_size).state_dict().items()}

    # shards: rank r's training windows are streams 2r, 2r + 1 of the 4-stream corpus, read in order ...
    b = GLOBAL_STREAMS // 2
    tokens = dm.tokens["train"]
    length = tokens.numel() // GLOBAL_STREAMS
    streams = tokens[: length * GLOBAL_STREAMS].view(GLOBAL_STREAMS, length)
    for r in (0, 1):
        assert [i for i, _ in traces[r]["train"]] == list(range(9))  # window index 0, 1, ..., in order
        read = _windows(traces[r]["train"]).permute(2, 0, 1).reshape(b, -1)  # (B, steps·T) per stream
        assert torch.equal(read, streams[r * b : (r + 1) * b, : read.shape[1]])  # contiguous corpus slices
    # ... together exactly the windows of one process with 4 streams, and so are the hyper (validation) windows
    for stream in ("train", "hyper"):
        both = torch.cat([_windows(traces[0][stream]), _windows(traces[1][stream])], dim=-1)
        assert torch.equal(both, _windows(single_trace[stream])), stream
    assert len(traces[0]["hyper"]) == 3  # warm-up 2 φ-steps, then T_train=2 : T_val=1 over 7 batches → 3 λ-steps

    # identical λ, σ, weights and counters on both ranks
    assert ranks[0].keys() == ranks[1].keys()
    for key, value in ranks[0].items():
        assert value == ranks[1][key], key
    state = ranks[0]
    assert state["phi_steps"] == [9.0] == single["phi_steps"]
    assert state["hyper_steps_done"] == [3.0] == single["hyper_steps_done"] and state["skipped_steps"] == [0.0]

    # equal to one process with the same global batch; λ and the weights moved
    for key in ("space.unconstrained", "space.scale", *(k for k in state if k.startswith("net."))):
        torch.testing.assert_close(_t(state[key]), _t(single[key]), atol=1e-5, rtol=1e-4, msg=key)
    for key in ("space.unconstrained", "net.encoder.weight"):
        assert not torch.equal(_t(state[key]).float(), init[key]), f"{key} did not move"
    # validation loss: token-weighted over both ranks' streams, the single process's value
    assert traces[0]["val_loss"] == traces[1]["val_loss"]
    assert traces[0]["val_loss"][0] == pytest.approx(single_trace["val_loss"][0], abs=1e-5)
