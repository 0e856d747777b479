"""SplitCIFAR-10 (5 two-class tasks) with the paper's ZenkeNet target: hyperlit's hypernetwork vs online EWC vs
fine-tuning.

Every learner sees the same task sequence (:class:`~datamodules.split_cifar.SplitCIFAR10DataModule`: classes
{0,1}, {2,3}, …, {8,9}, labels relative to the task, per-channel normalised, no augmentation as in the official
ZenkeNet runs), the same training batches (seeded by ``--seeds``), the same number of Adam steps per task, and is
measured on the test images of every task after each task (task-incremental / CL1: task identity given, one 2-way
head per task). By default it reads only the training batches of the shared partial copy
(``--train_batches data_batch_1``: about 2,000 training and 2,000 test images per task); with the full CIFAR-10 pass
``--train_batches data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5``.

Target: :class:`~hyperlit.models.zenkenet.ZenkeNet` (Zenke et al. 2017; 4 convolutions + FC 512, dropout 0.25 /
0.5, as in the official ``mnets/zenkenet.py``) with one 2-way head per task (``heads="multihead"``).

Learners:

* ``hyperlit`` — :class:`~hyperlit.continual.module.HyperContinualModule` with the official ZenkeNet settings
  (reference cl.md §2.3, §3.4, §3.5): chunked hypernetwork [100, 150, 200], task embedding 48, chunk embedding 80,
  chunk size 5,500, β = 0.01, Adam lr 1e-4 with β1 = 0.5 for θ and for the embeddings, earlier task embeddings
  frozen and the Adam look-ahead Δθ (``--lookahead``);
* ``ewc`` — :class:`~hyperlit.continual.baselines.EWCContinualModule`, online EWC (λ = 100, γ = 1: the online-EWC
  setting of the reference's baseline protocol, cl.md §4.3; the reference gives none for SplitCIFAR) on the plain
  multi-head ZenkeNet, same optimizer;
* ``finetune`` — the same plain network with λ = 0.

The paper trains 80 epochs per task at batch 256; ``--epochs`` converts epochs into steps per task with the
DataModule's epoch (one pass over the smallest task's training data), ``--steps`` sets the steps directly.
Printed per learner (mean ± std over seeds): during accuracy R[j, j], final accuracy R[T−1, j], backward transfer,
forgetting, compression ratio (trainable hypernetwork parameters incl. chunk and all task embeddings over target
parameters) and training wall-clock (evaluation excluded). Reads CIFAR-10 from ``$HYPERLIT_DATA_DIR``.

    python examples/benchmarks/cl_split_cifar10.py --quick
    python examples/benchmarks/cl_split_cifar10.py --steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import math
import os
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

from datamodules.split_cifar import SplitCIFAR10DataModule  # noqa: E402
from hyperlit.continual.base import ContinualModule  # noqa: E402
from hyperlit.continual.baselines import EWCContinualModule  # noqa: E402
from hyperlit.continual.metrics import format_matrix, summarize  # noqa: E402
from hyperlit.continual.module import HyperContinualModule  # noqa: E402
from hyperlit.models.zenkenet import ZenkeNet  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get("HYPERLIT_DATA_DIR") or str(ROOT.parent / "shared" / "data")

# Published SplitCIFAR-10 anchors (reference notes cl.md §5.2, §5.3): no number for this exact setting.
PUBLISHED = [
    ("deterministic hnet, ResNet-32 target, SplitCIFAR-10 5x2, CL1 (Henning et al. 2021 README)", "93.77"),
    ("deterministic hnet, WRN-28-10 target, same (Henning et al. 2021 README)", "95.75"),
]
PUBLISHED_NOTE = (
    "the reference notes give no number for von Oswald et al. 2020's SplitCIFAR-10/100 (6 tasks, ZenkeNet), only "
    "that HNET beats SI and fine-tuning on final accuracy (unverified, paper not checked); their settings: full "
    "CIFAR-10/100, 80 epochs per task, batch 256, Adam lr 1e-4 beta1 0.5"
)

LEARNER_NAMES = {
    "hyperlit": "hyperlit HyperContinualModule (chunked hnet)",
    "ewc": "online EWC, plain ZenkeNet",
    "finetune": "fine-tuning, plain ZenkeNet",
}


def adam(args: argparse.Namespace) -> Callable[[Any], torch.optim.Optimizer]:
    """Adam(lr, betas=(beta1, 0.999)): the official ZenkeNet optimizer (every learner, every parameter group)."""
    return lambda params: torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, 0.999))


def make_datamodule(args: argparse.Namespace, seed: int) -> SplitCIFAR10DataModule:
    """The task sequence; ``val_size=0``: every evaluation is on the test split (the papers' protocol)."""
    dm = SplitCIFAR10DataModule(
        data_dir=args.data_dir,
        train_batches=args.train_batches,
        num_tasks=args.tasks,
        val_size=0,
        eval_size=args.eval_size,
        steps_per_task=args.steps,
        batch_size=args.batch,
        eval_batch_size=1000,
        split_seed=seed,
    )
    dm.setup("fit")
    return dm


class _EvalTimer(pl.Callback):
    """Wall-clock spent in validation (subtracted from ``fit``'s time to report training time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._t0


def run_module(model: ContinualModule, dm: SplitCIFAR10DataModule) -> dict[str, Any]:
    """One ``Trainer.fit`` over the task sequence (the accuracy matrix, task given); training and eval seconds."""
    timer = _EvalTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=dm.num_schedule_epochs,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    total = time.perf_counter() - t0
    return {"R": model.acc_matrix.clone(), "train_s": total - timer.seconds, "eval_s": timer.seconds}


def hyperlit_learner(args: argparse.Namespace, seed: int, dm: SplitCIFAR10DataModule) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = HyperContinualModule(
        num_tasks=args.tasks,
        output_dim=2,
        heads="multihead",
        target=ZenkeNet(2, dropout_rate=args.dropout),
        hnet_hidden=tuple(args.hnet_hidden),
        chunk_size=args.chunk_size,
        chunk_emb_dim=args.chunk_emb,
        emb_dim=args.temb,
        beta=args.beta,
        lookahead=args.lookahead,
        train_old_embeddings=False,
        hnet_optimizer=adam(args),
        emb_optimizer=adam(args),
        infer_task=False,
        track_drift=False,
    )
    out = run_module(model, dm)
    out["ratio"] = model.compression()["compression_ratio"]
    out["target_params"] = model.hnet.num_target_params
    return out


def ewc_learner(args: argparse.Namespace, seed: int, dm: SplitCIFAR10DataModule, lam: float) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = EWCContinualModule(
        num_tasks=args.tasks,
        output_dim=2,
        heads="multihead",
        target=ZenkeNet(2, dropout_rate=args.dropout),
        ewc_lambda=lam,
        ewc_gamma=args.ewc_gamma,
        fisher_every=args.fisher_every,
        optimizer=adam(args),
        infer_task=False,
    )
    return run_module(model, dm)


LEARNERS: dict[str, Callable[[argparse.Namespace, int, SplitCIFAR10DataModule], dict[str, Any]]] = {
    "hyperlit": hyperlit_learner,
    "ewc": lambda a, s, dm: ewc_learner(a, s, dm, a.ewc_lambda),
    "finetune": lambda a, s, dm: ewc_learner(a, s, dm, 0.0),
}


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = np.asarray(values, dtype=float) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Summary table (mean ± std over seeds) and final accuracy per task; returns the means for the RESULT line."""
    cols = ("during", "final", "BWT", "forgetting", "ratio", "train s", "s/step")
    print("\nmean ± std over seeds; accuracies in %, train s = training wall-clock (evaluation excluded)")
    print(f"{'learner':46} " + " ".join(f"{c:>13}" for c in cols))
    means: dict[str, dict[str, float]] = {}
    total_steps = args.tasks * args.steps
    for key, runs in results.items():
        sums = [summarize(r["R"]) for r in runs]
        row = {
            "during": _ms([s["during_mean"] for s in sums]),
            "final": _ms([s["final_mean"] for s in sums]),
            "BWT": _ms([s["bwt"] for s in sums]),
            "forgetting": _ms([s["forgetting"] for s in sums]),
            "ratio": f"{runs[0]['ratio']:.3f}" if "ratio" in runs[0] else "-",
            "train s": _ms([r["train_s"] for r in runs], scale=1.0, digits=0),
            "s/step": _ms([r["train_s"] / total_steps for r in runs], scale=1.0, digits=3),
        }
        print(f"{LEARNER_NAMES[key]:46} " + " ".join(f"{row[c]:>13}" for c in cols))
        means[key] = {
            "final": float(np.mean([s["final_mean"] for s in sums])),
            "during": float(np.mean([s["during_mean"] for s in sums])),
            "bwt": float(np.mean([s["bwt"] for s in sums])),
            "train_s": float(np.mean([r["train_s"] for r in runs])),
        }
    print(f"\nfinal accuracy per task (%), mean over {len(args.seeds)} seed(s)")
    print(f"{'learner':46} " + " ".join(f"{'t' + str(j):>6}" for j in range(args.tasks)))
    for key, runs in results.items():
        final = torch.stack([r["R"][-1] for r in runs]).mean(0) * 100
        print(f"{LEARNER_NAMES[key]:46} " + " ".join(f"{float(v):>6.2f}" for v in final))
    print("\npublished SplitCIFAR-10 anchors (task identity given), final test accuracy (%):")
    for name, value in PUBLISHED:
        print(f"  {name:88} {value:>7}")
    print(f"  ({PUBLISHED_NOTE})")
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 tasks × 20 steps at batch 64, 200 test images per task")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--train_batches", nargs="+", default=["data_batch_1"], help="CIFAR-10 training batch files")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=80.0, help="epochs per task (the paper: 80), unless --steps")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per task (overrides --epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval_size", type=int, default=None, help="test images per task (default: all)")
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (the official ZenkeNet runs: 0.5)")
    parser.add_argument("--beta", type=float, default=0.01, help="output-regularizer strength β")
    parser.add_argument("--lookahead", choices=["none", "sgd", "adam"], default="adam")
    parser.add_argument("--hnet_hidden", type=int, nargs="+", default=[100, 150, 200])
    parser.add_argument("--chunk_size", type=int, default=5500)
    parser.add_argument("--chunk_emb", type=int, default=80)
    parser.add_argument("--temb", type=int, default=48)
    parser.add_argument("--dropout", type=float, default=0.25, help="ZenkeNet conv dropout (FC: twice this)")
    parser.add_argument("--ewc_lambda", type=float, default=100.0)
    parser.add_argument("--ewc_gamma", type=float, default=1.0)
    parser.add_argument("--fisher_every", type=int, default=25, help="EWC: Fisher estimate every k-th batch")
    parser.add_argument("--matrices", action="store_true", help="print every accuracy matrix")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.batch, args.seeds, args.eval_size = 2, 20, 64, [0], 200
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no per-fit "GPU available" banners
    warnings.filterwarnings("ignore", message=".*treespec.*")
    probe = make_datamodule(args, args.seeds[0])
    sizes = [probe.task_size(t, "train") for t in range(args.tasks)]
    tests = [probe.task_size(t, "test") for t in range(args.tasks)]
    if args.steps is None:  # an epoch of the DataModule: one pass over the smallest task's training data
        args.steps = max(1, round(args.epochs * math.ceil(min(sizes) / args.batch)))
    epochs = args.steps / math.ceil(min(sizes) / args.batch)
    print(
        f"SplitCIFAR-10 ({args.tasks} tasks x 2 classes) from {args.train_batches}: train images per task {sizes}, "
        f"test {tests}; {args.steps} steps/task (= {epochs:.1f} epochs of the smallest task), batch {args.batch}, "
        f"Adam lr {args.lr} beta1 {args.beta1}, seeds {args.seeds}; target ZenkeNet (dropout {args.dropout}) with "
        f"{args.tasks}x2 heads; hnet: chunked {args.hnet_hidden}, task emb {args.temb}, chunk emb {args.chunk_emb}, "
        f"chunk {args.chunk_size}, beta {args.beta}, look-ahead {args.lookahead}; online EWC lambda {args.ewc_lambda} "
        f"gamma {args.ewc_gamma}, Fisher every {args.fisher_every} batches"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, "
        f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
    )
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.learners}
    for seed in args.seeds:
        for key in args.learners:
            dm = make_datamodule(args, seed)
            r = LEARNERS[key](args, seed, dm)
            results[key].append(r)
            s = summarize(r["R"])
            print(
                f"seed {seed} {LEARNER_NAMES[key]:46} during {100 * s['during_mean']:.2f}, final "
                f"{100 * s['final_mean']:.2f}, BWT {100 * s['bwt']:+.2f}; train {r['train_s']:.0f} s, "
                f"eval {r['eval_s']:.0f} s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if args.matrices:
                print(format_matrix(r["R"]))
    means = report(results, args)
    fields = " ".join(f"{k}_{m}={100 * v[m]:.2f}" for k, v in means.items() for m in ("final", "bwt"))
    times = " ".join(f"{k}_train_s={v['train_s']:.1f}" for k, v in means.items())
    print(f"RESULT tasks={args.tasks} steps={args.steps} seeds={len(args.seeds)} {fields} {times}")


if __name__ == "__main__":
    main()
