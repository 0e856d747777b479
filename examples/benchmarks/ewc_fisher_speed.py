"""Time of one diagonal-Fisher estimate of online EWC: the Linear-layer path against per-example gradients (vmap).

:func:`~hyperlit.continual.ewc.per_example_grad_sq` estimates the mean squared per-example gradient. For a network
of ``nn.Linear`` layers it uses one forward and one backward pass, ``(g²)ᵀ a² / B`` per weight (``method="linear"``,
taken automatically); otherwise it vectorizes B per-example gradients with ``vmap`` (``method="vmap"``). Both are
timed here on the PermutedMNIST-10 target of the papers (MLP 1024-1000-1000-100, 10 heads, cross-entropy on one
head, batch 128), median of ``--reps`` calls after a warm-up, and their results compared.

    python examples/benchmarks/ewc_fisher_speed.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hyperlit.continual.ewc import per_example_grad_sq
from hyperlit.models.mlp import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = MLP(1024, (1000, 1000), 100).eval()
    x, y = torch.randn(args.batch, 1024), torch.randint(0, 10, (args.batch,))
    params = dict(net.named_parameters())

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(len(out), 10, 10)[:, 3], target)  # head 3 of the 10-head output

    results, medians = {}, {}
    for method in ("linear", "vmap"):
        per_example_grad_sq(net, params, loss, x, y, method=method)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            results[method] = per_example_grad_sq(net, params, loss, x, y, method=method)
            times.append(time.perf_counter() - t0)
        medians[method] = 1e3 * statistics.median(times)
        print(
            f"method={method}: median {medians[method]:.1f} ms over {reps} (min {1e3 * min(times):.1f}, max "
            f"{1e3 * max(times):.1f}), {torch.get_num_threads()} thread(s), MLP 1024-1000-1000-100, batch {args.batch}"
        )
    err = max(
        float((results["linear"][n] - results["vmap"][n]).abs().max() / results["vmap"][n].abs().max()) for n in params
    )
    print(
        f"RESULT fisher linear={medians['linear']:.1f} ms vmap={medians['vmap']:.1f} ms "
        f"speedup={medians['vmap'] / medians['linear']:.1f}x max_rel_diff={err:.2e}"
    )


if __name__ == "__main__":
    main()
