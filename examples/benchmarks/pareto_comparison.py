"""One model for the whole front vs one model per preference: equal epochs, equal compute, compute to match.

Per data set (Adult, Default, Bank: BCE and the hard FPR/FNR gaps, reference point (1, 1, 1); Multi-MNIST: the
two digits' cross-entropies, reference point (2, 2)) and per seed, every method is trained in the same harness
(LightningModule + ``Trainer.fit``, same data, batch size, learning rate and number of epochs) while a callback
records, every ``--eval-every`` training steps and at step 0, the train CPU time so far (evaluation excluded) and the
front on the validation and test splits at the **same R rays** for every method:

* single models: PHN-LS, PHN-EPO (Navon et al. 2021), PHN-HVI (Hoang et al. 2023: K rays per step, weights from
  the hypervolume gradient, cosine penalty) and COSMOS (Ruchte & Grabocka 2021: the ray concatenated to the input);
* per-ray models: LS and EPO, R target networks each trained in its own ``Trainer.fit`` (the paper's protocol);
  their front at a recording point is the R models' losses there, their compute the sum of the R models' times.

The three comparisons printed from those curves:

1. **equal epochs**: test HV after the last epoch and at the best-validation-HV point, and the epoch where the
   validation HV peaked (the curve is printed, so one sees whether it has stopped rising);
2. **equal compute**: the per-ray front at the last recording point whose summed time fits in one single model's
   whole training time (so each per-ray model gets ~1/R of it);
3. **compute to match**: the train time each single model needs to reach the per-ray models' final test HV, as a
   fraction of their summed time (the goal is ≤ 1/8).

Time is this process's CPU time (``time.process_time``, one thread), which other jobs on the machine do not inflate;
wall-clock is recorded beside it. HV is convention-free (the set of loss points); uniformity depends on the ray
convention (EPO aims at ``r ⊙ ℓ`` equal, COSMOS/HVI at ``ℓ ∝ r``), so it is not compared here.

    python examples/benchmarks/pareto_comparison.py --quick
    python examples/benchmarks/pareto_comparison.py --datasets adult default bank --seeds 0 1 2 --epochs 30 \\
        --json runs/pareto_comparison.json     # resumable: runs already in the JSON are skipped
    python examples/benchmarks/pareto_comparison.py --from-json runs/pareto_comparison.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.tabular import AdultDataModule, BankDataModule, DefaultDataModule  # noqa: E402
from hyperlit.pareto import ParetoBaselineModule, ParetoHyperNetModule  # noqa: E402
from hyperlit.pareto.baselines import default_baseline_rays  # noqa: E402
from hyperlit.pareto.metrics import circle_rays, hypervolume  # noqa: E402

SINGLE = ("PHN-LS", "PHN-EPO", "PHN-HVI", "COSMOS")
PER_RAY = ("LS", "EPO")
METHODS = SINGLE + PER_RAY
# Multi-MNIST HV at reference (2, 2), GMOOAR (NeurIPS 2022 submission) Table 1, 10 seeds, on the PMTL pickles
PUBLISHED_MULTI_MNIST = {"PHN-EPO": 2.82, "PHN-LS": 2.79, "EPO": 2.95, "COSMOS": 2.95}
Results = dict[str, dict[str, dict[str, Any]]]  # dataset → method → str(seed) → run record


@dataclass(frozen=True)
class DataSpec:
    """How one data set is built and scored."""

    name: str
    ref_point: tuple[float, ...]
    rays: Tensor  # the R rays every method is evaluated at (and the per-ray models are trained at)
    objectives: tuple[str, ...]
    eval_metric: str


def data_spec(name: str) -> DataSpec:
    if name == "multi_mnist":
        return DataSpec(name, (2.0, 2.0), circle_rays(5), ("ce_0", "ce_1"), "relaxed")
    return DataSpec(name, (1.0, 1.0, 1.0), default_baseline_rays(3, 10), ("bce", "fpr_gap", "fnr_gap"), "hard")


def make_datamodule(name: str, seed: int, args: argparse.Namespace) -> pl.LightningDataModule:
    if name == "multi_mnist":
        from datamodules.multi_mnist import MultiMNISTDataModule

        # the data and the validation split are fixed (generation seeds 0/1, val seed 42); the seed orders the batches
        dm = MultiMNISTDataModule(
            data_dir=args.data_dir, batch_size=args.batch_size, split_seed=seed, cache_dir=args.cache_dir
        )
    else:
        cls = {"adult": AdultDataModule, "default": DefaultDataModule, "bank": BankDataModule}[name]
        # stratified batches: every (group, label) cell in every batch, so no relaxed gap is 0 (EPO's LP needs ℓ > 0)
        dm = cls(data_dir=args.data_dir, batch_size=args.batch_size, split_seed=seed, stratify=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _target(spec: DataSpec, method: str) -> dict[str, Any]:
    """The target network argument: the PHN LeNet on Multi-MNIST (COSMOS: its own conditioned LeNet)."""
    if spec.name != "multi_mnist":
        return {}
    if method == "COSMOS":
        from hyperlit.pareto.cosmos import COSMOSMultiLeNet

        return {"target": COSMOSMultiLeNet()}
    from hyperlit.models.lenet import PHNLeNet

    return {"target": PHNLeNet()}


def make_module(method: str, spec: DataSpec, dm: Any, seed: int, args: argparse.Namespace, ray: Tensor | None):
    """The LightningModule of ``method`` (per-ray methods: the model of ``ray``)."""
    common: dict[str, Any] = {
        "objectives": spec.objectives,
        "ref_point": spec.ref_point,
        "eval_metric": spec.eval_metric,
        "optimizer": _adam(args.lr_cosmos if method == "COSMOS" else args.lr),
        **_target(spec, method),
    }
    if "target" not in common:
        common["in_dim"] = dm.input_dim
    if method in PER_RAY:
        assert ray is not None
        return ParetoBaselineModule(solver=method.lower(), rays=[ray.tolist()], seed=seed, **common)
    if method == "COSMOS":
        from hyperlit.pareto.cosmos import CosmosModule

        alpha, penalty = (1.2, 2.0) if spec.name == "multi_mnist" else (0.5, 0.01)  # COSMOS settings (phn.md §10.4)
        return CosmosModule(alpha=alpha, cosine_penalty=penalty, seed=seed, **common)
    if method == "PHN-HVI":  # HVI's Multi-MNIST settings (phn.md §10.3); λ 0.01 (COSMOS's) on the fairness sets
        mm = spec.name == "multi_mnist"
        return ParetoHyperNetModule(
            solver="hvi",
            rays_per_step=args.hvi_rays,
            ray_sampling="stratified" if mm else "dirichlet",
            hvi_penalty=5.0 if mm else args.hvi_penalty,
            alpha=args.alpha,
            seed=seed,
            **common,
        )
    return ParetoHyperNetModule(solver=method.split("-")[1].lower(), alpha=args.alpha, seed=seed, **common)


def _adam(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


class FrontCurve(pl.Callback):
    """Records (step, epoch, train CPU/wall seconds, test losses at the rays) at steps 0, 1 and then every factor
    √2 (rounded), every ``every`` steps if given, and at each epoch end (which also records the validation losses,
    for best-validation selection).

    The train time excludes the recording itself.
    """

    def __init__(
        self, every: int | None, val_loader: Any, test_loader: Any, rays: Tensor | None, geometric: bool = True
    ) -> None:
        self.every, self.val_loader, self.test_loader, self.rays = every, val_loader, test_loader, rays
        self.points: list[dict[str, Any]] = []
        self.steps = 0
        self.geometric = {round(math.sqrt(2) ** i) for i in range(80)} if geometric else set()

    def _clock(self) -> tuple[float, float]:
        return time.process_time(), time.perf_counter()

    def record(self, module: Any, epoch: float, with_val: bool) -> None:
        c0, w0 = self._clock()
        val = module.evaluate(self.val_loader, rays=self.rays) if with_val else None
        test = module.evaluate(self.test_loader, rays=self.rays)
        self.points.append(
            {
                "step": self.steps,
                "epoch": epoch,
                "cpu": c0 - self.cpu0 - self.eval_cpu,
                "wall": w0 - self.wall0 - self.eval_wall,
                "val_losses": None if val is None else val.losses.tolist(),
                "test_losses": test.losses.tolist(),
                "val_hv": None if val is None else val.hv,
                "test_hv": test.hv,
            }
        )
        c1, w1 = self._clock()
        self.eval_cpu += c1 - c0
        self.eval_wall += w1 - w0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cpu0, self.wall0 = self._clock()
        self.eval_cpu = self.eval_wall = 0.0
        self.record(pl_module, 0.0, with_val=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps += 1
        batches = trainer.num_training_batches
        in_epoch = args[-1] + 1  # batch_idx + 1
        end = in_epoch == batches
        if end or self.steps in self.geometric or (self.every is not None and self.steps % self.every == 0):
            self.record(pl_module, trainer.current_epoch + in_epoch / batches, with_val=end)


def train(method: str, spec: DataSpec, dm: Any, seed: int, args: argparse.Namespace, ray: Tensor | None = None):
    pl.seed_everything(seed, verbose=False)
    module = make_module(method, spec, dm, seed, args, ray)
    curve = FrontCurve(
        args.eval_every,
        dm.val_dataloader(),
        dm.test_dataloader(),
        None if ray is not None else spec.rays,
        geometric=not args.epoch_ends_only,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[curve],
    )
    trainer.fit(module, datamodule=dm)
    extra = {"fallbacks": int(getattr(module, "epo_fallbacks", 0)), "solves": int(getattr(module, "epo_solves", 0))}
    return curve.points, extra


def run(method: str, spec: DataSpec, dm: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One method on one data set and seed: its curve (per-ray methods: the R models' curves joined)."""
    if method in SINGLE:
        points, extra = train(method, spec, dm, seed, args)
        return {"points": points, **extra}
    curves, fallbacks, solves = [], 0, 0
    for k, ray in enumerate(spec.rays):
        points, extra = train(method, spec, dm, 100 * seed + k, args, ray)
        curves.append(points)
        fallbacks, solves = fallbacks + extra["fallbacks"], solves + extra["solves"]
    n = min(len(c) for c in curves)
    joined = []
    for i in range(n):  # every model trains the same steps, so recording point i is the same step for all of them
        val = None if curves[0][i]["val_losses"] is None else [c[i]["val_losses"][0] for c in curves]
        test = [c[i]["test_losses"][0] for c in curves]
        joined.append(
            {
                "step": curves[0][i]["step"],
                "epoch": curves[0][i]["epoch"],
                "cpu": sum(c[i]["cpu"] for c in curves),
                "wall": sum(c[i]["wall"] for c in curves),
                "val_losses": val,
                "test_losses": test,
                "val_hv": None if val is None else hypervolume(val, spec.ref_point),
                "test_hv": hypervolume(test, spec.ref_point),
            }
        )
    return {"points": joined, "fallbacks": fallbacks, "solves": solves}


