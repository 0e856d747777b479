"""A user's own network in the continual learners: checks, per-task output heads and per-task norm statistics.

Shared by :class:`~hyperlit.continual.module.HyperContinualModule` (whose target's weights are generated) and
:class:`~hyperlit.continual.baselines.EWCContinualModule` (whose network is trained directly):

* :func:`check_target` — any ``nn.Module`` without lazy (uninitialized) parameters;
* :func:`prepare_heads` — per-task output heads: the last layer with parameters (in registration order) must be an
  ``nn.Linear``; one with ``output_dim`` outputs is widened to ``num_tasks · output_dim`` (one slice per task), one
  that already has ``num_tasks · output_dim`` outputs is kept;
* :class:`TaskNormStats` — one copy per task of the running statistics of every BatchNorm/InstanceNorm layer that
  tracks them, read and updated through views while that task trains or is evaluated;
* :func:`check_outputs` — the network returns ``num_heads · output_dim`` outputs per example.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TaskNormStats", "check_outputs", "check_target", "head_parameter_names", "last_layer", "prepare_heads"]

_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def check_target(target: Any, owner: str) -> nn.Module:
    """``target`` if it is an ``nn.Module`` whose parameters are all initialized, else a clear error."""
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module (or None for the built-in MLP), got {type(target).__name__}")
    lazy = [n for n, p in target.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"the target has uninitialized (lazy) parameters {lazy}: run it once on an example batch before giving "
            f"it to {owner}"
        )
    return target


def last_layer(target: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the last leaf module (in registration order) that holds parameters."""
    leaves = [(n, m) for n, m in target.named_modules() if next(m.parameters(recurse=False), None) is not None]
    if not leaves:
        raise ValueError("the target network has no parameters to train")
    return leaves[-1]


def head_parameter_names(target: nn.Module) -> list[str]:
    """Names of the parameters of the target's last layer with parameters (its output head)."""
    prefix = last_layer(target)[0]
    return [n for n, _ in target.named_parameters() if (n.startswith(prefix + ".") if prefix else "." not in n)]


def prepare_heads(target: nn.Module, heads: str, shared: str, num_tasks: int, output_dim: int) -> str:
    """Give ``target`` one output slice per task unless ``heads == shared``; return its head's name.

    Args:
        target: The user's network (changed in place: its last ``nn.Linear`` may be replaced by a wider one).
        heads: The module's ``heads`` value.
        shared: The ``heads`` value of the module that means one head for all tasks (no slices).
        num_tasks: Number of tasks.
        output_dim: Outputs per task.
    """
    name, layer = last_layer(target)
    if heads == shared:
        return name
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"heads={heads!r} needs a target whose last layer with parameters is an nn.Linear (one output slice per "
            f"task); the target's last one is {name!r} ({type(layer).__name__}). Use heads={shared!r}, or end the "
            "target with an nn.Linear"
        )
    wide = num_tasks * output_dim
    if layer.out_features == wide:
        return name
    if layer.out_features != output_dim:
        raise ValueError(
            f"heads={heads!r}: the target's last layer {name!r} has {layer.out_features} outputs; give it "
            f"output_dim={output_dim} outputs (widened to num_tasks·output_dim={wide}) or {wide} outputs"
        )
    new = nn.Linear(layer.in_features, wide, bias=layer.bias is not None).to(layer.weight)
    parent, _, child = name.rpartition(".")
    setattr(target.get_submodule(parent) if parent else target, child, new)
    return name


def check_outputs(out: Any, heads: str, num_heads: int, output_dim: int) -> Tensor:
    """``out`` if it is a tensor (…, ``num_heads · output_dim``), else an error naming what to change."""
    want = num_heads * output_dim
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[-1] != want:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the target network returns {shape}; heads={heads!r} needs {want} outputs per example "
            f"(num_heads={num_heads} × output_dim={output_dim}): set output_dim to the outputs per task "
            "or change the target's last layer"
        )
    return out


class TaskNormStats(nn.Module):
    """Per-task copies ``(T, *shape)`` of the running statistics of the target's norm layers (checkpointed buffers).

    Norm layers built with ``track_running_stats=False`` keep none (they use batch statistics throughout). The
    target's own buffers are only the starting value of every task's copy and never change.

    Args:
        target: The network whose BatchNorm/InstanceNorm statistics are kept per task.
        num_tasks: Number of tasks.
    """

    def __init__(self, target: nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.names: list[str] = []
        for prefix, mod in target.named_modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                for buf in _NORM_STATS:
                    if getattr(mod, buf, None) is not None:
                        self.names.append(f"{prefix}.{buf}" if prefix else buf)
        buffers = dict(target.named_buffers())
        for name in self.names:
            stat = buffers[name].detach()
            self.register_buffer(self._key(name), stat.unsqueeze(0).repeat(num_tasks, *([1] * stat.dim())).clone())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def of(self, tasks: int | Tensor) -> dict[str, Tensor]:
        """Statistics of ``tasks``: views for one task (training updates them in place), (K, …) for K task ids."""
        return {n: getattr(self, self._key(n))[tasks] for n in self.names}

    def save(self, task: int) -> dict[str, Tensor]:
        """A copy of ``task``'s statistics (to undo a skipped step's update with :meth:`restore`)."""
        return {n: s.clone() for n, s in self.of(task).items()}

    @torch.no_grad()
    def restore(self, task: int, saved: dict[str, Tensor] | None) -> None:
        """Put back what :meth:`save` returned (``None``: nothing)."""
        if saved is not None:
            for name, stat in self.of(task).items():
                stat.copy_(saved[name])
