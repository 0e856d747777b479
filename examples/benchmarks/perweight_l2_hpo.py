"""As many hyperparameters as weights: per-weight L2 on MNIST by every gradient-based method, at equal wall-clock.

The experiment of Lorraine & Duvenaud (2018, §5.3) and Lorraine, Vicol & Duvenaud (2020): one L2 strength per weight
(and bias) of a 784-10 linear model, or of a 784-H-10 ReLU MLP, tuned on a held-out split. The training objective is
squared error on one-hot labels plus the per-weight penalty (the setup of ``examples/br_mnist_perweight.yaml``), on a
small training set so that regularization matters. Methods, each given the same wall-clock per seed:

* **BR-local**: :class:`~hyperlit.tuning.best_response.BestResponseModule`, local mode, factorized linear
  hypernetwork (bottleneck 10), the settings of ``br_mnist_perweight.yaml`` (penalty ``exp(λ_i)·w_i²``);
* **implicit**: :class:`~hyperlit.tuning.implicit.ImplicitDifferentiationModule`, Neumann series (penalty
  ``½·exp(λ_i)·w_i²``), the settings of ``implicit_mnist_perweight.yaml``;
* **unrolled**: :class:`~hyperlit.tuning.implicit.UnrolledDifferentiationModule`, reverse mode through
  ``--unroll-steps`` SGD steps, the settings of ``unrolled_mnist_perweight.yaml``;
* **TPE**: Optuna's TPE over *one global* L2 strength (TPE cannot search thousands of dimensions); each trial
  trains the same network with that penalty fixed for ``--trial-epochs`` epochs and is scored by its held-out loss;
* **untuned**: the per-weight penalty fixed at its initial value for the whole budget (the reference every tuner
  has to beat).

Every method's validation figure is computed the same way by this script: the squared error of the module's own
predictions (``module(x)``, eval mode, the current λ) on the hyper split, recorded after every epoch with the
wall-clock spent so far; a run stops at the first epoch end past the budget (its last recording counts). The selected
configuration of a gradient method is its final model; of TPE, its best trial. Its test squared error and accuracy
are printed. Method order is rotated per seed; one thread; CPU time and load average are printed beside wall-clock.

    python examples/benchmarks/perweight_l2_hpo.py --quick
    python examples/benchmarks/perweight_l2_hpo.py --models linear mlp --seeds 0 1 2 --budget 60
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import math
import os
import platform
import statistics
import sys
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
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.mnist import load_mnist  # noqa: E402
from hyperlit.models.mlp import MLP  # noqa: E402
from hyperlit.tuning.best_response import BestResponseModule  # noqa: E402
from hyperlit.tuning.implicit import ImplicitDifferentiationModule, UnrolledDifferentiationModule  # noqa: E402

METHODS = ("BR-local", "implicit", "unrolled", "TPE", "untuned")


# -- data -----------------------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor]]:
    """Train / hyper split from a fixed permutation of MNIST's training images; the first test images."""
    data_dir = args.data_dir or os.environ.get("HYPERLIT_DATA_DIR") or Path.home() / ".cache" / "hyperlit"
    x, y = load_mnist(data_dir, train=True)
    xt, yt = load_mnist(data_dir, train=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = x[perm].flatten(1).float().div_(255.0)
    y = y[perm]
    n, m = args.train_size, args.val_size
    return {
        "train": (x[:n].contiguous(), y[:n].clone()),
        "val": (x[n : n + m].contiguous(), y[n : n + m].clone()),
        "test": (xt[: args.test_size].flatten(1).float().div_(255.0), yt[: args.test_size].clone()),
    }


def _loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=shuffle)


