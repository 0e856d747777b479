"""Structured best-response embedding and LSTM (Self-Tuning Networks, MacKay et al. 2019, §4.3 and App. G).

Every weight of the STN LSTM language model is an STN best response ``ŵ_φ(λ)`` with the row-scaling structure of
the STN layers: for a hypernet input ``λ̃_b`` (one per sequence),

* embedding: ``e = E[x] + (V λ̃_b) ⊙ R[x]``;
* LSTM gates: ``g_t = W_ih x_t + b_ih + s_ih ⊙ (R_ih x_t) + a_ih ⊙ r_ih
  + W_hh h_{t−1} + b_hh + s_hh ⊙ (R_hh h_{t−1}) + a_hh ⊙ r_hh`` with ``[s_ih, a_ih, s_hh, a_hh] = V λ̃_b``,

so the per-sequence weights are never materialized. The input-to-hidden part of the whole window is one matmul
(elementary and response weights concatenated); only the recurrence steps through time, one matmul per step.
Gates use ``torch.nn.LSTM``'s order and parameter layout (i, f, g, o; ``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``), so a plain ``nn.LSTM`` loads the elementary weights directly (the official code orders the gates
f, i, o, g: a permutation of the same parameters).

:class:`DropConnectLSTM` and :func:`embedding_lookup` are the plain counterparts (the fused ``torch.lstm`` kernel,
cuDNN on a GPU, on DropConnect-masked weights): the baseline of the schedule-replay and fixed-value runs.

Forward-mode AD (:func:`torch.func.jvp`, any other ``torch.func`` transform, or
:mod:`torch.autograd.forward_ad` dual tensors): :func:`stn_lstm_recurrence` then runs the same time loop as plain
differentiable tensor operations instead of the hand-written :class:`StnLSTMRecurrence` (which has a reverse-mode
rule only), so the tangents are exact and themselves differentiable in reverse mode (Δ-STN's linearized response
step, :class:`~hyperlit.tuning.delta_stn_lm.DeltaStnLanguageModelModule`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from hyperlit.nn.regularizers import dropconnect_mask, embedding_dropout_mask
from hyperlit.nn.stn import StnLayer, VInit

__all__ = [
    "DropConnectLSTM",
    "LSTMState",
    "StnEmbedding",
    "StnLSTM",
    "StnLSTMRecurrence",
    "embedding_lookup",
    "stn_lstm_recurrence",
]

LSTMState = tuple[Tensor, Tensor]


def _uses_rate(p: Tensor | float) -> bool:
    return isinstance(p, Tensor) or p > 0


def embedding_lookup(
    weight: Tensor, tokens: Tensor, dropout: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Plain embedding lookup ``weight[tokens]`` with embedding dropout on rows (pass ``dropout=0`` in eval mode)."""
    out = F.embedding(tokens, weight)
    if _uses_rate(dropout):
        out = out * embedding_dropout_mask(weight.size(0), dropout, generator, like=out)[tokens].unsqueeze(-1)
    return out


