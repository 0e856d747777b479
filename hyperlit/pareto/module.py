"""Pareto HyperNetworks (Navon et al., "Learning the Pareto Front with Hypernetworks", ICLR 2021).

A hypernetwork ``h(r; φ)`` maps a preference ray r on the simplex to all weights of a target network, which
runs functionally with them (``torch.func``). Each training step draws K rays ``r ~ Dir(α)`` and descends the
linear scalarization (PHN-LS) or the EPO-weighted loss (PHN-EPO) of the m objectives, see
:mod:`hyperlit.pareto.solvers`. Validation evaluates the whole front at fixed test rays and logs ``val/hv``
(hypervolume, minimization, reference point ``ref_point``) and ``val/uniformity``; configure
``ModelCheckpoint(monitor="val/hv", mode="max")`` to keep the best-validation-HV model (the examples do).

Optimizers (fixed order): ``[Adam(hypernetwork)]``. Own counters (persistent buffers): ``ray_step`` (rays are
drawn from a generator seeded by ``(seed, ray_step)``, identical on all DDP ranks), ``epo_fallbacks``,
``epo_solves``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from hyperlit.models.mlp import MLP
from hyperlit.nn import HyperNetwork, batched_call, materialize
from hyperlit.pareto.metrics import FrontEvaluation, evaluate_front, evaluation_rays, sample_rays, validate_ray
from hyperlit.pareto.objectives import ObjectiveSet, make_objectives
from hyperlit.pareto.solvers import SolverOutput, make_solver, objective_gradients

__all__ = ["ParetoHyperNetModule", "ParetoModuleBase"]


def _batch_inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class ParetoModuleBase(pl.LightningModule):
    """What PHN and the per-ray baselines share: objectives, the target network, front evaluation, logging.

    Subclasses implement ``_build_weights`` (create trainable parameters once the target exists),
    ``eval_weights`` (the (R, …) weight sets evaluated at ``self.front_rays``) and ``training_step``.
    """

    def _init_common(
        self,
        objectives: Sequence[str],
        solver: str,
        epo_eps: float,
        target: nn.Module | None,
        in_dim: int | None,
        target_hidden: Sequence[int],
        out_dim: int,
        lr: float,
        weight_decay: float,
        gradient_clip_val: float | None,
        ref_point: Sequence[float] | None,
        eval_metric: str,
    ) -> None:
        self.automatic_optimization = False
        self.objective_set: ObjectiveSet = make_objectives(objectives)
        self.num_objectives = self.objective_set.num_objectives
        self.solver = make_solver(solver, epo_eps)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val}")
        if eval_metric not in ("hard", "relaxed"):
            raise ValueError(f"eval_metric must be 'hard' or 'relaxed', got {eval_metric!r}")
        self.ref_point = tuple(float(v) for v in ref_point) if ref_point is not None else (1.0,) * self.num_objectives
        if len(self.ref_point) != self.num_objectives:
            raise ValueError(
                f"ref_point {list(self.ref_point)} needs {self.num_objectives} entries (one per objective)"
            )
        self.target_hidden = tuple(target_hidden)
        self.out_dim = out_dim
        self.in_dim = in_dim
        self.target: nn.Module | None = None
        self.last_front: FrontEvaluation | None = None
        self._eval_stats: Tensor | None = None
        self.register_buffer("epo_fallbacks", torch.zeros((), dtype=torch.long))
        self.register_buffer("epo_solves", torch.zeros((), dtype=torch.long))
        if target is not None or in_dim is not None:
            self._build(target)

    # -- construction -------------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.target is not None

    def _default_target(self) -> nn.Module:
        if self.in_dim is None:
            raise ValueError(
                "the target MLP needs in_dim: set model.in_dim, pass a target module, or use a DataModule with an "
                "`input_dim` attribute"
            )
        return MLP(self.in_dim, self.target_hidden, self.out_dim)

    def _build(self, target: nn.Module | None = None) -> None:
        target = target if target is not None else self._default_target()
        self._build_weights(target)
        target.requires_grad_(False)  # run functionally; its own parameters are only a template
        self.target = target

    def _build_weights(self, target: nn.Module) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        in_dim = getattr(dm, "input_dim", None)
        if self.built:
            if in_dim is not None and self.in_dim is not None and int(in_dim) != self.in_dim:
                raise ValueError(f"model.in_dim={self.in_dim} but the DataModule's input_dim is {in_dim}")
            return
        if in_dim is None:
            raise ValueError(
                "cannot infer the target's in_dim: set model.in_dim or use a DataModule with an `input_dim` attribute"
            )
        self.in_dim = int(in_dim)
        self.hparams["in_dim"] = self.in_dim  # so checkpoints rebuild the same architecture
        self._build()

    # counters that `--init_from` (fine-tuning) must not copy: a new run starts them afresh
    init_from_skip = ("ray_step", "epo_solves", "epo_fallbacks")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from hyperlit.checkpoint import check_state_dict

        if not self.built:  # runs before load_state_dict: create the parameters the state dict fills
            in_dim = checkpoint.get("hyper_parameters", {}).get("in_dim")
            if in_dim is not None:
                self.in_dim = int(in_dim)
                self._build()
        if self.built:  # a checkpoint of another module or architecture: one clear error naming the tensors
            check_state_dict(self, checkpoint.get("state_dict", {}), source="checkpoint", strict=self.strict_loading)

    # -- shared pieces -----------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError("the module is not built yet: give in_dim/target or run it under a Trainer first")

    def _outputs(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        assert self.target is not None
        return batched_call(self.target, weights, x)

    def _apply_step(self, out: SolverOutput, losses: Tensor, batch_size: int) -> None:
        """Backward, clip, step; count EPO fallbacks and log the step's losses."""
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(out.loss)
        if self.hparams.get("gradient_clip_val"):
            self.clip_gradients(
                opt, gradient_clip_val=self.hparams["gradient_clip_val"], gradient_clip_algorithm="norm"
            )
        opt.step()
        if self.solver.name == "epo":
            self.epo_solves += len(out.modes)
            if out.fallbacks:
                before = int(self.epo_fallbacks)
                self.epo_fallbacks += out.fallbacks
                after = int(self.epo_fallbacks)
                # warn at the 1st, 10th, 100th, … fallback; the running count is logged as train/epo_fallbacks
                if math.floor(math.log10(after)) > (math.floor(math.log10(before)) if before else -1):
                    rank_zero_warn(f"EPO LP fell back to r/Σr ({after} times so far); last reason: {out.reasons[-1]}")
        # self.log costs ~5 ms a call on CPU; only log on the steps the logger writes (log_every_n_steps)
        connector = getattr(self._trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        logs = {f"train/{n}": losses[:, j].mean().detach() for j, n in enumerate(self.objective_set.names)}
        logs["train/loss"] = out.loss.detach()
        if self.solver.name == "epo":
            logs["train/epo_fallbacks"] = self.epo_fallbacks.float()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)

    def all_reduce_for_epo(self, losses: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """DDP hook for EPO: the mean over ranks of the (K, m) losses and (K, m, P) per-objective gradients.

        ``torch.autograd.grad`` bypasses DDP's gradient hooks, so without this every rank would solve its own LP
        from local gradients; with it every rank solves the same LP (identical β, then one synced backward).
        The losses are cloned first: the strategy reduces in place and ``losses.detach()`` shares its storage with
        the rank's own losses, whose logged values and loss value would otherwise silently become the rank mean.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return losses, grads
        strategy = trainer.strategy
        return strategy.reduce(losses.detach().clone(), reduce_op="mean"), strategy.reduce(grads, reduce_op="mean")

    # -- evaluation ----------------------------------------------------------------------------------------
    @property
    def front_rays(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_weights(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _eval_start(self) -> None:
        self._eval_stats = None

    def _eval_step(self, batch: Any, weights: dict[str, Tensor] | None = None) -> None:
        self._require_built()
        outputs = self._outputs(self.eval_weights() if weights is None else weights, _batch_inputs(batch))
        stats = self.objective_set.statistics(outputs, batch)
        self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats

    def _eval_end(self, stage: str) -> FrontEvaluation | None:
        stats = self._eval_stats
        self._eval_stats = None
        if stats is None:
            return None
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
        losses = self.objective_set.from_statistics(stats, hard=self.hparams.get("eval_metric", "hard") == "hard")
        front = evaluate_front(losses, self.front_rays, self.ref_point, self.objective_set.names)
        logs = {f"{stage}/hv": front.hv, f"{stage}/uniformity": front.uniformity}
        for j, name in enumerate(self.objective_set.names):
            logs[f"{stage}/{name}_mean"] = float(losses[:, j].mean())
        # the statistics were summed over ranks above, so every rank logs the same values
        self.log_dict(logs, prog_bar=False, sync_dist=True)
        self.last_front = front
        return front

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def weights_for_rays(self, rays: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has fixed rays; evaluate it at its own rays")

    @torch.no_grad()
    def evaluate(self, dataloader: Any, rays: Tensor | None = None) -> FrontEvaluation:
        """Front on every batch of ``dataloader`` at ``rays`` (default: the evaluation rays); no Trainer needed.

        Single process: under DDP use the Trainer's ``validate``/``test``, which reduce over ranks.
        """
        self._require_built()
        if rays is not None:
            rays = torch.stack([validate_ray(r, self.num_objectives) for r in rays]).to(self.device)
        was_training = self.training
        self.eval()
        self._eval_start()
        weights = None if rays is None else self.weights_for_rays(rays)
        for batch in dataloader:
            self._eval_step([b.to(self.device) if isinstance(b, Tensor) else b for b in batch], weights)
        stats = self._eval_stats
        self._eval_stats = None
        self.train(was_training)
        if stats is None:
            raise ValueError("evaluate() got an empty dataloader")
        losses = self.objective_set.from_statistics(stats, hard=self.hparams.get("eval_metric", "hard") == "hard")
        return evaluate_front(
            losses, self.front_rays if rays is None else rays, self.ref_point, self.objective_set.names
        )


class ParetoHyperNetModule(ParetoModuleBase):
    """PHN-LS / PHN-EPO over any target ``nn.Module`` (default: an MLP ``in_dim → target_hidden → out_dim``).

    Args:
        objectives: Objective names: fairness ``bce``, ``fpr_gap``, ``fnr_gap`` (batches ``(x, y, group)``) or
            multi-task ``ce_0``, ``ce_1``, … (batches ``(x, targets)``, outputs (B, T, C)).
        solver: ``ls`` (linear scalarization) or ``epo`` (exact Pareto optimal LP).
        epo_gradients: Gradients the EPO LP sees: w.r.t. the hypernetwork parameters φ (``hypernet``, as in
            the paper) or w.r.t. the generated target weights θ(r) (``target``; a cheaper variant — m instead of
            K·m backward passes through a much smaller vector, but ignores how φ couples the rays).
        epo_eps: Non-uniformity threshold between EPO's balance and dominance LPs.
        alpha: Dirichlet concentration of the training rays (paper: 0.2).
        rays_per_step: K rays drawn per step (paper: 1); the losses of all K are averaged.
        target: Target module whose parameters are generated (``None``: the MLP below).
        in_dim: Input features of the default MLP (``None``: taken from the DataModule's ``input_dim``).
        target_hidden: Hidden sizes of the default MLP (COSMOS's reconstruction of PHN's fairness MLP: 60, 25).
        out_dim: Outputs of the default MLP (1 logit for the fairness objectives).
        hnet_hidden: Ray-MLP hidden sizes. The official ``m→100→100→100`` MLP with a linear last layer followed
            by linear per-tensor heads is the same function class as ``(100, 100)`` here, whose output layer
            holds all heads (two consecutive linear maps fold into one).
        chunk_size: Generate the weights in chunks of this size (chunked hypernet for large targets).
        chunk_emb_dim: Chunk-embedding size of the chunked hypernet.
        out_init_std: Std of the hypernet output layer's weights (``None``: PyTorch default, as the official code).
        init_bias_from_target: Start the hypernet at the target's own initialisation (output bias = its weights).
        lr: Adam learning rate (paper: 1e-4).
        weight_decay: Adam weight decay.
        gradient_clip_val: Clip the hypernet gradient norm to this value (``None``: no clipping).
        num_test_rays: Number of test rays for m = 2.
        test_ray_partitions: Das–Dennis partitions of the test rays for m ≥ 3 (interior points only).
        eval_rays: Explicit evaluation rays (overrides the two settings above).
        ref_point: Hypervolume reference point (default: all ones).
        eval_metric: Evaluate the front on ``hard`` metrics (BCE and hard FPR/FNR gaps; error rates for
            multi-task) or on the ``relaxed`` training losses.
        predict_ray: Preference ray used by ``predict_step`` (``hyperlit predict --model.predict_ray [..]``);
            not stored in checkpoints, so it can be chosen at prediction time.
        seed: Seed of the training-ray generator (combined with the step counter).
    """

    def __init__(
        self,
        objectives: tuple[str, ...] = ("bce", "fpr_gap", "fnr_gap"),
        solver: Literal["ls", "epo"] = "epo",
        epo_gradients: Literal["hypernet", "target"] = "hypernet",
        epo_eps: float = 1e-4,
        alpha: float = 0.2,
        rays_per_step: int = 1,
        target: nn.Module | None = None,
        in_dim: int | None = None,
        target_hidden: tuple[int, ...] = (60, 25),
        out_dim: int = 1,
        hnet_hidden: tuple[int, ...] = (100, 100),
        chunk_size: int | None = None,
        chunk_emb_dim: int = 8,
        out_init_std: float | None = None,
        init_bias_from_target: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        gradient_clip_val: float | None = None,
        num_test_rays: int = 25,
        test_ray_partitions: int = 12,
        eval_rays: list[list[float]] | None = None,
        ref_point: tuple[float, ...] | None = None,
        eval_metric: Literal["hard", "relaxed"] = "hard",
        predict_ray: list[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        ignore = ["predict_ray"] + (["target"] if isinstance(target, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if rays_per_step < 1:
            raise ValueError(f"rays_per_step must be >= 1, got {rays_per_step}")
        if epo_gradients not in ("hypernet", "target"):
            raise ValueError(f"epo_gradients must be 'hypernet' or 'target', got {epo_gradients!r}")
        self.register_buffer("ray_step", torch.zeros((), dtype=torch.long))
        self.hnet: HyperNetwork | None = None
        self._init_common(
            objectives,
            solver,
            epo_eps,
            target,
            in_dim,
            target_hidden,
            out_dim,
            lr,
            weight_decay,
            gradient_clip_val,
            ref_point,
            eval_metric,
        )
        m = self.num_objectives
        if eval_rays is not None:
            rays = torch.stack([validate_ray(r, m) for r in eval_rays])
        else:
            rays = evaluation_rays(m, num_test_rays, test_ray_partitions)
        self.register_buffer("_front_rays", rays, persistent=False)
        self._predict_ray: Tensor | None = None
        self.predict_ray = predict_ray

    def _build_weights(self, target: nn.Module) -> None:
        hp = self.hparams
        self.hnet = HyperNetwork(
            target,
            self.num_objectives,
            hidden=tuple(hp["hnet_hidden"]),
            chunk_size=hp["chunk_size"],
            chunk_emb_dim=hp["chunk_emb_dim"],
            out_init_std=hp["out_init_std"],
            init_bias_from_target=hp["init_bias_from_target"],
        )

    # -- rays ----------------------------------------------------------------------------------------------
    @property
    def predict_ray(self) -> list[float] | None:
        return None if self._predict_ray is None else self._predict_ray.tolist()

    @predict_ray.setter
    def predict_ray(self, ray: Sequence[float] | Tensor | None) -> None:
        self._predict_ray = None if ray is None else validate_ray(ray, self.num_objectives)

    @property
    def front_rays(self) -> Tensor:
        return self._front_rays

    def training_rays(self) -> Tensor:
        """The K rays of the current step, from ``(seed, ray_step)``: the same on every rank, no broadcast."""
        hp = self.hparams
        return sample_rays(hp["rays_per_step"], self.num_objectives, hp["alpha"], hp["seed"], int(self.ray_step))

    # -- weights for rays ------------------------------------------------------------------------------------
    def weights_for_rays(self, rays: Tensor) -> dict[str, Tensor]:
        """Generated target weights, name → (K, *shape), for (K, m) rays."""
        self._require_built()
        assert self.hnet is not None
        return self.hnet(rays.to(self.device, torch.float32))

    def eval_weights(self) -> dict[str, Tensor]:
        return self.weights_for_rays(self.front_rays)

    def forward(self, x: Tensor, ray: Sequence[float] | Tensor) -> Tensor:
        """Target outputs for one preference ray."""
        r = validate_ray(ray, self.num_objectives)
        return self._outputs(self.weights_for_rays(r[None]), x)[0]

    def network_for_ray(self, ray: Sequence[float] | Tensor) -> nn.Module:
        """A plain ``nn.Module`` (a copy of the target) holding the weights generated for ``ray``."""
        self._require_built()
        assert self.hnet is not None and self.target is not None
        r = validate_ray(ray, self.num_objectives)
        with torch.no_grad():
            weights = {n: w[0] for n, w in self.weights_for_rays(r[None]).items()}
        net = materialize(self.target, weights).requires_grad_(True)
        return net.eval()

    # -- training ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._require_built()
        assert self.hnet is not None
        return torch.optim.Adam(
            self.hnet.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    def _epo_gradients(self, losses: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        assert self.hnet is not None
        if self.hparams["epo_gradients"] == "target":
            grads = objective_gradients(losses, [flat], separable=True)
        else:
            grads = objective_gradients(losses, [p for p in self.hnet.parameters() if p.requires_grad])
        return self.all_reduce_for_epo(losses, grads)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._require_built()
        assert self.hnet is not None
        rays = self.training_rays().to(self.device)
        flat = self.hnet.flat(rays)
        x = _batch_inputs(batch)
        outputs = self._outputs(self.hnet.unflatten(flat), x)
        losses = self.objective_set.losses(outputs, batch)  # (K, m)
        out = self.solver(losses, rays, lambda ls: self._epo_gradients(ls, flat))
        self._apply_step(out, losses, x.shape[0])
        self.ray_step += 1
        return out.loss.detach()

    # -- prediction --------------------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Predictions (probabilities) of the network for ``predict_ray`` on the batch's inputs."""
        if self._predict_ray is None:
            raise ValueError(
                "predict needs a preference ray: pass --model.predict_ray '[r1, ..., rm]' "
                f"({self.num_objectives} non-negative entries summing to 1) or set module.predict_ray"
            )
        return self.objective_set.predict(self(_batch_inputs(batch), self._predict_ray))
