"""Checkpoint helpers: weights-only initialisation (``init_from``) and architecture checks with clear errors."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointMismatchError", "check_state_dict", "load_weights", "read_checkpoint"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not belong to this model (other class, other architecture or shapes)."""


def check_state_dict(
    model: nn.Module, state_dict: dict[str, object], source: str = "checkpoint", strict: bool = True
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` fits ``model`` (resuming, not fine-tuning).

    Names every tensor whose shape differs (with both shapes) and, when ``strict``, the tensors that only one side
    has: a checkpoint of another architecture fails here with one clear message instead of ``load_state_dict``'s.
    """
    own = model.state_dict()
    problems = [
        f"{k}: {source} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing:
            problems.append(f"missing from the {source}: {missing}")
        if unexpected:
            problems.append(f"not in the model: {unexpected}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit this {type(model).__name__} (another architecture?):\n  " + "\n  ".join(problems)
        )


def load_weights(model: nn.Module, path: str | Path, strict_shapes: bool = True) -> list[str]:
    """Copy the tensors of a Lightning checkpoint's ``state_dict`` into ``model`` (fine-tuning, not resuming).

    Tensors whose names the model lacks, or that the model has but the checkpoint lacks, are skipped and
    returned; a tensor present in both with a different shape raises :class:`CheckpointMismatchError`
    (``strict_shapes``) or is skipped.
    State-dict names listed in the model's ``init_from_skip`` attribute (step counters) are never copied.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt or not a torch file
        raise CheckpointMismatchError(f"could not read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    own = model.state_dict()
    # a module's own step counters (``init_from_skip``) restart with the new run instead of being copied
    skip = set(getattr(model, "init_from_skip", ()))
    theirs = {k: v for k, v in ckpt["state_dict"].items() if k not in skip}
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if bad and strict_shapes:
        raise CheckpointMismatchError(f"checkpoint {path} has mismatched shapes:\n  " + "\n  ".join(bad))
    load = {k: v for k, v in theirs.items() if k in own and v.shape == own[k].shape}
    params = {name for name, _ in model.named_parameters()}
    if params.isdisjoint(load):  # nothing, or only buffers (counters), match: copying them would be a silent no-op
        only = f" (only {sorted(load)})" if load else ""
        raise CheckpointMismatchError(
            f"checkpoint {path} shares no weights with {type(model).__name__}{only}; was it saved by another "
            f"model, or are the model's layers built lazily (give their sizes, e.g. in_dim)?"
        )
    model.load_state_dict(load, strict=False)
    return sorted(set(own) - set(load)) + sorted(set(theirs) - set(own))


_CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The contents of the Lightning checkpoint ``path`` (tensors on the CPU), read as ``LightningCLI`` reads it.

    Raises :class:`CheckpointMismatchError` saying ``PATH is not a Lightning checkpoint`` for a file that
    ``torch.load`` cannot read (a YAML config, a text file, a truncated write) or that holds no ``state_dict``,
    instead of an unpickling trace; ``FileNotFoundError`` when there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hint = " (a configuration file? give it with --config)" if path.suffix.lower() in _CONFIG_SUFFIXES else ""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if zipfile.is_zipfile(path):  # a torch file, but with objects a weights-only load refuses
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointMismatchError(
                f"{path} is a torch file that torch.load(weights_only={weights_only}) cannot read: {reason}"
            ) from err
        raise CheckpointMismatchError(
            f"{path} is not a Lightning checkpoint: torch.load cannot read it{hint}; give a .ckpt file written by "
            "Lightning (hyperlit fit writes them to lightning_logs/version_N/checkpoints)"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no 'state_dict'){hint}")
    return ckpt
