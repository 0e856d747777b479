"""Plot the Pareto front learned by a PHN (or the per-ray baselines) after every validation epoch.

The module exposes its latest :class:`~hyperlit.pareto.metrics.FrontEvaluation` as ``pl_module.last_front``
(losses at the evaluation rays, hypervolume, reference point), computed in its ``on_validation_epoch_end`` by
:class:`~hyperlit.pareto.front_metric.FrontStatistics`. This callback draws it in ``on_validation_end``, which runs
after the module's epoch-end hook (a callback's ``on_validation_epoch_end`` runs before it and would see the
previous epoch's front) — a 2-D scatter for two
objectives, a 3-D scatter for three (pairwise panels for more) — coloured by the ray's first coordinate, and

* logs it with ``add_figure`` when the logger supports figures (TensorBoard), else
* writes ``<log_dir>/pareto_front/epoch_XXXX.png``.

Only rank 0 draws (the front is already the whole split's: the metric summed its statistics over ranks); sanity
checks are skipped;
matplotlib is imported lazily and used through its object API (no pyplot state). Figures use matplotlib's
constrained layout, so axis labels, tick labels, the colour bar and the title all lie inside the saved image.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["ParetoFrontPlot", "plot_front"]


def plot_front(front: Any, title: str = "", path: str | Path | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` of ``front`` (a ``FrontEvaluation``); saved as PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    losses = front.losses.numpy()
    rays = front.rays.numpy()
    m = losses.shape[1]
    names = list(front.names) or [f"objective {j}" for j in range(m)]
    text = f"{title}  HV={front.hv:.4f} (ref {list(front.ref_point)}), uniformity={front.uniformity:.3f}".strip()
    color = rays[:, 0]
    if m == 2:
        fig = Figure(figsize=(4.5, 4), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        sc = ax.scatter(losses[:, 0], losses[:, 1], c=color, cmap="viridis", s=18)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    elif m == 3:
        fig = Figure(figsize=(5, 4.5), layout="constrained")
        ax = fig.add_subplot(1, 1, 1, projection="3d")
        sc = ax.scatter(losses[:, 0], losses[:, 1], losses[:, 2], c=color, cmap="viridis", s=14)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_zlabel(names[2])
    else:
        pairs = list(itertools.combinations(range(m), 2))
        fig = Figure(figsize=(3.2 * len(pairs), 3), layout="constrained")
        for k, (i, j) in enumerate(pairs):
            ax = fig.add_subplot(1, len(pairs), k + 1)
            sc = ax.scatter(losses[:, i], losses[:, j], c=color, cmap="viridis", s=12)
            ax.set_xlabel(names[i])
            ax.set_ylabel(names[j])
    fig.colorbar(sc, ax=fig.axes, label="ray r₁", shrink=0.8)
    fig.suptitle(text, fontsize=8)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    return fig


class ParetoFrontPlot(Callback):
    """Draw ``pl_module.last_front`` after validation epochs (TensorBoard figure, else PNG in the log dir).

    Args:
        every_n_epochs: Plot every this many validation epochs.
        tag: TensorBoard tag / PNG folder name.
    """

    def __init__(self, every_n_epochs: int = 1, tag: str = "pareto_front") -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.tag = tag
        self.last_path: Path | None = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        front = getattr(pl_module, "last_front", None)
        if front is None:
            return
        try:
            fig = plot_front(front, title=f"epoch {trainer.current_epoch}")
        except ImportError:  # matplotlib is optional
            return
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(self.tag, fig, global_step=trainer.current_epoch)  # type: ignore[union-attr]
            return
        log_dir = trainer.log_dir or trainer.default_root_dir
        path = Path(log_dir) / self.tag / f"epoch_{trainer.current_epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        self.last_path = path