class StnEmbedding(StnLayer):
    """Best-response embedding ``E[x] + (V λ̃_b) ⊙ R[x]`` (official ``HyperEmbedding``; no bias scalars).

    Embedding dropout masks the same rows of both tables (one rate per batch), applied in training mode only.

    Args:
        num_embeddings: Vocabulary size.
        embedding_dim: Width of the vectors.
        hdim: Width of the hypernet input λ̃.
        v_init: Initialization of ``V``: ``normal`` (N(0, v_std²), official) or ``zero`` (pomonam).
        v_std: Standard deviation of ``V`` for ``v_init="normal"``.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, hdim: int, v_init: VInit = "normal", v_std: float = 0.01
    ) -> None:
        super().__init__(embedding_dim, hdim, bias=False, v_init=v_init, v_std=v_std)
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"need num_embeddings, embedding_dim >= 1, got {num_embeddings}, {embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.response_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(±0.1)`` for both tables (official), then ``V``."""
        nn.init.uniform_(self.weight, -0.1, 0.1)
        nn.init.uniform_(self.response_weight, -0.1, 0.1)
        self.reset_bottleneck()

    def forward(
        self,
        tokens: Tensor,
        hnet_input: Tensor | None = None,
        dropout: Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Embed ``tokens`` (T, B) → (T, B, D) for the hypernet input (B, hdim)."""
        if tokens.dim() != 2:
            raise ValueError(f"StnEmbedding expects (T, B) token ids, got shape {tuple(tokens.shape)}")
        s = self._gates(hnet_input, tokens.size(1))
        out = torch.addcmul(F.embedding(tokens, self.weight), F.embedding(tokens, self.response_weight), s)
        if self.training and _uses_rate(dropout):
            out = out * embedding_dropout_mask(self.num_embeddings, dropout, generator, like=out)[tokens].unsqueeze(-1)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, hdim={self.hdim}"


class _LSTMBase(nn.Module):
    """Elementary LSTM weights in ``torch.nn.LSTM``'s layout and the DropConnect-masked recurrent weights."""

    input_size: int
    hidden_size: int
    weight_ih: nn.Parameter
    weight_hh: nn.Parameter
    bias_ih: nn.Parameter
    bias_hh: nn.Parameter

    def _make_weights(self, input_size: int, hidden_size: int, response: bool) -> None:
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"need input_size, hidden_size >= 1, got {input_size}, {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        g = 4 * hidden_size
        prefixes = ("", "response_") if response else ("",)
        for prefix in prefixes:
            setattr(self, prefix + "weight_ih", nn.Parameter(torch.empty(g, input_size)))
            setattr(self, prefix + "weight_hh", nn.Parameter(torch.empty(g, hidden_size)))
            setattr(self, prefix + "bias_ih", nn.Parameter(torch.empty(g)))
            setattr(self, prefix + "bias_hh", nn.Parameter(torch.empty(g)))
        bound = 1.0 / math.sqrt(hidden_size)  # torch.nn.LSTM's initialization
        for prefix in prefixes:
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                nn.init.uniform_(getattr(self, prefix + name), -bound, bound)

    def zero_state(self, batch_size: int) -> LSTMState:
        """All-zero ``(h, c)``, each (B, hidden_size)."""
        z = self.weight_hh.new_zeros(batch_size, self.hidden_size)
        return z, z.clone()

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.size(2) != self.input_size:
            raise ValueError(f"{type(self).__name__} expects (T, B, {self.input_size}) input, got {tuple(x.shape)}")

    def _mask(self, dropconnect: Tensor | float, generator: torch.Generator | None) -> Tensor | None:
        if self.training and _uses_rate(dropconnect):
            return dropconnect_mask(self.weight_hh, dropconnect, generator)
        return None


class DropConnectLSTM(_LSTMBase):
    """A plain LSTM layer (time first) with DropConnect on ``weight_hh``, run by the fused ``torch.lstm`` kernel.

    The non-STN baseline of the schedule-replay and fixed-value runs (official ``model_basic.py``'s
    ``WeightDrop(nn.LSTM)``); parameters are named like ``torch.nn.LSTM``'s without the ``_l0`` suffix.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self._make_weights(input_size, hidden_size, response=False)

    def recurrent_weight(self, dropconnect: Tensor | float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """The hidden-to-hidden weight a forward pass uses (DropConnect-masked in training mode)."""
        mask = self._mask(dropconnect, generator)
        return self.weight_hh if mask is None else self.weight_hh * mask

    def forward(
        self,
        x: Tensor,
        state: LSTMState | None = None,
        dropconnect: Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, LSTMState]:
        """Outputs (T, B, hidden_size) and the final ``(h, c)`` for input (T, B, input_size)."""
        self._check_input(x)
        h, c = state if state is not None else self.zero_state(x.size(1))
        params = [self.weight_ih, self.recurrent_weight(dropconnect, generator), self.bias_ih, self.bias_hh]
        out, h_n, c_n = torch.lstm(x, (h.unsqueeze(0), c.unsqueeze(0)), params, True, 1, 0.0, False, False, False)
        return out, (h_n.squeeze(0), c_n.squeeze(0))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class StnLSTMRecurrence(torch.autograd.Function):
    """The time loop of :class:`StnLSTM` with a hand-written backward pass (BPTT).

    ``z_t = pre_t + W h_{t−1} + s ⊙ (R h_{t−1})`` (with ``[W; R]ᵀ = w_cat``), gates ``i, f, o = σ(·)``,
    ``g = tanh(·)`` in ``torch.nn.LSTM``'s order, ``c_t = f c_{t−1} + i g``, ``h_t = o tanh(c_t)``. The forward pass
    runs without building an autograd graph (one matmul and a few element-wise ops per step) and keeps only the
    gate activations, cell states and response projections; the backward pass steps through time once, and the
    recurrent weight gradient is one matmul over the whole window.

    Inputs: ``pre`` (T, B, 4H), ``h0``, ``c0`` (B, H), ``w_cat`` (H, 8H), ``s`` (B, 4H).
    Outputs: hidden states (T, B, H), ``h_T``, ``c_T``.

    Reverse mode only: call it through :func:`stn_lstm_recurrence`, which takes a plain-operation path under
    forward-mode AD.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, pre: Tensor, h0: Tensor, c0: Tensor, w_cat: Tensor, s: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        # one dtype for the whole loop (under autocast the inputs may differ); autocast off inside, grads cast back
        inputs = (pre, h0, c0, w_cat, s)
        ctx.dtypes = [t.dtype for t in inputs]
        dtype = functools.reduce(torch.promote_types, ctx.dtypes)
        with torch.autocast(pre.device.type, enabled=False):
            return StnLSTMRecurrence._run(ctx, *(t.to(dtype) for t in inputs))

    @staticmethod
    def _run(ctx: Any, pre: Tensor, h0: Tensor, c0: Tensor, w_cat: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        steps, _, g = pre.shape
        hd = g // 4
        acts = torch.empty_like(pre)  # σ(i, f, ·, o) and tanh(g) per step
        resp = torch.empty_like(pre)  # R h_{t−1}, needed for the gradient of s
        hs = pre.new_empty(steps, h0.size(0), hd)
        cs = pre.new_empty(steps, h0.size(0), hd)
        h, c = h0, c0
        for t in range(steps):
            rec = torch.mm(h, w_cat)
            resp[t] = rec[:, g:]
            z = torch.addcmul(pre[t] + rec[:, :g], s, rec[:, g:])
            a = acts[t]
            torch.sigmoid(z, out=a)
            torch.tanh(z[:, 2 * hd : 3 * hd], out=a[:, 2 * hd : 3 * hd])
            c = torch.addcmul(a[:, hd : 2 * hd] * c, a[:, :hd], a[:, 2 * hd : 3 * hd])
            cs[t] = c
            h = hs[t]
            torch.mul(a[:, 3 * hd :], torch.tanh(c), out=h)
        ctx.save_for_backward(h0, c0, w_cat, s, acts, resp, hs, cs)
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_out: Tensor | None, d_h: Tensor | None, d_c: Tensor | None
    ) -> tuple[Tensor, ...]:
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            grads = StnLSTMRecurrence._bptt(ctx, d_out, d_h, d_c)
        return tuple(gr.to(dt) for gr, dt in zip(grads, ctx.dtypes))

    @staticmethod
    def _bptt(
        ctx: Any, d_out: Tensor | None, d_h: Tensor | None, d_c: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        h0, c0, w_cat, s, acts, resp, hs, cs = ctx.saved_tensors
        d_out = d_out.to(hs.dtype) if d_out is not None else None
        d_h = d_h.to(hs.dtype) if d_h is not None else None
        d_c = d_c.to(hs.dtype) if d_c is not None else None
        steps, batch, g = acts.shape
        hd = g // 4
        d_out = torch.zeros_like(hs) if d_out is None else d_out
        dh = torch.zeros_like(h0) if d_h is None else d_h.clone()
        dc = torch.zeros_like(c0) if d_c is None else d_c.clone()
        d_rec = acts.new_empty(steps, batch, 2 * g)  # ∂L/∂[W h; R h] per step
        w_t = w_cat.t()
        for t in range(steps - 1, -1, -1):
            a = acts[t]
            i, f, gg, o = a[:, :hd], a[:, hd : 2 * hd], a[:, 2 * hd : 3 * hd], a[:, 3 * hd :]
            c_prev = cs[t - 1] if t > 0 else c0
            dh = dh + d_out[t]
            tc = torch.tanh(cs[t])
            dc = dc + dh * o * (1 - tc * tc)
            dz = d_rec[t, :, :g]
            torch.mul(dc * gg, i * (1 - i), out=dz[:, :hd])
            torch.mul(dc * c_prev, f * (1 - f), out=dz[:, hd : 2 * hd])
            torch.mul(dc * i, 1 - gg * gg, out=dz[:, 2 * hd : 3 * hd])
            torch.mul(dh * tc, o * (1 - o), out=dz[:, 3 * hd :])
            torch.mul(dz, s, out=d_rec[t, :, g:])
            dc = dc * f
            dh = torch.mm(d_rec[t], w_t)
        d_pre = d_rec[..., :g]
        d_s = (d_pre * resp).sum(0)
        if s.size(0) != batch:  # one hypernet input shared by the batch
            d_s = d_s.sum(0, keepdim=True)
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]) if steps > 1 else h0.unsqueeze(0)
        d_w = torch.mm(h_prev.reshape(-1, hd).t(), d_rec.reshape(-1, 2 * g))
        return d_pre, dh, dc, d_w, d_s