@torch.no_grad()
def squared_error(module: pl.LightningModule, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean squared error on one-hot labels (mean over examples × classes) and accuracy of ``module(x)``."""
    was_training = module.training
    module.eval()
    out = module(x)
    module.train(was_training)
    return float((out - F.one_hot(y, 10).to(out.dtype)).square().mean()), float((out.argmax(-1) == y).float().mean())


# -- harness --------------------------------------------------------------------------------------------------------
def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


class _Clock:
    def __init__(self) -> None:
        self.t0, self.c0, self.load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> str:
        return (
            f"wall {self.elapsed():6.1f} s  cpu {time.process_time() - self.c0:6.1f} s  "
            f"load {self.load0:.1f}->{os.getloadavg()[0]:.1f}"
        )


class _Budget(Callback):
    """Record the held-out squared error after every epoch; stop at the first epoch end past the budget."""

    def __init__(self, clock: _Clock, budget: float, val: tuple[Tensor, Tensor]) -> None:
        self.clock, self.budget, self.val = clock, budget, val
        self.points: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.points.append((self.clock.elapsed(), squared_error(pl_module, *self.val)[0]))
        if self.clock.elapsed() >= self.budget:
            trainer.should_stop = True


def _target(args: argparse.Namespace, model: str, seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(784, [args.hidden] if model == "mlp" else [], 10)


def _hidden(args: argparse.Namespace, model: str) -> list[int]:
    return [args.hidden] if model == "mlp" else []


def build(args: argparse.Namespace, method: str, model: str, seed: int, steps_per_epoch: int) -> pl.LightningModule:
    """The module of one gradient-based method (or of the untuned reference) with the example configs' settings."""
    adam = functools.partial(torch.optim.Adam, lr=args.hyper_lr)
    sgd = functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9)
    common = dict(loss="mse", weight_decay="per_weight", init_log_decay=args.init_log_decay, seed=seed)
    if method == "BR-local":
        torch.manual_seed(seed)
        return BestResponseModule(
            mode="local",
            input_dim=784,
            hidden_sizes=tuple(_hidden(args, model)),
            num_classes=10,
            penalty="per_weight",
            init_log_penalty=args.init_log_decay,
            sample_std=0.0031623,
            hnet_hidden=(10,),
            hnet_activation="none",
            num_samples=2,
            squared_norm=True,
            loss="mse",
            train_steps=10,
            hyper_steps=1,
            plot_schedule=False,
            phi_optimizer=functools.partial(torch.optim.Adam, lr=args.br_phi_lr),
            hyper_optimizer=adam,
            seed=seed,
        )
    warmup = steps_per_epoch * args.warmup_epochs
    if method == "implicit":
        return ImplicitDifferentiationModule(
            _target(args, model, seed),
            solver="neumann",
            iterations=args.neumann_iterations,
            alpha=args.neumann_alpha,
            warmup_steps=warmup,
            hyper_every=args.hyper_every,
            optimizer=sgd,
            hyper_optimizer=adam,
            **common,
        )
    if method == "unrolled":
        return UnrolledDifferentiationModule(
            _target(args, model, seed),
            steps=args.unroll_steps,
            inner_lr=args.lr,
            momentum=0.9,
            warmup_steps=warmup,
            hyper_every=args.hyper_every,
            hyper_optimizer=adam,
            **common,
        )
    if method == "untuned":  # inner steps only: the warm-up outlasts the run
        return ImplicitDifferentiationModule(
            _target(args, model, seed), warmup_steps=10**9, optimizer=sgd, hyper_optimizer=adam, **common
        )
    raise ValueError(method)


