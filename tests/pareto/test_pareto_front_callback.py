"""The Pareto-front plotting callback (2-D and 3-D fronts, TensorBoard figure or PNG, rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyperlit.callbacks.pareto_front import ParetoFrontPlot, plot_front
from hyperlit.pareto.metrics import evaluate_front, evaluation_rays


def _front(m: int):  # type: ignore[no-untyped-def]
    rays = evaluation_rays(m, n=9, n_partitions=5)
    losses = 0.3 / (rays * m)  # on the r⁻¹ ray
    return evaluate_front(losses.clamp(max=0.95), rays, names=[f"l{j}" for j in range(m)])


def _trainer(tmp_path: Path, logger, sanity: bool = False, zero: bool = True):  # type: ignore[no-untyped-def]
    return SimpleNamespace(
        sanity_checking=sanity,
        is_global_zero=zero,
        current_epoch=3,
        logger=logger,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )


@pytest.mark.parametrize("m", [2, 3])
def test_plot_front_draws_every_point(m: int, tmp_path: Path) -> None:
    front = _front(m)
    fig = plot_front(front, path=tmp_path / "f.png")
    ax = fig.axes[0]
    assert (ax.name == "3d") == (m == 3)
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == len(front.rays)
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "HV=" in fig._suptitle.get_text() and "ref [1.0" in fig._suptitle.get_text()


def test_callback_png_tensorboard_and_guards(tmp_path: Path) -> None:
    module = SimpleNamespace(last_front=_front(3))
    cb = ParetoFrontPlot()
    csv_like = SimpleNamespace(experiment=SimpleNamespace())  # no add_figure: PNG in the log dir
    cb.on_validation_epoch_end(_trainer(tmp_path, csv_like), module)  # type: ignore[arg-type]
    assert cb.last_path == tmp_path / "pareto_front" / "epoch_0003.png" and cb.last_path.exists()

    figures = []
    tb_like = SimpleNamespace(
        experiment=SimpleNamespace(add_figure=lambda tag, fig, global_step: figures.append((tag, global_step)))
    )
    cb.on_validation_epoch_end(_trainer(tmp_path, tb_like), module)  # type: ignore[arg-type]
    assert figures == [("pareto_front", 3)]
    cb.on_validation_epoch_end(_trainer(tmp_path, tb_like, sanity=True), module)  # type: ignore[arg-type]
    cb.on_validation_epoch_end(_trainer(tmp_path, tb_like, zero=False), module)  # type: ignore[arg-type]
    cb.on_validation_epoch_end(_trainer(tmp_path, tb_like), SimpleNamespace(last_front=None))  # type: ignore[arg-type]
    assert len(figures) == 1
    with pytest.raises(ValueError, match="every_n_epochs"):
        ParetoFrontPlot(every_n_epochs=0)
    assert torch.is_tensor(module.last_front.losses)
