"""STN and Δ-STN against random search, TPE and grid search at equal wall-clock (STN paper §5 / Table 2, CPU scale).

Problem: the official small STN CNN (:class:`~hyperlit.models.stn_cnn.StnSmallCNN`) on the shared partial CIFAR-10
(``datamodules/cifar10.py``, ``partial=True``: the 8,000 / 2,000 train / hyper split of ``data_batch_1`` and the
10,000 test images), a subset of the training images so that many trials fit in the budget. The tuned
regularization hyperparameters and their ranges are the STN model's own :class:`~hyperlit.hparams.Hyperparameter`
entries (``small_cnn_hyperparameters()``), so every method searches the same space:

* **STN**: :class:`~hyperlit.tuning.stn.SelfTuningModule`, its own alternating loop (warm-up, 2 φ-steps per λ-step
  on the hyper split, σ tuned with the entropy term); the warm-up, the λ-steps, the per-epoch validation and the
  extra cost of the STN layers all count against its budget. Its selected configuration is its final model at the
  unperturbed λ.
* **Δ-STN** (Bae & Grosse, NeurIPS 2020): :class:`~hyperlit.tuning.delta_stn.DeltaSelfTuningModule` on the same
  network and loop settings; the general weights step on the unperturbed training loss, the response parameters
  (their own SGD optimizer, same settings) on the perturbed, linearized one; evaluated at the general weights.
* **random search** (``optuna.samplers.RandomSampler``), **TPE** (``TPESampler``) and **grid search**
  (``GridSampler`` over 3 values per hyperparameter, visited in Optuna's seeded random order since the grid does
  not fit): every trial is a *plain* network of the same architecture
  (:class:`~hyperlit.tuning.fixed_hparams.FixedHyperparameterModule`, ordinary conv layers) trained with fixed
  values for a fixed number of epochs and scored by its final hyper-split loss. The best trial's trained model is
  evaluated on the test set (no retraining).

Budget rule (same for every method): wall-clock (``time.perf_counter``) from the method's start. A trial is only
started before the budget is spent; a trial still running when it ends is finished but its result is discarded.
STN stops at the first step after which the budget minus the duration of one validation pass is spent, so that its
final validation pass ends at about the budget; every validation pass counts only if it ended within the budget
plus that one pass.

Table 1 controls (per seed, after STN, not budget-limited): the plain network trained from scratch (same initial
weights as the STN's general weights) for as many φ-steps as the STN took, (a) with the STN's final values fixed,
(b) replaying the STN's recorded per-λ-step schedule (``hparam_schedule.csv`` → ``replay="step"``).

All methods run through the same Lightning ``Trainer`` settings, single-threaded, one seed after the other with
the method order rotated per seed, so machine load (the development machine is shared) hits all alike; process CPU
time and the load average are printed next to every wall-clock figure.

    python examples/benchmarks/stn_vs_hpo.py --quick     # 1 seed, 8 s per method (under 2 minutes)
    python examples/benchmarks/stn_vs_hpo.py             # 3 seeds, 150 s per method (about 40 minutes)
    python examples/benchmarks/stn_vs_hpo.py --budget 120   # the run in docs/benchmarks.md (about 30 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402
from hyperlit.hparams import Hyperparameter  # noqa: E402
from hyperlit.models.stn_cnn import StnSmallCNN, small_cnn_hyperparameters  # noqa: E402
from hyperlit.tuning.delta_stn import DeltaSelfTuningModule  # noqa: E402
from hyperlit.tuning.fixed_hparams import FixedHyperparameterModule  # noqa: E402
from hyperlit.tuning.stn import SelfTuningModule  # noqa: E402

METHODS = ("STN", "Delta-STN", "random", "TPE", "grid")
#: the best-response methods (one run each, selected configuration = the final λ); the others are trial searches
STN_METHODS = ("STN", "Delta-STN")
DEFAULT_TUNE = ("dropout0", "dropout1", "dropout2", "indropout", "inscale", "cutlength", "cutholes")
# STN paper Table 2, CIFAR-10 row (cross-entropy; reference/stn.md §4.3, unverified against the PDF): val, test
PAPER_CIFAR = {"grid": (0.794, 0.809), "random": (0.921, 0.752), "TPE": (0.636, 0.651), "STN": (0.575, 0.576)}


# -- data ------------------------------------------------------------------------------------------------------
class _Batches(Dataset[tuple[Tensor, Tensor]]):
    """In-memory tensors served a whole batch per index list (a ``BatchSampler`` drives it)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: list[int]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        index = torch.as_tensor(idx)
        return self.x[index], self.y[index]


