"""Prepared device check: every hyperlit module at its paper's size on CUDA, fp32 and bf16-mixed, and a CPU match.

For each module of :data:`CHECKS` the model is built from its example YAML (the ``model:`` section, parsed by
jsonargparse exactly as ``hyperlit fit --config`` parses it, with the few overrides listed in the entry) and trained
by a ``lightning.Trainer(accelerator="gpu", devices=1)`` for ``--steps`` training batches in each precision
(``32-true`` and ``bf16-mixed``). No data set is read: the device machine has none, so every batch is synthetic
tensors of the real shapes, batch sizes and dtypes (from the YAML's ``data:`` section: CIFAR-10 images, PTB
windows, MNIST / Multi-MNIST images, PermutedMNIST task batches). The losses are therefore not those of real
training; throughput and memory are.

Correctness (first, so a lease that ends early still has it): a short fp32 run of ``--check-steps`` batches on
CUDA (TF32 off: ``torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False``) against the
same run on the CPU; the training loss logged at each batch must agree within ``|a - b| <= atol + rtol·|b|``
(defaults ``rtol = 1e-3``, ``atol = 1e-5``). Both runs draw the same random numbers: for the check only, the
module's generator is a CPU generator and every draw from it is made on the CPU and moved to the device (CUDA's
Philox and the CPU's Mersenne Twister give different streams from one seed, so dropout masks and perturbations
would differ otherwise). What remains is arithmetic: fp32 sums in another order (cuBLAS/cuDNN against the CPU
kernels) and atomics in backward passes, relative errors of a few machine epsilons
(``torch.finfo(torch.float32).eps``) times the square root of the reduction length per operation, amplified by a
few optimizer steps. ``rtol = 1e-3`` is orders of magnitude above that, while a wrong weight, mask, device
placement or dtype changes a loss at its leading digits. Prints ``PASS``/``FAIL`` per module.

Then the timed runs. Printed per module and precision: training batches per second (``steps/s``; a batch is one
φ-step plus the interleaved λ-steps of the tuning modules), examples per second of the training stream (tokens
per second for the language model), the peak of ``torch.cuda.max_memory_allocated`` (reset before each run) and
the last logged training loss. The first ``--warmup`` batches of a run (cuDNN autotuning, allocator growth) are
not timed; a run stops early after ``--max-seconds`` and the runs share ``--budget`` seconds (a run left without
time is printed as ``SKIPPED``), so the whole check fits a short device lease. A run that raises is printed as
``ERROR`` with its message and the others go on. The last line is ``RESULT gpu_check: PASS`` or ``FAIL`` (a
failed comparison or any error); the exit status is 1 on ``FAIL``.

Usage::

    python examples/benchmarks/gpu_check.py --json gpu_check.json   # every module, on the GPU
    python examples/benchmarks/gpu_check.py --modules stn_cifar10,stn_ptb --steps 100
    python examples/benchmarks/gpu_check.py --device cpu --steps 3 --modules br_perweight   # test the script

Without CUDA (and without ``--device cpu``) it prints one line saying so and exits 0. With ``--device cpu`` the
"device" runs are CPU runs too (the comparison is then CPU against CPU).

Adding a module is one :class:`Check` entry in :data:`CHECKS`: its YAML, its overrides and the maker of one
synthetic training batch (:func:`image_batches`, :class:`LMWindows`, :func:`task_batches` or your own).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hyperlit.base import HyperlitModule
from hyperlit.cli import import_all
from hyperlit.streams import uses_hyper_stream

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PRECISIONS = ("32-true", "bf16-mixed")
NO_CUDA = "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check, exiting 0"

#: (data ``init_args`` of the YAML, the built model, batch index, CPU generator) → one batch of a stream
BatchMaker = Callable[[dict[str, Any], HyperlitModule, int, torch.Generator], Any]


# -- synthetic batches of the real shapes --------------------------------------------------------------------------
def _images(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """uint8-valued images scaled to [0, 1], as the DataModules serve them."""
    return torch.randint(0, 256, shape, generator=gen).float().div_(255.0)


def image_batches(
    image_shape: tuple[int, ...], num_classes: int, labels: int = 1, batch_key: str = "batch_size"
) -> BatchMaker:
    """``(x, y)`` batches: images ``(B, *image_shape)`` and labels ``(B,)`` (``(B, labels)`` when ``labels > 1``),
    ``B`` from the YAML's ``data.init_args[batch_key]``."""

    def make(data: dict[str, Any], model: HyperlitModule, i: int, gen: torch.Generator) -> Any:
        b = int(data.get(batch_key) or data["batch_size"])
        y_shape = (b,) if labels == 1 else (b, labels)
        return _images((b, *image_shape), gen), torch.randint(0, num_classes, y_shape, generator=gen)

    return make


