"""PHN-LS / PHN-EPO against per-ray LS / EPO baselines on Adult, Default and Bank (Navon et al. 2021, Table 2).

For each data set and each seed, in one run and with the same harness (LightningModule + Trainer, same target MLP
in_dim → 60 → 25 → 1, same objectives, same epochs, batch size and learning rate):

* PHN-LS and PHN-EPO: one hypernetwork each (ray MLP 3 → 100 → 100 → all target weights, Dirichlet(0.2) rays);
* LS and EPO baselines: 10 target networks, one per preference ray, each trained in its own ``Trainer.fit``
  (the paper's protocol: "baselines train 10 models, one per ray");
* evaluation on the test split at the **same 10 rays** (the interior Das–Dennis points with 6 partitions):
  hypervolume (minimization, reference point (1, 1, 1)) of (BCE, hard |ΔFPR|, hard |ΔFNR|), and
  uniformity 1 − mean KL(r⊙ℓ/Σr⊙ℓ ‖ uniform). PHN is also evaluated at its 55 test rays (12 partitions).
* train wall-clock: ``Trainer.fit`` time (validation disabled) of one PHN vs the sum over the 10 baseline models.

A seed ``s`` sets the data split (``split_seed``: train/val for Adult, whose test set is ``adult.test``;
train/val/test for Default and Bank), the training order of the batches, PHN's initialisation and its Dirichlet
training rays, and the baselines' initialisations (model k: ``100·s + k``). With several ``--seeds`` the summary
gives mean ± sample std over the seeds. The final epoch is evaluated for every method (no checkpoint selection).

``--step-timing`` measures instead the cost of one PHN training step with the EPO solver against one with LS
(issue 8 §4): hypernet forward + target forward + (EPO: per-objective gradients over the hypernetwork + HiGHS LP)
+ backward + Adam, measured alternately in one loop on real Adult batches, and the LP alone.

    python examples/benchmarks/pareto_benchmark.py --quick          # Adult, 1 seed, tiny budget + short step timing
    python examples/benchmarks/pareto_benchmark.py --epochs 3 --seeds 0 1 2 --json results.json --plot fronts.png
    python examples/benchmarks/pareto_benchmark.py --from-json results.json   # tables of a saved (partial) run
    python examples/benchmarks/pareto_benchmark.py --step-timing    # EPO step vs LS step (3-10 min)
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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.tabular import AdultDataModule, BankDataModule, DefaultDataModule  # noqa: E402
from hyperlit.pareto import ParetoBaselineModule, ParetoHyperNetModule  # noqa: E402
from hyperlit.pareto.baselines import default_baseline_rays  # noqa: E402
from hyperlit.pareto.metrics import evaluate_front  # noqa: E402
from hyperlit.pareto.solvers import epo_lp, weighted_loss  # noqa: E402

DATASETS = {"adult": AdultDataModule, "default": DefaultDataModule, "bank": BankDataModule}
METHODS = ("LS", "EPO", "PHN-LS", "PHN-EPO")
# Navon et al. 2021, Table 2 as quoted in the issue: HV / uniformity per data set, run time in minutes (V100)
PAPER = {
    "LS": ((0.628, 0.109), (0.522, 0.069), (0.704, 0.215), 9.0),
    "EPO": ((0.608, 0.734), (0.537, 0.533), (0.713, 0.881), 15.5),
    "PHN-LS": ((0.658, 0.289), (0.551, 0.108), (0.730, 0.615), 1.1),
    "PHN-EPO": ((0.648, 0.701), (0.548, 0.359), (0.748, 0.821), 1.8),
}
Results = dict[str, dict[str, dict[str, dict[str, Any]]]]  # dataset → method → str(seed) → figures


def _adam(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """The modules' ``optimizer`` argument: Adam over their parameters at ``lr``."""
    return lambda params: torch.optim.Adam(params, lr=lr)


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


