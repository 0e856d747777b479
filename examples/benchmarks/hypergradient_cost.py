"""What one hypergradient costs, against one training step, for per-weight L2 on MNIST-sized models.

Lorraine, Vicol & Duvenaud (2020) claim implicit differentiation is "only a few times more costly in memory and
compute than standard training". This script times, on the same batch (100 examples of 784 features, 10 classes,
squared error on one-hot labels plus ``½·Σ exp(λ_i)·w_i²``, one λ per weight):

* one plain training step (forward, backward, SGD update through ``torch.optim.SGD``);
* one implicit hypergradient (:func:`~hyperlit.tuning.hypergrad.implicit_hypergradient`, Neumann series with
  ``--iterations`` iterations) with each Hessian-vector-product mode: ``reverse-over-reverse`` (one stored graph
  reused) and ``forward-over-reverse`` (``jvp`` of ``grad``, the closure re-run per product);
* one unrolled hypergradient (:func:`~hyperlit.tuning.hypergrad.unrolled_hypergradient`, ``--unroll-steps`` SGD
  steps with momentum, all differentiated), which also performs those training steps.

Medians of ``--repeats`` timings after one untimed call, one thread, interleaved so machine load hits all alike.

    python examples/benchmarks/hypergradient_cost.py --quick
    python examples/benchmarks/hypergradient_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hyperlit.models.mlp import MLP
from hyperlit.tuning.hypergrad import NeumannSolver, implicit_hypergradient, unrolled_hypergradient


def measure(args: argparse.Namespace, hidden: int, train: tuple, val: tuple) -> None:
    """Time the four computations for the 784-``hidden``-10 model (0: linear) and print them."""
    (x, y), (xv, yv) = train, val
    torch.manual_seed(0)
    net = MLP(784, [hidden] if hidden else [], 10)
    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    lam = {k: torch.full_like(v, -3.5) for k, v in w.items()}

    def train_loss(w_: dict, lam_: dict, k: int | None = None) -> torch.Tensor:
        out = functional_call(net, w_, (x,))
        return (out - y).square().mean() + 0.5 * sum((lam_[n].exp() * w_[n].square()).sum() for n in w_)

    def val_loss(w_: dict, lam_: dict) -> torch.Tensor:
        return (functional_call(net, w_, (xv,)) - yv).square().mean()

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    lam_fixed = {k: v.clone() for k, v in lam.items()}

    def plain_step() -> None:
        opt.zero_grad()
        out = net(x)
        penalty = 0.5 * sum((lam_fixed[n].exp() * q.square()).sum() for n, q in net.named_parameters())
        ((out - y).square().mean() + penalty).backward()
        opt.step()

    def implicit(mode: str) -> Callable[[], None]:
        return lambda: implicit_hypergradient(
            train_loss, val_loss, w, lam, NeumannSolver(args.iterations, 0.01), hvp_mode=mode
        )

    def unrolled() -> None:
        unrolled_hypergradient(train_loss, val_loss, w, lam, steps=args.unroll_steps, lr=0.01, momentum=0.9)

    jobs = {
        "training step": plain_step,
        "implicit, reverse-over-reverse": implicit("reverse-over-reverse"),
        "implicit, forward-over-reverse": implicit("forward-over-reverse"),
        f"unrolled, {args.unroll_steps} steps": unrolled,
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for fn in jobs.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    weights = sum(v.numel() for v in w.values())
    base = statistics.median(times["training step"])
    print(f"784-{hidden}-10" if hidden else "784-10 (linear)", f"{weights} weights = {weights} hyperparameters")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:34s} {med * 1e3:9.2f} ms  = {med / base:7.1f} training steps")
    ratio = statistics.median(times["implicit, forward-over-reverse"]) / statistics.median(
        times["implicit, reverse-over-reverse"]
    )
    print(
        f"RESULT hidden={hidden} implicit/step={statistics.median(times['implicit, reverse-over-reverse']) / base:.1f} "
        f"forward-over-reverse/reverse-over-reverse={ratio:.1f} iterations={args.iterations}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repeats, linear model only")
    p.add_argument("--hidden", type=int, nargs="*", default=[0, 50, 500], help="hidden units (0: linear model)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--iterations", type=int, default=20, help="Neumann iterations")
    p.add_argument("--unroll-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.repeats = [0], 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average at start {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(0)
    x, xv = torch.rand(args.batch, 784, generator=g), torch.rand(args.batch, 784, generator=g)
    y = F.one_hot(torch.randint(0, 10, (args.batch,), generator=g), 10).float()
    yv = F.one_hot(torch.randint(0, 10, (args.batch,), generator=g), 10).float()
    for hidden in args.hidden:
        measure(args, hidden, (x, y), (xv, yv))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
