"""The STN LSTM language-model module, the plain/replay module and their configs (generated PTB files; real PTB in
the ``slow`` test)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import CSVLogger

from datamodules.ptb import PTBDataModule
from hyperlit.cli import main as cli_main
from hyperlit.models.stn_lstm_lm import LM_HPARAMS
from hyperlit.tuning.schedule_replay import LSTMLanguageModelModule, load_schedule
from hyperlit.tuning.stn_lm import StnLanguageModelModule
from tests.datamodules.ptb_fakedata import WORDS, write_fake_ptb
from tests.tuning.test_bilevel import sgd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VOCAB = len(WORDS) + 1


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_ptb(tmp_path_factory.mktemp("ptb_lm"))


def _dm(root: Path, tmp_path: Path, **kwargs: object) -> PTBDataModule:
    args: dict[str, object] = {"batch_size": 4, "bptt": 8, "eval_batch_size": 2, "test_batch_size": 2}
    args.update(kwargs)
    return PTBDataModule(data_dir=str(root), cache_dir=str(tmp_path / "hf"), **args)  # type: ignore[arg-type]


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    args: dict[str, object] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": CSVLogger(str(tmp_path), name="logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    args.update(kwargs)
    return pl.Trainer(**args)  # type: ignore[arg-type]


def _small_stn(**kwargs: object) -> StnLanguageModelModule:
    args: dict[str, object] = {
        "vocab_size": VOCAB,
        "embedding_size": 12,
        "hidden_size": 12,
        "phi_optimizer": sgd(5.0, 0.0),
    }
    args.update(kwargs)
    return StnLanguageModelModule(**args)  # type: ignore[arg-type]


def _manual_eval_loss(model: StnLanguageModelModule, loader: object) -> float:
    """Token-weighted cross-entropy over a whole split with the state carried window to window (by hand)."""
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for inputs, targets, _ in loader:  # type: ignore[attr-defined]
            out = model.eval_forward(inputs, state)
            state = out.state
            total += F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return total / count


# -- the STN module --------------------------------------------------------------------------------------------
def test_training_alternates_tunes_lambda_and_saves_the_schedule(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    model = _small_stn(warmup_epochs=0, warmup_steps=6)
    before = model.space.unconstrained.detach().clone()
    trainer = _trainer(tmp_path, limit_train_batches=20, limit_val_batches=3)
    trainer.fit(model, datamodule=dm)
    assert int(model.phi_steps) == 20 and int(model.hyper_steps_done) == (20 - 6) // 2  # T_train = 2, T_val = 1
    assert dm.hyper_repeat == 2  # consecutive λ-steps read consecutive validation windows
    assert not torch.equal(model.space.unconstrained.detach(), before)
    rows = model.schedule
    assert len(rows) == 7 and rows[0]["phi_step"] == 8  # no λ-step during warm-up
    csv_path = Path(trainer.log_dir) / "hparam_schedule.csv"  # type: ignore[arg-type]
    with open(csv_path) as fh:
        header = next(csv.reader(fh))
    assert {"phi_step", "epoch", *LM_HPARAMS} <= set(header)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["val/ppl"]))
    assert float(metrics["val/ppl"]) == pytest.approx(math.exp(float(metrics["val/loss"])), rel=1e-5)


def test_hyper_loss_is_plain_cross_entropy_through_the_hypernet_only(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.hyper_dataloader()))
    model = _small_stn(init={"alpha": 5.0, "beta": 5.0})  # large AR/TAR strengths: must not enter the outer loss
    model.eval()
    lam = model.space.repeat(4)
    loss = model.hyper_loss(batch, lam)
    with torch.no_grad():
        out = model.net(batch.inputs, model.space.hnet_input(lam), None)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits.reshape(-1, VOCAB), batch.targets.reshape(-1)))
    (grad,) = torch.autograd.grad(loss, model.space.unconstrained)
    assert grad.abs().sum() > 0
    with torch.no_grad():  # without a response (V = 0) the validation loss does not depend on λ at all
        for name, p in model.net.named_parameters():
            if name.endswith("hyper_bottleneck"):
                p.zero_()
    model.states.reset()
    (grad0,) = torch.autograd.grad(model.hyper_loss(batch, model.space.repeat(4)), model.space.unconstrained)
    assert torch.count_nonzero(grad0) == 0


def test_validation_perplexity_is_token_weighted_with_carried_state(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path, eval_batch_size=3, bptt=5)
    model = _small_stn()
    (result,) = _trainer(tmp_path).validate(model, datamodule=dm, verbose=False)
    assert result["val/loss"] == pytest.approx(_manual_eval_loss(model, dm.val_dataloader()), rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(result["val/loss"]), rel=1e-5)


def test_validate_then_fit(fake_root: Path, tmp_path: Path) -> None:
    """The token-weighted metric survives ``validate`` (inference mode) followed by ``fit`` (no-grad validation)."""
    dm = _dm(fake_root, tmp_path)
    model = _small_stn(warmup_epochs=0, warmup_steps=2)
    trainer = _trainer(tmp_path, limit_train_batches=4, limit_val_batches=2)
    (start,) = trainer.validate(model, datamodule=dm, verbose=False)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val/loss"]) != start["val/loss"]
    assert model.val_history == [pytest.approx(float(trainer.callback_metrics["val/loss"]))]


def test_checkpoint_round_trip(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    model = _small_stn(warmup_epochs=0, warmup_steps=2, tune=["dropouto", "wdrop"])
    trainer = _trainer(tmp_path, limit_train_batches=8, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "stn_lm.ckpt"
    trainer.save_checkpoint(path)
    loaded = StnLanguageModelModule.load_from_checkpoint(path)
    assert loaded.space.names == ["dropouto", "wdrop"]
    torch.testing.assert_close(loaded.space.unconstrained, model.space.unconstrained)
    assert int(loaded.phi_steps) == 8 and int(loaded.hyper_steps_done) == int(model.hyper_steps_done)
    assert loaded.val_history == model.val_history and loaded.schedule == model.schedule
    torch.testing.assert_close(loaded.net.rnns[1].weight_hh, model.net.rnns[1].weight_hh)


def test_nonmonotone_learning_rate_decay() -> None:
    """Official rule: divide the LR by lr_decay when the loss is worse than the best of all but the last nonmono."""
    model = _small_stn(nonmono=2, lr_decay=4.0)
    group = {"lr": 30.0}
    model.optimizers = lambda: [SimpleNamespace(param_groups=[group])]  # type: ignore[method-assign]
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    for loss in (5.0, 4.0, 3.0, 4.5):  # 4.5 < min([5.0]): no decay yet
        model._nonmonotone_decay(loss)
    assert group["lr"] == 30.0
    model._nonmonotone_decay(4.6)  # 4.6 > min([5.0, 4.0])
    assert group["lr"] == 7.5 and model.val_history == [5.0, 4.0, 3.0, 4.5, 4.6]


def test_vocabulary_mismatch_is_reported(fake_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"vocab_size to {VOCAB}"):
        _trainer(tmp_path, limit_train_batches=1).fit(_small_stn(vocab_size=50), datamodule=_dm(fake_root, tmp_path))


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(KeyError, match="dropoutz"):
        _small_stn(tune=["dropoutz"])
    with pytest.raises(KeyError, match="gamma"):
        _small_stn(fixed={"gamma": 0.1})


# -- schedule replay and fixed values ------------------------------------------------------------------------
def _write_schedule(path: Path, rows: list[dict[str, float]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_schedule_lookup_by_step_and_epoch(tmp_path: Path) -> None:
    rows = [
        {"hyper_step": 1.0, "phi_step": 4.0, "epoch": 0.0, "dropouto": 0.1, "sigma_unconstrained_dropouto": 1.0},
        {"hyper_step": 2.0, "phi_step": 6.0, "epoch": 0.0, "dropouto": 0.2, "sigma_unconstrained_dropouto": 1.0},
        {"hyper_step": 3.0, "phi_step": 8.0, "epoch": 1.0, "dropouto": 0.3, "sigma_unconstrained_dropouto": 1.0},
    ]
    sched = load_schedule(_write_schedule(tmp_path / "s.csv", rows))
    assert sched.names == ["dropouto"]
    assert sched.at_step(3) is None and sched.at_step(4) == {"dropouto": 0.1}
    assert sched.at_step(7) == {"dropouto": 0.2} and sched.at_step(100) == {"dropouto": 0.3}
    assert sched.at_epoch(0) == {"dropouto": 0.2} and sched.at_epoch(1) == {"dropouto": 0.3}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_schedule(tmp_path / "missing.csv")
    bad = _write_schedule(tmp_path / "bad.csv", [{"phi_step": 1.0, "epoch": 0.0, "lr": 1.0}])
    with pytest.raises(KeyError, match="none of the columns"):
        load_schedule(bad)
    (tmp_path / "nan.csv").write_text("phi_step,epoch,dropouto\n1,0,abc\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_schedule(tmp_path / "nan.csv")


def test_replay_module_follows_the_schedule_step_by_step(fake_root: Path, tmp_path: Path) -> None:
    rows = [
        {"phi_step": 2.0, "epoch": 0.0, "dropouto": 0.3, "wdrop": 0.1},
        {"phi_step": 5.0, "epoch": 0.0, "dropouto": 0.6, "wdrop": 0.2},
    ]
    path = _write_schedule(tmp_path / "sched.csv", rows)
    model = LSTMLanguageModelModule(
        VOCAB, 12, 12, values={"dropouto": 0.05}, schedule=str(path), optimizer=sgd(5.0, 0.0)
    )
    used: list[tuple[float, float]] = []
    original = model.current_values

    def spy() -> dict[str, float]:
        values = original()
        used.append((values["dropouto"], values["wdrop"]))
        return values

    model.current_values = spy  # type: ignore[method-assign]
    trainer = _trainer(tmp_path, limit_train_batches=7, limit_val_batches=2)
    trainer.fit(model, datamodule=_dm(fake_root, tmp_path))
    assert used == [(0.05, 0.05)] * 2 + [(0.3, 0.1)] * 3 + [(0.6, 0.2)] * 2
    assert math.isfinite(float(trainer.callback_metrics["val/ppl"]))
    assert float(trainer.callback_metrics["hparam/dropouto"]) == pytest.approx(0.6)


def test_fixed_value_mode_trains_a_plain_lstm(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    model = LSTMLanguageModelModule(VOCAB, 16, 16, values={"dropouto": 0.3, "alpha": 1.0}, optimizer=sgd(5.0, 0.0))
    assert all(not hasattr(rnn, "hyper_bottleneck") for rnn in model.net.rnns)  # no STN layers
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=4)
    dm.setup("validate")
    start = _manual_eval_loss(model, list(dm.val_dataloader())[:4])  # type: ignore[arg-type]
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val/loss"]) < start - 0.5
    with pytest.raises(ValueError, match="dropouto"):
        LSTMLanguageModelModule(VOCAB, values={"dropouto": 1.0})


# -- configs through the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["stn_ptb.yaml", "stn_ptb_cpu.yaml", "ptb_lstm_baseline.yaml"])
def test_configs_parse(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(EXAMPLES / config), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["class_path"] == "datamodules.PTBDataModule"
    assert cfg["model"]["init_args"]["vocab_size"] == 10000


def test_cpu_config_runs_on_generated_files(fake_root: Path, tmp_path: Path) -> None:
    cli_main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "stn_ptb_cpu.yaml"),
            f"--data.init_args.data_dir={fake_root}",
            f"--data.init_args.cache_dir={tmp_path / 'hf'}",
            "--data.init_args.batch_size=4",
            "--data.init_args.bptt=8",
            f"--model.init_args.vocab_size={VOCAB}",
            "--model.init_args.warmup_epochs=0",
            "--model.init_args.warmup_steps=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    schedules = list(tmp_path.rglob("hparam_schedule.csv"))
    assert len(schedules) == 1 and len(load_schedule(schedules[0]).rows) == 2


# -- distributed ---------------------------------------------------------------------------------------------
class _CheckShard(pl.Callback):
    """Asserts in every rank that its training windows are its own contiguous shard, in order."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        dm = trainer.datamodule
        rank, world, b = trainer.global_rank, trainer.world_size, dm.batch_size
        length = dm.tokens["train"].numel() // (world * b)
        streams = dm.tokens["train"][: length * world * b].view(world * b, length)[rank * b : (rank + 1) * b]
        window = batch["train"]
        assert int(window.index) == batch_idx
        start = batch_idx * dm.bptt
        assert torch.equal(window.inputs.t(), streams[:, start : start + window.inputs.shape[0]])


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_train_on_their_own_contiguous_shards(fake_root: Path, tmp_path: Path) -> None:
    """Two gloo processes (ddp_spawn): Lightning keeps the ordered sampler, each rank reads its own shard, and the
    alternating loop runs (λ outside DDP's reducer)."""
    dm = _dm(fake_root, tmp_path)
    # plot_schedule=False: HyperparameterSchedule.on_train_end reads trainer.log_dir (a collective) on rank 0 only
    model = _small_stn(warmup_epochs=0, warmup_steps=2, plot_schedule=False)
    trainer = _trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=6,
        limit_val_batches=2,
        logger=False,
        callbacks=[_CheckShard()],
    )
    trainer.fit(model, datamodule=dm)
    assert int(model.phi_steps) == 6 and int(model.hyper_steps_done) == 2


