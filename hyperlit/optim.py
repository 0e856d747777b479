"""Optimizers and learning-rate schedules injected the LightningCLI way.

Every hyperlit module takes one :data:`~lightning.pytorch.cli.OptimizerCallable` per parameter group its method has
(φ, λ, σ for the tuning modules; the hypernetwork and the task embeddings for continual learning; the
hypernetwork for Pareto HyperNetworks) and, where a schedule makes sense, an
:data:`~lightning.pytorch.cli.LRSchedulerCallable`. From the command line::

    hyperlit fit --config examples/quickstart.yaml \\
        --model.phi_optimizer torch.optim.AdamW --model.phi_optimizer.lr 3e-4 \\
        --model.phi_lr_scheduler torch.optim.lr_scheduler.CosineAnnealingLR --model.phi_lr_scheduler.T_max 50

and in Python ``SelfTuningModule(net, phi_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4))``.

:func:`build_optimizer` is how modules call them: it gives PyTorch's fused kernels to any optimizer that has them
and was not told otherwise (``fused``/``foreach`` left at ``None``). On CPU ``torch.optim.Adam`` otherwise runs its
``foreach`` loop, about 5x slower than the fused kernel on an STN's parameters; ``examples/benchmarks/stn_overhead.py``
measures the difference in a step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = [
    "OptimizerFactory",
    "SchedulerFactory",
    "build_optimizer",
    "build_scheduler",
    "check_factories",
    "step_scheduler",
]

#: ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``)
OptimizerFactory = Callable[[Iterable[Any]], Optimizer]
#: ``optimizer -> scheduler`` (LightningCLI's ``LRSchedulerCallable``)
SchedulerFactory = Callable[[Optimizer], LRScheduler | ReduceLROnPlateau]

_NOT_GIVEN = (None,)


def check_factories(**factories: Any) -> None:
    """``TypeError`` at construction for an argument that is not a factory; ``*_lr_scheduler`` ones may be ``None``."""
    for name, factory in factories.items():
        if factory is None and name.endswith("lr_scheduler"):
            continue
        if not callable(factory):
            what = "optimizer -> scheduler" if name.endswith("lr_scheduler") else "params -> torch.optim.Optimizer"
            raise TypeError(f"{name} must be a callable {what}, got {factory!r}")


def _fusable(opt: Optimizer) -> bool:
    if "fused" not in inspect.signature(type(opt).__init__).parameters:
        return False
    if opt.defaults.get("fused") not in _NOT_GIVEN or opt.defaults.get("foreach") not in _NOT_GIVEN:
        return False  # the user chose an implementation
    if opt.defaults.get("differentiable"):
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() for p in params)


def build_optimizer(
    factory: OptimizerFactory, params: Iterable[nn.Parameter] | list[dict[str, Any]], name: str, fuse: bool = True
) -> Optimizer:
    """Call ``factory(params)``; rebuild it with ``fused=True`` when it supports that and nothing was chosen.

    Raises ``TypeError`` with the argument's ``name`` when the factory does not return a ``torch.optim.Optimizer``
    (e.g. a class that is not an optimizer given on the command line).
    """
    params = list(params)
    opt = factory(params)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"{name} must build a torch.optim.Optimizer from parameters, got {type(opt).__name__}")
    if fuse and _fusable(opt):
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
        accepted = inspect.signature(type(opt).__init__).parameters
        # ``defaults`` can hold keys the constructor does not take (AdamW's ``decoupled_weight_decay``)
        defaults = {k: v for k, v in opt.defaults.items() if k in accepted and k not in ("fused", "foreach")}
        # a device or dtype without a fused kernel keeps the original
        with contextlib.suppress(RuntimeError, ValueError, TypeError):
            opt = type(opt)(groups, **defaults, fused=True)
    return opt


def build_scheduler(factory: SchedulerFactory | None, optimizer: Optimizer, name: str) -> Any:
    """``factory(optimizer)`` or ``None``; ``TypeError`` naming the argument if it is not a scheduler."""
    if factory is None:
        return None
    sched = factory(optimizer)
    if not isinstance(sched, (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"{name} must build a torch.optim.lr_scheduler scheduler, got {type(sched).__name__}")
    return sched


def step_scheduler(scheduler: Any, metrics: dict[str, Any], monitor: str) -> None:
    """Step a scheduler once (manual optimization steps schedules by hand); ``ReduceLROnPlateau`` on ``monitor``."""
    if isinstance(scheduler, ReduceLROnPlateau):
        value = metrics.get(monitor)
        if value is None:
            raise KeyError(f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; logged: {sorted(metrics)}")
        scheduler.step(float(value))
    else:
        scheduler.step()
