"""Hyperparameters that enter the training loss differentiably (for implicit and unrolled hypergradients).

:class:`TrainingHyperparameters` holds the tuned tensors λ of
:class:`~hyperlit.tuning.implicit.ImplicitDifferentiationModule` and
:class:`~hyperlit.tuning.implicit.UnrolledDifferentiationModule`, all stored *unconstrained* as ``nn.Parameter``:

* **weight decay** (Lorraine, Vicol & Duvenaud 2020; their code stores ``log`` decay and uses ``exp``): the penalty
  ``R(w, λ) = Σ_g e^{λ_g}/2 ‖w_g‖²`` over the groups ``g`` of ``weight_decay``: ``global`` (one λ for every
  parameter of the model), ``per_layer`` (one λ per parameter tensor, in ``named_parameters`` order) or
  ``per_weight`` (one λ per weight, ``½ Σ_i e^{λ_i} w_i²``, a flat vector in ``named_parameters`` order). Every
  trainable parameter (weights and biases) is penalised, as in :class:`~hyperlit.tuning.best_response.BestResponseModule`.
* **class weights**: logits ``κ`` (C,), the weight of class ``c`` is ``a_c = C · softmax(κ)_c`` (mean 1 over classes;
  all 1 at κ = 0, the initial value).
* **a reweighting network** ``r_θ`` whose parameters θ are hyperparameters: example ``i`` gets
  ``s_i = sigmoid(r_θ(z_i))`` where ``z_i`` is the example's input ``x_i`` (``reweight_input="x"``) or its detached
  per-example loss ``ℓ_i`` as a ``(B, 1)`` column (``"loss"``, Meta-Weight-Net style).

The example weights are ``u_i = a_{y_i} · s_i`` (a factor left out is 1), mean-normalised over the batch:
``ω_i = u_i / ((1/B) Σ_j u_j)``, so the training objective is

``L_T(w, λ) = (1/B) Σ_i ω_i ℓ_i(w) + R(w, λ) = Σ_i u_i ℓ_i(w) / Σ_j u_j + R(w, λ)``

(the plain mean loss when no weight is tuned). Class weights and θ enter only ``L_T`` (not the held-out loss), so
their hypergradient is purely the implicit / unrolled part. Every method takes the hyperparameters as an optional
``lam`` dict (``{name: tensor}``, see :meth:`TrainingHyperparameters.params`), so ``torch.func`` can differentiate
with respect to them; without it the module's own parameters are used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["TrainingHyperparameters"]

WeightDecay = Literal["none", "global", "per_layer", "per_weight"]

#: name of the log weight decay in :meth:`TrainingHyperparameters.params`
LOG_DECAY = "log_weight_decay"
#: name of the class-weight logits
CLASS_LOGITS = "class_logits"
#: prefix of the reweighting network's parameters
REWEIGHT = "reweighting_net."


class TrainingHyperparameters(nn.Module):
    """The λ of a training objective ``L_T(w, λ)``: weight decay, class weights, a reweighting network.

    Args:
        model: The trained network (only its parameter names and shapes are read, to size the decay).
        weight_decay: ``none``, ``global`` (one λ), ``per_layer`` (one per parameter tensor) or ``per_weight``.
        init_log_decay: Initial ``λ = log`` of the decay strength (≈ log 5e-4, IHO's ``--wdecay``).
        class_weights: Tune one weight per class (needs ``num_classes`` and integer labels).
        num_classes: Number of classes (for ``class_weights``).
        reweighting_net: A network mapping ``z`` (``(B, …)`` inputs or ``(B, 1)`` losses) to ``(B,)`` or ``(B, 1)``
            logits of the example weights; its parameters are hyperparameters. Its last layer starts at zero
            output if it is an ``nn.Linear`` (``zero_init_reweighting``), so every ``s_i = ½`` and ``ω_i = 1``
            at the start.
        reweight_input: What the reweighting network sees: the inputs ``x`` or the detached per-example loss.
        zero_init_reweighting: Zero the weight and bias of the reweighting network's last ``nn.Linear``.
    """

    def __init__(
        self,
        model: nn.Module,
        weight_decay: WeightDecay = "per_weight",
        init_log_decay: float = -7.6,
        class_weights: bool = False,
        num_classes: int | None = None,
        reweighting_net: nn.Module | None = None,
        reweight_input: Literal["x", "loss"] = "x",
        zero_init_reweighting: bool = True,
    ) -> None:
        super().__init__()
        if weight_decay not in ("none", "global", "per_layer", "per_weight"):
            raise ValueError(
                f"weight_decay must be 'none', 'global', 'per_layer' or 'per_weight', got {weight_decay!r}"
            )
        if not math.isfinite(init_log_decay):
            raise ValueError(f"init_log_decay must be finite, got {init_log_decay}")
        if class_weights and (num_classes is None or num_classes < 2):
            raise ValueError(f"class_weights needs num_classes >= 2, got num_classes={num_classes}")
        if reweight_input not in ("x", "loss"):
            raise ValueError(f"reweight_input must be 'x' or 'loss', got {reweight_input!r}")
        self.weight_decay = weight_decay
        self.reweight_input = reweight_input
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.param_numels = [p.numel() for n, p in model.named_parameters() if p.requires_grad]
        if not self.param_names:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to penalise or train")
        size = {"none": 0, "global": 1, "per_layer": len(self.param_names), "per_weight": sum(self.param_numels)}
        self.log_weight_decay: nn.Parameter | None = None
        if weight_decay != "none":
            self.log_weight_decay = nn.Parameter(torch.full((size[weight_decay],), float(init_log_decay)))
        self.class_logits: nn.Parameter | None = None
        self.num_classes = num_classes
        if class_weights:
            self.class_logits = nn.Parameter(torch.zeros(int(num_classes)))  # type: ignore[arg-type]
        self.reweighting_net = reweighting_net
        if reweighting_net is not None and zero_init_reweighting:
            last = [m for m in reweighting_net.modules() if isinstance(m, nn.Linear)]
            if last:
                with torch.no_grad():
                    last[-1].weight.zero_()
                    if last[-1].bias is not None:
                        last[-1].bias.zero_()
        if not list(self.parameters()):
            raise ValueError(
                "no hyperparameter to tune: set weight_decay, class_weights=True or give a reweighting_net"
            )

    # -- the λ dict ---------------------------------------------------------------------------------------------
    def params(self) -> dict[str, Tensor]:
        """The hyperparameters as ``{name: tensor}`` (the module's own parameters, not detached)."""
        out: dict[str, Tensor] = {}
        if self.log_weight_decay is not None:
            out[LOG_DECAY] = self.log_weight_decay
        if self.class_logits is not None:
            out[CLASS_LOGITS] = self.class_logits
        if self.reweighting_net is not None:
            for name, p in self.reweighting_net.named_parameters():
                out[REWEIGHT + name] = p
        return out

    def parameter_list(self) -> list[nn.Parameter]:
        """The parameters of :meth:`params`, in that order (what the hyper optimizer steps)."""
        return list(self.params().values())  # type: ignore[arg-type]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every hyperparameter tensor (for logs and reports)."""
        return {k: tuple(v.shape) for k, v in self.params().items()}

    def numel(self) -> int:
        """Number of scalar hyperparameters."""
        return sum(v.numel() for v in self.params().values())

    def _lam(self, lam: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return self.params() if lam is None else lam

    # -- the objective ------------------------------------------------------------------------------------------
    def penalty(self, w: dict[str, Tensor], lam: dict[str, Tensor] | None = None) -> Tensor:
        """``R(w, λ) = Σ_g e^{λ_g}/2 ‖w_g‖²`` (per weight: ``½ Σ_i e^{λ_i} w_i²``); 0 without weight decay.

        Args:
            w: The model's parameters by name (every name of the model's ``named_parameters``).
            lam: The hyperparameters (default: the module's own).
        """
        lam = self._lam(lam)
        if LOG_DECAY not in lam:
            return torch.zeros((), device=next(iter(w.values())).device, dtype=next(iter(w.values())).dtype)
        log_decay = lam[LOG_DECAY]
        tensors = [w[n] for n in self.param_names]
        if self.weight_decay == "per_weight":
            flat = torch.cat([t.reshape(-1) for t in tensors])
            return 0.5 * (log_decay.exp() * flat.square()).sum()
        squares = torch.stack([t.square().sum() for t in tensors])
        if self.weight_decay == "global":
            return 0.5 * log_decay.exp().squeeze(0) * squares.sum()
        return 0.5 * (log_decay.exp() * squares).sum()

    def weights(
        self, x: Tensor, y: Tensor, per_example_loss: Tensor, lam: dict[str, Tensor] | None = None
    ) -> Tensor | None:
        """The example weights ``ω_i = u_i / mean_j u_j`` with ``u_i = a_{y_i} · sigmoid(r_θ(z_i))``, shape ``(B,)``;
        ``None`` when no example weight is tuned (the plain mean)."""
        lam = self._lam(lam)
        u: Tensor | None = None
        if CLASS_LOGITS in lam:
            if y.dtype.is_floating_point or y.dim() != 1:
                raise ValueError(
                    f"class_weights needs integer class labels of shape (B,), got {y.dtype} of shape {tuple(y.shape)}"
                )
            logits = lam[CLASS_LOGITS]
            u = (logits.shape[0] * torch.softmax(logits, dim=0))[y]
        if self.reweighting_net is not None:
            net_params = {k[len(REWEIGHT) :]: v for k, v in lam.items() if k.startswith(REWEIGHT)}
            z = x if self.reweight_input == "x" else per_example_loss.detach().reshape(-1, 1)
            out = functional_call(self.reweighting_net, net_params, (z,))
            if out.dim() == 2 and out.shape[1] == 1:
                out = out[:, 0]
            if out.shape != per_example_loss.shape:
                raise ValueError(
                    f"the reweighting network must return one logit per example, shape ({per_example_loss.shape[0]},) "
                    f"or ({per_example_loss.shape[0]}, 1), got {tuple(out.shape)}"
                )
            s = torch.sigmoid(out)
            u = s if u is None else u * s
        if u is None:
            return None
        return u / u.mean()

    def train_objective(
        self,
        per_example_loss: Tensor,
        x: Tensor,
        y: Tensor,
        w: dict[str, Tensor],
        lam: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``L_T(w, λ) = (1/B) Σ_i ω_i ℓ_i + R(w, λ)`` (see the module docstring)."""
        omega = self.weights(x, y, per_example_loss, lam)
        data = per_example_loss.mean() if omega is None else (omega * per_example_loss).mean()
        return data + self.penalty(w, lam)

    def values(self) -> dict[str, Tensor]:
        """Constrained values for logging: ``weight_decay`` (``e^λ``) and ``class_weight`` (``a_c``), detached."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if self.log_weight_decay is not None:
                out["weight_decay"] = self.log_weight_decay.exp()
            if self.class_logits is not None:
                out["class_weight"] = self.class_logits.shape[0] * torch.softmax(self.class_logits, dim=0)
        return out
