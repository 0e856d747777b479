"""Ensembles at CPU scale: single network, deep, hyper-deep, BatchEnsemble (also widened) and hyper-batch ensembles.

Two problems, K = 4 members (hyper-ensembles paper, Wenzel et al. 2020, at CPU size; reference ``ensembles.md`` §6.3):

* **MNIST**: the MLP 784-200-200-10 (:class:`~hyperlit.models.mlp.MLP`) on a subset of the training images
  (normalised as :class:`datamodules.mnist.MNISTDataModule` does), a held-out split from the rest of the 60k pool,
  the first ``--test-size`` test images;
* **CIFAR-10**: the plain small CNN (:class:`~hyperlit.models.small_cnn.SmallCNN`, 3×3 convs 3→10→20→40) on the
  shared partial CIFAR-10 (``datamodules/cifar10.py``, ``partial=True``: the train / hyper split of
  ``data_batch_1`` and the test images).

Methods, all in the same harness (a LightningModule and ``Trainer.fit``, the same epochs, the same train split, the
same batches of ``--batch-size`` new examples per step, the same SGD recipe and schedule, 1 thread):

* ``single``: one plain network, a :class:`~hyperlit.ensembles.deep.DeepEnsembleModule` with K = 1 at the default
  L2 strength;
* ``deep``: a deep ensemble of 4 (``DeepEnsembleModule``, K = 4, default hyperparameters, different
  initialisations, every member sees every batch);
* ``hyper_deep``: a random-search pool of ``--pool`` members trained as one vectorised ``DeepEnsembleModule``: an L2
  strength per layer (log-uniform in [0.01, 100] / n_train, uncertainty-baselines' CIFAR-10 sweep range, whose
  divisor 47,500 is replaced by our training-set size) and label smoothing (log-uniform in [1e-5, 0.2]); member 0 is
  the default configuration. Greedy selection with replacement of at most 4 members on the held-out NLL
  (:func:`~hyperlit.ensembles.deep.hyper_deep_ensemble`; no retraining). The selected ids (repeats = weight) are
  printed; its parameter count counts distinct members;
* ``batch_ensemble``: :class:`~hyperlit.ensembles.batch_ensemble.BatchEnsembleModule`, K = 4, default L2 on the
  shared kernels, fast weights N(1, 0.5²) at half the learning rate (UB);
* ``batch_ensemble_wide``: the same with the hidden widths (MLP units, CNN filters) scaled so that its parameter
  count is the closest to the hyper-batch ensemble's (the issue's "same parameter count");
* ``hyper_batch``: :class:`~hyperlit.ensembles.hyper_batch.HyperBatchEnsembleModule`, K = 4, one L2 strength per
  layer and member, initialised at the default strength, range [0.1, 100] (UB) divided by n_train, tuned on the
  held-out split by the STN alternation (3 weight steps per λ-step, UB), fast weights N(1, 0.75²).

Defaults shared by every method (fairness): the L2 strength ``c = --l2`` (Keras convention ``c·Σw²``; 2e-4, UB's
CIFAR-10 ``DEFAULT_L2`` of the deterministic WRN and of the hyper-deep sweep's default run; the modules that divide
by the training-set size get ``c·n_train``), SGD with Nesterov momentum 0.9 at ``0.1·batch/128`` (UB's recipe; half
of it for the CIFAR-10 CNN, see ``DEFAULT_LR``) and UB's step schedule scaled to the epochs (×0.2 after 40 %, 80 %
and 90 % of them; [100, 200, 225] of 250), no warm-up (UB's 1 linear warm-up epoch is left out). The epochs (MNIST 8, CIFAR-10 4) were sized from the CPU times of
a 1-epoch run of every method, for a target of 45 minutes of one core for the default run. The held-out split is
used only by the hyper-batch ensemble (λ-steps) and the hyper-deep ensemble (selection). Train time is this
process's CPU time (``time.process_time``) of the fit (plus the selection for the hyper-deep ensemble); test
evaluation is not timed.

    python examples/benchmarks/ensembles_benchmark.py --quick    # 1 seed, 512 examples, 1 epoch (36 s CPU here)
    python examples/benchmarks/ensembles_benchmark.py --json runs/ensembles.json    # 3 seeds (resumable)
    python examples/benchmarks/ensembles_benchmark.py --from-json runs/ensembles.json    # print the tables again
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import io
import json
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
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402
from datamodules.mnist import MNIST_MEAN, MNIST_STD, load_mnist  # noqa: E402
from hyperlit.ensembles.batch_ensemble import BatchEnsembleModule  # noqa: E402
from hyperlit.ensembles.deep import DeepEnsembleModule, hyper_deep_ensemble, random_search_hparams  # noqa: E402
from hyperlit.ensembles.hyper_batch import HyperBatchEnsembleModule  # noqa: E402
from hyperlit.models.mlp import MLP  # noqa: E402
from hyperlit.models.small_cnn import SmallCNN  # noqa: E402
from hyperlit.nn.batch_ensemble import convert_to_batch_ensemble, convert_to_hyper_batch_ensemble  # noqa: E402

DATASETS = ("mnist", "cifar10")
METHODS = ("single", "deep", "hyper_deep", "batch_ensemble", "batch_ensemble_wide", "hyper_batch")
METRICS = ("nll", "acc", "ece", "brier")
K = 4
HDE_L2_RANGE = (1e-2, 1e2)  # UB cifar10_rand_search_sweep.py: [1e-2, 1e2] / 47,500 → [1e-2, 1e2] / n_train
HDE_LS_RANGE = (1e-5, 0.2)
HBE_L2_RANGE = (0.1, 100.0)  # UB hyperbatchensemble.py --min/max_l2_range, divided by n_train
#: training epochs per problem (sized so that 3 seeds of all six methods take about 45 CPU minutes, see main)
DEFAULT_EPOCHS = {"mnist": 8, "cifar10": 4}
#: SGD learning rate per problem at 128 new examples per step: UB's 0.1·batch/128 for the MLP; half of it for the
#: small CNN, whose deep-ensemble members at 0.1 ended 2 epochs at test accuracies 0.36-0.50 (0.455-0.475 at 0.05)
DEFAULT_LR = {"mnist": 0.1, "cifar10": 0.05}


# -- data ------------------------------------------------------------------------------------------------------
class _Batches(Dataset[tuple[Tensor, Tensor]]):
    """In-memory tensors served a whole batch per index list (a ``BatchSampler`` drives it)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: list[int]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        index = torch.as_tensor(idx)
        return self.x[index], self.y[index]


