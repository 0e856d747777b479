"""Deep ensembles of a user's network, vectorised over members, and hyper-deep ensembles.

**Deep ensemble** (Lakshminarayanan et al. 2017): K independently initialised copies of one classifier, trained at
the same time and evaluated by averaging their predictive distributions
(:class:`~hyperlit.ensembles.base.EnsembleModule`). :class:`DeepEnsembleModule` stacks the K copies' parameters
(``torch.func.stack_module_state``: every tensor gets a leading member dimension K) and runs them as one
``torch.vmap`` of ``torch.func.functional_call`` over the members, with ``randomness="different"`` so that each
member draws its own dropout masks: a training step costs one batched forward and backward, never a Python loop over
members.

**One optimizer over the stacked tensors is K independent optimizers** when its update is elementwise: SGD (with
momentum, Nesterov, weight decay), Adam/AdamW, RMSprop, Adagrad update each entry from that entry's gradient and
state only, and the members' entries never mix. The loss that is back-propagated is the **sum** of the members'
losses, so member k's parameters receive exactly the gradient of member k's own loss (the mean would divide every
gradient by K). Optimizers that couple entries are not equivalent: LBFGS (one line search for all), Adafactor's
factored second moments of one-dimensional tensors (a stacked bias is ``(K, out)``), Muon/Shampoo-style matrix
updates. Gradient-norm clipping couples entries too, so ``grad_clip`` clips every member's gradient to its own norm
(vectorised, in ``on_before_optimizer_step``, where mixed precision has already unscaled the gradients).

**Hyper-deep ensemble** (Wenzel et al. 2020, §3): :func:`random_search_hparams` draws M per-member hyperparameter
settings (log-uniform, as google/uncertainty-baselines' random-search sweep), a pool
:class:`DeepEnsembleModule` of M members with those ``member_hparams`` is trained in *one* fit (the whole random
search, vectorised), and :func:`hyper_deep_ensemble` greedily selects K members on validation NLL
(:func:`~hyperlit.ensembles.selection.greedy_selection`, with replacement) and returns :meth:`DeepEnsembleModule.subset`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state
from typing_extensions import override

from hyperlit.ensembles.base import EnsembleModule
from hyperlit.ensembles.selection import greedy_selection, sample_log_uniform
from hyperlit.optim import check_factories
from hyperlit.tuning.metrics import weighted_mean

__all__ = ["DeepEnsembleModule", "hyper_deep_ensemble", "member_seed", "random_search_hparams"]

_FIXED_HPARAMS = ("l2", "label_smoothing")


def member_seed(seed: int, member: int) -> int:
    """The initialisation seed of member ``member`` of an ensemble seeded with ``seed`` (``numpy.random.SeedSequence``
    of ``(seed, member)``: distinct, reproducible streams)."""
    return int(np.random.SeedSequence([int(seed), int(member)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _reset_parameters(module: nn.Module) -> list[str]:
    """Call ``reset_parameters()`` on every submodule that has one; the names of those owning parameters without."""
    missed = []
    for name, sub in module.named_modules():
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
        elif any(p is not None for p in sub._parameters.values()):
            missed.append(name or "<root>")
    return missed


def _running_stat_layers(model: nn.Module) -> list[str]:
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


def _replace_tensors(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
    """Put ``params``/``buffers`` (by their first, de-duplicated name) in every place of ``module`` that held the
    tensor of that name, so tied weights stay tied."""
    by_id_p = {id(p): name for name, p in module.named_parameters()}
    by_id_b = {id(b): name for name, b in module.named_buffers()}
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[leaf] = params[by_id_p[id(p)]]  # type: ignore[assignment]
        for leaf, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[leaf] = buffers[by_id_b[id(b)]]


class DeepEnsembleModule(EnsembleModule):
    """K independently initialised copies of a classifier, trained at once as one vectorised network.

    The members' parameters live in ``members``, a copy of ``model`` whose every parameter and buffer has a
    leading member dimension K: ``state_dict`` keys are ``members.<the model's own name>`` with shape ``(K, *shape)``.
    Member k is initialised under its own seed :func:`member_seed` ``(seed, k)`` by ``init_fn`` (default: every
    submodule's ``reset_parameters()``); the model passed in is left untouched. :meth:`member_model` returns member k
    as a plain copy of ``model``.

    Training (manual optimization): per batch, each member's loss is its cross-entropy with its own label smoothing
    ``ε_k`` plus its own L2 penalty ``Σ_p c_{k,p} Σ w_p²`` (Keras/uncertainty-baselines convention, no ½) divided by
    the training-set size ``train_size``; the sum of the members' losses is back-propagated (see the module
    docstring: one optimizer over the stacked tensors is then K independent optimizers). ``member_batches="shared"``
    gives every member the whole batch (members differ by their initialisation, their dropout masks and their
    hyperparameters); ``"disjoint"`` splits a batch of K·N examples member-major (member k gets rows ``k·N …
    (k+1)·N − 1``), so every member trains on its own data stream. Dropout masks are drawn from a global generator
    seeded from the module's checkpointed :attr:`~hyperlit.base.HyperlitModule.rng` (and the rank) at every step, so
    a resumed run redraws the same masks. Logged: ``train/loss`` (mean member loss, regularisers included) and
    ``train/nll`` (mean member cross-entropy without smoothing or L2: the training batch's Gibbs NLL); validation
    and test log the averaged prediction's metrics (:class:`~hyperlit.ensembles.base.EnsembleModule`).

    Args:
        model: The classifier (any ``nn.Module`` mapping a batch ``(N, ...)`` to logits ``(N, C)``) without
            BatchNorm running statistics; its forward runs under ``torch.vmap``, so it must not update buffers in
            place, call ``.item()`` or branch on tensor values.
        ensemble_size: Number of members K.
        num_classes: Number of classes C; ``None``: the model's ``num_classes`` attribute.
        member_hparams: Fixed per-member hyperparameters, each a sequence of K floats: ``label_smoothing`` (ε_k in
            ``[0, 1)``), ``l2`` (``c_k`` for every parameter not in an ``l2_groups`` group) and ``l2_<group>`` for
            each group of ``l2_groups``. ``None``: no smoothing, no L2.
        l2_groups: ``{path: group}``: the parameters whose name is ``path`` or starts with ``path.`` (a layer, e.g.
            ``layers.0``, or one tensor, e.g. ``layers.2.bias``) take ``l2_<group>``; the longest matching path wins.
        train_size: The divisor of the L2 penalty; ``None``: the length of the training loader's dataset at the start
            of ``fit`` (needed only with an L2 strength).
        member_batches: ``shared`` (every member sees the whole batch) or ``disjoint`` (a batch of K·N examples, N
            per member).
        init_fn: Re-initialises a member's copy of ``model`` in place (called under the member's seed, on CPU);
            ``None``: ``reset_parameters()`` of every submodule that has one.
        optimizer: Optimizer factory over the stacked parameters (default SGD lr 0.05, Nesterov momentum 0.9, the
            momentum of uncertainty-baselines' recipes); elementwise optimizers only (see the module docstring).
        lr_scheduler: Optional learning-rate schedule, stepped once per epoch.
        grad_clip: Clip each member's gradient norm to this value (``None``: no clipping).
        seed: Seed of the members' initialisation and of the module's generator (dropout masks).

    Raises:
        ValueError: BatchNorm layers with running statistics, member hyperparameters that are not K values in range,
            an ``l2_groups`` path that names no parameter, or an unknown ``member_batches``.
        KeyError: An unknown name in ``member_hparams``.
    """

    init_from_skip = ("steps",)

    def __init__(
        self,
        model: nn.Module,
        ensemble_size: int = 4,
        num_classes: int | None = None,
        member_hparams: Mapping[str, Sequence[float]] | None = None,
        l2_groups: Mapping[str, str] | None = None,
        train_size: int | None = None,
        member_batches: Literal["shared", "disjoint"] = "shared",
        init_fn: Callable[[nn.Module], Any] | None = None,
        optimizer: OptimizerCallable = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module classifier, got {type(model).__name__}")
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError(
                    f"{type(model).__name__} has no integer num_classes attribute: pass num_classes to "
                    "DeepEnsembleModule"
                )
        super().__init__(ensemble_size, num_classes, seed=seed)
        stats = _running_stat_layers(model)
        if stats:
            raise ValueError(
                f"DeepEnsembleModule cannot vectorise BatchNorm running statistics (layers {stats}): use GroupNorm or "
                "LayerNorm, BatchNorm with track_running_stats=False, or a BatchEnsemble of the network "
                "(hyperlit.nn.batch_ensemble, hyperlit.ensembles.batch_ensemble.BatchEnsembleModule), whose members "
                "share the statistics"
            )
        if member_batches not in ("shared", "disjoint"):
            raise ValueError(f"member_batches must be 'shared' or 'disjoint', got {member_batches!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        if train_size is not None and int(train_size) < 1:
            raise ValueError(f"train_size must be >= 1 or None, got {train_size}")
        check_factories(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.member_batches = member_batches
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.train_size = None if train_size is None else int(train_size)
        self.init_fn = init_fn
        self.members = self._build_members(model, init_fn)
        self.l2_groups = dict(l2_groups or {})
        self.member_hparams = self._check_hparams(member_hparams, self.l2_groups)
        smoothing = self.member_hparams.get("label_smoothing", [0.0] * self.ensemble_size)
        self.register_buffer("label_smoothing", torch.tensor(smoothing), persistent=False)
        names, table = self._l2_table()
        self._l2_names = names
        self.register_buffer("l2_coefficients", table, persistent=False)
        self._resolved_train_size = self.train_size
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        #: mean member loss and mean member NLL of the training batches (reduced over DDP ranks)
        self.train_loss_metric = weighted_mean()
        self.train_nll_metric = weighted_mean()
        self.save_hyperparameters(ignore=["model", "init_fn"])

    # -- construction -------------------------------------------------------------------------------------------
    def _build_members(self, model: nn.Module, init_fn: Callable[[nn.Module], Any] | None) -> nn.Module:
        copies = []
        missed: list[str] = []
        for k in range(self.ensemble_size):
            member = copy.deepcopy(model).cpu()
            with torch.random.fork_rng(devices=[]):  # on CPU: the global CUDA generators are not touched
                torch.default_generator.manual_seed(member_seed(self.seed, k))
                if init_fn is None:
                    missed = _reset_parameters(member)
                else:
                    init_fn(member)
            copies.append(member)
        if missed:
            rank_zero_warn(
                f"DeepEnsembleModule: {missed} own parameters but no reset_parameters(), so every member starts with "
                "the model's values there; pass init_fn to initialise them per member"
            )
        params, buffers = stack_module_state(copies)  # type: ignore[arg-type]
        members = copy.deepcopy(model).cpu()
        stacked_p = {n: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for n, p in params.items()}
        _replace_tensors(members, stacked_p, {n: b.clone() for n, b in buffers.items()})
        return members

    def _check_hparams(
        self, member_hparams: Mapping[str, Sequence[float]] | None, groups: Mapping[str, str]
    ) -> dict[str, list[float]]:
        k = self.ensemble_size
        allowed = [*_FIXED_HPARAMS, *(f"l2_{g}" for g in dict.fromkeys(groups.values()))]
        hparams = dict(member_hparams or {})
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise KeyError(
                f"member_hparams names {unknown}, which DeepEnsembleModule does not know; it takes {allowed} "
                "(l2_<group> for each group of l2_groups)"
            )
        out: dict[str, list[float]] = {}
        for name, values in hparams.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | Tensor | np.ndarray):
                raise ValueError(f"member_hparams[{name!r}] must be a sequence of {k} floats, got {values!r}")
            vals = [float(v) for v in values]
            if len(vals) != k:
                raise ValueError(
                    f"member_hparams[{name!r}] has {len(vals)} values, one per member is needed (ensemble_size={k})"
                )
            high = 1.0 if name == "label_smoothing" else math.inf
            bad = [v for v in vals if not (math.isfinite(v) and 0 <= v < high)]
            if bad:
                rng = "[0, 1)" if name == "label_smoothing" else ">= 0"
                raise ValueError(f"member_hparams[{name!r}] must lie in {rng}, got {bad}")
            out[name] = vals
        missing = [f"l2_{g}" for g in dict.fromkeys(groups.values()) if f"l2_{g}" not in out]
        if missing:
            raise ValueError(f"l2_groups defines groups without strengths: add {missing} to member_hparams")
        names = [n for n, _ in self.members.named_parameters()]
        unmatched = [path for path in groups if not any(n == path or n.startswith(path + ".") for n in names)]
        if unmatched:
            raise ValueError(f"l2_groups paths {unmatched} match no parameter of the model; its parameters: {names}")
        return out

    def _l2_table(self) -> tuple[list[str], Tensor]:
        """The regularised parameters' names and their strengths ``(P, K)`` (zero rows left out)."""
        names, rows = [], []
        for name, _ in self.members.named_parameters():
            paths = [p for p in self.l2_groups if name == p or name.startswith(p + ".")]
            key = f"l2_{self.l2_groups[max(paths, key=len)]}" if paths else "l2"
            values = self.member_hparams.get(key)
            if values is not None and any(v > 0 for v in values):
                names.append(name)
                rows.append(values)
        table = torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(0, self.ensemble_size)
        return names, table

    # -- identity and checkpoints -----------------------------------------------------------------------------
    @override
    def checkpoint_identity(self) -> dict[str, Any]:
        return {
            "ensemble_size": self.ensemble_size,
            "parameters": [n for n, _ in self.members.named_parameters()],
            "member_hparams": self.member_hparams,
        }

    @property
    def l2_divisor(self) -> int | None:
        """The training-set size the L2 penalties are divided by (``train_size``, or read at the start of ``fit``)."""
        return self._resolved_train_size

    # -- members ------------------------------------------------------------------------------------------------
    def stacked_parameters(self) -> dict[str, Tensor]:
        """The members' stacked parameters ``{name: (K, *shape)}`` (the model's own names)."""
        return dict(self.members.named_parameters())

    def member_model(self, member: int) -> nn.Module:
        """Member ``member`` as a plain copy of the model (its parameters and buffers copied, detached)."""
        if not 0 <= int(member) < self.ensemble_size:
            raise IndexError(f"member {member} out of range for an ensemble of {self.ensemble_size}")
        net = copy.deepcopy(self.members)
        params = {n: nn.Parameter(p.detach()[member].clone(), p.requires_grad) for n, p in net.named_parameters()}
        buffers = {n: b[member].clone() for n, b in net.named_buffers()}
        _replace_tensors(net, params, buffers)
        return net

    def _vmapped(self, x: Tensor, per_member: bool) -> Tensor:
        """Members' outputs: ``x`` ``(N, ...)`` shared by all (``per_member=False``) or ``(K, N, ...)``."""
        members = self.members

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(members, (params, buffers), (inputs,))

        params = dict(members.named_parameters())
        buffers = dict(members.named_buffers())
        run = torch.vmap(one, in_dims=(0, 0, 0 if per_member else None), randomness="different")
        out = run(params, buffers, x)
        if out.dim() != 3 or out.shape[-1] != self.num_classes:
            raise ValueError(
                f"the model's output per member has shape {tuple(out.shape[1:])}, expected (N, num_classes) = "
                f"(N, {self.num_classes}): pass the right num_classes (the model must return logits)"
            )
        return out

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Member logits ``(K, N, C)`` of a batch ``(N, ...)`` shared by every member."""
        return self._vmapped(x, per_member=False)

    @override
    def member_logits(self, x: Tensor) -> Tensor:
        return self._vmapped(x, per_member=False)

    def subset(self, indices: Sequence[int]) -> DeepEnsembleModule:
        """A new module whose members are copies of members ``indices`` (their weights and hyperparameters; repeats
        allowed: a member given twice weighs twice in the averaged prediction). Counters and optimizer start anew."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("subset needs at least one member index")
        bad = [i for i in idx if not 0 <= i < self.ensemble_size]
        if bad:
            raise IndexError(f"member indices {bad} out of range for an ensemble of {self.ensemble_size}")
        new = DeepEnsembleModule(
            self.member_model(idx[0]),
            ensemble_size=len(idx),
            num_classes=self.num_classes,
            member_hparams={n: [v[i] for i in idx] for n, v in self.member_hparams.items()},
            l2_groups=self.l2_groups,
            train_size=self.train_size,
            member_batches=self.member_batches,  # type: ignore[arg-type]
            init_fn=self.init_fn,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            grad_clip=self.grad_clip,
            seed=self.seed,
        )
        select = torch.tensor(idx)
        with torch.no_grad():
            ours_p, ours_b = dict(self.members.named_parameters()), dict(self.members.named_buffers())
            for name, p in new.members.named_parameters():
                p.copy_(ours_p[name].detach().cpu()[select])
            for name, b in new.members.named_buffers():
                b.copy_(ours_b[name].cpu()[select])
        return new.to(self.device)

    # -- training -------------------------------------------------------------------------------------------------
    def l2_penalty(self) -> Tensor:
        """Each member's ``Σ_p c_{k,p} Σ w_p²`` ``(K,)`` (not yet divided by ``train_size``)."""
        params = dict(self.members.named_parameters())
        out = torch.zeros(self.ensemble_size, device=self.l2_coefficients.device)
        for row, name in enumerate(self._l2_names):
            p = params[name]
            out = out + self.l2_coefficients[row] * p.reshape(self.ensemble_size, -1).pow(2).sum(1).to(out.dtype)
        return out

    def member_losses(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's training loss and cross-entropy ``(K,)`` of its logits ``(K, N, C)`` and labels ``(K, N)``.

        Loss of member k: ``(1 − ε_k)·NLL_k + ε_k·mean_c(−log p_c)`` (``F.cross_entropy`` with ``label_smoothing=ε_k``)
        plus :meth:`l2_penalty` / ``train_size``.
        """
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1)
        eps = self.label_smoothing.to(logp.dtype)
        loss = (1 - eps) * nll + eps * (-logp.mean(-1).mean(-1))
        if self._l2_names:
            if self._resolved_train_size is None:
                raise RuntimeError(
                    "DeepEnsembleModule has L2 strengths but no train_size: pass train_size, or train with a "
                    "DataModule whose training loader has a dataset with a length (it is read at the start of fit)"
                )
            loss = loss + self.l2_penalty() / self._resolved_train_size
        return loss, nll

    def training_logits(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Member logits ``(K, N, C)`` and labels ``(K, N)`` of a training batch (``member_batches``)."""
        k = self.ensemble_size
        if self.member_batches == "shared":
            return self._vmapped(x, per_member=False), y.unsqueeze(0).expand(k, -1)
        if x.shape[0] % k:
            raise ValueError(
                f"member_batches='disjoint' splits a batch of K·N examples into K sub-batches, but the batch has "
                f"{x.shape[0]} examples for K={k}: use a batch size divisible by {k} (and drop_last=True)"
            )
        n = x.shape[0] // k
        return self._vmapped(x.reshape(k, n, *x.shape[1:]), per_member=True), y.reshape(k, n)

    @contextlib.contextmanager
    def _step_randomness(self) -> Iterator[None]:
        """Seed the global generator of the module's device from :attr:`rng` (and the rank) for one step."""
        seed = int(torch.randint(0, 2**62, (), generator=self.rng, device=self.device)) + self.global_rank
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type=self.device.type):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield

    def _resolve_train_size(self) -> None:
        if self.train_size is not None or not self._l2_names or self._trainer is None:
            return
        loader: Any = self.trainer.train_dataloader
        if isinstance(loader, Mapping):
            loader = loader.get("train")
        dataset = getattr(loader, "dataset", None)
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            size = 0
        if size < 1:
            raise ValueError(
                "DeepEnsembleModule cannot read the training-set size (the training loader's dataset has no length): "
                "pass train_size, the divisor of the L2 penalty"
            )
        self._resolved_train_size = size

    @override
    def on_train_start(self) -> None:
        """Read the training-set size (the L2 divisor) from the training loader when ``train_size`` is not given."""
        super().on_train_start()
        self._resolve_train_size()

    @override
    def configure_optimizers(self) -> Any:
        """One optimizer over the stacked parameters (and its schedule, if one is given)."""
        opt = self.build_optimizer(self.optimizer, self.members.parameters(), "optimizer")
        return self.optimizers_config([opt], [self.build_scheduler(self.lr_scheduler, opt, "lr_scheduler")])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, Mapping) and "train" in batch:
            batch = batch["train"]  # a DataModule that served a tuning module yields {"train", "hyper"} batches
        x, y = self.unpack_batch(batch)
        with self._step_randomness():
            logits, targets = self.training_logits(x, y)
        losses, nll = self.member_losses(logits, targets)
        total = losses.sum()
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite training loss at step {int(self.steps)} (epoch {self.current_epoch}); member losses "
                f"{losses.detach().tolist()}"
            )
        (opt,) = self.optimizer_list()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        opt.step()
        self.steps += 1
        n = targets.shape[1]
        self.train_loss_metric(losses.detach().mean(), n)
        self.train_nll_metric(nll.detach().mean(), n)
        self.log("train/loss", self.train_loss_metric, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/nll", self.train_nll_metric, on_step=False, on_epoch=True)
        return total.detach() / self.ensemble_size

    def clip_member_gradients(self) -> None:
        """Scale each member's gradient to norm at most ``grad_clip`` (``clip_grad_norm_`` per member, vectorised)."""
        if self.grad_clip is None:
            return
        grads = [p.grad for p in self.members.parameters() if p.grad is not None]
        if not grads:
            return
        k = self.ensemble_size
        sq = torch.stack([g.detach().reshape(k, -1).float().pow(2).sum(1) for g in grads]).sum(0)
        coef = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(k, *([1] * (g.dim() - 1))).to(g.dtype))

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip each member's gradient (after mixed precision unscaled it, before the step)."""
        self.clip_member_gradients()