class LMWindows:
    """BPTT windows ``(inputs, targets, index)`` of ``(bptt, B)`` token ids, as :class:`datamodules.PTBDataModule`
    serves them; with ``repeat_hyper`` each window index is served ``T_train / T_val`` times in a row (its
    ``hyper_repeat``), so the hidden state is carried between λ-steps as in a real run."""

    def __init__(self, batch_key: str = "batch_size", repeat_hyper: bool = False) -> None:
        self.batch_key, self.repeat_hyper = batch_key, repeat_hyper

    def __call__(self, data: dict[str, Any], model: HyperlitModule, i: int, gen: torch.Generator) -> Any:
        b, bptt = int(data.get(self.batch_key) or data["batch_size"]), int(data.get("bptt", 70))
        stream = torch.randint(0, int(model.net.vocab_size), (bptt + 1, b), generator=gen)  # type: ignore[union-attr]
        return stream[:-1], stream[1:], self.index(model, i)

    def index(self, model: HyperlitModule, i: int) -> Tensor:
        """The window's position in its stream (consecutive indices carry the hidden state)."""
        if self.repeat_hyper and int(model.train_steps):  # type: ignore[arg-type]
            i //= max(1, math.ceil(int(model.train_steps) / int(model.hyper_steps)))  # type: ignore[arg-type]
        return torch.tensor(i)


def task_batches(input_dim: int, num_classes: int) -> BatchMaker:
    """Continual batches ``{"x": (B, input_dim), "y": (B,), "task": 0}`` (the first task of the sequence)."""

    def make(data: dict[str, Any], model: HyperlitModule, i: int, gen: torch.Generator) -> Any:
        b = int(data["batch_size"])
        x = _images((b, input_dim), gen)
        return {"x": x, "y": torch.randint(0, num_classes, (b,), generator=gen), "task": 0}

    return make


