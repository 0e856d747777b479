"""Which local-mode settings of :class:`~hyperlit.tuning.best_response.BestResponseModule` converge to the optimum?

Ridge regression, where the best λ is known in closed form: the training objective is the module's
``mean((Xw + b − y)²) + exp(λ)·‖(w, b)‖²``, its minimizer ``w(λ) = (H + e^λ I)⁻¹ c`` (``H = AᵀA/n``, ``c = Aᵀy/n``,
``A = [X, 1]``), and the validation loss ``L(λ) = mean((A_v w(λ) − y_v)²)`` has the exact derivative
``L'(λ) = −(2/n_v) e^λ (A_v w − y_v)ᵀ A_v (H + e^λ I)⁻¹ w`` (the *true* hypergradient). ``λ*`` is the zero of
``L'`` (bisection inside the bracket of a 0.01-spaced grid's minimum). Each setting (σ of ``N(λ̂, σ²)``, the φ Adam
learning rate) runs the local mode through the Lightning loop with every other argument at the module's default
(λ̂₀ = −3.5, 2 samples, 1 φ-step per λ-step, λ Adam lr 0.01, no warm-up) on every problem and seed, full-batch, for
``--steps`` batches; the table gives the worst and median ``|λ̂ − λ*|`` at the end and the worst ``|L'(λ̂)|``.

    python examples/benchmarks/br_defaults_sweep.py            # 6 problems × 2 seeds, 7 settings
    python examples/benchmarks/br_defaults_sweep.py --quick    # 2 problems × 1 seed, old and current defaults

Measured (``--settings 0.1,1e-3 0.5,1e-2 0.25,1e-2 1.0,1e-2 0.5,3e-3 0.1,1e-2``; 6 problems × 2 seeds, 1,000 steps)::

       σ   φ lr   max |Δ| at 500   max |Δ|   median |Δ|   max |L'(λ̂)|
     0.1   1e-3            0.997     0.656        0.110       3.73e-02   (former defaults)
     0.5   1e-2            0.851     0.087        0.033       1.76e-02   (defaults)
    0.25   1e-2            0.809     0.107        0.010       9.86e-03
     1.0   1e-2            0.847     0.251        0.101       5.92e-02
     0.5   3e-3            0.525     0.072        0.033       1.97e-02
     0.1   1e-2            0.715     0.408        0.025       1.37e-02

(the half-way column is dominated by the problem with λ* = 1.01, 4.5 from the start: λ̂'s Adam at lr 0.01 needs
≥ 450 steps to get there.)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.tuning.best_response import BestResponseModule

# (features d, training points n, validation points, weight scale, label noise std)
PROBLEMS = [
    (20, 100, 400, 0.15, 1.0),
    (10, 50, 400, 0.3, 1.0),
    (30, 200, 400, 0.1, 1.0),
    (5, 40, 400, 0.5, 2.0),
    (40, 100, 400, 0.1, 0.5),
    (15, 60, 400, 0.2, 1.5),
]


def ridge_problem(d: int, n: int, n_val: int, scale: float, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_true = scale * torch.randn(d, generator=g, dtype=torch.float64)
    x, x_val = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(n_val, d, generator=g, dtype=torch.float64),
    )
    y = x @ w_true + noise * torch.randn(n, generator=g, dtype=torch.float64)
    y_val = x_val @ w_true + noise * torch.randn(n_val, generator=g, dtype=torch.float64)
    return (x, y), (x_val, y_val)


def _design(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def val_loss_and_grad(train, val, log_lam: Tensor) -> tuple[Tensor, Tensor]:
    """Exact ``L(λ)`` and ``L'(λ)`` of the retrained ridge model at every λ of ``log_lam`` (K,)."""
    a, av = _design(train[0]), _design(val[0])
    h = a.T @ a / len(a)
    c = a.T @ train[1] / len(a)
    m = h + log_lam.exp()[:, None, None] * torch.eye(a.shape[1], dtype=a.dtype)
    w = torch.linalg.solve(m, c.expand(len(log_lam), -1))
    dw = -log_lam.exp()[:, None] * torch.linalg.solve(m, w)
    r = w @ av.T - val[1]  # (K, n_v)
    return r.square().mean(1), 2 * (r * (dw @ av.T)).mean(1)