def run_gradient(args: argparse.Namespace, data: dict, method: str, model: str, seed: int) -> dict[str, Any]:
    steps_per_epoch = len(data["train"][1]) // args.batch_size
    module = build(args, method, model, seed, steps_per_epoch)
    clock = _Clock()
    budget = _Budget(clock, args.budget, data["val"])
    loaders = {
        "train": _loader(*data["train"], args.batch_size, True, seed),
        "hyper": _loader(*data["val"], args.batch_size, True, seed + 1),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        _trainer(max_epochs=100_000, callbacks=[budget]).fit(module, train_dataloaders=loaders)
    info = clock.summary()
    val, _ = squared_error(module, *data["val"])
    test, acc = squared_error(module, *data["test"])
    hyper_steps = int(getattr(module, "hyper_steps_done", 0))
    lam = module.hp.params() if hasattr(module, "hp") else {"λ": module.space.unconstrained.detach()}
    flat = torch.cat([t.detach().flatten() for t in lam.values()])
    return {
        "curve": budget.points,
        "selected_val": val,
        "test": test,
        "acc": acc,
        "count": f"{len(budget.points)} epochs, {hyper_steps} hyper steps",
        "n_hparams": flat.numel(),
        "lam": f"log-decay mean {flat.mean():.3f} [{flat.min():.3f}, {flat.max():.3f}]",
        "clock": info,
    }


def run_tpe(args: argparse.Namespace, data: dict, model: str, seed: int) -> dict[str, Any]:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.tpe_startup)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    clock = _Clock()
    curve: list[tuple[float, float]] = []
    best: tuple[float, Any, float] = (math.inf, None, math.nan)
    n_done = n_late = 0
    while clock.elapsed() < args.budget:
        trial = study.ask()
        log_decay = trial.suggest_float("log_decay", args.tpe_low, args.tpe_high)
        k = n_done + n_late
        module = ImplicitDifferentiationModule(
            _target(args, model, seed * 1000 + k),
            loss="mse",
            weight_decay="global",
            init_log_decay=log_decay,
            warmup_steps=10**9,  # inner steps only: a plain run at this fixed penalty
            optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9),
            seed=seed * 1000 + k,
        )
        loaders = {
            "train": _loader(*data["train"], args.batch_size, True, seed * 1000 + k),
            "hyper": _loader(*data["val"], args.batch_size, True, seed),
        }
        with contextlib.redirect_stdout(io.StringIO()):
            _trainer(max_epochs=args.trial_epochs).fit(module, train_dataloaders=loaders)
        val, _ = squared_error(module, *data["val"])
        study.tell(trial, val)
        t = clock.elapsed()
        if t > args.budget:
            n_late += 1
            break
        n_done += 1
        if val < best[0]:
            best = (val, module, log_decay)
        curve.append((t, min(val, curve[-1][1]) if curve else val))
    info = clock.summary()
    test, acc = squared_error(best[1], *data["test"]) if best[1] is not None else (math.nan, math.nan)
    return {
        "curve": curve,
        "selected_val": best[0],
        "test": test,
        "acc": acc,
        "count": f"{n_done} trials (+{n_late} past the budget)",
        "n_hparams": 1,
        "lam": f"global log-decay {best[2]:.3f}",
        "clock": info,
    }


# -- report ---------------------------------------------------------------------------------------------------------
def _best_at(curve: list[tuple[float, float]], t: float) -> float:
    vals = [v for s, v in curve if s <= t]
    return min(vals) if vals else math.nan


def _time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    for t, v in curve:
        if v <= target:
            return t
    return None


def _ms(xs: list[float], digits: int = 4) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f}±{statistics.stdev(xs):.{digits}f}"