def _forward_mode(tensors: tuple[Tensor, ...]) -> bool:
    """Whether a ``torch.func`` transform is active or an input carries a :mod:`torch.autograd.forward_ad` tangent."""
    if torch._C._are_functorch_transforms_active():
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _recurrence_ops(pre: Tensor, h0: Tensor, c0: Tensor, w_cat: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The loop of :class:`StnLSTMRecurrence` as plain differentiable tensor operations (one dtype, no autocast)."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (pre, h0, c0, w_cat, s)])
    pre, h, c, w_cat, s = (t.to(dtype) for t in (pre, h0, c0, w_cat, s))
    g = pre.size(-1)
    outs = []
    with torch.autocast(pre.device.type, enabled=False):
        for t in range(pre.size(0)):
            rec = torch.mm(h, w_cat)
            i, f, gg, o = (pre[t] + rec[:, :g] + s * rec[:, g:]).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
    return torch.stack(outs), h, c


def stn_lstm_recurrence(pre: Tensor, h0: Tensor, c0: Tensor, w_cat: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The STN LSTM time loop (inputs and outputs of :class:`StnLSTMRecurrence`).

    The hand-written BPTT function in reverse mode; under forward-mode AD (a ``torch.func`` transform such as
    :func:`torch.func.jvp`, or :mod:`torch.autograd.forward_ad` dual inputs) the same loop as plain tensor
    operations, so ``J·v`` is exact and differentiable in reverse mode (reverse-over-forward).
    """
    if _forward_mode((pre, h0, c0, w_cat, s)):
        return _recurrence_ops(pre, h0, c0, w_cat, s)
    return StnLSTMRecurrence.apply(pre, h0, c0, w_cat, s)


class StnLSTM(StnLayer, _LSTMBase):
    """One best-response LSTM layer (time first) with DropConnect on the hidden-to-hidden weights.

    ``V`` maps λ̃_b to ``[s_ih, s_hh, a_ih, a_hh]`` (each 4·hidden): weight and bias scales of the input-to-hidden
    and hidden-to-hidden responses (official ``HyperLSTMCell`` = two ``HyperLinear`` layers without ``elem_scalar``).

    Args:
        input_size: Width of the input.
        hidden_size: Width of the hidden state.
        hdim: Width of the hypernet input λ̃.
        v_init: Initialization of ``V``: ``normal`` (N(0, v_std²), official) or ``zero``.
        v_std: Standard deviation of ``V`` for ``v_init="normal"``.
    """

    _general_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    _response_names = (
        "response_weight_ih",
        "response_weight_hh",
        "response_bias_ih",
        "response_bias_hh",
        "hyper_bottleneck",
    )

    def __init__(
        self, input_size: int, hidden_size: int, hdim: int, v_init: VInit = "normal", v_std: float = 0.01
    ) -> None:
        StnLayer.__init__(self, 8 * hidden_size, hdim, bias=True, v_init=v_init, v_std=v_std)
        self._make_weights(input_size, hidden_size, response=True)
        self.reset_bottleneck()

    def recurrent_weights(
        self, dropconnect: Tensor | float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(W_hh, R_hh)`` as a forward pass uses them: one DropConnect mask on both in training mode (official
        ``HyperLinear.mask_weights``)."""
        mask = self._mask(dropconnect, generator)
        if mask is None:
            return self.weight_hh, self.response_weight_hh
        return self.weight_hh * mask, self.response_weight_hh * mask

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        state: LSTMState | None = None,
        hnet_input: Tensor | None = None,
        dropconnect: Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, LSTMState]:
        """Run the layer over a window.

        Args:
            x: Input (T, B, input_size).
            state: ``(h, c)`` each (B, hidden_size) carried from the previous window (zeros if ``None``).
            hnet_input: Hypernet input (B, hdim) (or (1, hdim), shared).
            dropconnect: DropConnect rate on the hidden-to-hidden weights (training mode only).
            generator: Source of the DropConnect mask.

        Returns:
            The outputs (T, B, hidden_size) and the final ``(h, c)``.
        """
        self._check_input(x)
        h, c = state if state is not None else self.zero_state(x.size(1))
        g = 4 * self.hidden_size
        s_ih, s_hh, a_ih, a_hh = self._gates(hnet_input, x.size(1)).split(g, dim=-1)
        w_hh, r_hh = self.recurrent_weights(dropconnect, generator)
        # input-to-hidden for the whole window in one matmul: [W_ih; R_ih] x_t, plus every bias term
        proj = torch.matmul(x, torch.cat([self.weight_ih, self.response_weight_ih]).t())
        bias = torch.addcmul(
            torch.addcmul(self.bias_ih + self.bias_hh, a_ih, self.response_bias_ih), a_hh, self.response_bias_hh
        )
        pre = torch.addcmul(proj[..., :g] + bias, s_ih, proj[..., g:])  # (T, B, 4H)
        w_cat = torch.cat([w_hh, r_hh]).t()  # (H, 8H): [W_hh; R_hh] h in one matmul per step
        out, h, c = stn_lstm_recurrence(pre, h, c, w_cat, s_hh)
        return out, (h, c)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, hdim={self.hdim}"