# -- real PTB ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_ptb_stn_lowers_perplexity_moves_lambda_and_replays(real_data_dir: Path, tmp_path: Path) -> None:
    """Small STN LSTM, a few hundred steps on the first 60k PTB training tokens: validation perplexity drops, λ moves,
    the schedule is saved and a plain LSTM replays it."""
    if not (real_data_dir / "ptb" / "ptb.train.txt").exists():
        pytest.skip("no ptb/ in HYPERLIT_DATA_DIR")
    kwargs = {"batch_size": 20, "bptt": 35, "eval_batch_size": 10, "max_train_tokens": 60000, "max_eval_tokens": 10000}
    dm = PTBDataModule(data_dir=str(real_data_dir), cache_dir=str(tmp_path / "hf"), **kwargs)  # type: ignore[arg-type]
    model = StnLanguageModelModule(embedding_size=32, hidden_size=32, warmup_epochs=1)
    trainer = _trainer(tmp_path, max_epochs=3)
    (start,) = trainer.validate(model, datamodule=dm, verbose=False)
    before = model.space.values()
    trainer.fit(model, datamodule=dm)
    assert int(model.phi_steps) == 3 * 86 and int(model.hyper_steps_done) == 86  # 86 windows per epoch
    end = float(trainer.callback_metrics["val/ppl"])
    assert end < 0.2 * start["val/ppl"]  # from ~10,000 (uniform) to a few hundred
    after = model.space.values()
    assert max(abs(after[n] - before[n]) for n in LM_HPARAMS) > 5e-3
    schedule = Path(trainer.log_dir) / "hparam_schedule.csv"  # type: ignore[arg-type]
    assert len(load_schedule(schedule).rows) == 86

    replay = LSTMLanguageModelModule(embedding_size=32, hidden_size=32, schedule=str(schedule))
    replay_trainer = _trainer(tmp_path / "replay", max_epochs=2, limit_train_batches=50, limit_val_batches=5)
    replay_trainer.fit(replay, datamodule=dm)  # 100 steps: past the STN's warm-up (first λ-step after step 88)
    assert math.isfinite(float(replay_trainer.callback_metrics["val/ppl"]))
    replayed = load_schedule(schedule).at_step(100)
    assert replayed is not None and load_schedule(schedule).at_step(87) is None
    assert replay.current_values() == pytest.approx({**replay.values, **replayed})
