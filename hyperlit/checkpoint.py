"""Checkpoint helpers: weights-only initialisation (``init_from``) with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointMismatchError", "load_weights"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not belong to this model (other class, other architecture or shapes)."""


def load_weights(model: nn.Module, path: str | Path, strict_shapes: bool = True) -> list[str]:
    """Copy the tensors of a Lightning checkpoint's ``state_dict`` into ``model`` (fine-tuning, not resuming).

    Tensors whose names the model lacks, or that the model has but the checkpoint lacks, are skipped and
    returned; a tensor present in both with a different shape raises :class:`CheckpointMismatchError`
    (``strict_shapes``) or is skipped.
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
    theirs = ckpt["state_dict"]
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if bad and strict_shapes:
        raise CheckpointMismatchError(f"checkpoint {path} has mismatched shapes:\n  " + "\n  ".join(bad))
    load = {k: v for k, v in theirs.items() if k in own and v.shape == own[k].shape}
    if not load:
        raise CheckpointMismatchError(
            f"checkpoint {path} shares no tensor with {type(model).__name__}; was it saved by another model?"
        )
    model.load_state_dict(load, strict=False)
    return sorted(set(own) - set(load)) + sorted(set(theirs) - set(own))
