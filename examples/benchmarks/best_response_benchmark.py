"""Steps and wall-clock each best-response mode needs to reach the grid's cross-validated optimum.

Problem (as in ``tests/tuning/test_best_response.py``): ridge regression (20 features, 100 training and 400
validation points) with the training objective ``mean((Xw + b − y)²) + exp(λ)·‖(w, b)‖²``. The ground truth is the
validation minimum over a 0.01-spaced grid of λ, each grid point retrained exactly (closed form). Every mode starts
at λ̂ = −3.5 and runs in the real Lightning loop (:class:`~hyperlit.tuning.best_response.BestResponseModule`); a
mode "arrives" at the first φ-step after which |λ̂ − λ*| < 0.3 for the rest of the run. Steps are counted as
optimizer steps (φ-steps + λ-steps); wall-clock is measured from the start of ``fit``. The global mode's count
includes its phase 1 (fitting φ over p(λ)), which it needs before λ̂ moves at all.

    python examples/benchmarks/best_response_benchmark.py --quick
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.tuning.best_response import BestResponseModule

TOL = 0.3


def ridge_problem(seed: int, d: int = 20, n: int = 100, n_val: int = 400, scale: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    w_true = scale * torch.randn(d, generator=g)
    x, x_val = torch.randn(n, d, generator=g), torch.randn(n_val, d, generator=g)
    return (x, x @ w_true + torch.randn(n, generator=g)), (x_val, x_val @ w_true + torch.randn(n_val, generator=g))


def grid_optimum(train, val, lo: float = -6.0, hi: float = 4.0, step: float = 0.01) -> float:
    x, y = (t.double() for t in train)
    xv, yv = (t.double() for t in val)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    grid = torch.arange(lo, hi, step, dtype=torch.float64)
    h = a.T @ a / len(x) + grid.exp()[:, None, None] * torch.eye(a.shape[1], dtype=x.dtype)
    sols = torch.linalg.solve(h, (a.T @ y / len(x)).expand(len(grid), -1))
    losses = (xv @ sols[:, :-1].T + sols[:, -1] - yv[:, None]).square().mean(0)
    return float(grid[int(losses.argmin())])


def loaders(train, val, steps: int) -> dict[str, DataLoader]:
    def stream(x: Tensor, y: Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x.expand(steps, *x.shape), y.expand(steps, *y.shape)), batch_size=None)

    return {"train": stream(*train), "hyper": stream(*val)}


SETTINGS = {
    "global": dict(warmup_steps=1000, num_samples=32, prior_mean=-1.0, prior_std=2.0, hyper_steps=1),
    "local": dict(warmup_steps=200, train_steps=2, num_samples=4, sample_std=0.5),
    "simplified": dict(warmup_steps=200, train_steps=2),
}
BATCHES = {"global": 1200, "local": 800, "simplified": 800}


class Trace(pl.Callback):
    """λ̂, optimizer steps and wall-clock after every batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        steps = int(pl_module.phi_steps) + int(pl_module.hyper_steps_done)
        self.rows.append((pl_module.space.unconstrained.item(), steps, time.perf_counter() - self.t0))


def run(mode: str, seed: int, **overrides: object) -> dict[str, float | None]:
    train, val = ridge_problem(seed)
    lam_star = grid_optimum(train, val)
    torch.manual_seed(seed)
    model = BestResponseModule(
        mode=mode,
        input_dim=20,
        num_classes=1,
        loss="mse",
        init_log_penalty=-3.5,
        phi_optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        hyper_optimizer=functools.partial(torch.optim.Adam, lr=3e-2),
        plot_schedule=False,
        seed=seed,
        **{**SETTINGS[mode], **overrides},
    )
    trace = Trace()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[trace],
        default_root_dir="/tmp/hyperlit_br_benchmark",
    )
    trainer.fit(model, train_dataloaders=loaders(train, val, BATCHES[mode]))
    arrive = None
    for i in range(len(trace.rows)):
        if all(abs(lam - lam_star) < TOL for lam, _, _ in trace.rows[i:]):
            arrive = i
            break
    final = trace.rows[-1][0]
    return {
        "lam_star": lam_star,
        "final_err": final - lam_star,
        "steps": float(trace.rows[arrive][1]) if arrive is not None else None,
        "seconds": trace.rows[arrive][2] if arrive is not None else None,
        "total_seconds": trace.rows[-1][2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 5 (< 2 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="only the simplified mode with the hypernet's output bias started at the target's random init",
    )
    args = parser.parse_args()
    seeds = list(range(args.seeds if args.seeds else (2 if args.quick else 5)))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"ridge regression, d=20, n=100, n_val=400; start λ̂=-3.5; tolerance |λ̂-λ*| < {TOL}; seeds {seeds}")
    print(f"{'mode':<11} {'seed':>4} {'λ*':>6} {'final err':>9} {'steps to λ*':>11} {'s to λ*':>8} {'run s':>6}")
    summary: dict[str, list[dict]] = {}
    modes = ("simplified",) if args.ablation else ("global", "local", "simplified")
    overrides = {"hnet_bias_init": "target"} if args.ablation else {}
    if args.ablation:
        print("ablation: hnet_bias_init='target' (output bias = the target's random initialisation)")
    for mode in modes:
        for seed in seeds:
            r = run(mode, seed, **overrides)
            summary.setdefault(mode, []).append(r)
            steps = "never" if r["steps"] is None else f"{r['steps']:.0f}"
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
            print(
                f"{mode:<11} {seed:>4} {r['lam_star']:>6.2f} {r['final_err']:>+9.3f} {steps:>11} {secs:>8} "
                f"{r['total_seconds']:>6.2f}"
            )
    print("\nmedian over seeds (runs that never arrived excluded; count in brackets)")
    for mode, rows in summary.items():
        ok = [r for r in rows if r["steps"] is not None]
        if ok:
            med_steps = statistics.median(r["steps"] for r in ok)
            med_secs = statistics.median(r["seconds"] for r in ok)
            print(f"{mode:<11} steps {med_steps:>6.0f}  seconds {med_secs:>6.2f}  [{len(ok)}/{len(rows)} arrived]")
        else:
            print(f"{mode:<11} never arrived [0/{len(rows)}]")


if __name__ == "__main__":
    main()