def _loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    ds = _Batches(x, y)
    base = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=shuffle), batch_size=None)


def load_data(args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor]]:
    """Train subset / hyper split / test of the partial CIFAR-10, float in [0, 1], optionally downscaled."""
    dm = CIFAR10DataModule(data_dir=args.data_dir, partial=True)
    dm.setup("fit")
    out = {}
    for name, ds, n in (
        ("train", dm.train_set, args.train_size),
        ("val", dm.hyper_set, args.val_size),
        ("test", dm.test_set, args.test_size),
    ):
        x = ds.images[:n].float().div_(255.0)
        if args.image_size != 32:
            x = F.adaptive_avg_pool2d(x, args.image_size)
        out[name] = (x.contiguous(), ds.labels[:n].clone())
    return out


# -- harness -----------------------------------------------------------------------------------------------------
def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _sgd(lr: float) -> functools.partial:
    """φ's optimizer for every method: SGD with momentum 0.9 (the STN's default)."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)


def _net(args: argparse.Namespace, seed: int) -> StnSmallCNN:
    torch.manual_seed(seed)
    return StnSmallCNN(filters=tuple(args.filters), image_size=args.image_size)


def _test(module: pl.LightningModule, loader: DataLoader) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        res = _trainer().test(module, dataloaders=loader, verbose=False)
    return float(res[0]["test/loss"])


def _val(module: pl.LightningModule, loader: DataLoader) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        res = _trainer().validate(module, dataloaders=loader, verbose=False)
    return float(res[0]["val/loss"])


class _Clock:
    """Wall-clock, CPU time and load average of one method's run."""

    def __init__(self) -> None:
        self.t0, self.c0, self.load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> str:
        return (
            f"wall {self.elapsed():6.1f} s  cpu {time.process_time() - self.c0:6.1f} s  "
            f"load {self.load0:.1f}->{os.getloadavg()[0]:.1f}"
        )


class _StnBudget(Callback):
    """Stop STN when the budget minus one validation pass is spent; record every validation pass with its time."""

    def __init__(self, clock: _Clock, budget: float, val_loader: DataLoader) -> None:
        self.clock, self.budget, self.val_loader = clock, budget, val_loader
        self.val_seconds = 0.0
        self.points: list[tuple[float, float]] = []
        self.final: float | None = None
        self.best_state: dict[str, Tensor] | None = None  # best-val checkpoint in memory (official code's selection)
        self._v0 = 0.0

    def _record(self, module: pl.LightningModule, val: float) -> None:
        if all(val < v for _, v in self.points):
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.points.append((self.clock.elapsed(), val))

    @torch.no_grad()
    def _evaluate(self, module: SelfTuningModule) -> float:
        """The hyper-split loss of the current model at the unperturbed λ (what Lightning's validation computes)."""
        was_training = module.training
        module.eval()
        total, n = 0.0, 0
        for x, y in self.val_loader:
            total += float(module.eval_metrics((x, y))["loss"]) * len(y)
            n += len(y)
        module.train(was_training)
        return total / n

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.final is None and self.clock.elapsed() + self.val_seconds >= self.budget:
            trainer.should_stop = True
            self.final = self._evaluate(pl_module)  # type: ignore[arg-type]
            self._record(pl_module, self.final)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final is None:  # after the stop: the same model again
            self._record(pl_module, float(trainer.callback_metrics["val/loss"]))
            self.val_seconds = time.perf_counter() - self._v0


