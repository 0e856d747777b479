"""A hypernetwork that outputs every parameter of a target ``nn.Module``.

One component serves all three method families (see ``DESIGN.md``): the *condition* is a hyperparameter
vector λ (Lorraine & Duvenaud 2018), a preference ray r (Navon et al. 2021) or a task embedding e
(von Oswald et al. 2020). Conditions are batched: ``forward`` takes (K, cond_dim) and returns, for every target
tensor, a ``(K, *shape)`` tensor, so K rays / λ samples / tasks cost one call.

Architectures (all one module, chosen by arguments):

* **MLP with per-tensor heads** (PHN official: ``hidden=(100, 100, 100)``): a trunk MLP followed by one
  linear head per target tensor. The heads are stored as one ``nn.Linear`` whose output is split by tensor,
  which is the same function (block rows of one matrix) computed in one matmul.
* **Linear** (``hidden=()``): ``w = A c + b`` — L&D's local hypernet, the tangent of the best response.
* **Factorized linear** (``hidden=(r,)``, ``activation=None``): ``w = U (V c) + b`` with a rank-r bottleneck
  (L&D's 7,850-hyperparameter experiment).
* **Chunked** (``chunk_size`` set; von Oswald et al. 2020 §3): learned chunk embeddings ``c_i`` are appended to
  the condition, the MLP maps ``[e, c_i]`` to ``chunk_size`` outputs, all chunks in one batched call, and the
  concatenation (truncated to the target size) is the flat weight vector. The hypernet can then be smaller
  than its target (compression ratio < 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["HyperNetwork", "target_shapes"]

Activation = Literal["relu", "elu", "tanh", "sigmoid", "leaky_relu", "none"]


def _activation(name: str | None) -> nn.Module:
    table: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU,
        "elu": nn.ELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leaky_relu": nn.LeakyReLU,
    }
    if name is None or name == "none":
        return nn.Identity()
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(table)} or 'none'")
    return table[name]()


def target_shapes(
    target: nn.Module | Mapping[str, Sequence[int] | torch.Size], exclude: Sequence[str] = ()
) -> dict[str, torch.Size]:
    """Names and shapes of the tensors a hypernet must generate for ``target``.

    For a module: its trainable ``named_parameters()`` minus names starting with an entry of ``exclude``.
    """
    if isinstance(target, nn.Module):
        shapes = {
            n: p.shape
            for n, p in target.named_parameters()
            if p.requires_grad and not any(n == e or n.startswith(e + ".") for e in exclude)
        }
    else:
        shapes = {n: torch.Size(s) for n, s in target.items()}
    if not shapes:
        raise ValueError("the target has no parameters to generate")
    return shapes


class HyperNetwork(nn.Module):
    """Condition vectors → all parameters of a target network.

    Args:
        target: The target module (its trainable parameters are generated) or a mapping name → shape.
        cond_dim: Size of the condition vector (λ dimension, number of objectives, task-embedding size).
        hidden: Hidden layer sizes of the MLP; ``()`` gives a linear hypernet, ``(r,)`` with
            ``activation="none"`` a factorized-linear one.
        activation: Nonlinearity between hidden layers (``none`` for linear/factorized).
        chunk_size: If set, generate the flat weight vector in chunks of this size (chunked hypernet).
        chunk_emb_dim: Size of the learned chunk embeddings (chunked only).
        exclude: Parameter-name prefixes of ``target`` that are *not* generated (e.g. per-task heads that stay
            ordinary parameters).
        out_init_std: If set, the output layer's weight is drawn from N(0, out_init_std²) instead of PyTorch's
            default (small values keep the generated weights near the output bias at the start).
        init_bias_from_target: Initialise the output bias with the target's current parameters (non-chunked
            only), so the hypernet starts at the target's own initialisation.
    """

    def __init__(
        self,
        target: nn.Module | Mapping[str, Sequence[int] | torch.Size],
        cond_dim: int,
        hidden: Sequence[int] = (100, 100, 100),
        activation: Activation = "relu",
        chunk_size: int | None = None,
        chunk_emb_dim: int = 8,
        exclude: Sequence[str] = (),
        out_init_std: float | None = None,
        init_bias_from_target: bool = False,
    ) -> None:
        super().__init__()
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be >= 1, got {cond_dim}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {list(hidden)}")
        self.shapes = target_shapes(target, exclude)
        self.names = list(self.shapes)
        self.numels = [math.prod(s) for s in self.shapes.values()]
        self.num_target_params = sum(self.numels)
        self.cond_dim = cond_dim
        self.chunk_size = chunk_size
        if chunk_size is not None:
            if chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
            if init_bias_from_target:
                raise ValueError("init_bias_from_target needs a non-chunked hypernet (chunks share one bias)")
            self.num_chunks = math.ceil(self.num_target_params / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, chunk_emb_dim))
            in_dim, out_dim = cond_dim + chunk_emb_dim, chunk_size
        else:
            self.num_chunks = 1
            self.register_parameter("chunk_embeddings", None)
            in_dim, out_dim = cond_dim, self.num_target_params
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), _activation(activation)]
            prev = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(prev, out_dim)
        if out_init_std is not None:
            nn.init.normal_(self.head.weight, std=out_init_std)
        if init_bias_from_target:
            if not isinstance(target, nn.Module):
                raise ValueError("init_bias_from_target needs the target module, not only its shapes")
            params = dict(target.named_parameters())
            self.set_output_bias({n: params[n] for n in self.names})

    # -- introspection ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of trainable hypernetwork parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def compression_ratio(self, extra: int = 0) -> float:
        """Hypernet parameters (plus ``extra``, e.g. task embeddings) divided by generated target parameters."""
        return (self.num_parameters() + extra) / self.num_target_params

    # -- generation -----------------------------------------------------------------------------
    def flat(self, cond: Tensor) -> Tensor:
        """Flat generated weights (K, num_target_params) for conditions (K, cond_dim) or (cond_dim,)."""
        squeeze = cond.dim() == 1
        c = cond.unsqueeze(0) if squeeze else cond
        if c.dim() != 2 or c.shape[-1] != self.cond_dim:
            raise ValueError(
                f"condition must have shape (K, {self.cond_dim}) or ({self.cond_dim},), got {tuple(cond.shape)}"
            )
        if self.chunk_embeddings is None:
            out = self.head(self.trunk(c))
        else:
            k = c.shape[0]
            emb = self.chunk_embeddings.unsqueeze(0).expand(k, -1, -1)  # (K, C, E)
            inp = torch.cat([c.unsqueeze(1).expand(-1, self.num_chunks, -1), emb], dim=-1)
            out = self.head(self.trunk(inp)).reshape(k, -1)[:, : self.num_target_params]
        return out.squeeze(0) if squeeze else out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split (…, num_target_params) into a dict of ``(…, *shape)`` tensors in target order."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes.values())}

    def forward(self, cond: Tensor) -> dict[str, Tensor]:
        """Generated target parameters: name → ``(K, *shape)``, or ``(*shape)`` for a single condition vector."""
        return self.unflatten(self.flat(cond))

    @torch.no_grad()
    def set_output_bias(self, params: Mapping[str, Tensor]) -> None:
        """Set the output bias to ``params`` (flattened in target order); non-chunked hypernets only."""
        if self.chunk_embeddings is not None:
            raise ValueError("set_output_bias needs a non-chunked hypernet")
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"params lack generated tensors {missing}")
        flat = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        self.head.bias.copy_(flat.to(self.head.bias))