# -- the registry --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One module of the check.

    Args:
        name: Key for ``--modules``.
        config: Example YAML under ``examples/`` whose ``model:`` section builds the module.
        train: Maker of one training batch (see :data:`BatchMaker`).
        hyper: Maker of one hyper-stream batch (modules with ``uses_hyper_stream``); ``None`` otherwise.
        overrides: ``model.init_args`` values replacing the YAML's (e.g. no warm-up, so λ-steps are timed).
        check_overrides: Further ``model.init_args`` values for the short CPU/CUDA comparison only (e.g. a hyper
            step every 2 batches, so that the first few batches include one).
        unit: What the throughput counts: ``examples`` or ``tokens``.
        count: Examples (tokens) of one training batch; default: the leading size of its first tensor.
        datamodule: Attributes of the synthetic DataModule (the task protocol of continual modules).
        steps: Default number of timed training batches (``--steps`` overrides it).
    """

    name: str
    config: str
    train: BatchMaker
    hyper: BatchMaker | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    check_overrides: dict[str, Any] = field(default_factory=dict)
    unit: str = "examples"
    count: Callable[[Any], int] | None = None
    datamodule: dict[str, Any] = field(default_factory=dict)
    steps: int = 300


def _tokens(batch: Any) -> int:
    return int(batch[1].numel())


_NO_WARMUP = {"warmup_epochs": 0, "warmup_steps": 0}  # λ-steps from the first batches: they are part of what is timed
_PM10 = {"num_tasks": 10, "num_schedule_epochs": 10, "task_type": "classification", "classes_per_task": 10}
# the ensembles' CPU/CUDA comparison on WRN-28-2 (the YAMLs' l2_hparams name the 28-layer paths; width 2 keeps the
# 1×1 shortcut of group 0): WRN-28-10's 512 tiled rows would take minutes per batch on the CPU
_WRN28_2 = {"class_path": "hyperlit.models.wide_resnet.WideResNet", "init_args": {"depth": 28, "width": 2}}

CHECKS: list[Check] = [
    Check(
        "stn_cifar10",
        "stn_cifar10.yaml",
        image_batches((3, 32, 32), 10),
        image_batches((3, 32, 32), 10, batch_key="hyper_batch_size"),
        overrides=_NO_WARMUP,
    ),
    Check(
        "stn_ptb",
        "stn_ptb.yaml",
        LMWindows(),
        LMWindows("hyper_batch_size", repeat_hyper=True),
        overrides={**_NO_WARMUP, "plot_schedule": False},
        unit="tokens",
        count=_tokens,
        steps=150,
    ),
    Check(
        "br_perweight",
        "br_mnist_perweight.yaml",
        image_batches((784,), 10),
        image_batches((784,), 10),
        check_overrides={"train_steps": 2},  # a λ-step after batch 2 (the YAML's: after batch 10)
    ),
    Check("phn_ls", "phn_multi_mnist.yaml", image_batches((1, 36, 36), 10, labels=2), overrides={"solver": "ls"}),
    Check("phn_epo", "phn_multi_mnist.yaml", image_batches((1, 36, 36), 10, labels=2), overrides={"solver": "epo"}),
    Check("cosmos", "cosmos_multi_mnist.yaml", image_batches((1, 36, 36), 10, labels=2)),
    Check(
        "cl_pm10",
        "cl_permuted_mnist.yaml",
        task_batches(1024, 10),
        datamodule={**_PM10, "input_dim": 1024},
    ),
    Check(
        "dstn_cifar10",
        "delta_stn_cifar10.yaml",
        image_batches((3, 32, 32), 10),
        image_batches((3, 32, 32), 10, batch_key="hyper_batch_size"),
        overrides=_NO_WARMUP,
    ),
    Check(
        "implicit_perweight",
        "implicit_mnist_perweight.yaml",
        image_batches((784,), 10),
        image_batches((784,), 10),
        overrides={"warmup_steps": 0},
        check_overrides={"hyper_every": 2},  # a hyper step inside the compared batches (the YAML's: every 10)
    ),
    Check(
        "unrolled_perweight",
        "unrolled_mnist_perweight.yaml",
        image_batches((784,), 10),
        image_batches((784,), 10),
        overrides={"warmup_steps": 0},
        check_overrides={"hyper_every": 2},
    ),
    Check(
        "batch_ensemble_wrn",
        "batch_ensemble_cifar10_wrn28_10.yaml",
        image_batches((3, 32, 32), 10),
        check_overrides={"model": _WRN28_2},
        steps=100,
    ),
    Check(
        "hbe_wrn",
        "hbe_cifar10_wrn28_10.yaml",
        image_batches((3, 32, 32), 10),
        image_batches((3, 32, 32), 10, batch_key="hyper_batch_size"),
        # the penalty's divisor: UB's 47,500 training images (the synthetic loader's length counts batches)
        overrides={**_NO_WARMUP, "train_size": 47500},
        check_overrides={"net": _WRN28_2},  # its λ-step after batch 3 lies inside the 5 compared batches
        steps=100,
    ),
]


# -- building ------------------------------------------------------------------------------------------------------
@functools.cache
def _parser() -> LightningArgumentParser:
    import_all()
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(HyperlitModule, "model", subclass_mode=True, required=True)
    return parser


def load_config(check: Check, comparison: bool = False) -> dict[str, Any]:
    """The check's example YAML with its overrides (and, for the comparison, its ``check_overrides``) applied to
    ``model.init_args``."""
    config = yaml.safe_load((EXAMPLES / check.config).read_text())
    init_args = config["model"].setdefault("init_args", {})
    init_args.update(check.overrides)
    if comparison:
        init_args.update(check.check_overrides)
    return config


def build_model(config: dict[str, Any]) -> HyperlitModule:
    """The ``model:`` section through jsonargparse, as ``hyperlit fit --config`` builds it (after the YAML's
    ``seed_everything``, so every build starts from the same weights)."""
    pl.seed_everything(int(config.get("seed_everything", 0)), verbose=False)
    parser = _parser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        namespace = parser.parse_object({"model": config["model"]})
        built = (
            parser.instantiate(namespace) if hasattr(parser, "instantiate") else parser.instantiate_classes(namespace)
        )
    return built.model


class _Batches(Dataset[Any]):
    """``length`` batches cycling over a pool of pre-made ones (so making data costs nothing in the timed loop)."""

    def __init__(self, make: BatchMaker, data: dict[str, Any], model: HyperlitModule, length: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pool = [make(data, model, i, gen) for i in range(min(length, 4))]
        self.make, self.data, self.model, self.length = make, data, model, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        batch = self.pool[i % len(self.pool)]
        if isinstance(self.make, LMWindows):  # the pool's tokens, the position of window i
            return batch[0], batch[1], self.make.index(self.model, i)
        return batch


class SyntheticDataModule(pl.LightningDataModule):
    """Training batches of the real shapes (a ``{"train", "hyper"}`` pair for hyper-stream modules); no
    validation. The check's ``datamodule`` entries become attributes (``num_tasks`` etc. of the continual task
    protocol)."""

    def __init__(self, check: Check, data: dict[str, Any], model: HyperlitModule, steps: int) -> None:
        super().__init__()
        self.streams = {"train": _Batches(check.train, data, model, steps, seed=1)}
        if uses_hyper_stream(model):
            if check.hyper is None:
                raise ValueError(f"{check.name}: {type(model).__name__} uses a hyper stream; give the Check a `hyper`")
            self.streams["hyper"] = _Batches(check.hyper, data, model, steps, seed=2)
        for key, value in check.datamodule.items():
            setattr(self, key, value)

    def train_dataloader(self) -> Any:
        loaders = {k: DataLoader(v, batch_size=None, shuffle=False) for k, v in self.streams.items()}
        return loaders if "hyper" in loaders else loaders["train"]


# -- running -------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe(Callback):
    """Times the batches after ``warmup``, records the logged training loss, stops after ``max_seconds``."""

    def __init__(self, device: torch.device, warmup: int, max_seconds: float, every_step: bool) -> None:
        self.device, self.warmup, self.max_seconds, self.every_step = device, warmup, max_seconds, every_step
        self.losses: list[float] = []
        self.batches = 0
        self.timed = 0
        self.start: float | None = None
        self.elapsed = 0.0
        self.began = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if self.start is not None:
            self.timed += 1
        if self.every_step or pl_module.should_log_step():  # the batches on which the modules log their loss
            metrics = trainer.callback_metrics
            value = metrics.get("train/loss_step", metrics.get("train/loss"))
            if value is not None:
                self.losses.append(float(value))
        if time.perf_counter() - self.began > self.max_seconds:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # callbacks' epoch-end hooks run before the module's (schedules, histograms): only the batches are timed
        _sync(self.device)
        if self.start is not None:
            self.elapsed = time.perf_counter() - self.start


def fit(
    check: Check,
    device: torch.device,
    precision: str,
    steps: int,
    warmup: int = 0,
    max_seconds: float = math.inf,
    every_step: bool = False,
) -> dict[str, Any]:
    """Train ``check``'s module for ``steps`` synthetic batches on ``device``; throughput, memory and losses
    (``every_step``: the loss of every batch, for the comparison)."""
    config = load_config(check, comparison=every_step)
    model = build_model(config)
    dm = SyntheticDataModule(check, config.get("data", {}).get("init_args", {}), model, steps)
    probe = Probe(device, warmup, max_seconds, every_step)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1 if every_step else min(50, steps),  # the last batch logs: the final loss
        callbacks=[probe],
    )
    if device.type == "cuda":
        gc.collect()  # the previous run's model and optimizer states
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, logging intervals and the like
        trainer.fit(model, datamodule=dm)
    batch = dm.streams["train"][0]
    per_batch = check.count(batch) if check.count else int(next(_tensors(batch)).shape[0])
    rate = probe.timed / probe.elapsed if probe.elapsed > 0 else float("nan")
    return {
        "module": check.name,
        "class": type(model).__name__,
        "config": f"examples/{check.config}",
        "precision": precision,
        "device": str(device),
        "steps": probe.batches,
        "timed_steps": probe.timed,
        "seconds": probe.elapsed,
        "steps_per_s": rate,
        "unit": check.unit,
        f"{check.unit}_per_s": rate * per_batch,
        "per_step": per_batch,
        "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "final_loss": probe.losses[-1] if probe.losses else None,  # at the last logged batch
        "losses": probe.losses,
    }


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


# -- the same random numbers on every device (the correctness check only) ------------------------------------------
_DRAWS = ("rand", "randn", "randint", "randperm")


def _draw_on_cpu(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(fn)
    def draw(*args: Any, generator: torch.Generator | None = None, device: Any = None, **kwargs: Any) -> Tensor:
        target = torch.device(device) if device is not None else None
        if generator is not None and generator.device.type == "cpu" and target is not None and target.type != "cpu":
            return fn(*args, generator=generator, **kwargs).to(target)
        return fn(*args, generator=generator, device=device, **kwargs)

    return draw


def _cpu_rng(self: HyperlitModule) -> torch.Generator:
    if self._rng is None or self._rng.device.type != "cpu":
        self._rng = torch.Generator().manual_seed(self.generator_seed())
    return self._rng


@contextlib.contextmanager
def same_draws_on_every_device() -> Iterator[None]:
    """The module's generator is a CPU generator and draws from CPU generators are made on the CPU and moved."""
    saved = {name: getattr(torch, name) for name in _DRAWS}
    rng = HyperlitModule.rng
    try:
        for name in _DRAWS:
            setattr(torch, name, _draw_on_cpu(saved[name]))
        HyperlitModule.rng = property(_cpu_rng)  # type: ignore[assignment,method-assign]
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        HyperlitModule.rng = rng  # type: ignore[method-assign]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 (no TF32) for the CPU/CUDA comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compare(reference: list[float], other: list[float], rtol: float, atol: float) -> tuple[bool, float]:
    """Whether the two loss sequences agree elementwise (and have the same length); the largest ``|a-b|/|b|``."""
    if not reference or len(reference) != len(other):
        return False, float("nan")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(other, reference))
    ok = all(math.isfinite(a) and abs(a - b) <= atol + rtol * abs(b) for a, b in zip(other, reference))
    return ok, worst