# -- the three comparisons -----------------------------------------------------------------------------------


def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{statistics.stdev(values):.{digits}f}"


def best_val(points: list[dict[str, Any]]) -> dict[str, Any]:
    return max((p for p in points if p["val_hv"] is not None), key=lambda p: p["val_hv"])


def at_budget(points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """The last recording point whose train time fits in ``budget`` CPU seconds (step 0 at the least)."""
    fitting = [p for p in points if p["cpu"] <= budget]
    return fitting[-1] if fitting else points[0]


def time_to(points: list[dict[str, Any]], hv: float) -> float | None:
    """Train CPU seconds until the test HV first reaches ``hv`` (None: never)."""
    for p in points:
        if p["test_hv"] >= hv:
            return p["cpu"]
    return None


def summarize(results: Results, datasets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in [d for d in datasets if d in results]:
        res = results[name]
        methods = [m for m in METHODS if res.get(m)]
        seeds = sorted({s for m in methods for s in res[m]}, key=int)
        ref = data_spec(name).ref_point
        print(f"\n=== {name}: test HV at the same {len(data_spec(name).rays)} rays, ref {ref}; seeds {seeds} ===")
        print("1. equal epochs (last point / best-validation point; epoch of the validation peak; train CPU s)")
        for m in methods:
            runs = [res[m][s]["points"] for s in seeds if s in res[m]]
            last = [r[-1]["test_hv"] for r in runs]
            best = [best_val(r)["test_hv"] for r in runs]
            peak = [best_val(r)["epoch"] for r in runs]
            cpu = [r[-1]["cpu"] for r in runs]
            fb = [res[m][s] for s in seeds if s in res[m]]
            fallback = f" EPO LP fallbacks {sum(f['fallbacks'] for f in fb)}/{sum(f['solves'] for f in fb)}"
            print(
                f"  {m:<8} last {_ms(last):>15}  best-val {_ms(best):>15}  peak at epoch {_ms(peak, 2):>11} of "
                f"{runs[0][-1]['epoch']:.0f}  cpu {_ms(cpu, 1):>12}{fallback if 'EPO' in m else ''}  n={len(runs)}"
            )
            out[f"{name}_{m}_last_hv"] = statistics.fmean(last)
        print("   validation-HV curve, mean over seeds, at each epoch end:")
        for m in methods:
            runs = [res[m][s]["points"] for s in seeds if s in res[m]]
            ends = sorted({p["epoch"] for p in runs[0] if p["val_hv"] is not None})
            vals = [statistics.fmean(next(p["val_hv"] for p in r if p["epoch"] == e) for r in runs) for e in ends]
            print(f"     {m:<8} " + " ".join(f"{v:.4f}" for v in vals))
        per_ray = [m for m in PER_RAY if m in methods]
        single = [m for m in SINGLE if m in methods]
        print("2. equal compute: each single model's final test HV vs the per-ray front at the same total train time")
        for m in single:
            for b in per_ray:
                both = [s for s in seeds if s in res[m] and s in res[b]]
                mine = [res[m][s]["points"][-1]["test_hv"] for s in both]
                theirs = [at_budget(res[b][s]["points"], res[m][s]["points"][-1]["cpu"]) for s in both]
                wins = sum(a > t["test_hv"] for a, t in zip(mine, theirs))
                print(
                    f"  {m:<8} {_ms(mine):>15} vs {b} x{len(data_spec(name).rays)} {_ms([t['test_hv'] for t in theirs]):>15}"
                    f" (their models at epoch {_ms([t['epoch'] for t in theirs], 2)}) | higher in {wins}/{len(both)}"
                )
                out[f"{name}_{m}_vs_{b}_equal_compute_wins"] = wins
        print("3. compute to match: train CPU time to reach the per-ray front's final test HV, / the per-ray time")
        for m in single:
            for b in per_ray:
                both = [s for s in seeds if s in res[m] and s in res[b]]
                ratios, missed = [], 0
                for s in both:
                    target = res[b][s]["points"][-1]["test_hv"]
                    t = time_to(res[m][s]["points"], target)
                    if t is None:
                        missed += 1
                    else:
                        ratios.append(t / res[b][s]["points"][-1]["cpu"])
                reached = f"ratio {_ms(ratios, 3)}" if ratios else "ratio -"
                goal = "meets <= 1/8" if ratios and not missed and max(ratios) <= 0.125 else "misses <= 1/8"
                print(f"  {m:<8} to {b}'s HV: {reached} (not reached in {missed}/{len(both)} seeds) -> {goal}")
                out[f"{name}_{m}_to_{b}_ratio"] = statistics.fmean(ratios) if ratios else math.nan
        if name == "multi_mnist":
            print(
                "  published Multi-MNIST HV (GMOOAR Table 1, PMTL pickles, ref (2, 2)): " + str(PUBLISHED_MULTI_MNIST)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Adult, 1 seed, 2 short epochs, 3 methods")
    parser.add_argument("--datasets", nargs="+", default=["adult", "default", "bank"],
                        choices=["adult", "default", "bank", "multi_mnist"])  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam lr of PHN and the per-ray models (paper 1e-4)")
    parser.add_argument("--lr-cosmos", type=float, default=1e-3, help="Adam lr of COSMOS (its paper's setting)")
    parser.add_argument("--alpha", type=float, default=0.2, help="Dirichlet α of the PHN training rays")
    parser.add_argument("--hvi-rays", type=int, default=16, help="rays per PHN-HVI step (paper 16)")
    parser.add_argument("--hvi-penalty", type=float, default=0.01, help="PHN-HVI cosine penalty on the tabular sets")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also record every N steps (default: only the geometric schedule and epoch ends)",
    )
    parser.add_argument(
        "--epoch-ends-only",
        action="store_true",
        help="record at step 0 and epoch ends only (and every --eval-every steps), not on the √2-spaced steps: "
        "each recording evaluates the whole validation and test splits, which dominates short Multi-MNIST runs",
    )
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="where the generated Multi-MNIST arrays are cached")
    parser.add_argument("--json", type=Path, default=None, help="save after every run; runs already there are skipped")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="only print the comparisons of saved runs (several files: their runs joined)")  # fmt: skip
    parser.add_argument("--data-dir", default=os.environ.get("HYPERLIT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.seeds, args.epochs, args.limit_train_batches = ["adult"], [0], 2, 8
        args.methods = [m for m in args.methods if m in ("PHN-LS", "PHN-EPO", "LS")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    print("command: python examples/benchmarks/pareto_comparison.py " + " ".join(sys.argv[1:]))
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s); "
        f"load average at start {load[0]:.2f}"
    )
    if args.from_json is not None:
        joined: Results = {}
        datasets: list[str] = []
        for path in args.from_json:
            saved = json.loads(path.read_text())
            print(f"comparisons of {path}: {saved['config']}")
            for name, methods in saved["results"].items():
                for method, runs in methods.items():
                    joined.setdefault(name, {}).setdefault(method, {}).update(runs)
            datasets += [d for d in saved["config"]["datasets"] if d not in datasets]
        summarize(joined, datasets)
        return
    results: Results = {}
    if args.json is not None and args.json.exists():
        results = json.loads(args.json.read_text())["results"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(
        f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr} (COSMOS {args.lr_cosmos}), recording at steps "
        f"0{'' if args.epoch_ends_only else ', 1, √2-spaced'}, every {args.eval_every} and epoch ends; "
        f"limit_train_batches {args.limit_train_batches}; seeds {args.seeds}, methods {args.methods}"
    )
    t_start = time.perf_counter()
    for seed in args.seeds:  # seed outermost: a cut-off run still covers every data set
        for name in args.datasets:
            spec = data_spec(name)
            dm = make_datamodule(name, seed, args)
            for method in args.methods:
                if str(seed) in results.get(name, {}).get(method, {}):
                    continue
                record = run(method, spec, dm, seed, args)
                results.setdefault(name, {}).setdefault(method, {})[str(seed)] = record
                last = record["points"][-1]
                print(
                    f"  {name} seed {seed} {method}: test HV {last['test_hv']:.4f} after {last['epoch']:.0f} epochs, "
                    f"{last['cpu']:.1f} s train CPU ({last['wall']:.1f} s wall), "
                    f"{time.strftime('%H:%M:%S')}",
                    flush=True,
                )
                if args.json is not None:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"config": config, "results": results}))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    out = summarize(results, args.datasets)
    hv = [v for k, v in out.items() if k.endswith("_last_hv")]
    print(
        f"RESULT pareto_comparison datasets={','.join(args.datasets)} runs={len(hv)} "
        f"hv_min={min(hv):.4f} hv_max={max(hv):.4f} finite={all(math.isfinite(v) for v in hv)}"
    )


if __name__ == "__main__":
    main()
