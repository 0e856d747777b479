"""Parameter exchange with hypnettorch (``HMLP`` / ``ChunkedHMLP``), for side-by-side comparisons.

Layouts: both generate the target weights in ``param_shapes`` order ``[W1, b1, W2, b2, …]`` (W as [out, in]); a
hypnettorch MLP hypernet is Linear→act→…→Linear, as :class:`~hyperlit.nn.hypernet.HyperNetwork` with ``hidden``
layers. Differences handled here: hypnettorch keeps the task embeddings inside the hypernet (its conditional
parameters), and ``ChunkedHMLP`` feeds ``[chunk embedding, condition]`` where ours feeds
``[condition, chunk embedding]`` (the first layer's columns are swapped). hypnettorch itself is imported only by
the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyperlit.nn.hypernet import HyperNetwork

__all__ = ["copy_from_hypnettorch"]


@torch.no_grad()
def copy_from_hypnettorch(ref: nn.Module, ours: HyperNetwork) -> Tensor:
    """Copy a hypnettorch ``HMLP``/``ChunkedHMLP`` into ``ours``; returns its task embeddings (T, d).

    ``ours`` must have the same hidden sizes, condition size and (for chunked hypernets) chunk size and chunk
    embedding size; mismatches raise ``ValueError``.
    """
    uncond = list(ref.unconditional_params)  # type: ignore[attr-defined]
    chunk_emb = None
    if ours.chunk_embeddings is not None:
        chunk_emb, uncond = uncond[-1], uncond[:-1]
        if chunk_emb.shape != ours.chunk_embeddings.shape:
            raise ValueError(f"chunk embeddings {tuple(chunk_emb.shape)} vs ours {tuple(ours.chunk_embeddings.shape)}")
        ours.chunk_embeddings.copy_(chunk_emb)
    linears = [m for m in ours.trunk if isinstance(m, nn.Linear)] + [ours.head]
    if len(uncond) != 2 * len(linears):
        raise ValueError(f"hypnettorch hypernet has {len(uncond) // 2} layers, ours {len(linears)} (biases needed)")
    for i, (layer, w, b) in enumerate(zip(linears, uncond[0::2], uncond[1::2])):
        if i == 0 and chunk_emb is not None:  # [chunk emb, cond] → [cond, chunk emb]
            c = chunk_emb.shape[1]
            w = torch.cat([w[:, c:], w[:, :c]], 1)
        if w.shape != layer.weight.shape or b.shape != layer.bias.shape:
            raise ValueError(f"layer {i}: hypnettorch {tuple(w.shape)} vs ours {tuple(layer.weight.shape)}")
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return torch.stack([e.detach().clone() for e in ref.conditional_params])  # type: ignore[attr-defined]