def run_stn(
    args: argparse.Namespace, data: dict, space: list[Hyperparameter], seed: int, delta: bool = False
) -> dict[str, Any]:
    """STN, or with ``delta`` Δ-STN (Bae & Grosse 2020: centred, linearized response; w₀ and Θ stepped by their own
    SGD optimizers with the same settings), from the same initial network and with the same loop settings."""
    clock = _Clock()
    budget = _StnBudget(clock, args.budget, _loader(*data["val"], 500, False))
    kwargs: dict[str, Any] = dict(
        hyperparameters=space,
        plot_schedule=False,
        warmup_epochs=args.stn_warmup_epochs,
        phi_optimizer=_sgd(args.lr),
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=args.stn_hyper_lr),
        sigma_optimizer=functools.partial(torch.optim.Adam, lr=args.stn_hyper_lr),
        seed=seed,
    )
    if delta:
        stn: SelfTuningModule = DeltaSelfTuningModule(_net(args, seed), response_optimizer=_sgd(args.lr), **kwargs)
    else:
        stn = SelfTuningModule(_net(args, seed), **kwargs)
    loaders = {
        "train": _loader(*data["train"], args.batch_size, True, seed),
        "hyper": _loader(*data["val"], args.batch_size, True, seed + 1),
    }
    trainer = _trainer(max_epochs=100_000, callbacks=[budget])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(stn, train_dataloaders=loaders, val_dataloaders=_loader(*data["val"], 500, False))
    info = clock.summary()
    final_val = budget.final if budget.final is not None else _val(stn, _loader(*data["val"], 500, False))
    curve = [(t, v) for t, v in budget.points if t <= args.budget + budget.val_seconds]
    test = _test(stn, _loader(*data["test"], 500, False))
    values = {k: float(v) for k, v in stn.space.values().items()}
    schedule = list(stn.schedule)
    steps = {"phi_steps": int(stn.phi_steps), "hyper_steps": int(stn.hyper_steps_done)}  # before loading a checkpoint
    best_test = math.nan
    if budget.best_state is not None:  # the best-val checkpoint (weights, λ, σ) on the test set
        stn.load_state_dict(budget.best_state)
        best_test = _test(stn, _loader(*data["test"], 500, False))
    return {
        "curve": curve,
        "selected_val": final_val,
        "test": test,
        "epochs": trainer.current_epoch,
        "values": values,
        "schedule": schedule,
        "best_test": best_test,
        "clock": info,
        **steps,
    }