def report(model: str, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(f"\n=== {model}: held-out squared error (one-hot), {len(args.seeds)} seed(s), budget {args.budget:g} s ===")
    fractions = (0.1, 0.25, 0.5, 0.75, 1.0)
    print("best held-out error so far at " + ", ".join(f"{f:.0%}" for f in fractions) + " of the budget (mean):")
    for m, runs in results.items():
        row = [statistics.mean(_best_at(r["curve"], f * args.budget) for r in runs) for f in fractions]
        print(f"  {m:9s} " + "  ".join(f"{v:.4f}" if math.isfinite(v) else "  -   " for v in row))
    reach: dict[str, list[float | None]] = {}
    if "TPE" in results:
        for m, runs in results.items():
            reach[m] = [
                _time_to(r["curve"], min(v for _, v in t["curve"])) if t["curve"] else None
                for r, t in zip(runs, results["TPE"])
            ]
    print(
        f"RESULT {model:6s} {'method':9s} | {'#hparams':>8s} | {'best held-out':15s} | {'held-out sel.':15s} | "
        f"{'test of selected':16s} | {'test acc':15s} | time to TPE's best"
    )
    for m, runs in results.items():
        hits = [t for t in reach.get(m, []) if t is not None]
        ttb = (
            "n/a"
            if m not in reach
            else (
                f"{statistics.mean(hits):.1f} s ({len(hits)}/{len(runs)})" if hits else f"not reached (0/{len(runs)})"
            )
        )
        best = [min(v for _, v in r["curve"]) if r["curve"] else math.nan for r in runs]
        print(
            f"RESULT {model:6s} {m:9s} | {runs[0]['n_hparams']:8d} | {_ms(best):15s} | "
            f"{_ms([r['selected_val'] for r in runs]):15s} | {_ms([r['test'] for r in runs]):16s} | "
            f"{_ms([r['acc'] for r in runs], 3):15s} | {ttb}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="linear model, 1 seed, 6 s per method, small splits")
    p.add_argument("--models", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=60.0, help="wall-clock seconds per method, model and seed")
    p.add_argument("--train-size", type=int, default=1000, help="training images (small: regularization matters)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out (hyper) images")
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--hidden", type=int, default=50, help="hidden units of the MLP")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01, help="SGD (momentum 0.9) lr of the weights (implicit, unrolled)")
    p.add_argument("--br-phi-lr", type=float, default=1e-4, help="Adam lr of the BR hypernetwork (its config)")
    p.add_argument(
        "--hyper-lr", type=float, default=0.01, help="Adam lr of λ (every gradient method; the modules' default)"
    )
    p.add_argument("--init-log-decay", type=float, default=-3.5, help="initial log L2 strength of every weight")
    p.add_argument("--warmup-epochs", type=int, default=1, help="inner-only epochs before the first hyper step")
    p.add_argument("--hyper-every", type=int, default=10, help="inner steps per hyper step (implicit, unrolled)")
    p.add_argument("--neumann-iterations", type=int, default=20)
    p.add_argument("--neumann-alpha", type=float, default=0.01)
    p.add_argument("--unroll-steps", type=int, default=5)
    p.add_argument("--trial-epochs", type=int, default=20, help="epochs of one TPE trial")
    p.add_argument("--tpe-low", type=float, default=-12.0)
    p.add_argument("--tpe-high", type=float, default=2.0)
    p.add_argument("--tpe-startup", type=int, default=5)
    p.add_argument("--data-dir", default=None, help="data folder (default: $HYPERLIT_DATA_DIR, else ~/.cache/hyperlit)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.models, args.seeds, args.budget = ["linear"], [0], 6.0
        args.train_size, args.val_size, args.test_size, args.trial_epochs = 500, 500, 2000, 3

    torch.set_num_threads(args.threads)
    for message in (".*does not have many workers.*", ".*treespec.*", ".*λ never moves.*", ".*val_dataloader.*"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    data = load_data(args)
    print("command: python examples/benchmarks/perweight_l2_hpo.py " + " ".join(sys.argv[1:]))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        f"MNIST {len(data['train'][1])} train / {len(data['val'][1])} held-out / {len(data['test'][1])} test; squared "
        f"error on one-hot labels; batch {args.batch_size}; initial log decay {args.init_log_decay}; budget "
        f"{args.budget:g} s per method; implicit: Neumann {args.neumann_iterations} iterations, α {args.neumann_alpha}; "
        f"unrolled: {args.unroll_steps} steps; hyper step every {args.hyper_every} inner steps after "
        f"{args.warmup_epochs} epoch(s); λ Adam lr {args.hyper_lr}; TPE over one global log decay in "
        f"[{args.tpe_low}, {args.tpe_high}], {args.trial_epochs} epochs per trial"
    )
    for model in args.models:
        results: dict[str, list[dict]] = {m: [] for m in args.methods}
        for i, seed in enumerate(args.seeds):
            order = args.methods[i % len(args.methods) :] + args.methods[: i % len(args.methods)]
            for method in order:
                res = (
                    run_tpe(args, data, model, seed)
                    if method == "TPE"
                    else run_gradient(args, data, method, model, seed)
                )
                results[method].append(res)
                best = min(v for _, v in res["curve"]) if res["curve"] else math.nan
                print(
                    f"  {model} seed {seed} {method:9s} best held-out {best:.4f}  selected {res['selected_val']:.4f}  "
                    f"test {res['test']:.4f} (acc {res['acc']:.3f})  {res['count']}; {res['lam']}  ({res['clock']})",
                    flush=True,
                )
        report(model, results, args)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
