"""Hyperparameter spaces for hypernetwork-based tuning (STN, best-response hypernetworks).

Each hyperparameter lives in an *unconstrained* space (an ``nn.Parameter``) and is mapped to its range by a
fixed transform (MacKay et al. 2019, §4 and official ``stn_utils/hyperparameter.py``):

* ``(a, b)`` finite          → stretched sigmoid  ``a + (b - a)·sigmoid(u)``
* ``(a, ∞)``                 → ``a + softplus(u)``
* ``(-∞, b)``                → ``b - softplus(u)``
* ``(-∞, ∞)``                → identity
* ``transform="log"``        → ``exp(u)`` on ``(0, ∞)`` (penalties scaled by exp(λ), Lorraine & Duvenaud 2018)

``discrete`` entries are floored after the transform (cutout length, number of holes). Perturbations
``λ_b = λ + σ ⊙ ε_b``, ``ε_b ~ N(0, I)``, are drawn in the unconstrained space, one per example for
``per_example`` entries and one per batch otherwise; ``σ = softplus(s)`` is learnable and the entropy of the
perturbation distribution, ``H = Σ_h log(σ_h √(2πe))``, is the term STN's validation step subtracts (τ·H).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Hyperparameter", "HyperparameterSpace", "inv_softplus"]

Transform = Literal["auto", "sigmoid", "softplus", "identity", "log"]
_SIGMOID, _SOFTPLUS_LOW, _SOFTPLUS_HIGH, _IDENTITY, _EXP = range(5)


def inv_softplus(x: Tensor | float) -> Tensor:
    """Inverse of ``softplus``: ``log(expm1(x))``, stable for large ``x``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return torch.where(x > 20, x, torch.log(torch.expm1(x.clamp_min(1e-12))))


@dataclass
class Hyperparameter:
    """One tunable hyperparameter.

    Args:
        name: Unique name (used for logging and to look the value up).
        low: Lower end of the range (``-inf`` allowed).
        high: Upper end of the range (``inf`` allowed).
        init: Initial (constrained) value; must lie strictly inside ``(low, high)``.
        init_sigma: Initial perturbation scale σ in the unconstrained space.
        transform: ``auto`` picks the transform from the range; ``log`` means value = exp(u).
        discrete: Floor the value after the transform.
        per_example: One perturbation per example (True) or one per batch (False).
        size: Number of scalar hyperparameters sharing this entry (e.g. one L2 penalty per weight).
    """

    name: str
    low: float = 0.0
    high: float = 1.0
    init: float = 0.05
    init_sigma: float = 0.5
    transform: Transform = "auto"
    discrete: bool = False
    per_example: bool = True
    size: int = 1

    def kind(self) -> int:
        """The transform code for this entry (after resolving ``auto``)."""
        lo_fin, hi_fin = math.isfinite(self.low), math.isfinite(self.high)
        t = self.transform
        if t == "log":
            return _EXP
        if t == "identity":
            return _IDENTITY
        if t == "sigmoid":
            return _SIGMOID
        if t == "softplus":
            return _SOFTPLUS_LOW if lo_fin else _SOFTPLUS_HIGH
        if lo_fin and hi_fin:
            return _SIGMOID
        if lo_fin:
            return _SOFTPLUS_LOW
        if hi_fin:
            return _SOFTPLUS_HIGH
        return _IDENTITY

    def validate(self) -> None:
        """Raise ``ValueError`` for an empty or inverted range, an initial value outside it, or bad σ."""
        where = f"hyperparameter {self.name!r}"
        if not self.name:
            raise ValueError("a hyperparameter needs a non-empty name")
        if any(math.isnan(v) for v in (self.low, self.high, self.init, self.init_sigma)):
            raise ValueError(f"{where}: NaN in low/high/init/init_sigma")
        if not self.low < self.high:
            raise ValueError(f"{where}: empty or inverted range ({self.low}, {self.high}); need low < high")
        if not self.low < self.init < self.high:
            raise ValueError(f"{where}: initial value {self.init} lies outside its range ({self.low}, {self.high})")
        if not self.init_sigma > 0:
            raise ValueError(f"{where}: init_sigma must be > 0, got {self.init_sigma}")
        if self.size < 1:
            raise ValueError(f"{where}: size must be >= 1, got {self.size}")
        kind = self.kind()
        if kind == _SIGMOID and not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"{where}: transform 'sigmoid' needs a finite range, got ({self.low}, {self.high})")
        if kind == _EXP and self.low != 0.0:
            raise ValueError(f"{where}: transform 'log' maps to (0, inf); set low=0 (got {self.low})")
        if kind == _IDENTITY and (math.isfinite(self.low) or math.isfinite(self.high)):
            raise ValueError(f"{where}: transform 'identity' needs an unbounded range, got ({self.low}, {self.high})")