def search_space(names: list[str], image_size: int) -> list[Hyperparameter]:
    """The STN model's own entries (``small_cnn_hyperparameters()``) for ``names``; on downscaled images the cutout
    length's range and initial value shrink by ``image_size / 32`` (a hole keeps covering the same image fraction)."""
    by_name = {h.name: h for h in small_cnn_hyperparameters()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown hyperparameters {unknown}; StnSmallCNN tunes {list(by_name)}")
    space = [by_name[n] for n in names]
    f = image_size / 32
    return [dataclasses.replace(h, high=h.high * f, init=h.init * f) if h.name == "cutlength" else h for h in space]


def _suggest(trial: optuna.Trial, h: Hyperparameter) -> float:
    if h.discrete:  # the STN floors a value in (low, high): integers low .. ceil(high) - 1
        return float(trial.suggest_int(h.name, math.ceil(h.low), math.ceil(h.high) - 1))
    return trial.suggest_float(h.name, h.low, h.high)


def grid_values(h: Hyperparameter, n: int = 3) -> list[float]:
    """``n`` cell centres of the range (floored for discrete entries; duplicates removed)."""
    pts = [h.low + (k + 0.5) * (h.high - h.low) / n for k in range(n)]
    if h.discrete:
        pts = [float(math.floor(p)) for p in pts]
    return sorted(set(pts))


def run_search(
    args: argparse.Namespace, data: dict, space: list[Hyperparameter], seed: int, method: str
) -> dict[str, Any]:
    if method == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    elif method == "TPE":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.tpe_startup)
    else:
        sampler = optuna.samplers.GridSampler({h.name: grid_values(h) for h in space}, seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    clock = _Clock()
    curve: list[tuple[float, float]] = []
    best: tuple[float, FixedHyperparameterModule | None, dict[str, float]] = (math.inf, None, {})
    n_done = n_late = 0
    while clock.elapsed() < args.budget:
        trial = study.ask()
        cfg = {h.name: _suggest(trial, h) for h in space}
        k = n_done + n_late
        model = FixedHyperparameterModule(
            _net(args, seed * 1000 + k),
            values=cfg,
            hyperparameters=space,
            optimizer=_sgd(args.lr),
            seed=seed * 1000 + k,
        )
        trainer = _trainer(max_epochs=args.trial_epochs, check_val_every_n_epoch=args.trial_epochs)
        trainer.fit(
            model,
            train_dataloaders=_loader(*data["train"], args.batch_size, True, seed * 1000 + k),
            val_dataloaders=_loader(*data["val"], 500, False),
        )
        val = float(trainer.callback_metrics["val/loss"])
        study.tell(trial, val)
        t = clock.elapsed()
        if t > args.budget:
            n_late += 1
            break
        n_done += 1
        if val < best[0]:
            best = (val, model, cfg)
        curve.append((t, min(val, curve[-1][1]) if curve else val))
    info = clock.summary()
    test = _test(best[1], _loader(*data["test"], 500, False)) if best[1] is not None else math.nan
    return {
        "curve": curve,
        "selected_val": best[0],
        "test": test,
        "trials": n_done,
        "late": n_late,
        "values": best[2],
        "clock": info,
    }


def run_controls(
    args: argparse.Namespace, data: dict, space: list[Hyperparameter], seed: int, stn: dict[str, Any]
) -> dict[str, tuple[float, float, float]]:
    """Table 1 controls: STN's final values fixed; STN's schedule replayed (both from the STN's initial weights)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hparam_schedule.csv"
        holder = SelfTuningModule(_net(args, seed), hyperparameters=space, plot_schedule=False)
        holder.schedule = stn["schedule"]
        holder.write_schedule_csv(path)
        # no λ-step within the budget: the replay is the warm-up values throughout (the initial values)
        replay: dict[str, Any] = {"schedule": str(path), "replay": "step"} if stn["schedule"] else {}
        for name, kwargs in (("final values fixed", {"values": stn["values"]}), ("schedule replayed", replay)):
            clock = _Clock()
            model = FixedHyperparameterModule(
                _net(args, seed), hyperparameters=space, optimizer=_sgd(args.lr), seed=seed, **kwargs
            )
            _trainer(max_steps=stn["phi_steps"], limit_val_batches=0).fit(
                model, train_dataloaders=_loader(*data["train"], args.batch_size, True, seed)
            )
            wall = clock.elapsed()
            val = _val(model, _loader(*data["val"], 500, False))
            test = _test(model, _loader(*data["test"], 500, False))
            out[name] = (val, test, wall)
            print(f"  control {name:20s} val {val:.4f}  test {test:.4f}  ({clock.summary()})", flush=True)
    return out


# -- reporting ------------------------------------------------------------------------------------------------------
def _best_at(curve: list[tuple[float, float]], t: float) -> float:
    vals = [v for s, v in curve if s <= t]
    return min(vals) if vals else math.nan


def _time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    best = math.inf
    for t, v in curve:
        best = min(best, v)
        if best <= target:
            return t
    return None


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def plot(results: dict[str, list[dict]], budget: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    grid = [budget * i / 200 for i in range(201)]
    colors = {"STN": "C3", "Delta-STN": "C4", "random": "C0", "TPE": "C2", "grid": "C1"}
    for method, runs in results.items():
        for run in runs:
            if run["curve"]:
                ts, vs = zip(*[(t, min(v for _, v in run["curve"][: i + 1])) for i, (t, _) in enumerate(run["curve"])])
                ax.step(ts, vs, where="post", color=colors[method], alpha=0.25, lw=0.8)
        mean = []
        for t in grid:
            vals = [_best_at(r["curve"], t) for r in runs]
            mean.append(statistics.mean(vals) if all(math.isfinite(v) for v in vals) else math.nan)
        ax.plot(grid, mean, color=colors[method], lw=2, label=f"{method} (mean of {len(runs)} seeds)")
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("best hyper-validation loss so far")
    ax.set_title("STN and Δ-STN vs random / TPE / grid search, small CNN on partial CIFAR-10 (CPU, 1 thread)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, tiny budget (under 2 minutes)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds per method and seed (150; quick 8)")
    p.add_argument("--trial-epochs", type=int, default=None, help="epochs of one baseline trial (default 15; quick 3)")
    p.add_argument("--train-size", type=int, default=None, help="training images (default 1000; quick 500)")
    p.add_argument("--val-size", type=int, default=None, help="hyper-split images (default 2000; quick 500)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default 10000; quick 1000)")
    p.add_argument("--image-size", type=int, default=16, help="image side after downscaling (divisible by 8)")
    p.add_argument("--filters", type=int, nargs=3, default=[10, 20, 40], help="filters of the 3 convolutions")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="SGD (momentum 0.9) learning rate of every network")
    p.add_argument("--tune", nargs="+", default=list(DEFAULT_TUNE), help="tuned hyperparameters (StnSmallCNN names)")
    p.add_argument("--stn-warmup-epochs", type=int, default=None, help="STN warm-up epochs (default 5; quick 1)")
    p.add_argument("--stn-hyper-lr", type=float, default=0.01, help="Adam LR of STN's λ and σ")
    p.add_argument("--tpe-startup", type=int, default=5, help="random trials before TPE models (Optuna default 10)")
    p.add_argument("--no-controls", action="store_true", help="skip the Table 1 controls")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default docs/img/stn_hpo_curves.png)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $HYPERLIT_DATA_DIR, else ~/.cache/hyperlit)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    q = args.quick
    args.seeds = args.seeds or (1 if q else 3)
    args.budget = args.budget or (8.0 if q else 150.0)
    args.trial_epochs = args.trial_epochs or (3 if q else 15)
    args.train_size = args.train_size or (500 if q else 1000)
    args.val_size = args.val_size or (500 if q else 2000)
    args.test_size = args.test_size or (1000 if q else 10000)
    args.stn_warmup_epochs = args.stn_warmup_epochs if args.stn_warmup_epochs is not None else (1 if q else 5)
    if args.plot is None:
        args.plot = Path(tempfile.gettempdir()) / "stn_hpo_quick.png" if q else ROOT / "docs/img/stn_hpo_curves.png"

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    space = search_space(args.tune, args.image_size)
    data = load_data(args)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        f"partial CIFAR-10: {len(data['train'][1])} train / {len(data['val'][1])} hyper-val / "
        f"{len(data['test'][1])} test images at {args.image_size}x{args.image_size}; StnSmallCNN filters "
        f"{tuple(args.filters)}, batch {args.batch_size}, SGD lr {args.lr} momentum 0.9"
    )
    print(
        "search space (small_cnn_hyperparameters(), cutlength scaled to the image size): "
        + ", ".join(f"{h.name} ({h.low:g}, {h.high:g}){' int' if h.discrete else ''}" for h in space)
    )
    print(
        f"budget {args.budget:g} s per method and seed, {args.seeds} seed(s); baseline trial = {args.trial_epochs} "
        f"epochs of a plain CNN; STN: warm-up {args.stn_warmup_epochs} epochs, T_train/T_val 2/1, λ/σ Adam lr "
        f"{args.stn_hyper_lr:g}, τ 1e-3; TPE n_startup_trials {args.tpe_startup}; grid 3 values per hyperparameter"
    )

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    controls: list[dict[str, tuple[float, float, float]]] = []
    for seed in range(args.seeds):
        order = list(args.methods[seed % len(args.methods) :]) + list(args.methods[: seed % len(args.methods)])
        print(f"seed {seed}: order {', '.join(order)}", flush=True)
        for method in order:
            res = (
                run_stn(args, data, space, seed, delta=method == "Delta-STN")
                if method in STN_METHODS
                else run_search(args, data, space, seed, method)
            )
            results[method].append(res)
            best = min(v for _, v in res["curve"]) if res["curve"] else math.nan
            count = (
                f"{res['epochs']} epochs, {res['phi_steps']} φ-steps, {res['hyper_steps']} λ-steps"
                if method in STN_METHODS
                else f"{res['trials']} trials (+{res['late']} past the budget)"
            )
            print(
                f"  {method:7s} best val {best:.4f}  selected val {res['selected_val']:.4f}  test {res['test']:.4f}"
                f"  {count}  ({res['clock']})",
                flush=True,
            )
            print("          selected: " + ", ".join(f"{k}={v:.3g}" for k, v in res["values"].items()), flush=True)
            if method in STN_METHODS:
                print(f"          best-val checkpoint: val {best:.4f}  test {res['best_test']:.4f}", flush=True)
            if method == "STN" and not args.no_controls:
                controls.append(run_controls(args, data, space, seed, res))

    plot(results, args.budget, args.plot)
    print(f"curves: {args.plot}")

    # time to reach TPE's final best (per seed)
    reach: dict[str, list[float | None]] = {m: [] for m in args.methods}
    if "TPE" in results:
        for s in range(args.seeds):
            target = min(v for _, v in results["TPE"][s]["curve"]) if results["TPE"][s]["curve"] else math.nan
            for m in args.methods:
                reach[m].append(_time_to(results[m][s]["curve"], target) if math.isfinite(target) else None)

    print()
    header = (
        f"RESULT {'method':14s} | {'best hyper-val loss':19s} | {'val of selected':17s} | {'test of selected':17s} | "
        f"{'#trials':>8s} | time to TPE's best"
    )
    print(header)
    for m in args.methods:
        runs = results[m]
        best = [min(v for _, v in r["curve"]) if r["curve"] else math.nan for r in runs]
        trials = "1 run" if m in STN_METHODS else f"{statistics.mean(r['trials'] for r in runs):.1f}"
        hits = [t for t in reach[m] if t is not None]
        if not reach[m]:
            ttb = "n/a"
        elif hits:
            ttb = f"{statistics.mean(hits):.1f} s ({len(hits)}/{len(reach[m])} seeds)"
        else:
            ttb = f"not reached (0/{len(reach[m])} seeds)"
        print(
            f"RESULT {m:14s} | {_ms(best):19s} | {_ms([r['selected_val'] for r in runs]):17s} | "
            f"{_ms([r['test'] for r in runs]):17s} | {trials:>8s} | {ttb}"
        )
    for m in [m for m in STN_METHODS if m in results]:
        runs = results[m]
        print(
            f"RESULT {m + ' ckpt':14s} | {_ms([min(v for _, v in r['curve']) for r in runs]):19s} | "
            f"{_ms([min(v for _, v in r['curve']) for r in runs]):17s} | {_ms([r['best_test'] for r in runs]):17s} | "
            f"{'1 run':>8s} | (selecting its best-val checkpoint instead of its final model)"
        )
    if controls:
        print("Table 1 controls (plain CNN from the STN's initial weights, as many φ-steps as the STN):")
        for name in controls[0]:
            vals = [c[name] for c in controls]
            print(
                f"  {name:20s} val {_ms([v[0] for v in vals]):17s}  test {_ms([v[1] for v in vals]):17s}  "
                f"wall {statistics.mean(v[2] for v in vals):.1f} s"
            )
        stn_runs = results.get("STN", [])
        if stn_runs:
            print(
                f"  {'STN (its own run)':20s} val {_ms([r['selected_val'] for r in stn_runs]):17s}  "
                f"test {_ms([r['test'] for r in stn_runs]):17s}"
            )
    print("paper's Table 2, CIFAR-10 (AlexNet, 15 hyperparameters, GPU scale; not comparable one to one):")
    for m, (v, t) in PAPER_CIFAR.items():
        print(f"  {m:8s} val {v:.3f}  test {t:.3f}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
