"""Every example config (``examples/*.yaml``) through the ``hyperlit`` command line.

For each YAML: ``fit --print_config`` resolves it (the printed config names the YAML's model and data classes),
and a two-batch ``fit --trainer.fast_dev_run 2`` runs the YAML's own model class on its own DataModule, reading
tiny generated files in each data set's real on-disk format (MNIST IDX, CIFAR-10 pickle batches, PTB text, UCI
Adult / Default / Bank CSVs; digits and the 1-D regression toy need no files) from ``$HYPERLIT_DATA_DIR``. New
configs are picked up by the glob. Paper-scale configs get overrides from :data:`OVERRIDES`, which only shrink sizes
(widths, split, batch and epoch sizes, the vocabulary to the generated one) or switch off checks that generated files
cannot pass (md5 of the original CIFAR-10 files, UCI row counts) and data-loader worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from hyperlit.cli import main
from tests.datamodules.ptb_fakedata import WORDS, write_fake_ptb
from tests.datamodules.tabular_fakedata import write_fake_adult, write_fake_bank, write_fake_default
from tests.fakedata import write_fake_cifar, write_fake_mnist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))

_MNIST_SPLITS = ["--data.init_args.val_size", "50"]
_FEW_STEPS = ["--data.init_args.steps_per_task", "4"]  # task-sequence schedules: the epoch length
_PTB_VOCAB = ["--model.init_args.vocab_size", str(len(set(WORDS)) + 1)]  # the generated words and <eos>
_SMALL_LSTM = ["--model.init_args.embedding_size", "16", "--model.init_args.hidden_size", "16"]
_CIFAR = [
    "--data.init_args.batch_size",
    "8",
    "--data.init_args.num_workers",
    "0",
    "--data.init_args.pin_memory",
    "false",
]
_UCI = ["--data.init_args.verify_row_counts", "false"]
# WRN-10-2 instead of WRN-28-10 (width 2 keeps group 0's 1×1 shortcut); the HBE YAML's l2_hparams name the 28-layer
# paths, so the override gives the WRN-10's
_WRN10_L2 = {"conv": "input_conv_l2", "fc": "dense_l2"} | {
    f"groups.{g}.0.{layer}": f"group_{g}_l2" for g in range(3) for layer in ("conv1", "conv2", "shortcut")
}
_WRN10 = ["--data.init_args.verify_md5", "false"]

OVERRIDES: dict[str, list[str]] = {
    "br_mnist_global.yaml": _MNIST_SPLITS,
    "br_mnist_local.yaml": _MNIST_SPLITS,
    "br_mnist_perweight.yaml": [*_MNIST_SPLITS, "--data.init_args.train_size", "100"],
    "cl_permuted_mnist.yaml": [*_MNIST_SPLITS, *_FEW_STEPS],
    "cl_permuted_mnist_cpu.yaml": [*_MNIST_SPLITS, *_FEW_STEPS],
    "cl_regression1d.yaml": _FEW_STEPS,
    "cl_split_mnist.yaml": [*_MNIST_SPLITS, *_FEW_STEPS],
    "cosmos_adult.yaml": _UCI,
    "phn_adult.yaml": _UCI,
    "phn_bank.yaml": _UCI,
    "phn_default.yaml": _UCI,
    "ptb_lstm_baseline.yaml": [*_PTB_VOCAB, *_SMALL_LSTM],
    "stn_ptb.yaml": [*_PTB_VOCAB, *_SMALL_LSTM],
    "stn_ptb_cpu.yaml": _PTB_VOCAB,
    "delta_stn_ptb.yaml": [*_PTB_VOCAB, *_SMALL_LSTM],
    "delta_stn_ptb_cpu.yaml": _PTB_VOCAB,
    "stn_cifar10.yaml": [*_CIFAR, "--data.init_args.hyper_batch_size", "8", "--data.init_args.verify_md5", "false"],
    "stn_cifar10_cpu.yaml": _CIFAR,
    "delta_stn_cifar10.yaml": [
        *_CIFAR,
        "--data.init_args.hyper_batch_size",
        "8",
        "--data.init_args.verify_md5",
        "false",
    ],
    "delta_stn_cifar10_cpu.yaml": _CIFAR,
    "implicit_mnist_perweight.yaml": [*_MNIST_SPLITS, "--data.init_args.train_size", "100"],
    "unrolled_mnist_perweight.yaml": [*_MNIST_SPLITS, "--data.init_args.train_size", "100"],
    "hbe_mnist_cpu.yaml": [*_MNIST_SPLITS, "--data.init_args.train_size", "100"],
    "hbe_cifar10_cpu.yaml": [*_CIFAR, "--data.init_args.hyper_batch_size", "8"],
    "hbe_cifar10_wrn28_10.yaml": [
        *_CIFAR,
        *_WRN10,
        "--data.init_args.hyper_batch_size",
        "8",
        "--model.init_args.net.init_args.depth",
        "10",
        "--model.init_args.net.init_args.width",
        "2",
        "--model.init_args.l2_hparams",
        json.dumps(_WRN10_L2),
    ],
    "batch_ensemble_cifar10_wrn28_10.yaml": [
        *_CIFAR,
        *_WRN10,
        "--model.init_args.model.init_args.depth",
        "10",
        "--model.init_args.model.init_args.width",
        "2",
    ],
}


class RecordFit(Callback):
    """Remembers what the last ``fit`` trained (added to the trainer's callbacks from the command line)."""

    last: ClassVar[dict[str, Any]] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        RecordFit.last = {
            "model": type(pl_module).__name__,
            "data": type(trainer.datamodule).__name__,
            "global_step": trainer.global_step,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed,
        }


@pytest.fixture(scope="module")
def fake_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder holding every data set the configs read, each in its real on-disk format."""
    root = tmp_path_factory.mktemp("example_data")
    write_fake_mnist(root, n_train=300, n_test=50)
    write_fake_cifar(root, per_batch=50)  # full set: data_batch_1..5, test_batch, batches.meta
    write_fake_ptb(root)
    write_fake_adult(root, n_train=160, n_test=60)
    write_fake_default(root, n=200)
    write_fake_bank(root, n=200)
    return root


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_print_config_names_the_model_and_data(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    for key in ("model", "data"):
        assert _class_name(printed[key]["class_path"]) == _class_name(original[key]["class_path"]), key


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_fast_dev_run_on_generated_files(
    config: Path, fake_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERLIT_DATA_DIR", str(fake_data_dir))
    monkeypatch.chdir(tmp_path)  # nothing is written into the repository (lightning_logs, plots, ...)
    RecordFit.last = {}
    main(
        [
            "fit",
            "--config",
            str(config),
            *OVERRIDES.get(config.name, []),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            f"--trainer.callbacks+={__name__}.RecordFit",
        ]
    )
    original = yaml.safe_load(config.read_text())
    assert RecordFit.last, "fit did not finish"
    assert RecordFit.last["model"] == _class_name(original["model"]["class_path"])
    assert RecordFit.last["data"] == _class_name(original["data"]["class_path"])
    assert RecordFit.last["batches"] >= 1 and RecordFit.last["global_step"] >= 1
