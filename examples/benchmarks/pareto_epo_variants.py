"""PHN-EPO on the fairness data sets: LP fallbacks with and without stratified batches, and front quality per
second of PHN-LS against the two PHN-EPO gradient variants (issue 16).

Part 1 (``fallbacks``): EPO's LP needs strictly positive losses (Navon et al. 2021, §2.3 of the reference notes);
a relaxed FPR/FNR gap is exactly 0 on a batch where a (group, label) cell is empty, and the step falls back to
the LS weights ``r/Σr``. For each data set the script first counts the training batches with an empty cell (plain
shuffled batches vs ``stratify=True``, :class:`~datamodules.tabular.StratifiedBatchSampler`), then trains PHN-EPO
(``epo_gradients="hypernet"``) on both and prints ``EPO LP fallbacks a/b`` (fallbacks / LP solves) and the test
hypervolume at the 10 rays.

Part 2 (``speed``): PHN-LS, PHN-EPO (``epo_gradients="hypernet"``, the paper's gradients w.r.t. the hypernetwork
φ) and PHN-EPO (``epo_gradients="target"``, gradients w.r.t. the generated weights θ(r)) train for the same
epochs on the same stratified batches, from the same initialisation; after every epoch the front is evaluated on
the test split at the same 10 rays (interior Das–Dennis points, 6 partitions; reference point (1, 1, 1); BCE,
hard |ΔFPR|, |ΔFNR|), outside the timed part. The script prints HV against cumulative training time (wall and
this process's CPU seconds). PHN-EPO(hypernet) trains ``--speed-epochs`` epochs; its training CPU time is the
budget of the other two, which stop once they have spent it (CPU rather than wall time: the machine may be shared),
so the last HV of each is the front reached with the same compute.

    python examples/benchmarks/pareto_epo_variants.py --quick      # Bank, a few batches (seconds)
    python examples/benchmarks/pareto_epo_variants.py --threads 1  # all three data sets (about 7 min)
    python examples/benchmarks/pareto_epo_variants.py --parts speed --seeds 0 1 2  # part 2 only, 3 seeds
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.tabular import (  # noqa: E402
    AdultDataModule,
    BankDataModule,
    DefaultDataModule,
    StratifiedBatchSampler,
    TabularFairnessDataModule,
)
from hyperlit.pareto import ParetoHyperNetModule  # noqa: E402
from hyperlit.pareto.baselines import default_baseline_rays  # noqa: E402

DATASETS = {"adult": AdultDataModule, "default": DefaultDataModule, "bank": BankDataModule}
VARIANTS = {  # label → ParetoHyperNetModule arguments
    "PHN-LS": {"solver": "ls"},
    "PHN-EPO(hypernet)": {"solver": "epo", "epo_gradients": "hypernet"},
    "PHN-EPO(target)": {"solver": "epo", "epo_gradients": "target"},
}
REF = (1.0, 1.0, 1.0)


def _trainer(epochs: int, limit: int | None, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=limit,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
    )


def _datamodule(name: str, stratify: bool, args: argparse.Namespace) -> TabularFairnessDataModule:
    dm = DATASETS[name](data_dir=args.data_dir, batch_size=args.batch_size, split_seed=args.seed, stratify=stratify)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _model(dm: TabularFairnessDataModule, args: argparse.Namespace, **kwargs: Any) -> ParetoHyperNetModule:
    pl.seed_everything(args.seed, verbose=False)  # the same initialisation for every variant
    return ParetoHyperNetModule(
        in_dim=dm.input_dim,
        alpha=args.alpha,
        seed=args.seed,
        optimizer=lambda p: torch.optim.Adam(p, lr=args.lr),
        **kwargs,
    )


def empty_cell_batches(dm: TabularFairnessDataModule, epochs: int, limit: int | None) -> tuple[int, int]:
    """(batches with an empty (group, label) cell, batches) of the first ``epochs`` epochs of its train loader."""
    loader = dm.train_dataloader()
    _, y, g = dm.train_set.tensors
    cells = 2 * g + y.long()
    empty = total = 0
    for epoch in range(epochs):
        if isinstance(loader.batch_sampler, StratifiedBatchSampler):
            loader.batch_sampler.set_epoch(epoch)
            batches = list(loader.batch_sampler)
        else:
            loader.sampler.set_epoch(epoch)
            batches = list(torch.tensor(list(loader.sampler)).split(dm.batch_size))
        batches = batches[:limit] if limit is not None else batches
        present = [set(cells[torch.as_tensor(b)].tolist()) for b in batches]
        empty += sum(len(p) < 4 for p in present)
        total += len(batches)
    return empty, total


def fallbacks(args: argparse.Namespace) -> None:
    rays = default_baseline_rays(3, 10)
    print(f"\n== part 1: EPO LP fallbacks, PHN-EPO (epo_gradients='hypernet'), {args.epochs} epoch(s) ==")
    for name in args.datasets:
        for stratify in (False, True):
            dm = _datamodule(name, stratify, args)
            empty, total = empty_cell_batches(dm, args.epochs, args.limit_train_batches)
            model = _model(dm, args, solver="epo", epo_gradients="hypernet")
            t0 = time.perf_counter()
            _trainer(args.epochs, args.limit_train_batches).fit(model, datamodule=dm)
            seconds = time.perf_counter() - t0
            hv = model.evaluate(dm.test_dataloader(), rays=rays).hv
            kind = "stratified" if stratify else "plain     "
            print(
                f"  {name:8s} {kind} batches with an empty (group, label) cell {empty}/{total}, "
                f"EPO LP fallbacks {int(model.epo_fallbacks)}/{int(model.epo_solves)}, HV@10 {hv:.4f}, "
                f"{seconds:.1f}s",
                flush=True,
            )


class EpochFront(pl.Callback):
    """Times the training steps (wall and this process's CPU seconds), evaluates the test front after every epoch
    (outside the timing) and, with a ``budget`` of CPU seconds, stops training once it is spent."""

    def __init__(self, dm: TabularFairnessDataModule, rays: torch.Tensor, budget: float | None = None) -> None:
        self.dm, self.rays, self.budget = dm, rays, budget
        self.wall = self.cpu = 0.0
        self.steps = self._evaluated_at = 0
        self.rows: list[tuple[str, float, float, float]] = []  # (where, wall s, CPU s, HV)

    def _evaluate(self, where: str, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ParetoHyperNetModule)
        hv = pl_module.evaluate(self.dm.test_dataloader(), rays=self.rays).hv
        self.rows.append((where, self.wall, self.cpu, hv))
        self._evaluated_at = self.steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]
        self.steps += 1
        if self.budget is not None and self.cpu >= self.budget:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self.steps

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        whole = self.steps - self._epoch_start >= trainer.num_training_batches
        if self.steps > self._evaluated_at:  # "stepN": stopped by the budget N steps in
            self._evaluate(f"ep{trainer.current_epoch + 1}" if whole else f"step{self.steps}", pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps > self._evaluated_at:  # stopped by the budget in the middle of an epoch
            self._evaluate(f"step{self.steps}", pl_module)


def speed_run(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Part 2 on one data set with seed ``args.seed``: prints the curves; returns the HV at the same CPU time."""
    rays = default_baseline_rays(3, 10)
    dm = _datamodule(name, True, args)
    curves: dict[str, EpochFront] = {}
    budget: float | None = None
    for label in ("PHN-EPO(hypernet)", "PHN-LS", "PHN-EPO(target)"):
        kwargs = VARIANTS[label]
        cb = EpochFront(dm, rays, budget)
        model = _model(dm, args, **kwargs)
        epochs = args.speed_epochs if budget is None else 100 * args.speed_epochs
        _trainer(epochs, args.limit_train_batches, [cb]).fit(model, datamodule=dm)
        budget = cb.cpu if budget is None else budget
        curves[label] = cb
        points = ", ".join(f"{w} {c:.1f}cpu/{t:.1f}s HV {hv:.4f}" for w, t, c, hv in cb.rows)
        extra = f"; fallbacks {int(model.epo_fallbacks)}/{int(model.epo_solves)}" if kwargs["solver"] == "epo" else ""
        print(f"  {name:8s} seed {args.seed} {label:18s} {cb.steps} steps: {points}{extra}", flush=True)
    final = {label: cb.rows[-1][3] for label, cb in curves.items()}
    best = max(final, key=lambda k: final[k])
    summary = ", ".join(f"{k} HV {hv:.4f} ({curves[k].steps} steps)" for k, hv in final.items())
    print(f"  {name:8s} seed {args.seed} at the same {budget:.1f} CPU s: {summary} -> highest: {best}")
    epo = max(("PHN-EPO(hypernet)", "PHN-EPO(target)"), key=lambda k: final[k])
    print(f"  {name:8s} seed {args.seed} of the two EPO variants at the same CPU time: {epo} (HV {final[epo]:.4f})")
    same_epoch = {
        label: next((r[3] for r in cb.rows if r[0] == f"ep{args.speed_epochs}"), float("nan"))
        for label, cb in curves.items()
    }
    print(
        f"  {name:8s} seed {args.seed} after the same {args.speed_epochs} epoch(s): "
        + ", ".join(f"{k} HV {hv:.4f}" for k, hv in same_epoch.items())
    )
    return final


def speed(args: argparse.Namespace) -> None:
    seeds = args.seeds or [args.seed]
    print(
        f"\n== part 2: test HV@10 vs training time, stratified batches, same initialisation, rays and ref {REF}: "
        f"PHN-EPO(hypernet) trains {args.speed_epochs} epoch(s), its training CPU time is the budget of the "
        f"other two; seeds {seeds} =="
    )
    finals: dict[str, list[dict[str, float]]] = {name: [] for name in args.datasets}
    for seed in seeds:  # seed outermost: a cut-off run still covers every data set
        for name in args.datasets:
            finals[name].append(speed_run(name, argparse.Namespace(**{**vars(args), "seed": seed})))
    verdicts: list[str] = []
    epo_verdicts: list[str] = []
    print(f"\nHV@10 at the same CPU time, mean ± sample std over seeds {seeds} (wins: runs with the highest HV)")
    for name, runs in finals.items():
        means = {k: statistics.mean(r[k] for r in runs) for k in VARIANTS}
        stds = {k: statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else float("nan") for k in VARIANTS}
        wins = {k: sum(max(r, key=lambda j, r=r: r[j]) == k for r in runs) for k in VARIANTS}
        epo_wins = {
            k: sum(max(("PHN-EPO(hypernet)", "PHN-EPO(target)"), key=lambda j, r=r: r[j]) == k for r in runs)
            for k in ("PHN-EPO(hypernet)", "PHN-EPO(target)")
        }
        sd = {k: f"{stds[k]:.4f}" if len(runs) > 1 else "-" for k in VARIANTS}
        cells = ", ".join(f"{k} {means[k]:.4f}±{sd[k]} (wins {wins[k]})" for k in VARIANTS)
        epo_cells = ", ".join(f"{k} {v}/{len(runs)}" for k, v in epo_wins.items())
        print(f"  {name:8s} {cells}; EPO variant wins: {epo_cells}")
        verdicts.append(f"{name}={max(means, key=lambda k: means[k])}")
        epo = max(("PHN-EPO(hypernet)", "PHN-EPO(target)"), key=lambda k: means[k])
        epo_verdicts.append(f"{name}={epo}")
    print(
        "RESULT speed highest_mean_hv_at_equal_cpu "
        + " ".join(verdicts)
        + " epo_variant "
        + " ".join(epo_verdicts)
        + f" seeds={','.join(map(str, seeds))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Bank only, 1-2 epochs of 12 batches (seconds)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--parts", nargs="+", default=["fallbacks", "speed"], choices=["fallbacks", "speed"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of part 1 (fallbacks)")
    parser.add_argument(
        "--speed-epochs", type=int, default=3, help="epochs of PHN-EPO(hypernet) in part 2 (sets the CPU budget)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr (as pareto_benchmark.py; paper: 1e-4)")
    parser.add_argument("--alpha", type=float, default=0.2, help="Dirichlet α of the training rays")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="split, batch order, initialisation and rays")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds for part 2 (mean ± std)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("HYPERLIT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.epochs, args.speed_epochs, args.limit_train_batches = ["bank"], 1, 2, 12
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    print("command: python examples/benchmarks/pareto_epo_variants.py " + " ".join(sys.argv[1:]))
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; batch "
        f"{args.batch_size}, lr {args.lr}, alpha {args.alpha}, seed {args.seed}, limit_train_batches "
        f"{args.limit_train_batches}"
    )
    t0 = time.perf_counter()
    if "fallbacks" in args.parts:
        fallbacks(args)
    if "speed" in args.parts:
        speed(args)
    load = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