def _loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    ds = _Batches(x, y)
    base = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=shuffle), batch_size=None)


def load_data(name: str, args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor]]:
    """Train subset / held-out split / test set of one problem (one fixed split for every seed and method)."""
    if name == "mnist":
        data_dir = args.data_dir or os.environ.get("HYPERLIT_DATA_DIR") or "~/.cache/hyperlit"
        images, labels = load_mnist(Path(data_dir).expanduser(), train=True)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        x = ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).flatten(1)
        val_idx, train_idx = perm[: args.val_size], perm[args.val_size : args.val_size + args.train_size]
        test_x, test_y = load_mnist(Path(data_dir).expanduser(), train=False)
        test_x = ((test_x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).flatten(1)
        return {
            "train": (x[train_idx].contiguous(), labels[train_idx].clone()),
            "val": (x[val_idx].contiguous(), labels[val_idx].clone()),
            "test": (test_x[: args.test_size].contiguous(), test_y[: args.test_size].clone()),
        }
    dm = CIFAR10DataModule(data_dir=args.data_dir, partial=True)
    dm.setup("fit")
    out = {}
    for split, ds, n in (
        ("train", dm.train_set, args.train_size),
        ("val", dm.hyper_set, args.val_size),
        ("test", dm.test_set, args.test_size),
    ):
        out[split] = (ds.images[:n].float().div_(255.0).contiguous(), ds.labels[:n].clone())
    return out


# -- networks and modules ----------------------------------------------------------------------------------------
def make_net(dataset: str, seed: int, scale: float = 1.0) -> nn.Module:
    """The plain network of a problem, its hidden widths multiplied by ``scale`` (initialised under ``seed``)."""
    torch.manual_seed(seed)
    if dataset == "mnist":
        h = max(1, round(200 * scale))
        return MLP(784, (h, h), 10)
    return SmallCNN(filters=tuple(max(1, round(f * scale)) for f in (10, 20, 40)))


def layer_paths(net: nn.Module) -> list[str]:
    """Dotted paths of the network's ``nn.Linear`` / ``nn.Conv2d`` layers (one L2 group each)."""
    return [name for name, m in net.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hbe_count(dataset: str) -> int:
    """Parameters of the hyper-batch ensemble of the problem's network (every tensor of the converted network)."""
    return count(convert_to_hyper_batch_ensemble(make_net(dataset, 0), K))


@functools.cache
def wide_scale(dataset: str) -> float:
    """The width multiplier on the grid 1, 1.005, …, 2.995 whose BatchEnsemble has the parameter count closest to
    the hyper-batch ensemble's (the first such one; bisection, the count growing with the width)."""
    target = hbe_count(dataset)
    grid = [1.0 + 0.005 * i for i in range(400)]
    be_count = functools.cache(lambda i: count(convert_to_batch_ensemble(make_net(dataset, 0, grid[i]), K)))
    above = bisect.bisect_left(range(len(grid)), target, key=be_count)
    options = [i for i in (above - 1, above) if 0 <= i < len(grid)]
    best = min(options, key=lambda i: abs(be_count(i) - target))  # the lower one on a tie, as a scan would pick
    return grid[bisect.bisect_left(range(len(grid)), be_count(best), key=be_count)]  # the first of its plateau


def _sgd(lr: float) -> Any:
    return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, nesterov=True)


def _schedule(epochs: int) -> Any:
    """UB's step schedule scaled to the epochs: ×0.2 after 40 %, 80 %, 90 % of them ([100, 200, 225] / 250)."""
    milestones = sorted({max(1, round(f * epochs)) for f in (0.4, 0.8, 0.9)})
    return functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.2)


