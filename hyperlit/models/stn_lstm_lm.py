"""The STN LSTM language model of MacKay et al. (2019, §4.3): 2 layers, 650 units, 650-d embedding, tied weights.

Architecture (official ``lstm/hyperlstm.py``, after AWD-LSTM)::

    e = StnEmbedding(x; λ̃, dropoute)            # embedding dropout: whole words (rows), one rate per batch
    e = locked_dropout(e, dropouti_b)             # per-sequence rates
    h¹ = StnLSTM(e; λ̃, wdrop)                     # DropConnect on hidden-to-hidden weights, one rate per batch
    h¹ = locked_dropout(h¹, dropouth_b)
    h² = StnLSTM(h¹; λ̃, wdrop)                    # width = embedding size when the weights are tied
    o  = locked_dropout(h², dropouto_b)
    logits = o Eᵀ + b                              # decoder tied to the *elementary* embedding

Training objective: ``CE + α·mean(o²) + β·mean((h²_t − h²_{t−1})²)`` (AR on the dropped, TAR on the raw last-layer
output, α and β one value per batch). The tuning modules use plain cross-entropy as the outer (validation)
objective: the official code's validation step also added α·AR + β·TAR, which is not ported.

The seven hyperparameters, their ranges/transforms and per-example flags follow ``lstm/utils.py::create_hparams``
(``--tune_all``) in the official order: α, β (0, ∞) softplus, per batch; dropouto, dropouti, dropouth (0, 1) logit,
per sequence; dropoute, wdrop (0, 1) logit, per batch; all start at 0.05 with σ = 1 in the unconstrained space.

``hdim=0`` builds the plain (non-STN) model: ordinary embedding and :class:`~hyperlit.nn.stn_lstm.DropConnectLSTM`
layers running the fused LSTM kernel, with the same regularizers (official ``model_basic.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperlit.hparams import Hyperparameter
from hyperlit.nn.regularizers import activation_regularization, locked_dropout, temporal_activation_regularization
from hyperlit.nn.stn import StnNet, VInit
from hyperlit.nn.stn_lstm import DropConnectLSTM, LSTMState, StnEmbedding, StnLSTM, embedding_lookup

__all__ = [
    "LM_HPARAMS",
    "CarriedStates",
    "LMOutput",
    "StnLSTMLanguageModel",
    "lm_hyperparameters",
    "lm_training_loss",
]

#: The seven hyperparameters of the STN LSTM language model (AWD-LSTM names), in this order.
LM_HPARAMS = ("alpha", "beta", "dropouto", "dropouti", "dropouth", "dropoute", "wdrop")
_PER_BATCH = ("alpha", "beta", "dropoute", "wdrop")  # official ``minibatch=False``


def lm_hyperparameters(
    names: Sequence[str] = LM_HPARAMS, init: Mapping[str, float] | None = None, init_sigma: float = 1.0
) -> list[Hyperparameter]:
    """The official search space of the STN LSTM (``--tune_all``), restricted to ``names``, in the official order.

    Args:
        names: Which of :data:`LM_HPARAMS` to tune (Table 1 tunes ``dropouto`` only).
        init: Initial constrained values by name (default 0.05 for every entry, as in the official ``--tune_all``).
        init_sigma: Initial perturbation scale σ in the unconstrained space (official ``--perturb_scale 1``).
    """
    unknown = sorted(set(names) - set(LM_HPARAMS)) + sorted(set(init or {}) - set(LM_HPARAMS))
    if unknown:
        raise KeyError(f"unknown language-model hyperparameters {unknown}; known: {list(LM_HPARAMS)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"names must be a non-empty list without repeats, got {list(names)}")
    init = dict(init or {})
    out = []
    for name in LM_HPARAMS:
        if name not in names:
            continue
        high = float("inf") if name in ("alpha", "beta") else 1.0
        out.append(
            Hyperparameter(
                name,
                0.0,
                high,
                init=init.get(name, 0.05),
                init_sigma=init_sigma,
                per_example=name not in _PER_BATCH,
            )
        )
    return out


@dataclass
class LMOutput:
    """Outputs of one window: ``logits`` (T, B, V), the final ``state`` per layer, the last layer's ``raw`` output
    (T, B, D, before output dropout; TAR) and ``dropped`` output (after output dropout; AR)."""

    logits: Tensor
    state: list[LSTMState]
    raw: Tensor
    dropped: Tensor


def lm_training_loss(
    out: LMOutput, targets: Tensor, alpha: Tensor | float = 0.0, beta: Tensor | float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(CE + α·AR + β·TAR, CE)`` for a window; ``targets`` (T, B)."""
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), targets.reshape(-1))
    loss = ce
    if isinstance(alpha, Tensor) or alpha != 0:
        loss = loss + activation_regularization(out.dropped, alpha)
    if isinstance(beta, Tensor) or beta != 0:
        loss = loss + temporal_activation_regularization(out.raw, beta)
    return loss, ce