def random_search_hparams(
    ranges: Mapping[str, tuple[float, float]],
    num_members: int,
    seed: int = 0,
    include_default: Mapping[str, float] | None = None,
) -> dict[str, list[float]]:
    """``member_hparams`` of a random-search pool: ``num_members`` settings, each value log-uniform in its range.

    Wraps :func:`~hyperlit.ensembles.selection.sample_log_uniform` (same ``seed``, same draws). With
    ``include_default``, member 0 is that configuration (uncertainty-baselines' run 0 is the default config) and the
    other ``num_members − 1`` are drawn.

    Args:
        ranges: ``{name: (low, high)}``, ``0 < low <= high`` (e.g. ``{"l2": (0.01, 100.0), "label_smoothing":
            (1e-5, 0.2)}`` as in UB's CIFAR-10 sweep, whose L2 strengths are divided by the train-set size as
            :class:`DeepEnsembleModule` does).
        num_members: Size M of the pool.
        seed: Seed of the draws.
        include_default: A value for every name of ``ranges``, used as member 0.
    """
    if int(num_members) < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    num_members = int(num_members)
    drawn = num_members if include_default is None else num_members - 1
    out: dict[str, list[float]] = {name: [] for name in ranges}
    if include_default is not None:
        if set(include_default) != set(ranges):
            raise KeyError(
                f"include_default must give a value for exactly the names of ranges {sorted(ranges)}, got "
                f"{sorted(include_default)}"
            )
        for name in ranges:
            out[name].append(float(include_default[name]))
    if drawn > 0:
        samples = sample_log_uniform(ranges, drawn, seed)
        for name in ranges:
            out[name].extend(float(v) for v in samples[name].reshape(-1).tolist())
    return out


