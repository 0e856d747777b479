"""The base of every hyperlit LightningModule (the shape of TorchGeo's ``BaseTask``).

:class:`HyperlitModule` owns what the method families share, so each family module keeps only its own math and
phases:

* **manual optimization** (``automatic_optimization = False``) and optimizers built from injected factories
  (:meth:`HyperlitModule.build_optimizer`, fused kernels where PyTorch has them), with their learning-rate
  schedules stepped once per epoch (:meth:`HyperlitModule.on_train_epoch_end`);
* **checkpoint identity**: every checkpoint records the module's class and
  :meth:`~HyperlitModule.checkpoint_identity`; resuming from another module's or another configuration's
  checkpoint, or from one of another architecture, raises :class:`~hyperlit.checkpoint.CheckpointMismatchError`
  naming what differs, before any tensor is copied;
* **checkpointed generators**: :attr:`~HyperlitModule.rng` (on the module's device, seeded by
  :meth:`~HyperlitModule.generator_seed`, per rank if a family says so) and any named CPU generators from
  :meth:`~HyperlitModule.register_generator`, restored exactly on resume;
* **one logging throttle** (:meth:`~HyperlitModule.should_log_step`: the steps on which Lightning's logger
  writes) and rank-zero messages (:meth:`~HyperlitModule.info`, never ``print``);
* **metrics**: :meth:`~HyperlitModule.configure_metrics` returns a ``torchmetrics`` collection that the base
  clones per stage (``train/``, ``val/``, ``test/`` prefixes) in :meth:`~HyperlitModule.configure_model`;
  torchmetrics reduces their states over DDP ranks, so every rank logs the value of the whole split.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from typing_extensions import override

from hyperlit.checkpoint import CheckpointMismatchError, check_state_dict
from hyperlit.optim import OptimizerFactory, SchedulerFactory, build_optimizer, build_scheduler, step_scheduler

__all__ = ["CHECKPOINT_KEY", "HyperlitModule"]

#: the key of hyperlit's own entry in a Lightning checkpoint
CHECKPOINT_KEY = "hyperlit"

_STAGES = ("train", "val", "test")


class _InitDefault:
    """A picklable reference to the default value of argument ``name`` of ``owner.__init__`` (a lambda factory)."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner, self.name = owner, name

    def resolve(self) -> Any:
        return inspect.signature(self.owner.__init__).parameters[self.name].default


def _init_defaults(cls: type) -> dict[int, _InitDefault]:
    """``id(default) -> reference`` for every callable ``__init__`` default in ``cls``'s MRO."""
    out: dict[int, _InitDefault] = {}
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None or owner is object:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            continue
        for name, param in params.items():
            if callable(param.default) and getattr(param.default, "__name__", "") == "<lambda>":
                out.setdefault(id(param.default), _InitDefault(owner, name))
    return out