def make_module(method: str, dataset: str, seed: int, n_train: int, args: argparse.Namespace) -> pl.LightningModule:
    net = make_net(dataset, seed)
    paths = layer_paths(net)
    lam = args.l2 * n_train  # the default strength in the units of the modules that divide by n_train
    sched = _schedule(args.epochs[dataset])
    common = {"optimizer": _sgd(args.lr[dataset]), "lr_scheduler": sched, "seed": seed}
    if method in ("single", "deep"):
        k = 1 if method == "single" else K
        return DeepEnsembleModule(
            net,
            k,
            10,
            member_hparams={"l2": [lam] * k},
            train_size=n_train,
            **common,  # type: ignore[arg-type]
        )
    if method == "hyper_deep":
        groups = {p: p.replace(".", "_") for p in paths}
        ranges = {f"l2_{g}": HDE_L2_RANGE for g in groups.values()} | {"label_smoothing": HDE_LS_RANGE}
        default = {f"l2_{g}": lam for g in groups.values()} | {"label_smoothing": 0.0}
        # member 0 = the default config; the log-uniform draws need a positive label smoothing range
        hparams = random_search_hparams(ranges, args.pool, seed=seed, include_default=default)
        return DeepEnsembleModule(
            net,
            args.pool,
            10,
            member_hparams=hparams,
            l2_groups=groups,
            train_size=n_train,
            **common,  # type: ignore[arg-type]
        )
    if method in ("batch_ensemble", "batch_ensemble_wide"):
        if method == "batch_ensemble_wide":
            net = make_net(dataset, seed, wide_scale(dataset))
        return BatchEnsembleModule(net, K, 10, l2=args.l2, fast_init_scale=0.5, **common)  # type: ignore[arg-type]
    if method == "hyper_batch":
        hbe = convert_to_hyper_batch_ensemble(
            net, K, l2_range=HBE_L2_RANGE, l2_init=lam, fast_init_scale=0.75, seed=seed
        )
        return HyperBatchEnsembleModule(
            hbe,
            num_classes=10,
            train_size=n_train,
            train_steps=3,
            hyper_steps=1,
            entropy_weight=1e-3,
            phi_optimizer=_sgd(args.lr[dataset]),
            hyper_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
            sigma_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
            phi_lr_scheduler=sched,
            seed=seed,
        )
    raise ValueError(f"unknown method {method!r}")


# -- harness -----------------------------------------------------------------------------------------------------
def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _test(module: pl.LightningModule, loader: DataLoader) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        res = _trainer().test(module, dataloaders=loader, verbose=False)[0]
    return {m: float(res[f"test/{m}"]) for m in (*METRICS, "gibbs_nll", "disagreement")}


