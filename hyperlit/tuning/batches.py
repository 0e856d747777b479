"""How the tuning modules split a batch into inputs and targets (their ``unpack_batch`` hook).

Every place where :class:`~hyperlit.tuning.bilevel.BilevelModule` (STN, best-response hypernetworks) and
:class:`~hyperlit.tuning.fixed_hparams.FixedHyperparameterModule` take a batch apart goes through the module's
``unpack_batch(batch) -> (x, y)``, whose default is :func:`unpack_xy`. It accepts exactly:

* a tuple or list ``(x, y, ...)``: its first two entries (further entries, e.g. an index, are ignored);
* a mapping (``dict``) with one of the key pairs of :data:`BATCH_KEYS` — ``"x"``/``"y"``, ``"input"``/``"target"``
  or ``"image"``/``"label"``, tried in that order (other keys are ignored).

``x`` and ``y`` must be tensors. Anything else raises a ``TypeError`` naming these forms; a subclass overrides
``unpack_batch`` for another layout (the batch's leading dimension, ``x.shape[0]``, is its size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["ACCEPTED_BATCHES", "BATCH_KEYS", "unpack_xy"]

#: the key pairs ``(inputs, targets)`` of dict batches, tried in this order
BATCH_KEYS: tuple[tuple[str, str], ...] = (("x", "y"), ("input", "target"), ("image", "label"))

#: the accepted batch forms, as the error messages name them
ACCEPTED_BATCHES = (
    "a tuple or list (x, y, ...) or a dict with the keys "
    + ", ".join(f"{x!r}/{y!r}" for x, y in BATCH_KEYS[:-1])
    + f" or {BATCH_KEYS[-1][0]!r}/{BATCH_KEYS[-1][1]!r}"
)


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with the keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of length {len(batch)}"
    return f"a {type(batch).__name__}"


def unpack_xy(batch: Any, owner: str = "this module") -> tuple[Tensor, Tensor]:
    """``(x, y)`` of a batch in one of the forms of :data:`ACCEPTED_BATCHES`; ``TypeError`` otherwise.

    Args:
        batch: The batch, as the DataLoader yields it.
        owner: The module's name, for the error message.
    """
    pair: tuple[Any, Any] | None = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        pair = (batch[0], batch[1])
    elif isinstance(batch, Mapping):
        for kx, ky in BATCH_KEYS:
            if kx in batch and ky in batch:
                pair = (batch[kx], batch[ky])
                break
    if pair is None:
        raise TypeError(
            f"{owner} cannot split {_describe(batch)} into inputs and targets: it accepts {ACCEPTED_BATCHES}; "
            f"for another layout override {owner}.unpack_batch(batch) -> (x, y)"
        )
    x, y = pair
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{owner} needs tensors for the batch's inputs and targets, got ({type(x).__name__}, "
            f"{type(y).__name__}); for another layout override {owner}.unpack_batch(batch) -> (x, y)"
        )
    return x, y
