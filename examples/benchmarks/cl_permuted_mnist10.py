"""PermutedMNIST-10: hyperlit's hypernetwork vs hypnettorch's ``ChunkedHMLP`` vs online EWC vs fine-tuning.

Every learner sees the same task sequence (real MNIST, 32×32 zero-padded, permutations from ``RandomState(42)``,
task 0 unpermuted), the same training batches (the :class:`~datamodules.continual_mnist.PermutedMNISTDataModule`
schedule, seeded by ``--seeds``), the same number of Adam steps per task, and is measured on the same test images
after every task (task-incremental / CL1: task identity given, one 10-way head per task).

Learners (target network: MLP 1024-100-100-(10 heads × 10), the "small capacity" sizes of the official code):

* ``hyperlit`` — :class:`~hyperlit.continual.module.HyperContinualModule`, chunked hypernetwork [100, 75, 50],
  task embedding 64, chunk embedding 12, chunk size 2,000, β = 0.05 (Eq. 2 of von Oswald et al. 2020: output
  regularizer over all previous tasks, stored targets), one ``Trainer.fit`` over the sequence;
* ``hypnettorch`` — the reference: ``hypnettorch.hnets.ChunkedHMLP`` with the same sizes, trained in a plain
  PyTorch loop as in hypnettorch's ``examples/hypercl/run.py`` (targets from ``hnet_regularizer.get_current_targets``
  at each task start, a fresh ``Adam(hnet.parameters())`` per task, ``loss = CE + β·calc_fix_target_reg`` over
  all previous tasks every step, no look-ahead). Both hypernetworks start from the *same* parameters (the
  hypnettorch network is built under the seed and copied into hyperlit's with
  :func:`~hyperlit.continual.interop.copy_from_hypnettorch`), and hyperlit runs with the hypnettorch options
  (``train_old_embeddings=True``, ``lookahead="none"``), so the two should agree up to floating-point noise;
* ``hyperlit-hcl`` (optional, ``--learners``) — hyperlit with the official code's options and initialisation
  instead: earlier task embeddings frozen, the Adam look-ahead Δθ, Xavier-uniform matrices and zero biases;
* ``ewc`` — :class:`~hyperlit.continual.baselines.EWCContinualModule`, online EWC (λ = 100, γ = 1) on the plain
  multi-head MLP of the same shape;
* ``finetune`` — the same plain MLP with λ = 0.

Printed per learner (mean ± std over seeds): during accuracy R[j, j], final accuracy R[T−1, j], backward transfer
and forgetting, compression ratio (trainable hypernetwork parameters incl. chunk and all task embeddings over
target parameters), training wall-clock (evaluation excluded) and, for the hypernetworks, the final accuracy with
the task inferred by minimum predictive entropy (HNET+ENT). The published PermutedMNIST-10 numbers (much longer
training and bigger networks) are printed next to them. Reads MNIST from ``$HYPERLIT_DATA_DIR/mnist``.

    python examples/benchmarks/cl_permuted_mnist10.py --quick
    python examples/benchmarks/cl_permuted_mnist10.py --matrices --plot docs/img/cl_pm10_accuracy.png
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
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datamodules.continual_mnist import PermutedMNISTDataModule  # noqa: E402
from hyperlit.continual.base import ContinualModule  # noqa: E402
from hyperlit.continual.baselines import EWCContinualModule  # noqa: E402
from hyperlit.continual.interop import copy_from_hypnettorch  # noqa: E402
from hyperlit.continual.metrics import entropy_task_inference, format_matrix, summarize  # noqa: E402
from hyperlit.continual.module import HyperContinualModule  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get("HYPERLIT_DATA_DIR") or str(ROOT.parent / "shared" / "data")

# Published PermutedMNIST-10 results (reference notes cl.md §5; task-incremental = CL1 unless marked).
PUBLISHED = [
    ("fine-tuning, MLP 1000-1000 (van de Ven & Tolias 2018, Tab. 4)", "81.79"),
    ("online EWC, MLP 1000-1000 (van de Ven & Tolias 2018, Tab. 4)", "95.96 ± 0.06"),
    ("SI, MLP 1000-1000 (van de Ven & Tolias 2018, Tab. 4)", "94.75 ± 0.14"),
    ("HNET, target 1000-1000 (von Oswald et al. 2020, Tab. 1; unverified)", "97.57 ± 0.02"),
    ("HNET+ENT, task inferred (CL3, same table; unverified)", "91.75 ± 0.21"),
    ("deterministic hnet, target 100-100 (Henning et al. 2021 README)", "95.05"),
    ("  same, task inferred by entropy (CL3-ent)", "75.84"),
    ("fine-tuning, MLP 100-100 (Henning et al. 2021 README, final)", "47.89"),
]
PUBLISHED_SETTINGS = (
    "published settings: 5,000 iterations per task, Adam lr 1e-4, 10,000 test images per task; van de Ven & Tolias: "
    "mean ± SEM of 20 runs; HNET (official code defaults): target 1024-1000-1000-(10x10), chunked hnet [25, 25], "
    "chunk 78,000, beta 0.1, batch 128, compression ratio 0.955"
)


# -- configuration ------------------------------------------------------------------------------------------------
def target_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Target network shared by every learner: multi-head MLP, one 10-way head per task."""
    return dict(num_tasks=args.tasks, input_dim=1024, output_dim=10, hidden=tuple(args.hidden))


