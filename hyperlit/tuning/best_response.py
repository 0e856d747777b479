"""Best-response hypernetworks (Lorraine & Duvenaud 2018, "Stochastic Hyperparameter Optimization through
Hypernetworks", arXiv 1802.09419) as a LightningModule.

A hypernetwork ``w_φ(λ)`` (:class:`~hyperlit.nn.hypernet.HyperNetwork`) outputs *every* parameter of a target
network, which is run functionally (``torch.func.functional_call``, batched over the K hyperparameter samples of
a step with ``vmap``). The tuned hyperparameter is an L2 penalty with strength ``exp(λ)`` (``transform="log"``):
one global λ, one per parameter tensor, or one per weight (7,850 for a 784-10 model).

Modes (the alternating loop itself is :class:`~hyperlit.tuning.bilevel.BilevelModule`):

* ``global`` (Alg. 2): phase 1 = the warm-up (``warmup_steps`` / ``warmup_epochs``): φ-steps with λ drawn from a
  fixed broad ``p(λ) = N(prior_mean, prior_std²)`` (unconstrained, optionally clipped); phase 2: φ frozen, only
  λ-steps, λ̂ descending the validation loss of ``w_φ(λ̂)``. The switch is driven by the module's own φ-step
  counter (a checkpointed buffer), not Lightning's ``global_step``.
* ``local`` (Alg. 3): φ-steps at ``λ ~ N(λ̂, σ²)`` (σ = the entries' ``init_sigma``, fixed) alternating with
  λ-steps; a linear (one λ) or factorized-linear (per-weight λ) hypernet fits the tangent of the best response.
* ``simplified`` (Alg. 4): no sampling — φ is trained at the current λ̂ only.

Penalty convention (see :mod:`hyperlit.nn.penalties`): ``squared_norm=True`` (default) is the paper's
``Σ_i exp(λ_i) w_i²``; ``squared_norm=False`` is the official code's un-squared ``exp(λ)·‖w‖₂``. The penalty
covers every generated parameter (weights and biases: 7,850 for 784-10, as in the paper), is added once per
minibatch to the *mean* data loss, and the data loss is the mean over the K hyperparameter samples.

Where the paper (Lorraine & Duvenaud 2018) and its official code differ, the defaults follow the paper: squared
norm, p(λ) = N(0, 1.5²), two λ samples per φ-step; the code's choices are one argument away
(``squared_norm=False``, ``prior_mean=1.0, prior_std=3.0, prior_clip=(-inf, 4)``, ``num_samples=10``). The paper
trains with squared error on one-hot labels (``loss="mse"``); ``cross_entropy`` is the default here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from hyperlit.hparams import Hyperparameter
from hyperlit.models.mlp import MLP
from hyperlit.nn.functional import batched_call, materialize
from hyperlit.nn.hypernet import HyperNetwork, target_shapes
from hyperlit.nn.penalties import expand_strengths, weighted_l2
from hyperlit.tuning.bilevel import BilevelModule

__all__ = ["BestResponseModule"]

Mode = Literal["global", "local", "simplified"]
Penalty = Literal["global", "per_tensor", "per_weight"]


class BestResponseModule(BilevelModule):
    """Hyperparameter optimization with a hypernetwork that outputs all weights of a target network.

    Args:
        mode: ``global`` (fit φ over p(λ), then tune λ̂ on the frozen hypernet), ``local`` (alternate, λ ~ N(λ̂, σ²))
            or ``simplified`` (alternate, φ trained at λ̂ only).
        target: The target network whose parameters are generated; ``None`` builds an MLP from ``input_dim``,
            ``hidden_sizes`` and ``num_classes`` (``hidden_sizes=()``: the paper's linear model). A module passed
            here is not saved in the hyperparameters: pass it again to ``load_from_checkpoint``.
        input_dim: Input features of the default MLP target.
        hidden_sizes: Hidden layers of the default MLP target (the paper: ``()``, ``(100,)``, ``(100, 100)``).
        num_classes: Outputs of the default MLP target (1 for scalar regression).
        penalty: Default search space: one L2 strength (``global``), one per parameter tensor (``per_tensor``) or
            one per weight (``per_weight``, 7,850 for 784-10). Ignored when ``hyperparameters`` is given.
        init_log_penalty: Initial λ = log of the L2 strength of the default search space (official local code: -3.5).
        sample_std: σ of ``N(λ̂, σ²)`` in the local mode (unconstrained, i.e. on log λ) for the default search
            space. The default 0.5 (with the φ learning rate 1e-2 below) is measured to converge: on 6 ridge problems
            × 2 seeds whose optimum is known in closed form (``examples/benchmarks/br_defaults_sweep.py``, 1,000
            full-batch steps from λ̂ = −3.5) the local mode ends at most 0.087 from the optimal log λ (median 0.033),
            against 0.656 (median 0.110) for the former σ = 0.1 with lr 1e-3: a narrow σ leaves the linear
            hypernet's slope (the best response's tangent) poorly determined and slow to follow λ̂, so λ̂ stops where
            the *hypernet's* hypergradient vanishes, not the true one. The paper's σ² = 1e-5 is one argument away
            (``examples/br_mnist_local.yaml``).
        hyperparameters: Explicit search space: exactly one entry with ``low >= 0`` (the L2 strength) of size 1, the
            number of target parameter tensors, or the number of target weights. Use ``transform="log"`` for
            exp(λ)-scaled penalties.
        hnet_hidden: Hidden sizes of the hypernetwork; ``None`` picks the paper's: ``(50,)`` (global mode), ``(10,)``
            (factorized linear, per-weight λ) or ``()`` (linear).
        hnet_activation: Hypernet nonlinearity; ``None``: ``relu`` in the global mode, ``none`` (linear /
            factorized) otherwise.
        hnet_out_init_std: Std of the hypernet's output-layer weights at initialization.
        hnet_bias_init: Start of the hypernet's output bias: the target's own initialization (``target``) or zero
            (``zero``, like the official code's small random hypernet). ``None``: ``target`` in the global mode,
            ``zero`` otherwise. It matters for ``simplified``: trained at a single λ̂, the slope of a linear
            hypernet grows along the generated weights' change from their start, so from zero it points along
            the weights themselves (the shrinkage direction, the best response's tangent for isotropic inputs);
            from a random start it carries that random vector and biases λ̂ (measured in the tests).
        center_hnet_input: Feed the hypernet ``λ − λ̂₀`` (λ̂₀: the initial λ̂) instead of λ — the same affine function
            class, better conditioned: with thousands of hyperparameters near a common value the constant part of
            the input makes every Adam step on the first layer move the output by ~``lr·Σ|λ_i|``. ``None``: True
            for vector λ outside the simplified mode (which needs the raw input, see ``hnet_bias_init``).
        hnet_hidden_bias: Train the biases of the hypernet's hidden layers. ``None``: False for linear bottlenecks
            (``hnet_activation="none"``), whose hidden biases are redundant with the output bias (the paper counts
            them: 164,860 weights for 7,850 → 10 → 7,850); they are frozen at zero because under Adam the product
            ``U·b_hidden`` drifts and blows the generated weights up (measured; see the tests).
        num_samples: λ samples per φ-step in the global and local modes (paper: 2; official code: 10).
        prior_mean: Mean of the global mode's p(λ) (unconstrained, i.e. log strength).
        prior_std: Std of the global mode's p(λ).
        prior_clip: Optional ``(low, high)`` clip of p(λ) samples (official code clips at 4).
        squared_norm: Paper's ``Σ exp(λ_i) w_i²`` (True) or the official code's un-squared ``exp(λ)·‖w‖₂`` (False).
        loss: ``cross_entropy`` or ``mse`` (one-hot targets for integer labels, as in the paper; plain regression
            for float targets).
        loss_scale: Weight ``s`` of the data term of the training objective, ``s · L_data + R(w, exp(λ))``. 1 (default)
            is the paper's mean loss; Lorraine & Duvenaud's code minimises the Gaussian negative log-likelihood
            ``−log N(y; f(x), 0.1²) = 50 · MSE + const``, i.e. ``loss="mse", loss_scale=50``. It changes what λ means:
            the best L2 strength scales with ``s`` (log λ* shifts by ``log s``). The held-out objective of the λ-steps,
            ``train/data_loss`` and ``val/loss`` stay unscaled. Their 1-D MNIST toy
            (``loss_scale=50, squared_norm=False``) is ``examples/benchmarks/ld_toy.py``.
        histogram_every_n_epochs: Log histograms of vector λ (TensorBoard-like loggers) every so many epochs.
        plot_schedule: Add the :class:`~hyperlit.callbacks.hparam_schedule.HyperparameterSchedule` callback.
        train_steps: φ-steps per ``hyper_steps`` λ-steps (local/simplified; forced to 0 in the global mode).
        phi_optimizer: Optimizer of the hypernetwork φ (first optimizer). Default: Adam, lr 1e-2 (measured with
            ``sample_std`` in the local mode: the hypernet must track the best response as fast as λ̂ moves — at
            lr 1e-3 it lags and biases λ̂). A global hypernet over many target weights may need less: on Lorraine &
            Duvenaud's MNIST toy (``examples/benchmarks/ld_toy.py``, 7,850 outputs) 600 phase-1 steps at lr 1e-2
            left λ̂ stuck or far off on 3 of 3 seeds, at 3e-3 within 0.33 of the optimum. The paper: Adam 1e-4;
            the official local code: SGD without momentum.
        hyper_optimizer: Optimizer of λ̂ (second optimizer; official code: Adam lr 0.01). The third optimizer, σ's,
            is never stepped: σ stays at the entries' ``init_sigma``.
        **kwargs: The loop's other settings — ``hyper_steps`` (λ-steps per cycle; global mode: per batch of phase
            2), ``warmup_epochs``/``warmup_steps`` (φ-only steps before λ moves; global mode: phase 1),
            ``hnet_input`` (``unconstrained`` λ or ``constrained`` exp(λ)), ``phi_lr_scheduler``, ``grad_clip``,
            ``nan_policy`` and ``seed`` (all λ sampling): see :class:`~hyperlit.tuning.bilevel.BilevelModule`.
    """

    def __init__(
        self,
        mode: Mode = "local",
        target: nn.Module | None = None,
        input_dim: int = 784,
        hidden_sizes: tuple[int, ...] = (),
        num_classes: int = 10,
        penalty: Penalty = "global",
        init_log_penalty: float = -3.5,
        sample_std: float = 0.5,
        hyperparameters: list[Hyperparameter] | None = None,
        hnet_hidden: tuple[int, ...] | None = None,
        hnet_activation: Literal["relu", "elu", "tanh", "sigmoid", "leaky_relu", "none"] | None = None,
        hnet_out_init_std: float = 0.01,
        hnet_bias_init: Literal["target", "zero"] | None = None,
        center_hnet_input: bool | None = None,
        hnet_hidden_bias: bool | None = None,
        num_samples: int = 2,
        prior_mean: float = 0.0,
        prior_std: float = 1.5,
        prior_clip: tuple[float, float] | None = None,
        squared_norm: bool = True,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        loss_scale: float = 1.0,
        histogram_every_n_epochs: int = 1,
        plot_schedule: bool = True,
        train_steps: int = 1,
        phi_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=1e-2),
        hyper_optimizer: OptimizerCallable = lambda p: torch.optim.Adam(p, lr=0.01),
        **kwargs: Any,
    ) -> None:
        if mode not in ("global", "local", "simplified"):
            raise ValueError(f"mode must be 'global', 'local' or 'simplified', got {mode!r}")
        if penalty not in ("global", "per_tensor", "per_weight"):
            raise ValueError(f"penalty must be 'global', 'per_tensor' or 'per_weight', got {penalty!r}")
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not prior_std > 0 or not math.isfinite(prior_mean):
            raise ValueError(f"need a finite prior_mean and prior_std > 0, got {prior_mean}, {prior_std}")
        if prior_clip is not None and not prior_clip[0] < prior_clip[1]:
            raise ValueError(f"prior_clip must be (low, high) with low < high, got {prior_clip}")
        if not sample_std > 0:
            raise ValueError(f"sample_std must be > 0, got {sample_std}")
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale}")
        if histogram_every_n_epochs < 1:
            raise ValueError(f"histogram_every_n_epochs must be >= 1, got {histogram_every_n_epochs}")
        if mode == "global":
            if kwargs.get("warmup_steps", 0) == 0 and kwargs.get("warmup_epochs", 0) == 0:
                raise ValueError(
                    "the global mode fits φ over p(λ) during the warm-up (phase 1) and then freezes it: set "
                    "warmup_steps or warmup_epochs > 0"
                )
            train_steps = 0  # phase 2: φ frozen, λ-steps only
        elif train_steps < 1:
            raise ValueError(f"mode {mode!r} alternates φ- and λ-steps: train_steps must be >= 1, got {train_steps}")

        if target is None:
            target = MLP(input_dim, hidden_sizes, num_classes)
            classes: int | None = num_classes if num_classes > 1 else None
        else:
            classes = None
        shapes = target_shapes(target)
        numels = [math.prod(s) for s in shapes.values()]
        if hyperparameters is None:  # (not reassigning the argument: save_hyperparameters records it as given)
            size = {"global": 1, "per_tensor": len(numels), "per_weight": sum(numels)}[penalty]
            entries = [
                Hyperparameter(
                    "weight_decay",
                    low=0.0,
                    high=math.inf,
                    init=math.exp(init_log_penalty),
                    init_sigma=sample_std,
                    transform="log",
                    per_example=False,
                    size=size,
                )
            ]
        else:
            entries = list(hyperparameters)
        if len(entries) != 1:
            raise ValueError(
                f"BestResponseModule tunes one L2-penalty entry (scalar or vector), got {[h.name for h in entries]}"
            )
        if entries[0].low < 0:
            raise ValueError(f"the L2 strength {entries[0].name!r} must be non-negative: low={entries[0].low} < 0")
        if entries[0].size not in (1, len(numels), sum(numels)):
            raise ValueError(
                f"hyperparameter {entries[0].name!r} has size {entries[0].size}; expected 1 (global), {len(numels)} "
                f"(one per parameter tensor) or {sum(numels)} (one per weight)"
            )
        super().__init__(
            hyperparameters=entries,
            train_steps=train_steps,
            entropy_weight=0.0,
            tune_sigma=False,
            phi_optimizer=phi_optimizer,
            hyper_optimizer=hyper_optimizer,
            sigma_optimizer=functools.partial(torch.optim.Adam, lr=3e-3),  # σ is fixed: never stepped
            **kwargs,
        )
        if hnet_hidden is None:  # the paper's: 50 ReLU units (global), factorized rank 10 (vector λ), linear
            hnet_hidden = (50,) if mode == "global" else (10,) if self.space.dim > 1 else ()
        if hnet_bias_init is None:
            hnet_bias_init = "target" if mode == "global" else "zero"
        if hnet_bias_init not in ("target", "zero"):
            raise ValueError(f"hnet_bias_init must be 'target' or 'zero', got {hnet_bias_init!r}")
        if center_hnet_input is None:
            center_hnet_input = self.space.dim > 1 and mode != "simplified"
        if hnet_activation is None:
            hnet_activation = "relu" if mode == "global" else "none"
        self.mode = mode
        self.num_samples = num_samples
        self.prior_mean, self.prior_std = prior_mean, prior_std
        self.prior_clip = tuple(prior_clip) if prior_clip is not None else None
        self.squared_norm = squared_norm
        self.loss_name = loss
        self.loss_scale = float(loss_scale)
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.plot_schedule = plot_schedule
        self.hnet = HyperNetwork(
            target,
            cond_dim=self.space.dim,
            hidden=hnet_hidden,
            activation=hnet_activation,
            out_init_std=hnet_out_init_std,
            init_bias_from_target=hnet_bias_init == "target",
        )
        if hnet_bias_init == "zero":
            nn.init.zeros_(self.hnet.head.bias)
        if hnet_hidden_bias is None:
            hnet_hidden_bias = hnet_activation != "none"
        if not hnet_hidden_bias:
            for layer in self.hnet.trunk:
                if isinstance(layer, nn.Linear) and layer.bias is not None:
                    nn.init.zeros_(layer.bias)
                    layer.bias.requires_grad_(False)
        with torch.no_grad():
            offset = self.space.hnet_input(self.space.unconstrained).detach().clone() if center_hnet_input else None
        self.register_buffer("hnet_offset", offset if offset is not None else torch.zeros(self.space.dim))
        self.target = target.requires_grad_(False)  # run functionally: its own parameters are never used or trained
        self.penalty_name = entries[0].name
        self.num_classes = classes  # of the default MLP target (the accuracy's; None: not known)
        self.save_hyperparameters(ignore=["target"])

    # -- sampling (hooks of the loop) -----------------------------------------------------------------
    @override
    def sample_train_lambda(self, batch_size: int) -> Tensor:
        """λ samples (K, H) of a φ-step: p(λ) (global), N(λ̂, σ²) (local) or λ̂ (simplified); detached."""
        u = self.space.unconstrained.detach()
        if self.mode == "simplified":
            return u.unsqueeze(0).clone()
        eps = torch.randn(self.num_samples, self.space.dim, generator=self.rng, device=u.device, dtype=u.dtype)
        if self.mode == "local":
            return u + self.space.sigma.detach() * eps
        lam = self.prior_mean + self.prior_std * eps
        if self.prior_clip is not None:
            lam = lam.clamp(*self.prior_clip)
        return lam

    @override
    def sample_hyper_lambda(self, batch_size: int) -> Tensor:
        """λ̂ itself (1, H), carrying gradient: the λ-step descends L_val(w_φ(λ̂))."""
        return self.space.unconstrained.unsqueeze(0)

    @override
    def phi_parameters(self) -> list[nn.Parameter]:
        """The hypernetwork's parameters (the target's own parameters are placeholders)."""
        return [p for p in self.hnet.parameters() if p.requires_grad]

    # -- model --------------------------------------------------------------------------------------
    def _lam(self, lam: Tensor | None) -> Tensor:
        if lam is None:
            return self.space.unconstrained.unsqueeze(0)
        if lam.dim() == 1:
            lam = lam.unsqueeze(0)
        if lam.dim() != 2 or lam.shape[-1] != self.space.dim:
            raise ValueError(
                f"lam must have shape (K, {self.space.dim}) or ({self.space.dim},), got {tuple(lam.shape)}"
            )
        return lam

    def condition(self, lam: Tensor) -> Tensor:
        """The hypernetwork's input for unconstrained ``lam`` (K, H): ``hnet_input(λ)``, minus λ̂₀'s if centred."""
        return self.space.hnet_input(lam) - self.hnet_offset

    def best_response(self, lam: Tensor | None = None) -> dict[str, Tensor]:
        """Generated target parameters ``w_φ(λ)`` (name → ``(K, *shape)``) at unconstrained ``lam`` (default λ̂)."""
        return self.hnet(self.condition(self._lam(lam)))

    def tuned_target(self) -> nn.Module:
        """A plain copy of the target holding ``w_φ(λ̂)`` (detached), for inference without the hypernet."""
        weights = {n: w[0] for n, w in self.best_response().items()}
        return materialize(self.target, weights).requires_grad_(True)

    @override
    def forward(self, x: Tensor, lam: Tensor | None = None) -> Tensor:
        """Target outputs (K, B, …) for unconstrained ``lam`` (K, H); (B, …) at λ̂ when ``lam`` is None."""
        out = batched_call(self.target, self.best_response(lam), x)
        return out[0] if lam is None else out

    def _data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean loss per weight set: (K, B, C) outputs, (B,) targets → (K,)."""
        k, b = out.shape[:2]
        if y.is_floating_point():
            if self.loss_name == "cross_entropy":
                raise ValueError("loss='cross_entropy' needs integer class labels, got floating-point targets")
            return (out.reshape(k, b, -1) - y.reshape(1, b, -1).to(out.dtype)).square().mean(dim=(1, 2))
        if self.loss_name == "cross_entropy":
            per = F.cross_entropy(out.reshape(k * b, -1), y.repeat(k), reduction="none")
            return per.view(k, b).mean(1)
        onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return (out - onehot).square().mean(dim=(1, 2))

    # -- the two objectives -------------------------------------------------------------------------------
    @override
    def train_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """``mean_k [s · L_train(w_φ(λ_k)) + R(w_φ(λ_k), exp(λ_k))]`` over the K samples ``lam`` (K, H); ``s = loss_scale``."""
        x, y = self.unpack_batch(batch)
        flat = self.hnet.flat(self.condition(lam))  # (K, P)
        out = batched_call(self.target, self.hnet.unflatten(flat), x)
        data = self._data_loss(out, y)
        strength = expand_strengths(self.space.constrained(lam), self.hnet.numels)
        reg = weighted_l2(flat, strength, squared=self.squared_norm)
        if self.should_log_step():  # the data loss unscaled, as val/loss
            self.log_dict({"train/data_loss": data.mean().detach(), "train/penalty": reg.mean().detach()})
        return (self.loss_scale * data + reg).mean()

    @override
    def hyper_loss(self, batch: Any, lam: Tensor) -> Tensor:
        """Unregularized validation loss of ``w_φ(λ)``; λ's gradient flows only through the hypernetwork."""
        x, y = self.unpack_batch(batch)
        return self._data_loss(self(x, lam), y).mean()

    @override
    def evaluate(self, batch: Any) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Unregularized loss of ``w_φ(λ̂)`` and, for integer labels, its logits and the labels."""
        x, y = self.unpack_batch(batch)
        with torch.no_grad():
            out = self(x, self.space.unconstrained.unsqueeze(0))
        loss = self._data_loss(out, y).mean()
        return loss, (None if y.is_floating_point() else (out[0], y))

    @override
    def configure_metrics(self) -> MetricCollection:
        """Loss and micro accuracy (the accuracy is updated only for integer class labels)."""
        metrics = super().configure_metrics()
        metrics.add_metrics({"acc": MulticlassAccuracy(num_classes=self.num_classes, average="micro")})
        return metrics

    # -- Lightning -------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        before = int(self.hyper_steps_done)
        super().training_step(batch, batch_idx)
        if int(self.hyper_steps_done) != before and self.should_log_step():
            u = self.space.unconstrained.detach()
            if self.space.dim == 1:
                self.log(f"log_hparam/{self.penalty_name}", u[0], on_step=True, on_epoch=False)
            else:
                self.log_dict(
                    {
                        f"log_hparam/{self.penalty_name}_mean": u.mean(),
                        f"log_hparam/{self.penalty_name}_std": u.std(),
                    },
                    on_step=True,
                    on_epoch=False,
                )

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.space.dim > 1 and self.current_epoch % self.histogram_every_n_epochs == 0:
            self.log_histograms()

    def log_histograms(self) -> None:
        """Histograms of log λ and λ (vector hyperparameters) for loggers with ``add_histogram`` (TensorBoard)."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        u = self.space.unconstrained.detach().cpu()
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"log_hparam/{self.penalty_name}", u, int(self.hyper_steps_done))
                experiment.add_histogram(
                    f"hparam/{self.penalty_name}", self.space.constrained().detach().cpu(), int(self.hyper_steps_done)
                )

    @override
    def configure_callbacks(self) -> list[Callback]:
        if not self.plot_schedule:
            return []
        from hyperlit.callbacks.hparam_schedule import HyperparameterSchedule

        return [HyperparameterSchedule()]

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.info(f"Final validation loss: {float(val):.4f}")