def exact_optimum(train, val, lo: float = -8.0, hi: float = 6.0) -> float:
    grid = torch.arange(lo, hi, 0.01, dtype=torch.float64)
    losses, _ = val_loss_and_grad(train, val, grid)
    best = int(losses.argmin())
    if not 0 < best < len(grid) - 1:
        raise RuntimeError("the grid does not bracket the validation minimum")
    left, right = float(grid[best - 1]), float(grid[best + 1])
    for _ in range(60):  # bisection on L'(λ) = 0
        mid = 0.5 * (left + right)
        if val_loss_and_grad(train, val, torch.tensor([mid], dtype=torch.float64))[1].item() < 0:
            left = mid
        else:
            right = mid
    return 0.5 * (left + right)


def loaders(train, val, steps: int) -> dict[str, DataLoader]:
    def stream(x: Tensor, y: Tensor) -> DataLoader:
        x, y = x.float(), y.float()
        return DataLoader(TensorDataset(x.expand(steps, *x.shape), y.expand(steps, *y.shape)), batch_size=None)

    return {"train": stream(*train), "hyper": stream(*val)}


class _Trace(pl.Callback):
    """λ̂ after every batch."""

    def __init__(self) -> None:
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.lams.append(pl_module.space.unconstrained.item())


def run(problem: tuple, seed: int, steps: int, sigma: float | None, lr: float | None) -> tuple[float, float, float]:
    """``λ̂ − λ*`` half-way and at the end, and the final ``L'(λ̂)``, of a local-mode run (``None``: the default)."""
    train, val = ridge_problem(*problem, seed=seed)
    overrides: dict[str, object] = {}
    if sigma is not None:
        overrides["sample_std"] = sigma
    if lr is not None:
        overrides["phi_optimizer"] = functools.partial(torch.optim.Adam, lr=lr)
    torch.manual_seed(seed)
    model = BestResponseModule(
        mode="local", input_dim=problem[0], num_classes=1, loss="mse", plot_schedule=False, seed=seed, **overrides
    )
    trace = _Trace()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[trace],
    )
    trainer.fit(model, train_dataloaders=loaders(train, val, steps))
    lam_star = exact_optimum(train, val)
    lam = trace.lams[-1]
    grad = val_loss_and_grad(train, val, torch.tensor([lam], dtype=torch.float64))[1].item()
    return trace.lams[steps // 2 - 1] - lam_star, lam - lam_star, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 problems, 1 seed, 2 settings, 400 steps")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["0.1,1e-3", "0.1,1e-2", "0.25,1e-2", "0.5,3e-3", "0.5,1e-2", "1.0,1e-2", "default"],
        help="σ,lr pairs ('default': the module's own)",
    )
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    torch.set_num_threads(1)
    problems, seeds, steps, settings = PROBLEMS, range(args.seeds), args.steps, args.settings
    if args.quick:
        problems, seeds, steps, settings = PROBLEMS[:2], range(1), 400, ["0.1,1e-3", "default"]
    pl.seed_everything(0, verbose=False)
    stars = [round(exact_optimum(*ridge_problem(*p, seed=s)), 3) for p in problems for s in seeds]
    print("log λ* per problem and seed:", stars, flush=True)
    print(
        f"{'sigma':>8} {'phi lr':>8} {'max |dlog lam| half-way':>24} {'max |dlog lam|':>15} {'median':>8} "
        f"{'max |dL_val/dlog lam|':>22}",
        flush=True,
    )
    for setting in settings:
        sigma, lr = (None, None) if setting == "default" else (float(v) for v in setting.split(","))
        runs = [run(p, s, steps, sigma, lr) for p in problems for s in seeds]
        half = max(abs(r[0]) for r in runs)
        errors = [abs(r[1]) for r in runs]
        grads = [abs(r[2]) for r in runs]
        name = ("default", "default") if sigma is None else (f"{sigma:g}", f"{lr:g}")
        print(
            f"{name[0]:>8} {name[1]:>8} {half:24.3f} {max(errors):15.3f} {statistics.median(errors):8.3f} "
            f"{max(grads):22.2e}",
            flush=True,
        )
    print(f"RESULT ({len(problems)} problems x {len(seeds)} seeds, {steps} full-batch steps each)")


if __name__ == "__main__":
    main()
