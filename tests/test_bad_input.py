"""Issue 9, bad input: each wrong input stops with a clear error naming the offending value.

Items covered elsewhere (not repeated here):

* a ray with negative entries or of the wrong length: ``tests/pareto/test_module.py`` (``negative``,
  ``must have 3 entries``) in the test that checks ``network_for_ray``;
* a task id beyond those trained: ``tests/continual/test_module.py::test_unknown_and_out_of_order_tasks_raise``
  and ``tests/datamodules/test_continual_mnist.py`` (``unknown task id``);
* an ``adult.data`` with a missing column: ``tests/datamodules/test_tabular.py::test_corrupt_adult_raises_data_format_error``
  (``14 columns, expected 15``);
* a CIFAR pickle with the wrong shape: ``tests/datamodules/test_cifar10.py::test_corrupt_and_truncated_files``
  (``(N, 3072)``);
* an inverted range in Python: ``tests/test_hparams.py::test_validation_errors_name_the_offending_value``.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules.digits import DigitsDataModule
from hyperlit.checkpoint import CheckpointMismatchError
from hyperlit.cli import main
from hyperlit.models.stn_cnn import StnMLP
from hyperlit.tuning import SelfTuningModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
    ]


def _trainer(tmp_path: Path, steps: int = 4, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _stn(hidden: tuple[int, ...] = (16,), **kwargs) -> SelfTuningModule:
    torch.manual_seed(0)
    kwargs.setdefault("plot_schedule", False)
    return SelfTuningModule(StnMLP(in_features=64, hidden=hidden, num_classes=10), **kwargs)


# -- configuration through the CLI (in-process) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--model.init_args.tune", "[no_such]"), r"unknown hyperparameters \['no_such'\]; available: \['dropout0'\]"),
        (
            ("--model.init_args.hyperparameters", "[{name: dropout0, low: 0.9, high: 0.1, init: 0.5}]"),
            r"'dropout0': empty or inverted range \(0\.9, 0\.1\)",
        ),
    ],
    ids=["unknown-hyperparameter", "inverted-range"],
)
def test_cli_config_errors_name_the_offending_value(tmp_path: Path, extra: tuple[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        main(_cli_args(tmp_path, *extra))
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing ran


# -- NaN mid-run ------------------------------------------------------------------------------------------------------
def test_nan_loss_mid_run_stops_with_step_and_value(tmp_path: Path) -> None:
    module = _stn(warmup_steps=10)
    original = module.train_loss

    def poisoned(batch, lam):  # the third φ-step's loss is NaN
        loss = original(batch, lam)
        return loss * float("nan") if int(module.phi_steps) == 2 else loss

    module.train_loss = poisoned  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at φ-step 3, λ-step 0 \(epoch 0\)"):
        _trainer(tmp_path).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.phi_steps) == 3  # stopped at once, the offending step counted


def _nan_lambda_module(**kwargs) -> SelfTuningModule:
    """λ-steps whose hypergradient is NaN (the loss itself stays finite): Adam turns λ into NaN."""
    module = _stn(warmup_steps=1, train_steps=1, **kwargs)
    module.space.unconstrained.register_hook(lambda g: torch.full_like(g, float("nan")))
    return module


def test_nan_lambda_raises_naming_the_hyperparameter(tmp_path: Path) -> None:
    module = _nan_lambda_module()
    with pytest.raises(FloatingPointError, match=r"non-finite hyperparameters at step 1: dropout0 \(λ=\[nan\]"):
        _trainer(tmp_path).fit(module, datamodule=DigitsDataModule(batch_size=32))


def test_nan_lambda_is_skipped_with_a_warning(tmp_path: Path) -> None:
    module = _nan_lambda_module(nan_policy="skip")
    lam0 = module.space.unconstrained.detach().clone()
    with pytest.warns(UserWarning, match=r"dropout0 \(λ=\[nan\].*restoring the previous values"):
        _trainer(tmp_path, steps=4).fit(module, datamodule=DigitsDataModule(batch_size=32))
    # 4 φ-steps, the first one warm-up: 3 λ-steps, all skipped, λ left at its last finite value
    assert int(module.hyper_steps_done) == 3 and int(module.skipped_steps) == 3
    assert torch.equal(module.space.unconstrained.detach(), lam0)
    assert torch.isfinite(module.space.scale).all()


# -- checkpoints ------------------------------------------------------------------------------------------------------
def _saved(tmp_path: Path, module: pl.LightningModule, name: str) -> Path:
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


class OtherTuningModule(SelfTuningModule):
    """Same weights and hyperparameters as SelfTuningModule, but another module."""


def test_resume_from_another_modules_checkpoint_raises(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, _stn(), "stn")
    with pytest.raises(CheckpointMismatchError, match="written by SelfTuningModule, not OtherTuningModule"):
        _trainer(tmp_path).fit(
            OtherTuningModule(StnMLP(hidden=(16,)), plot_schedule=False),
            datamodule=DigitsDataModule(batch_size=32),
            ckpt_path=ckpt,
        )
    # a plain Lightning checkpoint (not written by a hyperlit module)
    plain = torch.load(ckpt, weights_only=False)
    del plain["hyperlit"]
    torch.save(plain, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointMismatchError, match="not written by a hyperlit module"):
        _trainer(tmp_path).fit(_stn(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=tmp_path / "plain.ckpt")


def test_resume_with_other_hyperparameters_raises(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, _stn(hidden=(16, 16)), "two")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"hyperparameter_names: checkpoint \['dropout0', 'dropout1'\] vs model \['dropout0'\]",
    ):
        _trainer(tmp_path).fit(
            _stn(hidden=(16, 16), tune=["dropout0"]), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt
        )


def test_resume_with_another_architecture_raises(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, _stn(hidden=(16,)), "wide")
    with pytest.raises(CheckpointMismatchError) as info:
        _trainer(tmp_path).fit(_stn(hidden=(8,)), datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    message = str(info.value)
    assert "does not fit this SelfTuningModule" in message
    assert "net.layers.0.weight: checkpoint (16, 64) vs model (8, 64)" in message
    assert "net.layers.1.weight: checkpoint (10, 16) vs model (10, 8)" in message
    # another depth: tensors only one side has are named
    deep = _saved(tmp_path, _stn(hidden=(8, 8), tune=["dropout0"]), "deep")
    with pytest.raises(CheckpointMismatchError, match=r"not in the model: \['net\.layers\.2\."):
        _trainer(tmp_path).fit(_stn(hidden=(8,)), datamodule=DigitsDataModule(batch_size=32), ckpt_path=deep)


def test_continual_resume_from_an_stn_checkpoint_raises(tmp_path: Path) -> None:
    from datamodules.regression1d import Regression1DDataModule
    from hyperlit.continual.module import HyperContinualModule

    ckpt = _saved(tmp_path, _stn(), "stn")
    model = HyperContinualModule(num_tasks=3, input_dim=1, output_dim=1, hidden=(5,), hnet_hidden=(6,))
    with pytest.raises(CheckpointMismatchError, match=r"written by SelfTuningModule, not HyperContinualModule"):
        _trainer(tmp_path).fit(model, datamodule=Regression1DDataModule(num_train=20, num_test=10), ckpt_path=ckpt)


def test_init_from_mismatched_shapes_names_tensor_and_shapes(tmp_path: Path) -> None:
    # the quickstart's StnMLP has hidden=[256]; this checkpoint's has 16 hidden units
    ckpt = _saved(tmp_path, _stn(hidden=(16,)), "small")
    with pytest.raises(CheckpointMismatchError) as info:
        main(_cli_args(tmp_path, "--init_from", str(ckpt)))
    message = str(info.value)
    assert str(ckpt) in message
    assert re.search(r"net\.\S+weight\S*: checkpoint \(16, 64\) vs model \(256, 64\)", message), message
    assert "(10, 16) vs model (10, 256)" in message


def test_init_from_missing_or_foreign_file(tmp_path: Path) -> None:
    module = _stn()
    from hyperlit.checkpoint import load_weights

    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist"):
        load_weights(module, tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match=r"could not read checkpoint .*junk\.ckpt"):
        load_weights(module, tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"something.else": torch.zeros(3)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="shares no weights with SelfTuningModule"):
        load_weights(module, tmp_path / "other.ckpt")
    # only buffers in common (e.g. a step counter): copying them alone would silently change nothing that matters
    holder = torch.nn.Module()
    holder.register_buffer("warmup_phi_steps", torch.zeros((), dtype=torch.long))
    holder.layer = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointMismatchError, match=r"shares no weights with Module \(only \['warmup_phi_steps'\]\)"):
        load_weights(holder, _saved(tmp_path, _stn(), "stn"))


# -- the hyper stream and the warm-up (checked at fit start) ----------------------------------------------------------
EMPTY_HYPER = r"the hyper stream \(the held-out batches of the λ-steps\) has no batches"


@pytest.mark.parametrize(
    ("fractions", "examples"), [((1.0, 0.0, 0.0), 0), ((0.98, 0.01, 0.01), 18)], ids=["zero-fraction", "under-a-batch"]
)
def test_empty_hyper_split_raises_before_the_first_step(tmp_path: Path, fractions, examples: int) -> None:
    module = _stn()
    message = (
        EMPTY_HYPER + rf" \({examples} held-out examples, batch_size=32, drop_last=True\), so SelfTuningModule could "
        r"never tune its hyperparameters: give the hyper/validation split at least one full batch \(e\.g\. a non-zero "
        r"hyper/validation fraction in the DataModule's `fractions`, or a smaller batch_size\)"
    )
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path).fit(module, datamodule=DigitsDataModule(batch_size=32, fractions=fractions))
    assert int(module.phi_steps) == 0


def test_empty_hyper_split_through_the_cli(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=EMPTY_HYPER + r" \(0 held-out examples"):
        main(_cli_args(tmp_path, "--data.init_args.fractions", "[1.0, 0.0, 0.0]"))


def test_empty_hyper_loader_passed_to_fit_raises(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    empty = DataLoader(TensorDataset(torch.randn(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=8)
    loaders = {"train": DataLoader(data, batch_size=8), "hyper": empty}
    with pytest.raises(ValueError, match=EMPTY_HYPER + r" \(0 held-out examples, batch_size=8, drop_last=False\)"):
        _trainer(tmp_path).fit(_stn(), train_dataloaders=loaders)


NEVER_MOVES = "the warm-up lasts the whole run, so λ never moves (no λ-step is taken)"


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "message"),
    [
        (
            {"warmup_epochs": 2},
            {"max_epochs": 2},
            f"warmup_epochs=2 >= the Trainer's max_epochs=2: {NEVER_MOVES}; lower warmup_epochs or raise max_epochs",
        ),
        (
            {"warmup_steps": 5},
            {"max_steps": 3},
            f"warmup_steps=5 >= the Trainer's max_steps=3: {NEVER_MOVES}; lower warmup_steps or raise max_steps",
        ),
        (
            {"warmup_steps": 4},
            {},
            f"warmup_steps=4 >= the run's 4 training batches (max_epochs=1 × 4 per epoch): {NEVER_MOVES}; "
            "lower warmup_steps or train for more batches",
        ),
    ],
    ids=["epochs", "max-steps", "batches"],
)
def test_warmup_as_long_as_the_run_warns(tmp_path: Path, kwargs, trainer_kwargs, message: str) -> None:
    module = _stn(**kwargs)
    trainer_kwargs = {"max_epochs": 1, **trainer_kwargs}
    trainer = pl.Trainer(
        limit_train_batches=4,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert int(module.hyper_steps_done) == 0


def test_warmup_shorter_than_the_run_does_not_warn(tmp_path: Path) -> None:
    import warnings

    module = _stn(warmup_steps=3, train_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, steps=4).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert not [w for w in caught if "never moves" in str(w.message)]
    assert int(module.hyper_steps_done) == 1
