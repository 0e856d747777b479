"""Accuracy-matrix report of a continual-learning run: a text table and a heatmap (rank 0 only).

After every validation that filled a new row of ``R[i, j]`` (and at the end of ``fit``) the callback shows the
table with the during/final means and backward transfer through Lightning's logger (``rank_zero_info``), and
draws the heatmap: with a TensorBoard logger it is added with ``add_figure``; otherwise it is written as a PNG
into the logger's ``log_dir`` (or the trainer's ``default_root_dir``). matplotlib is imported lazily and the
figure is built with the object API and closed. Works with any module that has an ``acc_matrix`` buffer
(:class:`~hyperlit.continual.base.ContinualModule`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from hyperlit.continual.metrics import format_matrix, num_trained_tasks, summarize

__all__ = ["AccuracyMatrixCallback", "accuracy_matrix_figure"]


def accuracy_matrix_figure(matrix: Tensor, title: str = "accuracy matrix R[i, j]", scale: float = 100.0) -> Any:
    """A matplotlib ``Figure`` with R as a heatmap (rows: after task i; columns: task j), values annotated."""
    from matplotlib.figure import Figure

    r = matrix.detach().float().cpu() * scale
    t = r.shape[0]
    fig = Figure(figsize=(1.0 + 0.7 * t, 0.8 + 0.6 * t))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(r.numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax)
    for i in range(t):
        for j in range(t):
            v = float(r[i, j])
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


class AccuracyMatrixCallback(pl.Callback):
    """Show and plot the accuracy matrix whenever a task finishes, and at the end of training.

    Args:
        every_task: Report after each finished task (else only at the end of ``fit``).
        plot: Draw the heatmap (needs matplotlib).
        scale: Multiply entries by this for display (100: percent; use 1 for MSE matrices).
    """

    def __init__(self, every_task: bool = True, plot: bool = True, scale: float | None = None) -> None:
        super().__init__()
        self.every_task = every_task
        self.plot = plot
        self.scale = scale
        self._reported_rows = 0
        self.last_table: str | None = None
        self.figure_paths: list[Path] = []

    def _scale(self, pl_module: pl.LightningModule) -> float:
        if self.scale is not None:
            return self.scale
        return 100.0 if getattr(pl_module, "task_type", "classification") == "classification" else 1.0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the module's on_validation_epoch_end, which writes the row
        if trainer.sanity_checking or not self.every_task or not hasattr(pl_module, "acc_matrix"):
            return
        rows = num_trained_tasks(pl_module.acc_matrix)
        if rows > self._reported_rows:
            self._report(trainer, pl_module, tag=f"after_task_{rows - 1}")
            self._reported_rows = rows

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(pl_module, "acc_matrix"):
            self._report(trainer, pl_module, tag="final")

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        matrix = pl_module.acc_matrix.detach().cpu()
        scale = self._scale(pl_module)
        higher = getattr(pl_module, "higher_is_better", True)
        summary = summarize(matrix, higher)
        lines = [format_matrix(matrix, scale=scale)]
        if summary.get("num_tasks", 0) > 0:
            lines.append(
                f"during mean {summary['during_mean'] * scale:.2f} | final mean {summary['final_mean'] * scale:.2f}"
                f" | BWT {summary['bwt'] * scale:+.2f}"
            )
        self.last_table = "\n".join(lines)
        rank_zero_info(f"[accuracy matrix, {tag}]\n{self.last_table}")
        if self.plot:
            self._log_figure(trainer, matrix, tag, scale)

    def _log_figure(self, trainer: pl.Trainer, matrix: Tensor, tag: str, scale: float) -> None:
        fig = accuracy_matrix_figure(matrix, title=f"R[i, j] ({tag})", scale=scale)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"continual/accuracy_matrix_{tag}", fig, global_step=trainer.current_epoch)
        else:
            root = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
            out_dir = Path(root or trainer.default_root_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"accuracy_matrix_{tag}.png"
            fig.savefig(path, dpi=100)
            self.figure_paths.append(path)
        del fig

    def state_dict(self) -> dict[str, Any]:
        return {"reported_rows": self._reported_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reported_rows = int(state_dict.get("reported_rows", 0))