# plain data: let ``torch.load(weights_only=True)`` (Lightning's resume) read checkpoints whose saved init
# arguments (``save_hyperparameters``) contain Hyperparameter entries
torch.serialization.add_safe_globals([Hyperparameter])


class HyperparameterSpace(nn.Module):
    """Named hyperparameters with learnable unconstrained values λ and perturbation scales σ.

    The flat unconstrained vector has one column per scalar hyperparameter (``dim`` columns; an entry of
    ``size`` k occupies k consecutive columns). All transforms are vectorized over columns.

    Args:
        hyperparameters: The entries (names must be unique).
        hnet_input: What the hypernetwork sees: the ``unconstrained`` perturbed value (official CNN code; the
            default) or the ``constrained`` one (official LSTM ``--tune_all``).
    """

    def __init__(
        self,
        hyperparameters: Sequence[Hyperparameter],
        hnet_input: Literal["unconstrained", "constrained"] = "unconstrained",
    ) -> None:
        super().__init__()
        entries = list(hyperparameters)
        if not entries:
            raise ValueError("a HyperparameterSpace needs at least one hyperparameter")
        names = [h.name for h in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate hyperparameter names: {dupes}")
        for h in entries:
            h.validate()
        if hnet_input not in ("unconstrained", "constrained"):
            raise ValueError(f"hnet_input must be 'unconstrained' or 'constrained', got {hnet_input!r}")
        self.entries = entries
        self.hnet_input_mode = hnet_input
        self._slices: dict[str, slice] = {}
        start = 0
        for h in entries:
            self._slices[h.name] = slice(start, start + h.size)
            start += h.size
        self.dim = start

        def col(values: Iterable[float]) -> Tensor:
            return torch.tensor([v for h, v in zip(entries, values) for _ in range(h.size)], dtype=torch.float32)

        self.register_buffer("_low", col(h.low for h in entries), persistent=False)
        self.register_buffer("_high", col(h.high for h in entries), persistent=False)
        self.register_buffer("_kind", col(float(h.kind()) for h in entries).long(), persistent=False)
        self.register_buffer("_discrete", col(float(h.discrete) for h in entries).bool(), persistent=False)
        self.register_buffer("_per_example", col(float(h.per_example) for h in entries).bool(), persistent=False)

        init = col(h.init + (0.5 if h.discrete else 0.0) for h in entries)
        # discrete entries start at the centre of their bucket so that floor() gives exactly `init`
        init = torch.minimum(init, self._high - 1e-3 * (self._high - self._low).clamp(max=1.0))
        self.unconstrained = nn.Parameter(self.unconstrain(init))
        self.scale = nn.Parameter(inv_softplus(col(h.init_sigma for h in entries)).float())

    # -- names and slices ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [h.name for h in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def slice(self, name: str) -> slice:
        """Columns of ``name`` in the flat vector; ``KeyError`` naming the known entries otherwise."""
        try:
            return self._slices[name]
        except KeyError:
            raise KeyError(f"unknown hyperparameter {name!r}; known: {self.names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._slices

    def get(self, values: Tensor, name: str) -> Tensor:
        """Column(s) of ``name`` from a (…, dim) tensor: shape (…,) for size-1 entries, (…, size) otherwise."""
        sl = self.slice(name)
        out = values[..., sl]
        return out.squeeze(-1) if sl.stop - sl.start == 1 else out

    # -- transforms -----------------------------------------------------------------------------
    @property
    def sigma(self) -> Tensor:
        """Perturbation scales σ = softplus(s) (unconstrained space)."""
        return F.softplus(self.scale)

    def constrained(self, unconstrained: Tensor | None = None, discretize: bool = True) -> Tensor:
        """Map unconstrained values (…, dim) to their ranges; floors discrete entries if ``discretize``."""
        u = self.unconstrained if unconstrained is None else unconstrained
        low, high, kind = self._low.to(u.dtype), self._high.to(u.dtype), self._kind
        lo0 = torch.nan_to_num(low, neginf=0.0)
        hi0 = torch.nan_to_num(high, posinf=0.0)
        out = torch.where(kind == _SIGMOID, lo0 + (hi0 - lo0) * torch.sigmoid(u), u)
        out = torch.where(kind == _SOFTPLUS_LOW, lo0 + F.softplus(u), out)
        out = torch.where(kind == _SOFTPLUS_HIGH, hi0 - F.softplus(u), out)
        out = torch.where(kind == _EXP, torch.exp(u), out)
        if discretize:
            out = torch.where(self._discrete, torch.floor(out), out)
        return out

    def unconstrain(self, constrained: Tensor) -> Tensor:
        """Inverse of :meth:`constrained` (without the floor of discrete entries)."""
        v = constrained.to(torch.float64)
        low, high, kind = self._low.double(), self._high.double(), self._kind
        lo0 = torch.nan_to_num(low, neginf=0.0)
        hi0 = torch.nan_to_num(high, posinf=0.0)
        p = ((v - lo0) / (hi0 - lo0).clamp_min(1e-30)).clamp(1e-12, 1 - 1e-12)
        out = torch.where(kind == _SIGMOID, torch.logit(p), v)
        out = torch.where(kind == _SOFTPLUS_LOW, inv_softplus((v - lo0).clamp_min(1e-12)), out)
        out = torch.where(kind == _SOFTPLUS_HIGH, inv_softplus((hi0 - v).clamp_min(1e-12)), out)
        out = torch.where(kind == _EXP, torch.log(v.clamp_min(1e-300)), out)
        return out.to(constrained.dtype if constrained.is_floating_point() else torch.float32)

    def hnet_input(self, unconstrained: Tensor) -> Tensor:
        """What the hypernetwork sees for the (perturbed) unconstrained values."""
        if self.hnet_input_mode == "constrained":
            return self.constrained(unconstrained, discretize=False)
        return unconstrained

    # -- sampling ----------------------------------------------------------------------------
    def perturb(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``λ_b = λ + σ ⊙ ε_b`` (B, dim) in the unconstrained space.

        ``per_example=False`` entries share one draw across the batch. Gradients flow to λ and σ
        (reparameterization), which the validation step uses when σ is tuned.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        u = self.unconstrained
        eps = (
            torch.randn(batch_size, self.dim, generator=generator, device=u.device, dtype=u.dtype)
            if (generator is None or generator.device == u.device)
            else torch.randn(batch_size, self.dim, generator=generator, dtype=u.dtype).to(u.device)
        )
        eps = torch.where(self._per_example, eps, eps[:1].expand_as(eps))
        return u + self.sigma * eps

    def repeat(self, batch_size: int) -> Tensor:
        """The current unconstrained values repeated over a batch (no perturbation), (B, dim)."""
        return self.unconstrained.unsqueeze(0).expand(batch_size, -1)

    def entropy(self) -> Tensor:
        """Entropy of the diagonal Gaussian perturbation: Σ log(σ √(2πe))."""
        return torch.log(self.sigma * math.sqrt(2 * math.pi * math.e)).sum()

    # -- checks and reporting --------------------------------------------------------------------
    def check_finite(self, step: int | None = None) -> None:
        """Raise ``FloatingPointError`` naming every hyperparameter whose λ or σ is NaN/Inf."""
        bad = []
        with torch.no_grad():
            for h in self.entries:
                sl = self._slices[h.name]
                if not torch.isfinite(self.unconstrained[sl]).all() or not torch.isfinite(self.scale[sl]).all():
                    bad.append(f"{h.name} (λ={self.unconstrained[sl].tolist()}, s={self.scale[sl].tolist()})")
        if bad:
            at = f" at step {step}" if step is not None else ""
            raise FloatingPointError(f"non-finite hyperparameters{at}: {', '.join(bad)}")

    @torch.no_grad()
    def values(self) -> dict[str, float | Tensor]:
        """Current constrained values: floats for scalar entries, tensors for vector entries."""
        v = self.constrained().detach().cpu()
        return {
            h.name: (v[self._slices[h.name]].item() if h.size == 1 else v[self._slices[h.name]].clone())
            for h in self.entries
        }

    @torch.no_grad()
    def sigmas(self) -> dict[str, float | Tensor]:
        """Current perturbation scales σ, same layout as :meth:`values`."""
        s = self.sigma.detach().cpu()
        return {
            h.name: (s[self._slices[h.name]].item() if h.size == 1 else s[self._slices[h.name]].clone())
            for h in self.entries
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{h.name}∈({h.low}, {h.high})" + ("[int]" if h.discrete else "") for h in self.entries)
