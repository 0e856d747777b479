"""The Pareto-front plotting callback (2-D and 3-D fronts, TensorBoard figure or PNG, rank 0 only, the current
epoch's front)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

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
    cb.on_validation_end(_trainer(tmp_path, csv_like), module)  # type: ignore[arg-type]
    assert cb.last_path == tmp_path / "pareto_front" / "epoch_0003.png" and cb.last_path.exists()

    figures = []
    tb_like = SimpleNamespace(
        experiment=SimpleNamespace(add_figure=lambda tag, fig, global_step: figures.append((tag, global_step)))
    )
    cb.on_validation_end(_trainer(tmp_path, tb_like), module)  # type: ignore[arg-type]
    assert figures == [("pareto_front", 3)]
    cb.on_validation_end(_trainer(tmp_path, tb_like, sanity=True), module)  # type: ignore[arg-type]
    cb.on_validation_end(_trainer(tmp_path, tb_like, zero=False), module)  # type: ignore[arg-type]
    cb.on_validation_end(_trainer(tmp_path, tb_like), SimpleNamespace(last_front=None))  # type: ignore[arg-type]
    assert len(figures) == 1
    with pytest.raises(ValueError, match="every_n_epochs"):
        ParetoFrontPlot(every_n_epochs=0)
    assert torch.is_tensor(module.last_front.losses)


def test_callback_draws_the_front_of_the_epoch_just_validated(
    tmp_path: Path, make_trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a Trainer the plotted front is the one the module computed this epoch, not the sanity check's."""
    import hyperlit.callbacks.pareto_front as module_under_test
    from hyperlit.pareto import ParetoHyperNetModule

    drawn = []
    original = module_under_test.plot_front
    monkeypatch.setattr(module_under_test, "plot_front", lambda front, **kw: drawn.append(front) or original(front))
    g = torch.Generator().manual_seed(0)
    x, y, group = torch.randn(32, 3, generator=g), (torch.rand(32, generator=g) < 0.5).float(), torch.arange(32) % 2
    loader = DataLoader(TensorDataset(x, y, group), batch_size=8)
    model = ParetoHyperNetModule(in_dim=3, target_hidden=(4,), hnet_hidden=(8,), test_ray_partitions=4)
    cb = ParetoFrontPlot()
    make_trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[cb]).fit(model, loader, loader)
    assert len(drawn) == 2 and drawn[-1] is model.last_front  # one per epoch, none for the sanity check
    assert cb.last_path is not None and cb.last_path.name == "epoch_0001.png" and cb.last_path.exists()


@pytest.mark.parametrize("m", [2, 3, 4])
def test_labels_and_tick_labels_lie_inside_the_canvas(m: int) -> None:
    """Long objective names and wide tick labels (values near 1234.5) stay on the saved figure (none clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rays = evaluation_rays(m, n=9, n_partitions=5)
    names = [f"objective_number_{j}" for j in range(m)]
    front = evaluate_front(0.3 / (rays * m) + 1234.5, rays, names=names, ref_point=[3000.0] * m)
    fig = plot_front(front, title="epoch 3")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox

    def inside(box, what: str) -> None:  # type: ignore[no-untyped-def]
        assert box.x0 >= canvas.x0 and box.y0 >= canvas.y0, (what, box.bounds, canvas.bounds)
        assert box.x1 <= canvas.x1 and box.y1 <= canvas.y1, (what, box.bounds, canvas.bounds)

    inside(fig._suptitle.get_window_extent(renderer), "title")
    for ax in fig.axes:  # the scatter panels and the colour bar: everything drawn (tick labels, axis labels)
        inside(ax.get_tightbbox(renderer), f"axes {ax.get_label()!r}")
        for axis in (ax.xaxis, ax.yaxis, getattr(ax, "zaxis", None)):
            if axis is not None and axis.label.get_text():
                inside(axis.label.get_window_extent(renderer), axis.label.get_text())
    assert fig.axes[0].yaxis.label.get_text() == names[1]