def _survives_weights_only_load(value: Any) -> bool:
    """Whether ``value`` can go into a checkpoint that ``torch.load(weights_only=True)`` reads back."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


class HyperlitModule(pl.LightningModule):
    """Base LightningModule of hyperlit: manual optimization, checkpoint identity, generators, metrics, logging.

    Template hooks for subclasses (all optional):

    * :meth:`configure_metrics` — the metric collection cloned per stage;
    * :meth:`checkpoint_identity` — values that must match for a checkpoint to be resumed;
    * :meth:`checkpoint_state` / :meth:`restore_checkpoint_state` — Python state (lists, histories) to checkpoint;
    * :meth:`prepare_state_dict` — make the module ready for a checkpoint's ``state_dict`` (grow buffers, build
      lazily created layers) before its shapes are checked;
    * :meth:`generator_seed` — the seed of :attr:`rng`.

    Args:
        seed: Seed of the module's generator :attr:`rng` (every random draw of the method).
    """

    #: state-dict entries that ``--init_from`` (:func:`hyperlit.checkpoint.load_weights`) never copies: counters
    init_from_skip: tuple[str, ...] = ()
    #: the logged value that ``ReduceLROnPlateau`` schedules follow
    scheduler_monitor: str = "val/loss"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.seed = int(seed)
        self._rng: torch.Generator | None = None
        self._rng_state: Tensor | None = None
        self._generators: dict[str, torch.Generator] = {}
        self.train_metrics: MetricCollection | None = None
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None

    # -- template hooks ----------------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection | None:
        """The metrics of one stage (unprefixed names); cloned as ``train/…``, ``val/…``, ``test/…``."""
        return None

    def checkpoint_identity(self) -> dict[str, Any]:
        """Values (plain Python) a resumed checkpoint must share with this module, besides its class."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """Python state saved in the checkpoint (tensors in persistent buffers need nothing here)."""
        return {}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""

    def prepare_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the checkpoint's ``state_dict`` is checked and loaded: grow buffers, build lazy layers."""

    def generator_seed(self) -> int:
        """Seed of a fresh :attr:`rng` (default ``seed``; families override for per-rank streams)."""
        return self.seed

    # -- generators ----------------------------------------------------------------------------------------
    @property
    def rng(self) -> torch.Generator:
        """The module's generator on its device; its state is saved in checkpoints."""
        device = self.device
        if self._rng is None or self._rng.device != device:
            gen = torch.Generator(device=device)
            if self._rng_state is not None:
                gen.set_state(self._rng_state)
                self._rng_state = None
            else:
                gen.manual_seed(self.generator_seed())
            self._rng = gen
        return self._rng

    def register_generator(self, name: str, seed: int) -> torch.Generator:
        """A named CPU generator (e.g. one drawn identically on every rank), saved and restored with checkpoints."""
        gen = torch.Generator().manual_seed(int(seed))
        self._generators[name] = gen
        return gen

    def generator(self, name: str) -> torch.Generator:
        """The named generator registered with :meth:`register_generator`."""
        return self._generators[name]

    def __getstate__(self) -> dict[str, Any]:
        """Generators travel as their state bytes: ``ddp_spawn``'s shared-memory pickler cannot rebuild them.

        Attributes that are the (unpicklable) lambda defaults of an ``__init__`` argument, e.g. a default optimizer
        factory, travel as a reference to that default and are looked up again on the other side.
        """
        state = self.__dict__.copy()
        state["_generators"] = {k: bytes(g.get_state().numpy()) for k, g in self._generators.items()}
        if self._rng is not None:
            state["_rng_state"] = self._rng.get_state().cpu()
        state["_rng"] = None
        defaults = _init_defaults(type(self))
        for key, value in state.items():
            if callable(value) and id(value) in defaults:
                state[key] = defaults[id(value)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v.resolve() if isinstance(v, _InitDefault) else v for k, v in state.items()}
        gens = {}
        for name, raw in state.get("_generators", {}).items():
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            gens[name] = gen
        super().__setstate__({**state, "_generators": gens})

    # -- hyperparameters -----------------------------------------------------------------------------------
    @override
    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's ``save_hyperparameters``, minus values a weights-only checkpoint load cannot read back.

        Optimizer factories given in Python (``lambda p: torch.optim.SGD(p, ...)``, ``functools.partial``, the
        defaults) are not saved:
        give them again to ``load_from_checkpoint``. Under ``hyperlit``'s CLI they are saved as their config.
        """
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        for store in (self._hparams, getattr(self, "_hparams_initial", None)):
            if store is None:
                continue
            for key in list(store.keys()):
                if not _survives_weights_only_load(store[key]):  # lambdas, partials, local functions, handles
                    del store[key]

    # -- optimizers ------------------------------------------------------------------------------------------
    def build_optimizer(
        self, factory: OptimizerFactory, params: Iterable[nn.Parameter] | list[dict[str, Any]], name: str
    ) -> torch.optim.Optimizer:
        """``factory(params)`` with fused kernels when possible (not under mixed precision: Lightning's
        ``MixedPrecision`` plugin refuses to clip the gradients of a fused optimizer, fp16 or bf16)."""
        fuse = True
        if self._trainer is not None:
            precision = str(self.trainer.precision)
            fuse = not (precision.startswith("16") or precision.endswith("-mixed"))
        return build_optimizer(factory, params, name, fuse=fuse)

    def build_scheduler(self, factory: SchedulerFactory | None, optimizer: torch.optim.Optimizer, name: str) -> Any:
        """``factory(optimizer)`` (``None``: no schedule)."""
        return build_scheduler(factory, optimizer, name)

    @staticmethod
    def optimizers_config(optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> Any:
        """What ``configure_optimizers`` returns for a fixed list of optimizers and their (optional) schedules."""
        schedulers = [s for s in schedulers if s is not None]
        return (optimizers, schedulers) if schedulers else optimizers

    @override
    def on_train_epoch_end(self) -> None:
        """Step every learning-rate schedule once per epoch (manual optimization does not step them)."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        metrics = dict(self.trainer.callback_metrics) if self._trainer is not None else {}
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            step_scheduler(sched, metrics, self.scheduler_monitor)

    def optimizer_list(self) -> list[Any]:
        """``self.optimizers()`` as a list (Lightning returns a bare optimizer when there is one)."""
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    # -- metrics -----------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Clone :meth:`configure_metrics` per stage (idempotent; Lightning calls this before moving to device)."""
        self.build_metrics()

    def build_metrics(self) -> None:
        """Create ``train_metrics``/``val_metrics``/``test_metrics`` once (also usable without a Trainer)."""
        if self.val_metrics is not None:
            return
        template = self.configure_metrics()
        if template is None:
            return
        for stage in _STAGES:
            setattr(self, f"{stage}_metrics", template.clone(prefix=f"{stage}/").to(self.device))

    def stage_metrics(self, stage: str) -> MetricCollection:
        """The metric collection of ``stage`` (``train``, ``val`` or ``test``)."""
        self.build_metrics()
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is None:
            raise RuntimeError(f"{type(self).__name__} has no {stage} metrics (configure_metrics returned None)")
        return metrics

    def _reset_stage_metrics(self, stage: str) -> None:
        # ``trainer.validate``/``test`` run (and reset metrics) under inference mode, which leaves inference tensors
        # that the no-grad validation inside a later ``fit`` cannot update in place: reset in the loop's own mode
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is not None:
            metrics.reset()

    @override
    def on_validation_epoch_start(self) -> None:
        """Reset the validation metrics (a subclass overriding this hook must call super)."""
        self._reset_stage_metrics("val")

    @override
    def on_test_epoch_start(self) -> None:
        """Reset the test metrics (a subclass overriding this hook must call super)."""
        self._reset_stage_metrics("test")

    # -- logging -----------------------------------------------------------------------------------------------
    def should_log_step(self) -> bool:
        """Whether Lightning's logger writes on this training batch (every ``log_every_n_steps`` batches).

        Each ``self.log`` call costs about a millisecond on CPU, so per-step values are only computed and logged
        on the batches where they are written.
        """
        if self._trainer is None:
            return False
        every = self.trainer.log_every_n_steps
        if every <= 0:
            return False
        return (self.trainer.fit_loop.total_batch_idx + 1) % every == 0 or self.trainer.should_stop

    def info(self, message: str) -> None:
        """A message shown once (rank zero) through Lightning's logger."""
        rank_zero_info(message)

    # -- non-finite steps ---------------------------------------------------------------------------------------
    @staticmethod
    def check_nan_policy(policy: str) -> str:
        """``policy`` if it is ``raise`` or ``skip``, else a ``ValueError`` (call in ``__init__``)."""
        if policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {policy!r}")
        return policy

    def skip_or_raise(self, message: str) -> None:
        """A non-finite step (every rank agreed, see :meth:`all_ranks`): ``FloatingPointError`` under
        ``nan_policy='raise'``; under ``'skip'`` a warning, ``skipped_steps += 1`` and ``train/skipped_steps`` logged.

        The family owns ``nan_policy`` and its ``skipped_steps`` counter (a buffer or an int it checkpoints).
        """
        if self.nan_policy == "raise":  # type: ignore[attr-defined]
            raise FloatingPointError(message + "; pass nan_policy='skip' to skip such steps")
        rank_zero_warn(message + " — step skipped (nan_policy='skip')")
        self.skipped_steps += 1  # type: ignore[attr-defined]
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)  # type: ignore[attr-defined]

    # -- distributed helpers ------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """Whether more than one process trains (and tensors outside DDP's reducer need reducing by hand)."""
        return self._trainer is not None and self.trainer.world_size > 1

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over ranks of a tensor that bypasses DDP's reducer (a copy; the input is untouched)."""
        if not self.distributed:
            return tensor
        return self.trainer.strategy.reduce(tensor.detach().clone(), reduce_op="mean")

    def all_ranks(self, flag: bool | Tensor) -> bool:
        """``flag`` and-ed over ranks: every rank takes (or skips) a collective step together."""
        value = torch.as_tensor(flag, dtype=torch.float32, device=self.device)
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "module": type(self).__qualname__,
            "identity": self.checkpoint_identity(),
            "rng_state": self.rng.get_state(),
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "state": self.checkpoint_state(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = type(self).__qualname__
        state = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(state, dict) or "module" not in state:
            raise CheckpointMismatchError(
                f"this checkpoint was not written by a hyperlit module; {own} cannot resume it"
            )
        if state["module"] != own:
            raise CheckpointMismatchError(
                f"this checkpoint was written by {state['module']}, not {own}; resume it with its own module "
                "(or start a new run from its weights with --init_from)"
            )
        ours, theirs = self.checkpoint_identity(), state.get("identity", {})
        differ = [f"{k}: checkpoint {theirs.get(k)!r} vs model {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise CheckpointMismatchError(
                f"this checkpoint belongs to another {own} configuration:\n  " + "\n  ".join(differ)
            )
        self.prepare_state_dict(checkpoint)
        if "state_dict" in checkpoint:  # another architecture: one clear error instead of load_state_dict's
            check_state_dict(self, checkpoint["state_dict"], strict=self.strict_loading)
        if state.get("rng_state") is not None:
            self._rng_state = state["rng_state"]
            self._rng = None
        for name, gen_state in state.get("generators", {}).items():
            if name in self._generators:
                self._generators[name].set_state(gen_state)
        self.restore_checkpoint_state(state.get("state", {}))
