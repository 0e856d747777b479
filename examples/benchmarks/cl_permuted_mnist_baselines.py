"""Hypernetwork vs. fine-tuning vs. online EWC on PermutedMNIST, in the same harness (same data, same schedule).

Each learner runs one ``Trainer.fit`` over the task sequence; the script prints every accuracy matrix and a
summary (mean during / final accuracy, backward transfer; with the hypernetwork also the task-inferred accuracy).
Reads the MNIST IDX files from ``$HYPERLIT_DATA_DIR/mnist`` (or ``--data_dir``).

    python examples/benchmarks/cl_permuted_mnist_baselines.py [--quick] [--data_dir DIR]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

# the sibling script puts the repository root on sys.path and holds the shared Trainer set-up
from cl_permuted_mnist10 import DEFAULT_DATA_DIR, fit_lightning

from datamodules.continual_mnist import PermutedMNISTDataModule
from hyperlit.continual.base import ContinualModule
from hyperlit.continual.baselines import EWCContinualModule
from hyperlit.continual.metrics import format_matrix
from hyperlit.continual.module import HyperContinualModule


def run(model: ContinualModule, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    dm = PermutedMNISTDataModule(
        data_dir=args.data_dir,
        num_tasks=args.tasks,
        pad_to_32=False,
        val_size=5000,
        eval_size=2000,
        steps_per_task=args.steps,
        batch_size=128,
        eval_batch_size=1000,
    )
    _, train_s, eval_s, _ = fit_lightning(model, dm)
    return model.cl_summary(), train_s + eval_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 tasks × 100 steps (< 2 minutes)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.tasks, args.steps = (3, 100) if args.quick else (5, 500)
    torch.set_num_threads(args.threads)
    common = dict(num_tasks=args.tasks, input_dim=784, output_dim=10, hidden=(100, 100))  # default Adam(1e-3)
    hnet = dict(hnet_hidden=(100, 100), chunk_size=2000, emb_dim=8, hnet_out_init_std=0.01)
    learners = {
        "hypernetwork (beta=0.05)": lambda: HyperContinualModule(**common, **hnet, beta=0.05),
        "hypernetwork fine-tuning (beta=0)": lambda: HyperContinualModule(**common, **hnet, beta=0.0),
        "online EWC (lambda=100, multi-head MLP)": lambda: EWCContinualModule(**common, ewc_lambda=100.0),
        "fine-tuning (multi-head MLP)": lambda: EWCContinualModule(**common, ewc_lambda=0.0),
    }
    print(
        f"PermutedMNIST, {args.tasks} tasks × {args.steps} steps, batch 128, target MLP 784-100-100-10, "
        f"accuracy on 2,000 validation images per task"
    )
    rows = []
    for name, make in learners.items():
        pl.seed_everything(0, verbose=False)
        model = make()
        summary, seconds = run(model, args)
        print(f"\n== {name} ({seconds:.0f} s)\n{format_matrix(model.acc_matrix)}")
        rows.append((name, summary))
    print(f"\n{'learner':42} {'during':>7} {'final':>7} {'BWT':>7} {'final (task inferred)':>22}")
    for name, s in rows:
        inferred = f"{100 * s['final_mean_inferred']:.2f}" if "final_mean_inferred" in s else "-"
        print(
            f"{name:42} {100 * s['during_mean']:>7.2f} {100 * s['final_mean']:>7.2f} {100 * s['bwt']:>+7.2f}"
            f" {inferred:>22}"
        )


if __name__ == "__main__":
    main()