def run(method: str, dataset: str, seed: int, data: dict[str, tuple[Tensor, Tensor]], args: argparse.Namespace):
    """Train one method on one problem and seed; its test metrics, parameters, CPU seconds and extras."""
    n_train = len(data["train"][1])
    module = make_module(method, dataset, seed, n_train, args)
    train = _loader(*data["train"], args.batch_size, True, seed)
    loaders: Any = train
    if method == "hyper_batch":
        loaders = {"train": train, "hyper": _loader(*data["val"], args.batch_size, True, seed + 1)}
    t0, c0 = time.perf_counter(), time.process_time()
    _trainer(max_epochs=args.epochs[dataset], limit_val_batches=0).fit(module, train_dataloaders=loaders)
    extra: dict[str, Any] = {}
    params = count(module)
    if method == "hyper_deep":
        val = _loader(*data["val"], 1000, False)
        module, ids = hyper_deep_ensemble(module, val, K)  # type: ignore[arg-type]
        extra["selected"] = ids
        extra["multiplicity"] = {str(i): ids.count(i) for i in sorted(set(ids))}
        params = len(set(ids)) * count(make_net(dataset, seed))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    if method == "hyper_batch":
        values = module.space.values()  # type: ignore[union-attr]
        extra["lambda"] = {name: [float(v) for v in vals.reshape(K, -1).mean(-1)] for name, vals in values.items()}
    res = _test(module, _loader(*data["test"], 1000, False))
    return {**res, "params": params, "cpu_s": cpu, "wall_s": wall, **extra}


# -- tables --------------------------------------------------------------------------------------------------------
def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_tables(results: dict[str, Any], datasets: list[str]) -> None:
    for dataset in datasets:
        runs = results.get(dataset, {})
        seeds = sorted({int(s) for m in runs.values() for s in m})
        if not seeds:
            continue
        print(f"\n== {dataset}: test metrics per seed (K = {K}) ==")
        print(
            f"{'method':20s} {'seed':>4s} {'NLL':>7s} {'acc':>7s} {'ECE':>7s} {'Brier':>7s} {'params':>9s} "
            f"{'CPU s':>7s}"
        )
        for method in METHODS:
            for seed in seeds:
                r = runs.get(method, {}).get(str(seed))
                if r is None:
                    continue
                line = (
                    f"{method:20s} {seed:4d} {r['nll']:7.4f} {r['acc']:7.4f} {r['ece']:7.4f} {r['brier']:7.4f} "
                    f"{r['params']:9,d} {r['cpu_s']:7.1f}"
                )
                if "selected" in r:
                    line += f"  selected {r['selected']} (multiplicity {r['multiplicity']})"
                print(line)
                if "lambda" in r:
                    for name, vals in r["lambda"].items():
                        vals_s = ", ".join(f"{v:.3g}" for v in vals)
                        print(f"{'':25s} final λ {name} (penalty λ/n_train), members 0..3: {vals_s}")
        print(f"\n== {dataset}: mean ± std over seeds ==")
        for method in METHODS:
            rs = [runs[method][str(s)] for s in seeds if str(s) in runs.get(method, {})]
            if not rs:
                continue
            cols = "  ".join(f"{m} {_ms([r[m] for r in rs])}" for m in METRICS)
            print(
                f"RESULT {dataset} {method:20s} n={len(rs)}  {cols}  params {rs[0]['params']:,d}  "
                f"cpu_s {_ms([r['cpu_s'] for r in rs], 1)}"
            )
        for a, b in (("hyper_batch", "batch_ensemble"), ("hyper_batch", "batch_ensemble_wide"), ("hyper_deep", "deep")):
            common = [s for s in seeds if str(s) in runs.get(a, {}) and str(s) in runs.get(b, {})]
            if not common:
                continue
            margins = [runs[b][str(s)]["nll"] - runs[a][str(s)]["nll"] for s in common]
            held = sum(m > 0 for m in margins)
            print(
                f"GOAL {dataset} NLL {a} < {b}: holds in {held}/{len(common)} seeds; margin ({b} − {a}) "
                f"{_ms(margins)} per seed {[round(m, 4) for m in margins]}"
            )