def _datamodule(name: str, seed: int, args: argparse.Namespace) -> pl.LightningDataModule:
    dm = DATASETS[name](data_dir=args.data_dir, batch_size=args.batch_size, split_seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def run_dataset(name: str, seed: int, args: argparse.Namespace, record: Callable[[str, dict], None]) -> None:
    """Train and evaluate the four methods on one data set with one seed; ``record(method, figures)`` each."""
    dm = _datamodule(name, seed, args)
    rays = default_baseline_rays(3, 10)
    common = {"optimizer": _adam(args.lr), "in_dim": dm.input_dim}
    for solver in ("ls", "epo"):
        pl.seed_everything(seed, verbose=False)
        phn = ParetoHyperNetModule(solver=solver, alpha=args.alpha, seed=seed, **common)
        seconds, cpu = _fit(phn, dm, args)
        at10 = phn.evaluate(dm.test_dataloader(), rays=rays)
        at55 = phn.evaluate(dm.test_dataloader())
        method = f"PHN-{solver.upper()}"
        fallbacks, solves = int(phn.epo_fallbacks), int(phn.epo_solves)
        record(
            method,
            {
                "hv": at10.hv,
                "uniformity": at10.uniformity,
                "hv55": at55.hv,
                "uniformity55": at55.uniformity,
                "seconds": seconds,
                "cpu": cpu,
                "fallbacks": fallbacks,
                "solves": solves,
                "losses": at10.losses.tolist(),
                "losses55": at55.losses.tolist(),
            },
        )
        print(
            f"  {name} seed {seed} {method}: {seconds:.1f}s ({cpu:.1f}s CPU), HV@10 {at10.hv:.4f} "
            f"unif {at10.uniformity:.3f}, HV@55 {at55.hv:.4f}, EPO LP fallbacks {fallbacks}/{solves}",
            flush=True,
        )
    for solver in ("ls", "epo"):
        total = total_cpu = 0.0
        fallbacks = solves = 0
        losses = []
        for k, ray in enumerate(rays.tolist()):
            model_seed = 100 * seed + k
            pl.seed_everything(model_seed, verbose=False)
            base = ParetoBaselineModule(solver=solver, rays=[ray], seed=model_seed, **common)
            seconds, cpu = _fit(base, dm, args)
            total, total_cpu = total + seconds, total_cpu + cpu
            fallbacks, solves = fallbacks + int(base.epo_fallbacks), solves + int(base.epo_solves)
            losses.append(base.evaluate(dm.test_dataloader()).losses[0])
        front = evaluate_front(torch.stack(losses), rays, (1.0, 1.0, 1.0))
        method = solver.upper()
        record(
            method,
            {
                "hv": front.hv,
                "uniformity": front.uniformity,
                "seconds": total,
                "cpu": total_cpu,
                "fallbacks": fallbacks,
                "solves": solves,
                "losses": front.losses.tolist(),
            },
        )
        print(
            f"  {name} seed {seed} {method} x10: {total:.1f}s ({total_cpu:.1f}s CPU), HV@10 {front.hv:.4f} "
            f"unif {front.uniformity:.3f}, EPO LP fallbacks {fallbacks}/{solves}",
            flush=True,
        )


# -- summary ---------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _ms(values: list[float], digits: int) -> str:
    mean, std = _stats(values)
    return f"{mean:.{digits}f}±{std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}±   -"


def _seeds_of(results: Results, name: str, method: str) -> list[str]:
    return sorted(results.get(name, {}).get(method, {}), key=int)


def summarize(results: Results, datasets: list[str]) -> dict[str, float]:
    """Print the mean ± std tables next to the paper's Table 2; return figures for the RESULT line."""
    datasets = [d for d in datasets if d in results]
    seeds = sorted({s for d in datasets for m in results[d] for s in results[d][m]}, key=int)
    print(
        f"\nHV / uniformity on the test split at the same 10 rays, mean ± sample std over seeds {[int(s) for s in seeds]}"
        " (ref (1,1,1); BCE, |ΔFPR|, |ΔFNR|); n = seeds finished"
    )
    print(f"{'method':<9}" + "".join(f"| {n + ' HV':<14}{'unif':<14}{'n':>2} " for n in datasets) + "| paper HV/unif")
    for method in METHODS:
        row = f"{method:<9}"
        for name in datasets:
            runs = [results[name][method][s] for s in _seeds_of(results, name, method)]
            if runs:
                row += f"| {_ms([r['hv'] for r in runs], 4):<14}{_ms([r['uniformity'] for r in runs], 3):<14}"
                row += f"{len(runs):>2} "
            else:
                row += f"| {'-':<14}{'-':<14}{0:>2} "
        paper = PAPER[method]
        row += "| " + " ".join(f"{h:.3f}/{u:.3f}" for (h, u), d in zip(paper[:3], DATASETS) if d in datasets)
        print(row)
    print("(paper columns: Navon et al. 2021 Table 2 as quoted in the issue, in the order of the data sets above)")

    print("\nPHN at its 55 test rays (HV / uniformity, mean ± std)")
    for method in ("PHN-LS", "PHN-EPO"):
        row = f"{method:<9}"
        for name in datasets:
            runs = [results[name][method][s] for s in _seeds_of(results, name, method)]
            if runs:
                row += f"| {name}: HV {_ms([r['hv55'] for r in runs], 4)} unif {_ms([r['uniformity55'] for r in runs], 3)} "
        print(row)

    print("\nEPO LP fallbacks (r/Σr used instead of the LP), summed over seeds")
    for name in datasets:
        parts = []
        for method in ("PHN-EPO", "EPO"):
            runs = [results[name][method][s] for s in _seeds_of(results, name, method)]
            parts.append(f"{method} {sum(r['fallbacks'] for r in runs)}/{sum(r['solves'] for r in runs)}")
        print(f"{name:<8} " + ", ".join(parts))

    print(
        "\nTrain time (s), wall-clock and CPU, mean ± std over seeds: one PHN vs the 10 per-ray models "
        "(ratio = mean of per-seed ratios; target <= 1/8 = 0.125)"
    )
    out: dict[str, float] = {}
    for name in datasets:
        r = results[name]
        for phn, base in (("PHN-LS", "LS"), ("PHN-EPO", "EPO")):
            seeds_both = [s for s in _seeds_of(results, name, phn) if s in r.get(base, {})]
            if not seeds_both:
                continue
            wall = [r[phn][s]["seconds"] / r[base][s]["seconds"] for s in seeds_both]
            cpu = [r[phn][s]["cpu"] / r[base][s]["cpu"] for s in seeds_both]
            wins = sum(r[phn][s]["hv"] >= r[base][s]["hv"] for s in seeds_both)
            print(
                f"{name:<8} {phn:<8} wall {_ms([r[phn][s]['seconds'] for s in seeds_both], 1):>11} vs {base} x10 "
                f"{_ms([r[base][s]['seconds'] for s in seeds_both], 1):>12} (ratio {_ms(wall, 3)}) | CPU ratio "
                f"{_ms(cpu, 3)} | HV >= baseline in {wins}/{len(seeds_both)} seeds"
            )
            out[f"{name}_{phn}_wall_ratio"] = statistics.fmean(wall)
            out[f"{name}_{phn}_hv_wins"] = wins
    print("paper run time (min, V100): LS 9.0, EPO 15.5, PHN-LS 1.1, PHN-EPO 1.8 (ratios 0.122 and 0.116)")
    all_hv = [results[d][m][s]["hv"] for d in datasets for m in results[d] for s in results[d][m]]
    out["runs"] = len(all_hv)
    out["seeds"] = len(seeds)
    out["hv_min"] = min(all_hv) if all_hv else math.nan
    out["hv_max"] = max(all_hv) if all_hv else math.nan
    return out


def plot_fronts(results: Results, datasets: list[str], path: Path) -> None:
    """Test losses at the 10 shared rays (first seed), two projections per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in datasets if d in results]
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 7.5), squeeze=False)
    style = {"LS": ("s", "tab:blue"), "EPO": ("D", "tab:orange"), "PHN-LS": ("o", "tab:green"),
             "PHN-EPO": ("^", "tab:red")}  # fmt: skip
    for col, name in enumerate(datasets):
        for method in METHODS:
            seeds = _seeds_of(results, name, method)
            if not seeds:
                continue
            losses = np.asarray(results[name][method][seeds[0]]["losses"])
            marker, color = style[method]
            for row, j in enumerate((1, 2)):
                ax = axes[row, col]
                ax.scatter(losses[:, 0], losses[:, j], marker=marker, color=color, label=method, alpha=0.8)
                ax.set_xlabel("test BCE")
                ax.set_ylabel(("|ΔFPR|", "|ΔFNR|")[row])
        first = _seeds_of(results, name, "LS")[:1] or ["?"]
        axes[0, col].set_title(f"{name} (seed {first[0]}, test split, 10 shared rays)")
    axes[0, 0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- EPO step vs LS step ----------------------------------------------------------------------------------------


def step_timing(args: argparse.Namespace) -> None:
    """Median time of one training step, PHN-LS vs PHN-EPO (and per-ray R=1 models), measured alternately."""
    dm = _datamodule("adult", 0, args)
    batches = []
    for i, batch in enumerate(dm.train_dataloader()):
        batches.append(batch)
        if i >= 15:
            break
    in_dim = dm.input_dim

    def phn_step(solver: str, k: int, epo_gradients: str = "hypernet") -> Callable[[int, dict[str, float]], None]:
        pl.seed_everything(0, verbose=False)
        module = ParetoHyperNetModule(
            solver=solver, in_dim=in_dim, rays_per_step=k, optimizer=_adam(args.lr), epo_gradients=epo_gradients
        )
        assert module.hnet is not None
        (opt,) = module.configure_optimizers()  # the module's own optimizer (fused Adam where available)
        hnet = module.hnet

        def step(i: int, parts: dict[str, float]) -> None:
            # the body of ParetoHyperNetModule.training_step (solver inlined to time its parts), no Lightning
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            rays = module.training_rays()
            flat = hnet.flat(rays)
            outputs = module._outputs(hnet.unflatten(flat), batch[0])
            losses = module.objective_set.losses(outputs, batch)  # (K, m)
            t1 = time.perf_counter()
            parts["forward"] += t1 - t0
            if solver == "epo":
                lp_losses, grads = module._epo_gradients(losses, flat)  # (K, m, |φ|)
                gram = grads @ grads.transpose(-1, -2)
                t2 = time.perf_counter()
                results = module.solver.solve(lp_losses, rays, gram)
                t3 = time.perf_counter()
                parts["grads"] += t2 - t1
                parts["lp"] += t3 - t2
                beta = torch.as_tensor(np.stack([r.beta for r in results]), dtype=losses.dtype) * losses.shape[-1]
                loss = weighted_loss(losses, beta)
                t1 = t3
            else:
                loss = weighted_loss(losses, rays)
            opt.zero_grad()
            loss.backward()
            opt.step()
            module.ray_step += 1
            parts["backward+adam"] += time.perf_counter() - t1

        step.n_hnet = sum(p.numel() for p in hnet.parameters())  # type: ignore[attr-defined]
        step.n_target = sum(hnet.numels)  # type: ignore[attr-defined]
        return step

    def baseline_step(solver: str) -> Callable[[int, dict[str, float]], None]:
        pl.seed_everything(0, verbose=False)
        ray = default_baseline_rays(3, 10)[4:5]
        module = ParetoBaselineModule(solver=solver, rays=ray.tolist(), in_dim=in_dim, optimizer=_adam(args.lr))
        assert module.weights is not None
        (opt,) = module.configure_optimizers()

        def step(i: int, parts: dict[str, float]) -> None:
            # the body of ParetoBaselineModule.training_step (solver inlined to time its parts), no Lightning
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            losses = module.objective_set.losses(module._outputs(module.eval_weights(), batch[0]), batch)
            t1 = time.perf_counter()
            parts["forward"] += t1 - t0
            if solver == "epo":
                lp_losses, grads = module._epo_gradients(losses)  # (1, m, 7,971)
                gram = grads @ grads.transpose(-1, -2)
                t2 = time.perf_counter()
                results = module.solver.solve(lp_losses, module._rays, gram)
                t3 = time.perf_counter()
                parts["grads"] += t2 - t1
                parts["lp"] += t3 - t2
                beta = torch.as_tensor(np.stack([r.beta for r in results]), dtype=losses.dtype) * losses.shape[-1]
                loss = weighted_loss(losses, beta) * module.num_models
                t1 = t3
            else:
                loss = weighted_loss(losses, module._rays) * module.num_models
            opt.zero_grad()
            loss.backward()
            opt.step()
            parts["backward+adam"] += time.perf_counter() - t1

        return step

    ks = [1] + [k for k in args.step_rays if k != 1]
    configs: dict[str, Callable[[int, dict[str, float]], None]] = {}
    for k in ks:
        configs[f"PHN K={k} LS"] = phn_step("ls", k)
        configs[f"PHN K={k} EPO"] = phn_step("epo", k)
    configs["PHN K=1 EPO-θ"] = phn_step("epo", 1, "target")  # the cheaper non-faithful variant (grads w.r.t. θ)
    configs["per-ray R=1 LS"] = baseline_step("ls")
    configs["per-ray R=1 EPO"] = baseline_step("epo")
    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    parts: dict[str, dict[str, float]] = {
        n: dict.fromkeys(("forward", "grads", "lp", "backward+adam"), 0.0) for n in names
    }
    warmup = 3
    t_start = time.perf_counter()
    for i in range(warmup + args.step_repeats):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate so no config always runs first
        for n in order:
            scratch = dict.fromkeys(("forward", "grads", "lp", "backward+adam"), 0.0)
            t0 = time.perf_counter()
            configs[n](i, scratch)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[n].append(dt)
                for key, v in scratch.items():
                    parts[n][key] += v
    loop_s = time.perf_counter() - t_start

    # the LP alone: epo_lp on the (ℓ, r, G Gᵀ) of real PHN steps (one ray, m = 3)
    pl.seed_everything(0, verbose=False)
    module = ParetoHyperNetModule(solver="epo", in_dim=in_dim)
    assert module.hnet is not None
    problems = []
    for i in range(len(batches)):
        rays = module.training_rays()
        flat = module.hnet.flat(rays)
        losses = module.objective_set.losses(module._outputs(module.hnet.unflatten(flat), batches[i][0]), batches[i])
        lp_losses, grads = module._epo_gradients(losses, flat)
        gram = (grads @ grads.transpose(-1, -2)).detach().double().numpy()
        problems.append((lp_losses.detach().double().numpy()[0], rays.double().numpy()[0], gram[0]))
        module.ray_step += 1
    lp_times, modes = [], []
    for i in range(args.step_repeats * 2):
        ell, ray, gram = problems[i % len(problems)]
        t0 = time.perf_counter()
        res = epo_lp(ell, ray, gram)
        lp_times.append(time.perf_counter() - t0)
        modes.append(res.mode)

    first = configs[names[0]]
    print(
        f"\nEPO step vs LS step on Adult batches (batch {args.batch_size}, in_dim {in_dim}): target MLP "
        f"{first.n_target:,} weights, hypernet {first.n_hnet:,} parameters; "  # type: ignore[attr-defined]
        f"{torch.get_num_threads()} thread(s); median (IQR) of {args.step_repeats} steps per row after {warmup} "
        f"warm-up, all rows interleaved in one loop ({loop_s:.0f} s)"
    )
    print(f"{'step':<17}{'median ms':>10}{'IQR ms':>18} | mean ms per step: forward  grads(+Gram)  LP  backward+Adam")
    med = {}
    for n in names:
        q = np.percentile(times[n], [25, 50, 75]) * 1e3
        med[n] = q[1]
        p = {key: v / len(times[n]) * 1e3 for key, v in parts[n].items()}
        print(
            f"{n:<17}{q[1]:>10.2f}{f'{q[0]:.2f}-{q[2]:.2f}':>18} | {p['forward']:>20.2f} {p['grads']:>12.2f} "
            f"{p['lp']:>5.2f} {p['backward+adam']:>14.2f}"
        )
    print("ratio EPO step / LS step (medians):")
    for k in ks:
        print(f"  PHN K={k}: {med[f'PHN K={k} EPO'] / med[f'PHN K={k} LS']:.2f}")
    print(
        f"  PHN K=1, EPO with gradients w.r.t. the generated θ (epo_gradients='target'): "
        f"{med['PHN K=1 EPO-θ'] / med['PHN K=1 LS']:.2f}"
    )
    print(f"  per-ray R=1 (one target MLP): {med['per-ray R=1 EPO'] / med['per-ray R=1 LS']:.2f}")
    q = np.percentile(lp_times, [25, 50, 75]) * 1e3
    mode_counts = {m: modes.count(m) for m in sorted(set(modes))}
    print(
        f"LP alone (epo_lp, HiGHS via scipy.optimize.linprog, m = 3, one ray, {len(lp_times)} solves on "
        f"{len(problems)} real PHN steps' Gram matrices): median {q[1]:.3f} ms (IQR {q[0]:.3f}-{q[2]:.3f}); "
        f"modes {mode_counts}"
    )
    print(
        "paper (Navon et al. 2021 Table 2 as quoted in the issue, V100): PHN-EPO / PHN-LS whole-run time 1.8 / 1.1 min "
        f"= {1.8 / 1.1:.2f}; EPO x10 / LS x10 15.5 / 9.0 min = {15.5 / 9.0:.2f}"
    )
    ratio1 = med["PHN K=1 EPO"] / med["PHN K=1 LS"]
    print(
        f"RESULT step_timing phn_ls_ms={med['PHN K=1 LS']:.3f} phn_epo_ms={med['PHN K=1 EPO']:.3f} "
        f"ratio={ratio1:.3f} lp_ms={q[1]:.4f} baseline_ratio={med['per-ray R=1 EPO'] / med['per-ray R=1 LS']:.3f}"
    )


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="Adult only, 1 epoch of 15 batches, then a short step timing (K=1)"
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr for every method (paper: 1e-4)")
    parser.add_argument("--alpha", type=float, default=0.2, help="Dirichlet α of the PHN training rays")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny nets)")
    parser.add_argument("--seed", type=int, default=0, help="the seed when --seeds is not given")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean ± std tables")
    parser.add_argument("--json", type=Path, default=None, help="write every run's figures here (after each run)")
    parser.add_argument("--from-json", type=Path, default=None, help="only print the tables of a saved run")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the fronts at the 10 rays (first seed)")
    parser.add_argument("--step-timing", action="store_true", help="EPO step vs LS step instead of the fronts")
    parser.add_argument("--step-repeats", type=int, default=200, help="steps per row of --step-timing")
    parser.add_argument("--step-rays", type=int, nargs="+", default=[1, 8], help="K rays per PHN step to time")
    parser.add_argument("--data-dir", default=os.environ.get("HYPERLIT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.epochs, args.limit_train_batches = ["adult"], 1, 15
        args.step_repeats, args.step_rays = min(args.step_repeats, 10), [1]
    seeds = args.seeds or [args.seed]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    print("command: python examples/benchmarks/pareto_benchmark.py " + " ".join(sys.argv[1:]))
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        print(f"tables of {args.from_json} ({saved['config']})")
        summarize(saved["results"], saved["config"]["datasets"])
        if args.plot is not None:
            plot_fronts(saved["results"], saved["config"]["datasets"], args.plot)
        return
    if args.step_timing:
        step_timing(args)
        return

    print(
        f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, limit_train_batches "
        f"{args.limit_train_batches}, seeds {seeds}"
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"seeds": seeds}
    results: Results = {name: {} for name in args.datasets}
    t_start = time.perf_counter()
    for seed in seeds:  # seed outermost: a cut-off run still covers every data set
        for name in args.datasets:
            print(f"[{name} seed {seed}]", flush=True)

            def record(method: str, figures: dict, name: str = name, seed: int = seed) -> None:
                results[name].setdefault(method, {})[str(seed)] = figures
                if args.json is not None:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"config": config, "results": results}))

            run_dataset(name, seed, args, record)
    load = os.getloadavg()
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    out = summarize(results, args.datasets)
    if args.plot is not None:
        plot_fronts(results, args.datasets, args.plot)
    finite = all(math.isfinite(out[k]) for k in ("hv_min", "hv_max"))
    ratios = " ".join(f"{k}={v:.3f}" for k, v in out.items() if k.endswith("wall_ratio"))
    print(
        f"RESULT fronts datasets={','.join(args.datasets)} seeds={','.join(map(str, seeds))} runs={out['runs']} "
        f"hv_min={out['hv_min']:.4f} hv_max={out['hv_max']:.4f} finite={finite} {ratios}"
    )
    if args.quick:  # keep the step-timing path covered by the quick run
        step_timing(args)


if __name__ == "__main__":
    main()