def hyper_deep_ensemble(
    pool: DeepEnsembleModule,
    val_loader: Iterable[Any],
    ensemble_size: int,
    objective: str = "nll",
) -> tuple[DeepEnsembleModule, list[int]]:
    """Greedy selection of a hyper-deep ensemble from a trained random-search pool (Wenzel et al. 2020, §3).

    The pool's members' validation logits are collected
    (:meth:`~hyperlit.ensembles.base.EnsembleEvaluation.collect_member_logits`),
    :func:`~hyperlit.ensembles.selection.greedy_selection` picks members with replacement
    until ``ensemble_size`` distinct ones are chosen or no addition lowers the objective, and the selected members
    (repeats included) become a new :class:`DeepEnsembleModule` (:meth:`DeepEnsembleModule.subset`).

    This is uncertainty-baselines' "simplified version": no stratification over random initialisations and **no
    retraining** of the selected configurations on train+validation data — the selected members are the pool's
    trained networks.

    Args:
        pool: The trained pool (M members, their ``member_hparams`` from :func:`random_search_hparams`).
        val_loader: The validation batches the selection is scored on.
        ensemble_size: Number of distinct members K to select at most.
        objective: Selection objective of :func:`~hyperlit.ensembles.selection.greedy_selection` (``nll``: the
            ensemble's validation NLL).

    Returns:
        The selected ensemble and the selected member indices (in selection order, repeats included).
    """
    logits, labels = pool.collect_member_logits(val_loader)
    selected = [int(i) for i in greedy_selection(logits.log_softmax(-1), labels, ensemble_size, objective=objective)]
    return pool.subset(selected), selected