def adam(args: argparse.Namespace) -> Callable[[Any], torch.optim.Optimizer]:
    """Adam with the benchmark's learning rate (every learner, every parameter group)."""
    return lambda params: torch.optim.Adam(params, lr=args.lr)


def hnet_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Hypernetwork sizes (official code's PermutedMNIST "small capacity" branch), β and the two optimizers."""
    return dict(
        hnet_optimizer=adam(args),
        emb_optimizer=adam(args),
        heads="multihead",
        hnet_hidden=tuple(args.hnet_hidden),
        hnet_activation=args.hnet_activation,
        chunk_size=args.chunk_size,
        chunk_emb_dim=args.chunk_emb,
        emb_dim=args.temb,
        beta=args.beta,
        track_drift=False,
    )


def make_datamodule(args: argparse.Namespace, seed: int) -> PermutedMNISTDataModule:
    """The task sequence; ``val_size=0``: every evaluation is on the test split (the papers' protocol)."""
    dm = PermutedMNISTDataModule(
        data_dir=args.data_dir,
        num_tasks=args.tasks,
        pad_to_32=True,
        val_size=0,
        eval_size=args.eval_size,
        steps_per_task=args.steps,
        batch_size=args.batch,
        eval_batch_size=1000,
        split_seed=seed,
    )
    dm.setup("fit")
    return dm


def build_hypnettorch(args: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    """hypnettorch's main net (no own weights) and ``ChunkedHMLP``, built under ``seed``."""
    from hypnettorch.hnets import ChunkedHMLP
    from hypnettorch.mnets import MLP

    torch.manual_seed(seed)
    np.random.seed(seed)  # calc_fix_target_reg draws task subsets from numpy's global RNG (unused: all tasks)
    mnet = MLP(1024, 10 * args.tasks, hidden_layers=tuple(args.hidden), no_weights=True, verbose=False)
    hnet = ChunkedHMLP(
        mnet.param_shapes,
        chunk_size=args.chunk_size,
        chunk_emb_size=args.chunk_emb,
        cond_in_size=args.temb,
        layers=tuple(args.hnet_hidden),
        activation_fn={"relu": torch.nn.ReLU(), "elu": torch.nn.ELU()}[args.hnet_activation],
        num_cond_embs=args.tasks,
        verbose=False,
    )
    return mnet, hnet


# -- learners ---------------------------------------------------------------------------------------------------
class _EvalTimer(pl.Callback):
    """Wall-clock of each task's training (validation excluded) and of validation; checkpointed, so a resumed run
    reports the time of the whole run (a task cut by the kill counts from the start of its last attempt)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        self._epoch_t0: float | None = None
        self.task_seconds: list[float] = []  # training time of each task (epoch), evaluation excluded

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        if self._epoch_t0 is not None:  # the task's last batch is done: its evaluation starts
            self.task_seconds.append(self._t0 - self._epoch_t0)
            self._epoch_t0 = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._t0
        if isinstance(pl_module, ContinualModule) and trainer.state.fn == "fit":
            progress(pl_module.task, pl_module.acc_matrix[pl_module.task], self.seconds)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "task_seconds": list(self.task_seconds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = state_dict["seconds"]
        self.task_seconds = list(state_dict["task_seconds"])


def progress(task: int, row: Tensor, eval_s: float) -> None:
    """One line per finished task (long runs are followed in their logs)."""
    seen = row[: task + 1]
    print(
        f"  task {task} done: mean accuracy over seen tasks {100 * float(seen.mean()):.2f}, eval so far "
        f"{eval_s:.0f} s, {time.strftime('%H:%M:%S')}",
        flush=True,
    )


def fit_lightning(
    model: ContinualModule, dm: pl.LightningDataModule, ckpt_dir: Path | None = None
) -> tuple[pl.Trainer, float, float, list[float]]:
    """One ``Trainer.fit`` over the task sequence; returns the trainer, training and evaluation seconds and the
    training seconds of each task. With ``ckpt_dir`` a checkpoint is written after every task's evaluation and a
    run killed part-way resumes from the last one (exact resume, the Lightning way: ``fit(ckpt_path=...)``)."""
    timer = _EvalTimer()
    callbacks: list[pl.Callback] = [timer]
    ckpt_path = None
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_on_train_epoch_end=False))
        if (ckpt_dir / "last.ckpt").exists():
            ckpt_path = str(ckpt_dir / "last.ckpt")
            print(f"  resuming from {ckpt_path}", flush=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=dm.num_schedule_epochs,  # type: ignore[attr-defined]
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, sum(timer.task_seconds), timer.seconds, timer.task_seconds


def ckpt_dir_of(args: argparse.Namespace, key: str, seed: int) -> Path | None:
    """Checkpoint folder of one learner and seed under ``--ckpt_dir`` (``None``: no checkpoints)."""
    return None if args.ckpt_dir is None else Path(args.ckpt_dir) / f"{key}_seed{seed}"


def run_module(model: ContinualModule, dm: PermutedMNISTDataModule, ckpt_dir: Path | None = None) -> dict[str, Any]:
    """Fit with the task given (accuracy matrix), then one test pass with the task inferred by entropy (inferring
    after every task would score every seen task on every test batch, T times over)."""
    model.infer_task = False
    trainer, train_s, eval_s, task_s = fit_lightning(model, dm, ckpt_dir)
    model.infer_task = True
    t0 = time.perf_counter()
    trainer.test(model, dm, verbose=False)
    eval_s += time.perf_counter() - t0
    out: dict[str, Any] = {"R": model.acc_matrix.clone(), "train_s": train_s, "eval_s": eval_s, "task_s": task_s}
    out["final_inferred"] = float(model.test_scores[1].mean())
    if isinstance(model, HyperContinualModule):
        out["ratio"] = model.compression()["compression_ratio"]
    return out


def hyperlit_learner(args: argparse.Namespace, seed: int, dm: PermutedMNISTDataModule, hcl: bool) -> dict[str, Any]:
    """hyperlit's hypernetwork: with hypnettorch's options from the hypnettorch network's parameters of the same
    seed, or with the official code's options (``hcl``) from the official code's initialisation."""
    options = dict(train_old_embeddings=False, lookahead="adam") if hcl else dict(train_old_embeddings=True)
    model = HyperContinualModule(**target_kwargs(args), **hnet_kwargs(args), **options)
    if hcl:
        torch.manual_seed(seed)
        model.reset_hypernetwork()  # the official initialisation (what hnet_init="xavier" does at construction)
    else:
        _, ref = build_hypnettorch(args, seed)
        with torch.no_grad():
            model.task_embeddings.copy_(copy_from_hypnettorch(ref, model.hnet))
    pl.seed_everything(seed, verbose=False)
    return run_module(model, dm, ckpt_dir_of(args, "hyperlit-hcl" if hcl else "hyperlit", seed))


def ewc_learner(args: argparse.Namespace, seed: int, dm: PermutedMNISTDataModule, lam: float) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = EWCContinualModule(
        **target_kwargs(args), heads="multihead", ewc_lambda=lam, ewc_gamma=1.0, optimizer=adam(args)
    )
    return run_module(model, dm, ckpt_dir_of(args, "ewc" if lam > 0 else "finetune", seed))


def _hnt_outputs(mnet: Any, weights: list[list[Tensor]], x: Tensor, tasks: list[int]) -> Tensor:
    """(K, B, 10) outputs of the generated nets ``weights[k]`` for k in ``tasks``, each read on its own head."""
    return torch.stack([mnet.forward(x, weights=weights[k])[:, 10 * k : 10 * k + 10] for k in tasks])


@torch.no_grad()
def _hnt_evaluate(mnet: Any, hnet: Any, dm: PermutedMNISTDataModule, seen: int, infer: bool) -> tuple[Tensor, Tensor]:
    """Accuracy per task (task given) and, with ``infer``, with the task inferred by entropy (both (T,), NaN unseen)."""
    hnet.eval()
    weights = hnet.forward(cond_id=list(range(seen)), ret_format="sequential")
    given = torch.full((dm.num_tasks,), math.nan)
    inferred = given.clone()
    for task, loader in enumerate(dm.val_dataloader()[:seen]):
        n = correct = correct_inf = 0
        for batch in loader:
            out = _hnt_outputs(mnet, weights, batch["x"], list(range(seen)) if infer else [task])
            correct += int((out[task if infer else 0].argmax(-1) == batch["y"]).sum())
            if infer:  # correct: the inferred task and the class within it (the class-incremental score)
                inferred_task, pred = entropy_task_inference(out)
                correct_inf += int(((pred == batch["y"]) & (inferred_task == task)).sum())
            n += len(batch["y"])
        given[task] = correct / n
        inferred[task] = correct_inf / n
    hnet.train()
    return given, inferred


def hypnettorch_learner(args: argparse.Namespace, seed: int, dm: PermutedMNISTDataModule) -> dict[str, Any]:
    """hypnettorch's CL loop (``examples/hypercl/run.py``) on the DataModule's batches."""
    import hypnettorch.utils.hnet_regularizer as hreg

    mnet, hnet = build_hypnettorch(args, seed)
    loader = dm.train_dataloader()
    num_tasks = args.tasks
    acc = torch.full((num_tasks, num_tasks), math.nan)
    train_s = eval_s = 0.0
    task_s: list[float] = []
    inferred = torch.full((num_tasks,), math.nan)
    folder = ckpt_dir_of(args, "hypnettorch", seed)
    state_file = None if folder is None else folder / "after_task.pt"
    first = 0
    if state_file is not None and state_file.exists():  # resume after the last finished task (exact: fresh Adam)
        state = torch.load(state_file, weights_only=True)
        hnet.load_state_dict(state["hnet"])
        acc, task_s, eval_s, first = state["acc"], list(state["task_s"]), float(state["eval_s"]), state["task"] + 1
        inferred = state["inferred"]
        train_s = sum(task_s)
        print(f"  resuming from {state_file} after task {first - 1}", flush=True)
    for task in range(first, num_tasks):
        t0 = time.perf_counter()
        calc_reg = task > 0 and args.beta > 0
        targets = hreg.get_current_targets(task, hnet) if calc_reg else None
        optimizer = torch.optim.Adam(hnet.parameters(), lr=args.lr)
        hnet.train()
        loader.sampler.set_epoch(task)  # type: ignore[attr-defined]  # the batches Lightning's epoch `task` gets
        for batch in loader:
            optimizer.zero_grad()
            weights = hnet.forward(cond_id=task)
            y_hat = mnet.forward(batch["x"], weights=weights)[:, 10 * task : 10 * task + 10]
            loss_task = F.cross_entropy(y_hat, batch["y"])
            loss_reg = 0
            if calc_reg:
                loss_reg = hreg.calc_fix_target_reg(hnet, task, targets=targets, mnet=mnet, inds_of_out_heads=None)
            loss = loss_task + args.beta * loss_reg
            loss.backward()
            optimizer.step()
        task_s.append(time.perf_counter() - t0)
        train_s += task_s[-1]
        t0 = time.perf_counter()
        last = task == num_tasks - 1
        acc[task], inferred = _hnt_evaluate(mnet, hnet, dm, task + 1, infer=last)
        eval_s += time.perf_counter() - t0
        progress(task, acc[task], eval_s)
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state = {"hnet": hnet.state_dict(), "acc": acc, "task_s": task_s, "eval_s": eval_s, "task": task}
            state["inferred"] = inferred
            torch.save(state, state_file)
    final_inferred = float(inferred.mean())
    target_params = sum(math.prod(s) for s in mnet.param_shapes)
    ratio = sum(p.numel() for p in hnet.parameters() if p.requires_grad) / target_params
    return {
        "R": acc,
        "final_inferred": final_inferred,
        "train_s": train_s,
        "eval_s": eval_s,
        "task_s": task_s,
        "ratio": ratio,
    }


LEARNERS: dict[str, tuple[str, Callable[[argparse.Namespace, int, PermutedMNISTDataModule], dict[str, Any]]]] = {
    "hyperlit": ("hyperlit HyperContinualModule", lambda a, s, dm: hyperlit_learner(a, s, dm, hcl=False)),
    "hypnettorch": ("hypnettorch ChunkedHMLP (reference)", hypnettorch_learner),
    "hyperlit-hcl": ("hyperlit, HCL options (frozen e, look-ahead)", lambda a, s, dm: hyperlit_learner(a, s, dm, True)),
    "ewc": ("online EWC (lambda=100), plain MLP", lambda a, s, dm: ewc_learner(a, s, dm, 100.0)),
    "finetune": ("fine-tuning, plain MLP", lambda a, s, dm: ewc_learner(a, s, dm, 0.0)),
}


def check_same_start(args: argparse.Namespace) -> float:
    """Max |difference| of the two hypernetworks' outputs at initialisation (same seed, copied parameters)."""
    mnet, ref = build_hypnettorch(args, 0)
    model = HyperContinualModule(**target_kwargs(args), **hnet_kwargs(args))
    with torch.no_grad():
        model.task_embeddings.copy_(copy_from_hypnettorch(ref, model.hnet))
        x = torch.rand(16, 1024)
        ours = model.task_outputs(x, torch.arange(args.tasks))
        weights = ref.forward(cond_id=list(range(args.tasks)), ret_format="sequential")
    return float((ours - _hnt_outputs(mnet, weights, x, list(range(args.tasks)))).abs().max())


def eval_timing(args: argparse.Namespace, seen: int, reps: int = 3) -> None:
    """Evaluation wall-clock side by side: hyperlit's ``trainer.validate`` over ``seen`` task loaders against the
    hypnettorch loop's evaluation (generate the weights once, loop over tasks and batches), alternating, median."""
    dm = make_datamodule(args, 0)
    mnet, ref = build_hypnettorch(args, 0)
    model = HyperContinualModule(**target_kwargs(args), **hnet_kwargs(args), infer_task=False)
    with torch.no_grad():
        model.task_embeddings.copy_(copy_from_hypnettorch(ref, model.hnet))
    for task in range(seen):
        model.start_task(task)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    ours, theirs = [], []
    for _ in range(reps + 1):  # the first round warms up
        t0 = time.perf_counter()
        trainer.validate(model, dm.val_dataloader()[:seen], verbose=False)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _hnt_evaluate(mnet, ref, dm, seen, infer=False)
        theirs.append(time.perf_counter() - t0)
    a, b = float(np.median(ours[1:])), float(np.median(theirs[1:]))
    n = len(dm.val_dataloader()[0].dataset)  # type: ignore[arg-type]
    print(
        f"RESULT eval seen={seen} images_per_task={n}: hyperlit trainer.validate {a:.2f} s, hypnettorch loop "
        f"{b:.2f} s (median of {reps}), ratio {a / b:.2f}"
    )


# -- reporting --------------------------------------------------------------------------------------------------
def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = np.asarray(values, dtype=float) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Summary table (mean ± std over seeds) and final accuracy per task; returns the means for the RESULT line."""
    cols = ("during", "final", "BWT", "forgetting", "final (task inferred)", "ratio", "train s", "eval s")
    cols += ("ms/step task 1", f"ms/step task {args.tasks}")
    print(
        "\nmean ± std over seeds; accuracies in %, train s = training wall-clock (evaluation excluded), eval s = "
        "evaluation wall-clock, ms/step = training time of that task / its steps"
    )
    print(f"{'learner':46} " + " ".join(f"{c:>{max(15, len(c))}}" for c in cols))
    means: dict[str, dict[str, float]] = {}
    for key, runs in results.items():
        sums = [summarize(r["R"]) for r in runs]
        row = {
            "during": _ms([s["during_mean"] for s in sums]),
            "final": _ms([s["final_mean"] for s in sums]),
            "BWT": _ms([s["bwt"] for s in sums]),
            "forgetting": _ms([s["forgetting"] for s in sums]),
            "final (task inferred)": "-",
            "ratio": f"{runs[0]['ratio']:.3f}" if "ratio" in runs[0] else "-",
            "train s": _ms([r["train_s"] for r in runs], scale=1.0, digits=0),
            "eval s": _ms([r["eval_s"] for r in runs], scale=1.0, digits=0),
            "ms/step task 1": _ms([r["task_s"][0] / args.steps for r in runs], scale=1000.0, digits=1),
            f"ms/step task {args.tasks}": _ms([r["task_s"][-1] / args.steps for r in runs], scale=1000.0, digits=1),
        }
        if "final_inferred" in runs[0]:
            row["final (task inferred)"] = _ms([r["final_inferred"] for r in runs])
        print(f"{LEARNERS[key][0]:46} " + " ".join(f"{row[c]:>{max(15, len(c))}}" for c in cols))
        means[key] = {
            "final": float(np.mean([s["final_mean"] for s in sums])),
            "during": float(np.mean([s["during_mean"] for s in sums])),
            "bwt": float(np.mean([s["bwt"] for s in sums])),
            "train_s": float(np.mean([r["train_s"] for r in runs])),
            "inferred": float(np.mean([r["final_inferred"] for r in runs])),
        }
    print(f"\nfinal accuracy per task (%), mean over {len(args.seeds)} seed(s)")
    print(f"{'learner':46} " + " ".join(f"{'t' + str(j):>6}" for j in range(args.tasks)))
    for key, runs in results.items():
        final = torch.stack([r["R"][-1] for r in runs]).mean(0) * 100
        print(f"{LEARNERS[key][0]:46} " + " ".join(f"{float(v):>6.2f}" for v in final))
    print("\npublished PermutedMNIST-10 (task identity given unless marked), final test accuracy (%):")
    for name, value in PUBLISHED:
        print(f"  {name:72} {value:>13}")
    print(f"  ({PUBLISHED_SETTINGS})")
    return means


def save(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: str) -> None:
    """Write the runs (accuracy matrices as lists, NaN as null) and the arguments to ``path``."""
    import json

    def plain(value: Any) -> Any:
        if isinstance(value, Tensor):
            return [[None if math.isnan(v) else v for v in row] for row in value.tolist()]
        return value

    runs = {k: [{f: plain(v) for f, v in r.items()} for r in rs] for k, rs in results.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"results saved to {path}")


def report_saved(paths: list[str]) -> None:
    """One table from several ``--save`` files of the same configuration (e.g. one learner per process)."""
    import json

    results: dict[str, list[dict[str, Any]]] = {}
    configs = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        keep = ("tasks", "steps", "seeds", "batch", "lr", "beta", "hidden", "hnet_hidden", "chunk_size", "eval_size")
        configs.append({k: saved["args"][k] for k in keep})
        for key, runs in saved["runs"].items():
            for r in runs:
                r["R"] = torch.tensor([[math.nan if v is None else v for v in row] for row in r["R"]])
            results.setdefault(key, []).extend(runs)
    if any(c != configs[0] for c in configs):
        raise SystemExit(f"the files hold different configurations: {configs}")
    args = argparse.Namespace(**configs[0])
    print(f"PermutedMNIST-{args.tasks} from {len(paths)} file(s): {args.steps} steps/task, {configs[0]}")
    report(results, args)


def plot(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    tasks = np.arange(1, args.tasks + 1)
    for key, runs in results.items():
        final = torch.stack([r["R"][-1] for r in runs]).mean(0).numpy() * 100
        during = torch.stack([r["R"].diagonal() for r in runs]).mean(0).numpy() * 100
        axes[0].plot(tasks, during, marker="o", label=LEARNERS[key][0])
        axes[1].plot(tasks, final, marker="o", label=LEARNERS[key][0])
    axes[0].set_title("during: accuracy right after training task j")
    axes[1].set_title(f"final: accuracy after all {args.tasks} tasks")
    for ax in axes:
        ax.set_xlabel("task j")
        ax.set_xticks(tasks)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"PermutedMNIST-{args.tasks}, {args.steps} steps/task, mean of {len(args.seeds)} seed(s) (2-core CPU)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot saved to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 tasks × 50 steps, 1 seed, 2,000 test images (< 2 min)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per task (the papers: 5,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval_size", type=int, default=None, help="test images per task (default: all 10,000)")
    parser.add_argument("--learners", nargs="+", default=["hyperlit", "hypnettorch", "ewc", "finetune"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr of every learner (the papers: 1e-4)")
    parser.add_argument("--beta", type=float, default=0.05, help="output-regularizer strength β")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="target MLP hidden sizes")
    parser.add_argument("--hnet_hidden", type=int, nargs="+", default=[100, 75, 50])
    parser.add_argument("--hnet_activation", choices=["relu", "elu"], default="relu", help="the paper's PM-10: elu")
    parser.add_argument("--chunk_size", type=int, default=2000)
    parser.add_argument("--chunk_emb", type=int, default=12)
    parser.add_argument("--temb", type=int, default=64)
    parser.add_argument("--plot", default=None, help="save a PNG of during/final accuracy per task")
    parser.add_argument("--matrices", action="store_true", help="print every accuracy matrix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default=None, help="write every run's results to this JSON file")
    parser.add_argument(
        "--ckpt_dir",
        default=None,
        help="checkpoint every learner after each task here and resume a killed run from it (same arguments)",
    )
    parser.add_argument(
        "--eval_timing",
        type=int,
        default=None,
        metavar="SEEN",
        help="only time one evaluation of SEEN tasks, hyperlit against the hypnettorch loop (no training)",
    )
    parser.add_argument(
        "--report", nargs="+", default=None, help="print one table from JSON files written by --save (no training)"
    )
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.seeds, args.eval_size = 3, 50, [0], 2000
    unknown = set(args.learners) - set(LEARNERS)
    if unknown:
        parser.error(f"unknown learners {sorted(unknown)}; choose from {list(LEARNERS)}")
    if args.report:
        report_saved(args.report)
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no per-fit "GPU available" banners
    warnings.filterwarnings("ignore", message=".*treespec.*")
    if args.eval_timing is not None:
        eval_timing(args, args.eval_timing)
        return
    print(
        f"PermutedMNIST-{args.tasks}: {args.steps} steps/task, batch {args.batch}, Adam lr {args.lr}, seeds "
        f"{args.seeds}; target MLP 1024-{'-'.join(map(str, args.hidden))}-({args.tasks}x10 heads); hypernets: "
        f"chunked {args.hnet_hidden}, task emb {args.temb}, chunk emb {args.chunk_emb}, chunk {args.chunk_size}, "
        f"beta {args.beta}; {args.eval_size or 'all 10,000'} test images per task"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, "
        f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
    )
    print(f"same start: max |hyperlit - hypnettorch| of generated-net outputs at init = {check_same_start(args):.1e}")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.learners}
    for seed in args.seeds:
        for key in args.learners:
            dm = make_datamodule(args, seed)
            r = LEARNERS[key][1](args, seed, dm)
            results[key].append(r)
            s = summarize(r["R"])
            inferred = f", final inferred {100 * r['final_inferred']:.2f}"
            print(
                f"seed {seed} {LEARNERS[key][0]:46} during {100 * s['during_mean']:.2f}, final "
                f"{100 * s['final_mean']:.2f}, BWT {100 * s['bwt']:+.2f}{inferred}; train {r['train_s']:.0f} s, "
                f"eval {r['eval_s']:.0f} s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if args.matrices:
                print(format_matrix(r["R"]))
    if args.save:
        save(results, args, args.save)
    means = report(results, args)
    if args.plot:
        plot(results, args, args.plot)
    fields = " ".join(
        f"{k}_{m}={v[m] if m == 'train_s' else 100 * v[m]:.2f}" for k, v in means.items() for m in ("final", "bwt")
    )
    times = " ".join(f"{k}_train_s={v['train_s']:.1f}" for k, v in means.items())
    print(f"RESULT tasks={args.tasks} steps={args.steps} seeds={len(args.seeds)} {fields} {times}")


if __name__ == "__main__":
    main()