def _progress(t_start: float, message: str) -> None:
    """A progress line on stderr (the results go to stdout)."""
    print(f"[gpu_check {time.perf_counter() - t_start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _error(err: BaseException) -> str:
    """``Type: message`` on one line (the first line of the message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# -- the command line ----------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [c.name for c in CHECKS]
    parser.add_argument("--modules", default=",".join(names), help=f"comma-separated subset of {names}")
    parser.add_argument("--steps", type=int, default=None, help="training batches per run (default: per module)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first batches (default: min(20, steps/5))")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="stop a timed run after this long")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check (runs shorten)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated Lightning precisions")
    parser.add_argument("--check-steps", type=int, default=5, help="batches of the CPU/CUDA loss comparison (0: skip)")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu (self-test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="3 timed batches and a 3-batch check per module")
    parser.add_argument("--json", type=Path, default=None, help="write every result to this file")
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's banners and the modules' info lines
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.device is None and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    unknown = sorted(set(args.modules.split(",")) - set(names))
    if unknown:
        parser.error(f"unknown --modules {unknown}; known: {names}")
    checks = [c for c in CHECKS if c.name in args.modules.split(",")]
    precisions = args.precisions.split(",")
    if args.quick:
        args.steps = args.steps or 3
        args.check_steps = min(args.check_steps, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"gpu_check: device {where}; torch {torch.__version__}, lightning {pl.__version__}; "
        f"modules {[c.name for c in checks]}; precisions {precisions}; synthetic batches of the real shapes "
        "(no data sets are read)",
        flush=True,
    )
    t_start = time.perf_counter()
    errors: list[dict[str, Any]] = []
    checks_out: list[dict[str, Any]] = []
    if args.check_steps > 0:
        print(
            f"correctness: first {args.check_steps} training losses, fp32 on {device} (TF32 off) against the CPU, "
            f"|a-b| <= {args.atol:g} + {args.rtol:g}·|b|",
            flush=True,
        )
        with same_draws_on_every_device(), no_tf32():
            for check in checks:
                try:
                    _progress(t_start, f"comparison {check.name}: {args.check_steps} batches on cpu, then on {device}")
                    cpu = fit(check, torch.device("cpu"), "32-true", args.check_steps, every_step=True)["losses"]
                    dev = fit(check, device, "32-true", args.check_steps, every_step=True)["losses"]
                except Exception as err:
                    errors.append({"module": check.name, "precision": "check", "error": _error(err)})
                    checks_out.append({"module": check.name, "pass": False, "error": _error(err)})
                    print(f"  FAIL {check.name:<20} ERROR {_error(err)}", flush=True)
                    continue
                ok, worst = compare(cpu, dev, args.rtol, args.atol)
                checks_out.append(
                    {"module": check.name, "cpu_losses": cpu, "device_losses": dev, "max_rel_diff": worst, "pass": ok}
                )
                shown = ", ".join(f"{a:.6g}/{b:.6g}" for a, b in zip(dev, cpu))
                print(
                    f"  {'PASS' if ok else 'FAIL'} {check.name:<20} max rel diff {_fmt(worst, '.2e')}  "
                    f"(device/cpu: {shown})",
                    flush=True,
                )
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    runs_left = len(checks) * len(precisions)
    print(
        f"throughput: training batches (steps) per second after the untimed warm-up batches; examples/s counts the "
        f"training stream's examples (tokens/s: its tokens); each run stops after {args.max_seconds:g} s, all of "
        f"them together by {args.budget:g} s after the start",
        flush=True,
    )
    print(
        f"{'module':<20}{'precision':<12}{'steps':>6}{'steps/s':>10}{'examples/s':>14}{'tokens/s':>12}"
        f"{'peak MiB':>11}{'final loss':>12}",
        flush=True,
    )
    for check in checks:
        steps = args.steps or check.steps
        warmup = args.warmup if args.warmup is not None else min(20, steps // 5)
        for precision in precisions:
            left = args.budget - (time.perf_counter() - t_start)
            limit = min(args.max_seconds, left / max(runs_left, 1))
            runs_left -= 1
            if limit < 2.0:
                skipped.append({"module": check.name, "precision": precision})
                print(f"{check.name:<20}{precision:<12}SKIPPED (--budget {args.budget:g} s spent)", flush=True)
                continue
            try:
                _progress(t_start, f"{check.name} {precision}: {warmup} + {steps} batches, at most {limit:.0f} s")
                res = fit(check, device, precision, steps + warmup, warmup, limit)
            except Exception as err:  # one broken module must not cost the other modules' device time
                errors.append({"module": check.name, "precision": precision, "error": _error(err)})
                print(f"{check.name:<20}{precision:<12}ERROR {_error(err)}", flush=True)
                continue
            results.append(res)
            per_s = res[f"{check.unit}_per_s"]
            print(
                f"{check.name:<20}{precision:<12}{res['timed_steps']:>6}{_fmt(res['steps_per_s'], '.2f'):>10}"
                f"{_fmt(per_s if check.unit == 'examples' else None, ',.0f'):>14}"
                f"{_fmt(per_s if check.unit == 'tokens' else None, ',.0f'):>12}"
                f"{_fmt(res['peak_mem_mib'], ',.0f'):>11}{_fmt(res['final_loss'], '.4f'):>12}",
                flush=True,
            )

    passed = not errors and all(c["pass"] for c in checks_out)
    total = time.perf_counter() - t_start
    if args.json is not None:
        payload = {
            "device": where,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "synthetic_data": True,
            "rtol": args.rtol,
            "atol": args.atol,
            "results": results,
            "checks": checks_out,
            "errors": errors,
            "skipped": skipped,
            "passed": passed,
            "seconds": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=True))
    verdict = "PASS" if passed else "FAIL"
    print(
        f"RESULT gpu_check: {verdict} ({len(results)} timed runs, {len(checks_out)} CPU comparisons, "
        f"{len(errors)} errors, {len(skipped)} skipped, {total:.0f} s)",
        flush=True,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