class StnLSTMLanguageModel(StnNet):
    """Multi-layer (STN) LSTM language model with the seven regularization hyperparameters of the STN paper.

    Args:
        vocab_size: Number of tokens (PTB: 10,000).
        embedding_size: Embedding width (paper: 650).
        hidden_size: Width of the hidden layers (paper: 650).
        num_layers: LSTM layers (paper: 2).
        tie_weights: Tie the decoder to the elementary embedding (the last layer then has ``embedding_size`` units).
        hdim: Width of the hypernet input (number of tuned hyperparameters); ``0`` builds the plain model.
        fixed: Values of hyperparameters not given to ``forward`` (default 0 = off).
        v_init: Initialization of the bottlenecks ``V``: ``normal`` (official) or ``zero``.
    """

    hparam_names = LM_HPARAMS

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 650,
        hidden_size: int = 650,
        num_layers: int = 2,
        tie_weights: bool = True,
        hdim: int = len(LM_HPARAMS),
        fixed: Mapping[str, float] | None = None,
        v_init: VInit = "normal",
    ) -> None:
        super().__init__()
        if vocab_size < 2 or embedding_size < 1 or hidden_size < 1 or num_layers < 1 or hdim < 0:
            raise ValueError(
                f"invalid sizes: vocab_size={vocab_size}, embedding_size={embedding_size}, "
                f"hidden_size={hidden_size}, num_layers={num_layers}, hdim={hdim}"
            )
        unknown = sorted(set(fixed or {}) - set(LM_HPARAMS))
        if unknown:
            raise KeyError(f"fixed names unknown hyperparameters {unknown}; known: {list(LM_HPARAMS)}")
        self.fixed = {k: float(v) for k, v in (fixed or {}).items()}
        self.vocab_size = vocab_size
        self.hdim = hdim
        self.tie_weights = tie_weights
        last = embedding_size if tie_weights else hidden_size
        sizes = [embedding_size] + [hidden_size] * (num_layers - 1) + [last]
        self.encoder: StnEmbedding | nn.Embedding
        if hdim:
            self.encoder = StnEmbedding(vocab_size, embedding_size, hdim, v_init=v_init)
            self.rnns = nn.ModuleList(StnLSTM(sizes[i], sizes[i + 1], hdim, v_init=v_init) for i in range(num_layers))
        else:
            self.encoder = nn.Embedding(vocab_size, embedding_size)
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            self.rnns = nn.ModuleList(DropConnectLSTM(sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.decoder = nn.Linear(last, vocab_size)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def default_hyperparameters(self) -> list[Hyperparameter]:
        return lm_hyperparameters()

    def zero_state(self, batch_size: int) -> list[LSTMState]:
        return [rnn.zero_state(batch_size) for rnn in self.rnns]  # type: ignore[operator]

    def _value(self, hparams: Mapping[str, Tensor | float] | None, name: str, per_batch: bool) -> Tensor | float:
        v = hparams[name] if hparams is not None and name in hparams else self.fixed.get(name, 0.0)
        if per_batch and isinstance(v, Tensor) and v.dim() > 0:
            v = v.reshape(-1)[0]  # per-batch entries share one draw across the batch (official: row 0)
        return v

    def forward(  # type: ignore[override]
        self,
        tokens: Tensor,
        hnet_input: Tensor | None = None,
        hparams: Mapping[str, Tensor | float] | None = None,
        generator: torch.Generator | None = None,
        state: Sequence[LSTMState] | None = None,
    ) -> LMOutput:
        """Run one BPTT window.

        Args:
            tokens: Token ids (T, B).
            hnet_input: Hypernet input (B, hdim) (ignored by the plain model).
            hparams: Constrained hyperparameter values by name: (B,) or scalars; names absent here take ``fixed``.
                Regularizers act in training mode only.
            generator: Source of every dropout mask.
            state: Per-layer ``(h, c)`` carried from the previous window (zeros if ``None``).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (T, B) ids, got shape {tuple(tokens.shape)}")
        train = self.training

        def rate(name: str) -> Tensor | float:
            return self._value(hparams, name, name in _PER_BATCH) if train else 0.0

        if self.hdim:
            x = self.encoder(tokens, hnet_input, rate("dropoute"), generator)
        else:
            x = embedding_lookup(self.encoder.weight, tokens, rate("dropoute"), generator)
        if train:
            x = locked_dropout(x, rate("dropouti"), generator)
        states = list(state) if state is not None else [None] * len(self.rnns)
        if len(states) != len(self.rnns):
            raise ValueError(f"state has {len(states)} layers, the model {len(self.rnns)}")
        new_state: list[LSTMState] = []
        wdrop = rate("wdrop")
        for i, rnn in enumerate(self.rnns):
            if self.hdim:
                x, st = rnn(x, states[i], hnet_input, wdrop, generator)
            else:
                x, st = rnn(x, states[i], wdrop, generator)
            new_state.append(st)
            if i < len(self.rnns) - 1 and train:
                x = locked_dropout(x, rate("dropouth"), generator)
        raw = x
        dropped = locked_dropout(raw, rate("dropouto"), generator) if train else raw
        return LMOutput(self.decoder(dropped), new_state, raw, dropped)

    def regularization_strengths(self, hparams: Mapping[str, Tensor | float] | None) -> tuple[Tensor | float, ...]:
        """``(α, β)`` of a training step (one value per batch)."""
        return self._value(hparams, "alpha", True), self._value(hparams, "beta", True)


class CarriedStates:
    """Hidden states carried across consecutive BPTT windows of named streams (train, hyper, eval), detached.

    A stream's state is reset (``None``) when a window does not directly follow the previous one (its index is
    not the previous index + 1: a new epoch, a cycled stream, skipped windows) or the batch size changes.
    """

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, list[LSTMState]]] = {}

    def get(self, stream: str, index: int, batch_size: int) -> list[LSTMState] | None:
        entry = self._states.get(stream)
        if entry is None or index != entry[0] + 1 or entry[1][0][0].size(0) != batch_size:
            return None
        return entry[1]

    def put(self, stream: str, index: int, state: Sequence[LSTMState]) -> None:
        self._states[stream] = (index, [(h.detach(), c.detach()) for h, c in state])

    def reset(self, stream: str | None = None) -> None:
        if stream is None:
            self._states.clear()
        else:
            self._states.pop(stream, None)
