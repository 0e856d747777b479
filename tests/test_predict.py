"""``hyperlit predict`` writes what ``predict_step`` returns (:mod:`hyperlit.callbacks.prediction_writer`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from datamodules.digits import DigitsDataModule
from hyperlit.base import HyperlitModule
from hyperlit.callbacks.prediction_writer import PredictionWriter
from hyperlit.cli import HyperlitCLI

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
N_TEST = 360  # DigitsDataModule's test split: 20 % of 1,797 (the predict loader)


class ParetoLike(HyperlitModule):
    """Returns what a Pareto module returns: a dict of the preference rays (R, m) and (R, B, C) predictions."""

    def __init__(self, rays: int = 3) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.rays = torch.softmax(torch.arange(rays * 2, dtype=torch.float32).view(rays, 2), dim=1)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        probs = torch.softmax(self.net(batch[0]), dim=1)
        return {"rays": self.rays, "predictions": torch.stack([probs * r[0] for r in self.rays])}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _predict_cli(tmp_path: Path, *args: str) -> HyperlitCLI:
    return HyperlitCLI(
        args=[
            "predict", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *args,
        ]
    )  # fmt: skip


def test_stn_predict_writes_one_row_per_example(tmp_path: Path) -> None:
    """The quickstart's STN through ``hyperlit predict``: the default writer puts predictions.csv in the run folder."""
    cli = _predict_cli(tmp_path)
    writers = [cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter)]
    assert len(writers) == 1 and writers[0].written == [tmp_path / "predictions.csv"]
    assert cli.config_init["predict"]["return_predictions"] is False  # the file has them: not kept in memory too
    rows = _rows(tmp_path / "predictions.csv")
    assert len(rows) == N_TEST
    assert list(rows[0]) == ["index"] + [f"prediction_{c}" for c in range(10)]
    assert sorted(int(r["index"]) for r in rows) == list(range(N_TEST))
    assert all(len(r) == 11 for r in rows)


def test_predict_keeps_a_configured_writer(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    cli = _predict_cli(
        tmp_path, "--trainer.callbacks+", "hyperlit.callbacks.prediction_writer.PredictionWriter",
        "--trainer.callbacks.output_dir", str(out), "--trainer.callbacks.format", "pt",
    )  # fmt: skip
    assert [type(cb).__name__ for cb in cli.trainer.callbacks].count("PredictionWriter") == 1
    logits = torch.load(out / "predictions.pt", weights_only=True)
    assert logits.shape == (N_TEST, 10)
    assert not (tmp_path / "predictions.csv").exists()


def _trainer(tmp_path: Path, writer: PredictionWriter) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[writer]
    )


def test_dict_outputs_csv_and_pt(tmp_path: Path) -> None:
    model, data = ParetoLike(rays=3), DigitsDataModule(batch_size=64)
    csv_writer = PredictionWriter(output_dir=str(tmp_path / "csv"))
    _trainer(tmp_path, csv_writer).predict(model, datamodule=data, return_predictions=False)
    rows = _rows(tmp_path / "csv" / "predictions.csv")
    assert len(rows) == N_TEST
    header = list(rows[0])
    assert header[:7] == ["index", "rays_0_0", "rays_0_1", "rays_1_0", "rays_1_1", "rays_2_0", "rays_2_1"]
    assert header[7:] == [f"predictions_{r}_{c}" for r in range(3) for c in range(10)]
    assert float(rows[5]["rays_2_1"]) == pytest.approx(float(model.rays[2, 1]))  # per-batch value on each row

    pt_writer = PredictionWriter(output_dir=str(tmp_path / "pt"), format="pt")
    _trainer(tmp_path, pt_writer).predict(model, datamodule=data, return_predictions=False)
    saved = torch.load(tmp_path / "pt" / "predictions.pt", weights_only=True)
    assert set(saved) == {"rays", "predictions"}
    torch.testing.assert_close(saved["rays"], model.rays)  # the same in every batch: saved once
    assert saved["predictions"].shape == (N_TEST, 3, 10)  # (R, B, C) batches written example-major
    row = torch.tensor([float(rows[7][f"predictions_1_{c}"]) for c in range(10)])
    torch.testing.assert_close(saved["predictions"][7, 1], row)


def test_bad_writer_arguments_and_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"PredictionWriter format must be one of \['csv', 'pt'\], got 'npy'"):
        PredictionWriter(format="npy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"filename must be a plain file name \(a stem\), got 'a/b'"):
        PredictionWriter(filename="a/b")

    class OnlyRays(ParetoLike):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
            return self.rays

    message = (
        r"PredictionWriter\(format='csv'\) writes one row per example, but no output of predict_step has a dimension "
        r"of the batch's size \(64\): \{'': \(3, 2\)\}; use format='pt'"
    )
    writer = PredictionWriter(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):  # on the first batch
        _trainer(tmp_path, writer).predict(OnlyRays(), datamodule=DigitsDataModule(batch_size=64))

    class Text(ParetoLike):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return {"label": "cat"}

    with pytest.raises(TypeError, match=r"writes tensors \(or dicts, tuples or lists of them\); predict_step returned "
                       r"a str for 'label'"):  # fmt: skip
        _trainer(tmp_path, PredictionWriter(output_dir=str(tmp_path))).predict(
            Text(), datamodule=DigitsDataModule(batch_size=64)
        )
