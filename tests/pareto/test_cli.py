"""``hyperlit fit --config examples/phn_adult.yaml`` (subprocess, with another optimizer from the command line) and
``hyperlit predict`` with a ray on the command line, from the checkpoint the fit wrote; ``--print_config`` of the
example configs shows the optimizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from hyperlit.cli import HyperlitCLI, import_all
from hyperlit.pareto import ParetoHyperNetModule
from tests.datamodules.tabular_fakedata import write_fake_adult

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "phn_adult.yaml"


def test_phn_adult_config_fits_then_predicts_at_a_command_line_ray(tmp_path: Path) -> None:
    write_fake_adult(tmp_path / "data", n_train=160, n_test=60)
    common = [
        "--config",
        str(CONFIG),
        "--data.data_dir",
        str(tmp_path / "data"),
        "--data.verify_row_counts",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    fit = [
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--model.solver",
        "ls",
        "--model.test_ray_partitions",
        "5",
        "--model.optimizer",
        "torch.optim.AdamW",
        "--model.optimizer.lr",
        "3e-4",
    ]
    cmd = [sys.executable, "-m", "hyperlit", "fit", *common, *fit]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = sorted((tmp_path / "run").rglob("best-hv-*.ckpt"))
    assert len(best) == 1 and any((tmp_path / "run").rglob("last.ckpt"))
    ckpt = torch.load(best[0], weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["solver"] == "ls" and hparams["in_dim"] > 0  # override and inferred in_dim are stored
    (group,) = ckpt["optimizer_states"][0]["param_groups"]  # one optimizer, over φ
    assert group["lr"] == 3e-4 and group["decoupled_weight_decay"]  # AdamW from the command line

    import_all()
    ray = [0.2, 0.5, 0.3]
    cli = HyperlitCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "predict",
            *common,
            "--ckpt_path",
            str(best[0]),
            "--model.predict_ray",
            str(ray),
            "--return_predictions",
            "true",
        ],
    )
    model = cli.model
    assert model.predict_ray == pytest.approx(ray)  # the command-line ray, not a value from the checkpoint
    out = ParetoHyperNetModule.gather_predictions(cli.trainer.predict_loop.predictions)  # type: ignore[arg-type]
    assert out["ray"].tolist() == pytest.approx(ray)
    preds = out["predictions"]
    x = cli.datamodule.test_set.tensors[0]
    with torch.no_grad():
        expected = torch.sigmoid(model.network_for_ray(ray)(x).squeeze(-1))
    assert preds.shape == (60,)
    torch.testing.assert_close(preds, expected)


@pytest.mark.parametrize("name", ["phn_adult", "phn_bank", "phn_default"])
def test_example_configs_print_their_optimizer(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from hyperlit.cli import main

    args = ["fit", "--config", str(ROOT / "examples" / f"{name}.yaml"), "--print_config"]
    with pytest.raises(SystemExit):
        main(args)
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["optimizer"]["class_path"] == "torch.optim.Adam" and model["optimizer"]["init_args"]["lr"] == 1e-4
    assert model["lr_scheduler"] is None
    with pytest.raises(SystemExit):
        main([*args, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.01"])
    optimizer = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.SGD" and optimizer["init_args"]["lr"] == 0.01
