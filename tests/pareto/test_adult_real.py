"""Slow: PHN-LS and PHN-EPO on the real UCI Adult data, best-validation-HV checkpoint, HV and uniformity on the
test split at the 55 interior Das–Dennis rays. Run with ``pytest -m slow tests/pareto/test_adult_real.py -s``
to see the reported figures."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.tabular import AdultDataModule
from hyperlit.pareto import ParetoHyperNetModule


@pytest.mark.slow
def test_real_adult_phn_ls_and_phn_epo(real_data_dir: Path, tmp_path: Path, make_trainer) -> None:
    dm = AdultDataModule(data_dir=str(real_data_dir), batch_size=256)
    dm.setup("fit")
    report = {}
    for solver in ("ls", "epo"):
        pl.seed_everything(0)
        model = ParetoHyperNetModule(
            solver=solver, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), in_dim=dm.input_dim
        )
        untrained = model.evaluate(dm.test_dataloader())
        ckpt = ModelCheckpoint(dirpath=tmp_path / solver, monitor="val/hv", mode="max", save_top_k=1)
        trainer = make_trainer(max_epochs=3, callbacks=[ckpt], enable_checkpointing=True)
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
        hv, unif = float(trainer.callback_metrics["test/hv"]), float(trainer.callback_metrics["test/uniformity"])
        report[solver] = (hv, unif)
        print(
            f"\nreal Adult PHN-{solver.upper()}: test HV {hv:.4f}, uniformity {unif:.3f} "
            f"(untrained HV {untrained.hv:.4f}; best val HV {float(ckpt.best_model_score):.4f}; "
            f"ref {list(model.last_front.ref_point)}, {len(model.last_front.rays)} rays)"  # type: ignore[union-attr]
        )
        assert 0.5 < hv < 1.0 and hv > untrained.hv
        assert model.last_front is not None and len(model.last_front.rays) == 55
    # EPO places r⊙ℓ closer to uniform than LS (the paper's contrast: 0.701 vs 0.289 on Adult)
    assert report["epo"][1] > report["ls"][1]
