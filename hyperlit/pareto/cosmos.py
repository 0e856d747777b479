"""COSMOS (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning", ICDM 2021).

No hypernetwork: one ordinary network takes the preference ray as an extra input and learns the whole front.
:class:`RayConditioner` wraps any target: tabular inputs (B, d) get the ray concatenated to the features (the
target's first layer takes ``d + m``); images (B, C, H, W) get it as m extra channels, the ray ``(m, 1, 1)``
upsampled by two transposed convolutions and a nearest-neighbour resize to H × W (the first layer takes
``C + m`` channels). Each training step draws ``r ~ Dir(α)`` and descends

    ``Σ_k r_k ℓ_k − λ · cos(ℓ, r)``

(COSMOS ``methods/cosmos/cosmos.py``), the linear scalarization plus a cosine term that pulls the loss vector
towards the ray: the ray convention is ``ℓ ∝ r``, not EPO's ``r ⊙ ℓ`` equal, so ``val/uniformity`` (defined for
the EPO convention) does not rank COSMOS against PHN; the hypervolume does. COSMOS's settings: λ = 2, α = 1.2 on
Multi-MNIST, λ = 0.01, α = 0.5 on Adult/Compas (Credit: λ = 0.01), ``Adam(lr=1e-3)``.

Evaluation, logging, checkpoints and prediction are those of
:class:`~hyperlit.pareto.module.ParetoHyperNetModule` (the same
:class:`~hyperlit.pareto.front_metric.FrontStatistics` at the same test rays and reference point): the R front rays
run through the conditioned model in one batched call, outputs (R, B, …).

Optimizers (fixed order): ``[optimizer(the conditioned model's parameters)]`` (default ``Adam(lr=1e-3)``), with an
optional ``lr_scheduler`` stepped once per epoch. Under DDP the parameters are ordinary ones (DDP's reducer
averages their gradients); the cosine is taken of the rank-mean losses, so for batch-mean objectives a W-process
step equals one process on the W-times larger batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from hyperlit.models.mlp import MLP
from hyperlit.pareto.metrics import sample_rays, validate_ray
from hyperlit.pareto.module import RayConditionedModule, _batch_inputs
from hyperlit.pareto.objectives import ObjectiveSet
from hyperlit.pareto.solvers import SolverOutput

__all__ = ["COSMOSMultiLeNet", "CosmosModule", "RayConditioner", "cosmos_loss", "ray_upsampler"]

InputKind = Literal["auto", "tabular", "image"]


def ray_upsampler(num_objectives: int) -> nn.Sequential:
    """COSMOS's ray-to-image map (``Upsampler``): ``(R, m, 1, 1) → (R, m, 10, 10)``, resized to H × W later.

    ``ConvTranspose2d(m, m, 4, stride 1, pad 0) → ReLU → ConvTranspose2d(m, m, 6, stride 2, pad 1) → ReLU``, no
    biases (spatial sizes 1 → 4 → 10).
    """
    m = num_objectives
    return nn.Sequential(
        nn.ConvTranspose2d(m, m, kernel_size=4, stride=1, padding=0, bias=False),
        nn.ReLU(),
        nn.ConvTranspose2d(m, m, kernel_size=6, stride=2, padding=1, bias=False),
        nn.ReLU(),
    )


def _first_layer(target: nn.Module) -> nn.Module | None:
    """The first ``nn.Linear`` or ``nn.Conv*d`` in ``target``'s registration order (lazy layers count too)."""
    for mod in target.modules():
        if isinstance(mod, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
            return mod
    return None


def _first_width(layer: nn.Module | None) -> int | None:
    """Input features or channels the first layer takes (``None``: unknown, e.g. a lazy layer)."""
    if layer is None or isinstance(layer, nn.modules.lazy.LazyModuleMixin):
        return None
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return int(layer.in_channels)
    return None


class RayConditioner(nn.Module):
    """Any target network conditioned on a preference ray (COSMOS ``Upsampler``).

    Args:
        target: The network; its first layer takes ``d + m`` features (tabular) or ``C + m`` channels (images).
        num_objectives: m, the length of the rays.
        input_kind: ``tabular`` (concatenate the ray to (B, d) features), ``image`` (the ray upsampled to m extra
            channels of (B, C, H, W) images) or ``auto``: ``image`` when the target's first layer is an
            ``nn.Conv2d``, ``tabular`` when it is an ``nn.Linear``.
    """

    def __init__(self, target: nn.Module, num_objectives: int, input_kind: InputKind = "auto") -> None:
        super().__init__()
        if num_objectives < 2:
            raise ValueError(f"a preference ray needs >= 2 objectives, got {num_objectives}")
        first = _first_layer(target)
        if input_kind == "auto":
            if isinstance(first, nn.Conv2d):
                input_kind = "image"
            elif isinstance(first, nn.Linear):
                input_kind = "tabular"
            else:
                raise ValueError(
                    f"cannot tell whether {type(target).__name__} takes tabular or image inputs (its first layer is "
                    f"{type(first).__name__ if first is not None else 'missing'}): give input_kind='tabular' or "
                    "'image'"
                )
        if input_kind not in ("tabular", "image"):
            raise ValueError(f"input_kind must be 'auto', 'tabular' or 'image', got {input_kind!r}")
        self.target = target
        self.num_objectives = int(num_objectives)
        self.input_kind: str = input_kind
        #: features/channels the target's first layer takes (``None`` when it cannot be read, e.g. lazy layers)
        self.target_width = _first_width(first)
        self.upsampler = ray_upsampler(self.num_objectives) if input_kind == "image" else None

    def check_width(self, data_width: int) -> None:
        """``ValueError`` unless the target's first layer takes ``data_width + m`` features or channels."""
        m = self.num_objectives
        if self.target_width is None or self.target_width == data_width + m:
            return
        unit = "input features" if self.input_kind == "tabular" else "input channels"
        what = "d" if self.input_kind == "tabular" else "C"
        raise ValueError(
            f"{type(self.target).__name__}'s first layer takes {self.target_width} {unit}, but COSMOS feeds it the "
            f"data's {what}={data_width} plus the ray's m={m}: build it with {data_width + m} {unit} "
            f"({what} + m)"
        )

    def condition(self, x: Tensor, rays: Tensor) -> Tensor:
        """The (R·B, …) conditioned inputs: row ``k·B + i`` is example i with ray k."""
        m = self.num_objectives
        if rays.dim() != 2 or rays.shape[1] != m:
            raise ValueError(f"rays must be (R, m) = (R, {m}), got shape {tuple(rays.shape)}")
        r, b = rays.shape[0], x.shape[0]
        rays = rays.to(x.dtype)
        if self.input_kind == "tabular":
            if x.dim() != 2:
                raise ValueError(
                    f"tabular COSMOS takes (B, d) inputs, got shape {tuple(x.shape)} (give input_kind='image' and a "
                    "convolutional target for images)"
                )
            self.check_width(x.shape[1])
            joined = torch.cat([x.expand(r, *x.shape), rays[:, None, :].expand(r, b, m)], dim=-1)
            return joined.reshape(r * b, x.shape[1] + m)
        if x.dim() != 4:
            raise ValueError(f"image COSMOS takes (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        self.check_width(x.shape[1])
        assert self.upsampler is not None
        # one upsampled map per ray (COSMOS computes it per example from the repeated ray: the same values)
        maps = F.interpolate(self.upsampler(rays.view(r, m, 1, 1)), size=tuple(x.shape[-2:]), mode="nearest")
        joined = torch.cat([x.expand(r, *x.shape), maps[:, None].expand(r, b, *maps.shape[1:])], dim=2)
        return joined.reshape(r * b, *joined.shape[2:])

    @override
    def forward(self, x: Tensor, rays: Tensor) -> Tensor:
        """Outputs (R, B, …) of the target for the B examples of ``x`` at each of the (R, m) ``rays``, one call."""
        joined = self.condition(x, rays)
        r, b = rays.shape[0], x.shape[0]
        out = self.target(joined)
        if not isinstance(out, Tensor) or out.shape[0] != r * b:
            raise ValueError(
                f"{type(self.target).__name__} must return one tensor with the batch first, (B, …); got "
                f"{type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}"
            )
        return out.view(r, b, *out.shape[1:])


class COSMOSMultiLeNet(nn.Module):
    """COSMOS's Multi-MNIST network (``models/simple.py:MultiLeNet``) with ``in_channels + num_objectives`` inputs.

    ``Conv(C+m→10, 5) → MaxPool2 → ReLU → Conv(10→20, 5) → MaxPool2 → ReLU → Flatten(720) → Linear(720, 50) → ReLU``
    and one ``Linear(50, 10)`` head per task; 36 × 36 inputs, outputs (B, T, 10). Wrapped in a
    :class:`RayConditioner` (m = 2) it has 43,058 parameters, the upsampler's included.

    Args:
        in_channels: Channels of the images (1 for Multi-MNIST).
        num_objectives: m, the ray's length (extra input channels).
        num_tasks: Number of heads T.
        num_classes: Classes per head.
    """

    def __init__(self, in_channels: int = 1, num_objectives: int = 2, num_tasks: int = 2, num_classes: int = 10):
        super().__init__()
        self.shared = nn.Sequential(
            nn.Conv2d(in_channels + num_objectives, 10, kernel_size=5),
            nn.MaxPool2d(kernel_size=2),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.MaxPool2d(kernel_size=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(720, 50),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList([nn.Linear(50, num_classes) for _ in range(num_tasks)])

    @override
    def forward(self, x: Tensor) -> Tensor:
        h = self.shared(x)
        return torch.stack([head(h) for head in self.heads], dim=1)


def cosmos_loss(
    losses: Tensor, rays: Tensor, cosine_penalty: float, mean_losses: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """COSMOS's training loss ``mean_k (Σ_j r_kj ℓ_kj − λ · cos(ℓ_k, r_k))`` of (K, m) losses and rays.

    Args:
        losses: (K, m) losses, differentiable.
        rays: (K, m) preference rays.
        cosine_penalty: λ.
        mean_losses: Under DDP, the rank mean ``ℓ̄`` of ``losses`` (a constant): the cosine is then ``cos(ℓ̄, r)``
            with its gradient taken through this rank's losses, so DDP's gradient averaging gives the gradient of
            ``cos(ℓ̄, r)`` (``None``: ``ℓ̄ = ℓ``).

    Returns:
        The scalar loss and the (K,) cosines.
    """
    rays = rays.to(losses.dtype)
    at = losses if mean_losses is None else losses - losses.detach() + mean_losses.detach()
    cos = F.cosine_similarity(at, rays, dim=-1)
    return ((losses * rays).sum(-1) - cosine_penalty * cos).mean(), cos


class CosmosModule(RayConditionedModule):
    """COSMOS over any target ``nn.Module`` (default: an MLP ``in_dim + m → target_hidden → out_dim``).

    Args:
        objectives: As for :class:`~hyperlit.pareto.module.ParetoHyperNetModule` (fairness names, ``ce_0``, ``ce_1``,
            … or an :class:`~hyperlit.pareto.objectives.ObjectiveSet`).
        alpha: Dirichlet concentration of the training rays (COSMOS: 0.5 on Adult/Compas, 1.2 on Multi-MNIST).
        cosine_penalty: λ of the cosine term (COSMOS: 0.01 on Adult/Compas/Credit, 2 on Multi-MNIST).
        rays_per_step: K rays drawn per step (COSMOS: 1), run in one batched call; their losses are averaged.
        target: The network conditioned on the ray (``None``: the MLP below); its first layer takes ``d + m``
            features (tabular) or ``C + m`` channels (images), e.g. :class:`COSMOSMultiLeNet`. A module given in
            Python is not saved in checkpoints' hyperparameters: give it again to ``load_from_checkpoint``.
        input_kind: How the ray enters, see :class:`RayConditioner` (``auto``: from the target's first layer).
        in_dim: Data features d of the default MLP, which takes ``d + m`` (``None``: the DataModule's
            ``input_dim``).
        target_hidden: Hidden sizes of the default MLP (COSMOS ``FullyConnected``: 60, 25).
        out_dim: Outputs of the default MLP (1 logit for the fairness objectives).
        optimizer: Optimizer of the network's parameters (COSMOS: ``Adam(lr=1e-3)``, the default).
        lr_scheduler: Optional learning-rate schedule of ``optimizer``, stepped once per epoch
            (``ReduceLROnPlateau`` follows ``val/hv``; give it ``mode="max"``).
        gradient_clip_val: Clip the gradient norm to this value (``None``: no clipping).
        num_test_rays: Number of test rays for m = 2.
        test_ray_partitions: Das–Dennis partitions of the test rays for m ≥ 3 (interior points only).
        eval_rays: Explicit evaluation rays (overrides the two settings above).
        ref_point: Hypervolume reference point (default: all ones).
        eval_metric: ``hard`` or ``relaxed`` evaluation values, as for PHN.
        nan_policy: On NaN/inf input features or training losses: ``raise`` or ``skip`` the step on every rank.
        predict_ray: Preference ray used by ``predict_step`` (not stored in checkpoints).
        predict_rays: Several rays at once: predictions (R, B, …) (not stored in checkpoints).
        seed: Seed of the training-ray generator (combined with the step counter).
    """

    def __init__(
        self,
        objectives: tuple[str, ...] | ObjectiveSet = ("bce", "fpr_gap", "fnr_gap"),
        alpha: float = 0.5,
        cosine_penalty: float = 0.01,
        rays_per_step: int = 1,
        target: nn.Module | None = None,
        input_kind: InputKind = "auto",
        in_dim: int | None = None,
        target_hidden: tuple[int, ...] = (60, 25),
        out_dim: int = 1,
        optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-3),
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        num_test_rays: int = 25,
        test_ray_partitions: int = 12,
        eval_rays: list[list[float]] | None = None,
        ref_point: tuple[float, ...] | None = None,
        eval_metric: Literal["hard", "relaxed"] = "hard",
        nan_policy: Literal["raise", "skip"] = "raise",
        predict_ray: list[float] | None = None,
        predict_rays: list[list[float]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        ignore = ["predict_ray", "predict_rays"] + (["target"] if isinstance(target, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if cosine_penalty < 0:
            raise ValueError(f"cosine_penalty must be >= 0, got {cosine_penalty}")
        if rays_per_step < 1:
            raise ValueError(f"rays_per_step must be >= 1, got {rays_per_step}")
        if input_kind not in ("auto", "tabular", "image"):
            raise ValueError(f"input_kind must be 'auto', 'tabular' or 'image', got {input_kind!r}")
        self.register_buffer("ray_step", torch.zeros((), dtype=torch.long))
        self._init_common(
            objectives,
            "ls",  # the step's loss is COSMOS's own; the base's solver only names how steps are logged
            1e-4,
            target,
            in_dim,
            target_hidden,
            out_dim,
            optimizer,
            lr_scheduler,
            gradient_clip_val,
            ref_point,
            eval_metric,
            nan_policy,
        )
        self._init_rays(eval_rays, num_test_rays, test_ray_partitions, predict_ray, predict_rays)

    # -- construction ----------------------------------------------------------------------------------------
    @property
    def conditioner(self) -> RayConditioner:
        """The trained network, the target wrapped in its :class:`RayConditioner`."""
        self._require_built()
        assert isinstance(self.target, RayConditioner)
        return self.target

    @override
    def _default_target(self) -> nn.Module:
        if self.in_dim is None:
            raise ValueError(
                "the target MLP needs in_dim: set model.in_dim, pass a target module, or use a DataModule with an "
                "`input_dim` attribute"
            )
        return MLP(self.in_dim + self.num_objectives, self.target_hidden, self.out_dim)

    @override
    def _build(self, target: nn.Module | None = None) -> None:
        """Wrap the target in a :class:`RayConditioner`; it stays trainable (the base freezes function templates)."""
        target = target if target is not None else self._default_target()
        batch_norms = [
            name or type(mod).__name__
            for name, mod in target.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm)
        ]
        if batch_norms:
            raise ValueError(
                f"the target's batch-norm layers {batch_norms} would mix the rays of one batched call (COSMOS runs "
                "the R rays' copies of a batch as one batch of R·B rows): use nn.LayerNorm or nn.GroupNorm"
            )
        conditioned = (
            target
            if isinstance(target, RayConditioner)
            else RayConditioner(target, self.num_objectives, self.hparams["input_kind"])
        )
        if conditioned.num_objectives != self.num_objectives:
            raise ValueError(
                f"the RayConditioner takes rays of {conditioned.num_objectives} entries, the objectives are "
                f"{self.num_objectives}"
            )
        trainable = [p.requires_grad for p in conditioned.parameters()]
        super()._build(conditioned)
        for p, flag in zip(conditioned.parameters(), trainable):
            p.requires_grad_(flag)  # the user's own frozen parameters stay frozen
        if self.in_dim is not None and conditioned.input_kind == "tabular":
            conditioned.check_width(self.in_dim)

    @override
    def _build_weights(self, target: nn.Module) -> None:
        """Nothing to create: the conditioned network's own parameters are trained."""

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        in_dim = getattr(dm, "input_dim", None)
        if in_dim is not None and self.conditioner.input_kind == "tabular":
            self.conditioner.check_width(int(in_dim))

    @override
    def _trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.conditioner.parameters() if p.requires_grad]

    # -- rays and outputs ------------------------------------------------------------------------------------
    def training_rays(self) -> Tensor:
        """The K rays of the current step, from ``(seed, ray_step)``: the same on every rank, no broadcast."""
        hp = self.hparams
        return sample_rays(hp["rays_per_step"], self.num_objectives, hp["alpha"], hp["seed"], int(self.ray_step))

    @override
    def weights_for_rays(self, rays: Tensor) -> dict[str, Tensor]:
        """COSMOS has no generated weights: the rays themselves, ``{"rays": (R, m)}``, condition the network."""
        self._require_built()
        return {"rays": rays.to(self.device, torch.float32)}

    @override
    def eval_weights(self) -> dict[str, Tensor]:
        return self.weights_for_rays(self.front_rays)

    @override
    def _outputs(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        """(R, B, …) outputs of the conditioned network at the rays of ``weights_for_rays``, one batched call."""
        return self.conditioner(x, weights["rays"])

    @override
    def forward(self, x: Tensor, ray: Sequence[float] | Tensor) -> Tensor:
        """Outputs (B, …) for one preference ray."""
        r = validate_ray(ray, self.num_objectives)
        return self._outputs(self.weights_for_rays(r[None]), x)[0]

    # -- training ----------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One step on the K rays of :meth:`training_rays`: ``mean_k (Σ_j r_kj ℓ_kj − λ cos(ℓ̄_k, r_k))``.

        ``ℓ̄`` is the rank mean of the losses (the losses themselves in one process) with the gradient of this
        rank's losses, so after DDP's gradient averaging the cosine term's gradient is that of the mean losses.
        """
        rays = self.training_rays().to(self.device)
        x = _batch_inputs(batch)
        outputs = self._outputs(self.weights_for_rays(rays), x)
        losses = self.objective_set.losses(outputs, batch)  # (K, m)
        if not self._check_step(batch, batch_idx, losses, rays):
            self.ray_step += 1  # a skipped step still moves on to the next rays
            return None
        mean = self.reduce_mean(losses.detach()) if self.distributed else None
        loss, cos = cosmos_loss(losses, rays, self.hparams["cosine_penalty"], mean)
        self._apply_step(SolverOutput(loss, rays.detach()), losses, x.shape[0])
        if self.should_log_step():
            self.log("train/cos", cos.detach().mean(), on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.ray_step += 1
        return loss.detach()
