"""PHN-LS / PHN-EPO against per-ray LS / EPO baselines on Adult, Default and Bank (Navon et al. 2021, Table 2).

For each data set, in one run and with the same harness (LightningModule + Trainer, same target MLP
in_dim → 60 → 25 → 1, same objectives, same epochs, batch size and learning rate):

* PHN-LS and PHN-EPO: one hypernetwork each (ray MLP 3 → 100 → 100 → all target weights, Dirichlet(0.2) rays);
* LS and EPO baselines: 10 target networks, one per preference ray, each trained in its own ``Trainer.fit``
  (the paper's protocol: "baselines train 10 models, one per ray");
* evaluation on the test split at the **same 10 rays** (the interior Das–Dennis points with 6 partitions):
  hypervolume (minimization, reference point (1, 1, 1)) of (BCE, hard |ΔFPR|, hard |ΔFNR|), and
  uniformity 1 − mean KL(r⊙ℓ/Σr⊙ℓ ‖ uniform). PHN is also evaluated at its 55 test rays (12 partitions).
* train wall-clock: ``Trainer.fit`` time (validation disabled) of one PHN vs the sum over the 10 baseline models.

The final epoch is evaluated for every method (no checkpoint selection), so all get the same treatment.

    python examples/benchmarks/pareto_benchmark.py --quick          # Adult only, tiny budget (about 30 s)
    python examples/benchmarks/pareto_benchmark.py --epochs 10      # all three data sets (about 20 min)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.tabular import AdultDataModule, BankDataModule, DefaultDataModule  # noqa: E402
from hyperlit.pareto import ParetoBaselineModule, ParetoHyperNetModule  # noqa: E402
from hyperlit.pareto.baselines import default_baseline_rays  # noqa: E402
from hyperlit.pareto.metrics import evaluate_front  # noqa: E402

DATASETS = {"adult": AdultDataModule, "default": DefaultDataModule, "bank": BankDataModule}
# Navon et al. 2021, Table 2 as quoted in the issue: HV / uniformity per data set, run time in minutes (V100)
PAPER = {
    "LS": ((0.628, 0.109), (0.522, 0.069), (0.704, 0.215), 9.0),
    "EPO": ((0.608, 0.734), (0.537, 0.533), (0.713, 0.881), 15.5),
    "PHN-LS": ((0.658, 0.289), (0.551, 0.108), (0.730, 0.615), 1.1),
    "PHN-EPO": ((0.648, 0.701), (0.548, 0.359), (0.748, 0.821), 1.8),
}


def _trainer(args: argparse.Namespace) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _fit(model: pl.LightningModule, dm: pl.LightningDataModule, args: argparse.Namespace) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process) of ``Trainer.fit``."""
    t0, c0 = time.perf_counter(), time.process_time()
    _trainer(args).fit(model, datamodule=dm)
    return time.perf_counter() - t0, time.process_time() - c0


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    dm = DATASETS[name](data_dir=args.data_dir, batch_size=args.batch_size, split_seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    rays = default_baseline_rays(3, 10)
    common = {"lr": args.lr, "in_dim": dm.input_dim}
    results: dict[str, dict[str, float]] = {}
    for solver in ("ls", "epo"):
        pl.seed_everything(args.seed, verbose=False)
        phn = ParetoHyperNetModule(solver=solver, alpha=args.alpha, seed=args.seed, **common)
        seconds, cpu = _fit(phn, dm, args)
        at10 = phn.evaluate(dm.test_dataloader(), rays=rays)
        at55 = phn.evaluate(dm.test_dataloader())
        results[f"PHN-{solver.upper()}"] = {
            "hv": at10.hv,
            "uniformity": at10.uniformity,
            "hv55": at55.hv,
            "uniformity55": at55.uniformity,
            "seconds": seconds,
            "cpu": cpu,
        }
        print(
            f"  {name} PHN-{solver.upper()}: {seconds:.1f}s ({cpu:.1f}s CPU), HV@10 {at10.hv:.4f}, HV@55 {at55.hv:.4f}, "
            f"EPO LP fallbacks {int(phn.epo_fallbacks)}/{int(phn.epo_solves)}",
            flush=True,
        )
    for solver in ("ls", "epo"):
        total = total_cpu = 0.0
        fallbacks = solves = 0
        losses = []
        for k, ray in enumerate(rays.tolist()):
            pl.seed_everything(args.seed + k, verbose=False)
            base = ParetoBaselineModule(solver=solver, rays=[ray], seed=args.seed + k, **common)
            seconds, cpu = _fit(base, dm, args)
            total, total_cpu = total + seconds, total_cpu + cpu
            fallbacks, solves = fallbacks + int(base.epo_fallbacks), solves + int(base.epo_solves)
            losses.append(base.evaluate(dm.test_dataloader()).losses[0])
        front = evaluate_front(torch.stack(losses), rays, (1.0, 1.0, 1.0))
        results[solver.upper()] = {"hv": front.hv, "uniformity": front.uniformity, "seconds": total, "cpu": total_cpu}
        print(
            f"  {name} {solver.upper()} x10: {total:.1f}s ({total_cpu:.1f}s CPU), HV@10 {front.hv:.4f}, EPO LP fallbacks {fallbacks}/{solves}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Adult only, 1 epoch of 15 batches")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr for every method (paper: 1e-4)")
    parser.add_argument("--alpha", type=float, default=0.2, help="Dirichlet α of the PHN training rays")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny nets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("HYPERLIT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.epochs, args.limit_train_batches = ["adult"], 1, 15
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    print("command: python examples/benchmarks/pareto_benchmark.py " + " ".join(sys.argv[1:]))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, "
        f"limit_train_batches {args.limit_train_batches}"
    )
    all_results = {}
    for name in args.datasets:
        print(f"[{name}]", flush=True)
        all_results[name] = run_dataset(name, args)

    print("\nHV / uniformity on the test split at the same 10 rays (ref (1,1,1); BCE, |ΔFPR|, |ΔFNR|)")
    header = f"{'method':<9}" + "".join(f"| {n:^27} " for n in args.datasets) + "| paper (Adult/Default/Bank HV/unif)"
    print(header)
    for method in ("LS", "EPO", "PHN-LS", "PHN-EPO"):
        row = f"{method:<9}"
        for name in args.datasets:
            r = all_results[name][method]
            row += f"| HV {r['hv']:.4f} unif {r['uniformity']:7.3f}  "
        paper = PAPER[method]
        row += "| " + " ".join(f"{h:.3f}/{u:.3f}" for h, u in paper[:3])
        print(row)
    print("\nPHN at its 55 test rays (HV / uniformity)")
    for method in ("PHN-LS", "PHN-EPO"):
        print(
            f"{method:<9}"
            + "".join(
                f"| {n}: HV {all_results[n][method]['hv55']:.4f} unif {all_results[n][method]['uniformity55']:.3f} "
                for n in args.datasets
            )
        )
    print("\nTrain time (s), wall-clock and CPU: one PHN vs the 10 per-ray models (ratio; target <= 1/8 = 0.125)")
    for name in args.datasets:
        r = all_results[name]
        for phn, base in (("PHN-LS", "LS"), ("PHN-EPO", "EPO")):
            wall = r[phn]["seconds"] / r[base]["seconds"]
            cpu = r[phn]["cpu"] / r[base]["cpu"]
            hv_ok = "yes" if r[phn]["hv"] >= r[base]["hv"] else "no"
            print(
                f"{name:<8} {phn:<8} wall {r[phn]['seconds']:7.1f} vs {base} x10 {r[base]['seconds']:7.1f} "
                f"(ratio {wall:.3f}) | CPU {r[phn]['cpu']:7.1f} vs {r[base]['cpu']:7.1f} (ratio {cpu:.3f}) "
                f"| HV >= baseline: {hv_ok}"
            )
    print("paper run time (min, V100): LS 9.0, EPO 15.5, PHN-LS 1.1, PHN-EPO 1.8 (ratios 0.122 and 0.116)")


if __name__ == "__main__":
    main()
