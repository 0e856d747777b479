"""Per-member hyperparameters for hyper-batch ensembles: one STN Gaussian perturbation per ensemble member.

Member ``k`` of ``K`` has its own unconstrained values ``λ_k`` and perturbation scales ``σ_k = softplus(s_k)``
(hyper-batch ensembles, Wenzel et al. 2020; here with STN's Gaussian perturbation ``λ + σ ⊙ ε``, MacKay et
al. 2019, instead of the learnable log-uniform bounds of the released hyper-batch-ensemble code). The space is
a :class:`~hyperlit.hparams.HyperparameterSpace` whose ``unconstrained`` and ``scale`` parameters have shape
``(K, dim)``; the transforms, ``slice``/``get``/``names``/``dim`` and ``hnet_input`` are inherited and
broadcast over the leading member dimension.

Rows are **member-major**: a batch of ``N`` examples becomes ``K·N`` rows ``[member 0's N rows; member 1's N
rows; …]``, and :meth:`MemberHyperparameterSpace.perturb` / :meth:`MemberHyperparameterSpace.repeat` return
their hyperparameter rows in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from hyperlit.hparams import Hyperparameter, HyperparameterSpace

__all__ = ["MemberHyperparameterSpace"]


class MemberHyperparameterSpace(HyperparameterSpace):
    """``K`` members' hyperparameters ``λ_k`` and perturbation scales ``σ_k``, vectorised as ``(K, dim)``.

    Args:
        hyperparameters: The entries (names must be unique); each entry's ``init``/``init_sigma`` is every
            member's starting point unless ``member_init`` overrides it.
        ensemble_size: ``K``, the number of members.
        hnet_input: What the hypernetwork sees (see :class:`~hyperlit.hparams.HyperparameterSpace`).
        member_init: Optional list of ``K`` dicts, name → constrained initial value of that member (a float, or
            a sequence of ``size`` floats for vector entries); names not in a dict keep the entry's ``init``.
        init_spread: Standard deviation of a deterministic ``N(0, init_spread²)`` jitter added to every
            member's initial unconstrained value, so that members start apart (0 = no jitter).
        seed: Seed of the generator that draws the jitter.
    """

    def __init__(
        self,
        hyperparameters: Sequence[Hyperparameter],
        ensemble_size: int,
        hnet_input: Literal["unconstrained", "constrained"] = "unconstrained",
        member_init: Sequence[Mapping[str, float | Sequence[float]]] | None = None,
        init_spread: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(hyperparameters, hnet_input=hnet_input)
        k = int(ensemble_size)
        if k < 1 or k != ensemble_size:
            raise ValueError(f"ensemble_size must be an integer >= 1, got {ensemble_size!r}")
        if not (math.isfinite(init_spread) and init_spread >= 0):
            raise ValueError(f"init_spread must be a finite number >= 0, got {init_spread!r}")
        self.ensemble_size = k
        base = self.unconstrained.detach().clone()
        init = base.unsqueeze(0).repeat(k, 1)
        if member_init is not None:
            init = self._member_init(init, member_init)
        if init_spread > 0:
            gen = torch.Generator().manual_seed(int(seed))
            init = init + init_spread * torch.randn(k, self.dim, generator=gen, dtype=init.dtype)
        scale = self.scale.detach().clone().unsqueeze(0).repeat(k, 1)
        self.unconstrained = nn.Parameter(init)
        self.scale = nn.Parameter(scale)

    def _member_init(self, init: Tensor, member_init: Sequence[Mapping[str, float | Sequence[float]]]) -> Tensor:
        """Replace the rows of ``init`` (K, dim) by the unconstrained values of each member's overrides."""
        if isinstance(member_init, Mapping) or len(member_init) != self.ensemble_size:
            got = "a dict" if isinstance(member_init, Mapping) else f"{len(member_init)} entries"
            raise ValueError(
                f"member_init must be a list of ensemble_size={self.ensemble_size} dicts (one per member), got {got}"
            )
        out = init.clone()
        for k, overrides in enumerate(member_init):
            unknown = sorted(set(overrides) - set(self.names))
            if unknown:
                raise ValueError(f"member_init[{k}]: unknown hyperparameter(s) {unknown}; known: {self.names}")
            row = self.constrained(init[k], discretize=False).clone()
            for h in self.entries:
                if h.name not in overrides:
                    continue
                sl = self.slice(h.name)
                value = torch.as_tensor(overrides[h.name], dtype=row.dtype).flatten()
                if value.numel() not in (1, h.size):
                    raise ValueError(
                        f"member_init[{k}][{h.name!r}]: expected 1 or {h.size} values, got {value.numel()}"
                    )
                if not bool(((value > h.low) & (value < h.high)).all()):
                    raise ValueError(
                        f"member_init[{k}][{h.name!r}] = {value.tolist()} lies outside the range ({h.low}, {h.high})"
                    )
                if h.discrete:  # the centre of the bucket, as the parent does for `init`
                    value = torch.clamp(value + 0.5, max=h.high - 1e-3 * min(h.high - h.low, 1.0))
                row[sl] = value.expand(h.size)
            # entries without an override keep their exact unconstrained initial value
            new = self.unconstrain(row)
            changed = torch.zeros(self.dim, dtype=torch.bool)
            for name in overrides:
                changed[self.slice(name)] = True
            out[k] = torch.where(changed, new, init[k])
        return out

    # -- sampling ----------------------------------------------------------------------------------
    def _members_of(self, batch_size: int) -> int:
        if batch_size < 1 or batch_size % self.ensemble_size:
            raise ValueError(
                f"batch_size must be a positive multiple of ensemble_size={self.ensemble_size} (K·N member-major "
                f"rows), got {batch_size}; tile the batch with hyperlit.nn.batch_ensemble.tile_members"
            )
        return batch_size // self.ensemble_size

    def perturb(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``λ_k + σ_k ⊙ ε`` for ``K·N`` member-major rows, shape ``(K·N, dim)``.

        Row ``k·N + i`` belongs to member ``k``. ``per_example=False`` entries share one draw per member per
        batch. Gradients flow to λ and σ (reparameterisation).

        Args:
            batch_size: ``K·N``, the number of rows; ``ValueError`` when it is not a multiple of ``K``.
            generator: Optional generator for ``ε``.
        """
        n = self._members_of(batch_size)
        u, k = self.unconstrained, self.ensemble_size
        shape = (k, n, self.dim)
        eps = (
            torch.randn(shape, generator=generator, device=u.device, dtype=u.dtype)
            if (generator is None or generator.device == u.device)
            else torch.randn(shape, generator=generator, dtype=u.dtype).to(u.device)
        )
        eps = torch.where(self._per_example, eps, eps[:, :1].expand_as(eps))
        return (u.unsqueeze(1) + self.sigma.unsqueeze(1) * eps).reshape(batch_size, self.dim)

    def repeat(self, batch_size: int) -> Tensor:
        """Each member's unperturbed λ_k repeated over its ``N`` rows, ``(K·N, dim)`` member-major."""
        n = self._members_of(batch_size)
        return self.unconstrained.unsqueeze(1).expand(-1, n, -1).reshape(batch_size, self.dim)

    def entropy(self) -> Tensor:
        """Sum of the members' Gaussian entropies, ``Σ_k Σ_h log(σ_kh √(2πe))``."""
        return torch.log(self.sigma * math.sqrt(2 * math.pi * math.e)).sum()

    # -- checks and reporting ----------------------------------------------------------------------
    def check_finite(self, step: int | None = None) -> None:
        """Raise ``FloatingPointError`` naming every (member, hyperparameter) whose λ or σ is NaN/Inf."""
        bad = []
        with torch.no_grad():
            ok_u = torch.isfinite(self.unconstrained)
            ok_s = torch.isfinite(self.scale)
            for k in range(self.ensemble_size):
                for h in self.entries:
                    sl = self.slice(h.name)
                    if not (ok_u[k, sl].all() and ok_s[k, sl].all()):
                        bad.append(
                            f"member {k} {h.name} (λ={self.unconstrained[k, sl].tolist()}, "
                            f"s={self.scale[k, sl].tolist()})"
                        )
        if bad:
            at = f" at step {step}" if step is not None else ""
            raise FloatingPointError(f"non-finite hyperparameters{at}: {', '.join(bad)}")

    def _by_name(self, table: Tensor) -> dict[str, Tensor]:
        return {h.name: self.get(table, h.name).clone() for h in self.entries}

    @torch.no_grad()
    def values(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Constrained values per member: name → ``(K,)`` (or ``(K, size)`` for vector entries)."""
        return self._by_name(self.constrained().detach().cpu())

    @torch.no_grad()
    def sigmas(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Perturbation scales σ per member, same layout as :meth:`values`."""
        return self._by_name(self.sigma.detach().cpu())

    @torch.no_grad()
    def member_values(self, k: int) -> dict[str, float | Tensor]:
        """Member ``k``'s constrained values: floats for scalar entries, tensors for vector entries."""
        if not -self.ensemble_size <= k < self.ensemble_size:
            raise IndexError(f"member {k} out of range for ensemble_size={self.ensemble_size}")
        v = self.constrained().detach().cpu()[k]
        return {
            h.name: (v[self.slice(h.name)].item() if h.size == 1 else v[self.slice(h.name)].clone())
            for h in self.entries
        }

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, " + super().extra_repr()