# -- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, tiny subsets, 1 epoch")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs of every method (default MNIST 8, CIFAR-10 4; quick 1)",
    )
    p.add_argument("--train-size", type=int, default=None, help="training examples (default 8000; quick 512)")
    p.add_argument("--val-size", type=int, default=None, help="held-out examples (default 2000; quick 256)")
    p.add_argument("--test-size", type=int, default=None, help="test examples (default 10000; quick 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="new examples per step (every method)")
    p.add_argument("--pool", type=int, default=None, help="hyper-deep random-search pool size M (default 8; quick 4)")
    p.add_argument("--l2", type=float, default=2e-4, help="default L2 strength c (Keras c·Σw², UB's DEFAULT_L2)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default MNIST 0.1, CIFAR-10 0.05)")
    p.add_argument("--hyper-lr", type=float, default=0.01, help="Adam learning rate of the HBE's λ and σ")
    p.add_argument("--data-dir", default=None, help="data folder (default: $HYPERLIT_DATA_DIR, else ~/.cache/hyperlit)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="save after every run; runs already there are skipped")
    p.add_argument("--from-json", type=Path, default=None, help="only print the tables of a saved JSON")
    args = p.parse_args()
    q = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.epochs = {d: args.epochs or (1 if q else DEFAULT_EPOCHS[d]) for d in DATASETS}
    args.train_size = args.train_size or (512 if q else 8000)
    args.val_size = args.val_size or (256 if q else 2000)
    args.test_size = args.test_size or (1000 if q else 10000)
    args.pool = args.pool or (4 if q else 8)
    args.lr = {d: args.lr if args.lr is not None else DEFAULT_LR[d] * args.batch_size / 128 for d in DATASETS}
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        print(f"config: {saved['config']}")
        print_tables(saved["results"], list(saved["results"]))
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "from_json")
    }
    results: dict[str, Any] = {}
    if args.json is not None and args.json.exists():
        results = json.loads(args.json.read_text())["results"]
    print(
        f"ensembles_benchmark: torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}; K = {K}, epochs {args.epochs}, batch {args.batch_size} new "
        f"examples per step, SGD Nesterov 0.9 lr {args.lr} (×0.2 after 40/80/90 % of the epochs), "
        f"default L2 c = {args.l2:g} (c·n_train for the modules dividing by n_train), HDE pool {args.pool} "
        f"(L2 {HDE_L2_RANGE}/n_train per layer, label smoothing {HDE_LS_RANGE}), HBE λ range {HBE_L2_RANGE}/n_train, "
        f"Adam {args.hyper_lr:g} on λ and σ, 3 weight steps per λ-step",
        flush=True,
    )
    for dataset in args.datasets:
        data = load_data(dataset, args)
        sizes = " / ".join(f"{len(data[s][1])} {s}" for s in ("train", "val", "test"))
        print(
            f"{dataset}: {sizes}; single network {count(make_net(dataset, 0)):,d} parameters, HBE "
            f"{hbe_count(dataset):,d}, BE-wide width ×{wide_scale(dataset):.3f}",
            flush=True,
        )
        for seed in args.seeds:
            for method in args.methods:
                if str(seed) in results.get(dataset, {}).get(method, {}):
                    continue
                res = run(method, dataset, seed, data, args)
                results.setdefault(dataset, {}).setdefault(method, {})[str(seed)] = res
                extra = f"  selected {res['selected']}" if "selected" in res else ""
                print(
                    f"{dataset} seed {seed} {method:20s} NLL {res['nll']:.4f} acc {res['acc']:.4f} "
                    f"ECE {res['ece']:.4f} Brier {res['brier']:.4f} params {res['params']:,d} "
                    f"cpu {res['cpu_s']:.1f} s{extra}",
                    flush=True,
                )
                if args.json is not None:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"config": config, "results": results}, indent=1))
    print_tables(results, args.datasets)
    n = sum(len(s) for d in results.values() for s in d.values())
    print(f"\nRESULT ensembles_benchmark: {n} runs")
    if any(not math.isfinite(r["nll"]) for d in results.values() for m in d.values() for r in m.values()):
        raise SystemExit("a run ended with a non-finite test NLL")


if __name__ == "__main__":
    main()
