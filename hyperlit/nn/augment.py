"""Per-example data augmentation as batched tensor ops (STN §4.3, official ``cnn/datasets/cifar.py``).

The official code rebuilt a ``torchvision`` ``ColorJitter`` and a ``Cutout`` for every image inside the Dataset
(which forces ``num_workers=0``). Here every operation takes one strength per example and runs on the whole batch
on any device; images are float tensors (B, 3, H, W) in [0, 1]. The colour operations reproduce
``torchvision.transforms.functional.adjust_{brightness,contrast,saturation,hue}`` image by image (tested to 1e-5).
Every random draw takes an explicit ``generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "cutout",
    "grayscale",
    "hsv_to_rgb",
    "input_scale_noise",
    "jitter_factors",
    "rgb_to_hsv",
]

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _per_example(v: Tensor | float, x: Tensor, name: str) -> Tensor:
    """(B, 1, …, 1) view (as many dims as ``x``) of a scalar or (B,) strength, detached."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device).detach()
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.dim() != 1 or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))


def _check_rgb(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")


def grayscale(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(img1: Tensor, img2: Tensor | float, ratio: Tensor) -> Tensor:
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-example ``TF.adjust_brightness``: ``clamp(f_b · x_b)``."""
    return _blend(x, 0.0, _per_example(factor, x, "brightness factor"))


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-example ``TF.adjust_contrast``: blend with the image's mean grey level."""
    _check_rgb(x)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _per_example(factor, x, "contrast factor"))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-example ``TF.adjust_saturation``: blend with the grey image."""
    _check_rgb(x)
    return _blend(x, grayscale(x), _per_example(factor, x, "saturation factor"))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB → HSV (all in [0, 1]) following torchvision's ``_rgb2hsv``."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV → RGB, equal to torchvision's ``_hsv2rgb`` (sector selection by ``torch.where``, no einsum)."""
    h, s, v = x.unbind(dim=1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # sector: 0     1     2     3     4     5
    # r:      v     q     p     p     t     v
    # g:      t     v     v     q     p     p
    # b:      p     p     t     v     v     q
    r = torch.where(i < 1, v, torch.where(i < 2, q, torch.where(i < 4, p, torch.where(i < 5, t, v))))
    g = torch.where(i < 1, t, torch.where(i < 3, v, torch.where(i < 4, q, p)))
    b = torch.where(i < 2, p, torch.where(i < 3, t, torch.where(i < 5, v, q)))
    return torch.stack((r, g, b), dim=1)


def adjust_hue(x: Tensor, shift: Tensor | float) -> Tensor:
    """Per-example ``TF.adjust_hue``: rotate the hue by ``shift_b`` ∈ [−0.5, 0.5] (fraction of a turn)."""
    _check_rgb(x)
    sh = _per_example(shift, x, "hue shift").view(-1, 1, 1)
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + sh, 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def jitter_factors(
    brightness: Tensor | float,
    contrast: Tensor | float,
    saturation: Tensor | float,
    hue: Tensor | float,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample ``ColorJitter`` factors per example: (B, 4) = brightness, contrast, saturation, hue.

    As ``torchvision.transforms.ColorJitter`` with strength ``s``: factors ~ U[max(0, 1 − s), 1 + s] and
    hue shift ~ U[−h, h] (``h`` ≤ 0.5), one draw per example.
    """
    strengths = [
        torch.as_tensor(v, dtype=torch.float32, device=device).detach().expand(batch_size)
        for v in (brightness, contrast, saturation, hue)
    ]
    s = torch.stack(strengths, dim=1)
    if not bool((s >= 0).all() & (s[:, 3] <= 0.5).all()):
        raise ValueError("jitter strengths must be >= 0 and the hue strength <= 0.5 (NaN is rejected too)")
    u = torch.rand(batch_size, 4, generator=generator, device=s.device)
    lo = torch.cat(((1 - s[:, :3]).clamp_min(0.0), -s[:, 3:]), dim=1)
    hi = torch.cat((1 + s[:, :3], s[:, 3:]), dim=1)
    return lo + (hi - lo) * u


def color_jitter(
    x: Tensor,
    brightness: Tensor | float = 0.0,
    contrast: Tensor | float = 0.0,
    saturation: Tensor | float = 0.0,
    hue: Tensor | float = 0.0,
    generator: torch.Generator | None = None,
    factors: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Per-example colour jitter (``ColorJitter`` with one strength per example).

    Args:
        x: (B, 3, H, W) images in [0, 1].
        brightness, contrast, saturation, hue: Strengths, scalar or (B,).
        generator: Source of the factor draws.
        factors: Explicit (B, 4) factors (brightness, contrast, saturation, hue shift); skips sampling.
        order: Optional (B, 4) permutation of the operation indices (0 brightness, 1 contrast, 2 saturation,
            3 hue) per example, as ``ColorJitter`` draws it per image. By default the fixed order
            brightness → contrast → saturation → hue is used (4 operations instead of 16).
    """
    _check_rgb(x)
    if factors is None:
        factors = jitter_factors(brightness, contrast, saturation, hue, x.shape[0], generator, x.device)
    factors = factors.to(x.dtype)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    if order is None:
        for k, op in enumerate(ops):
            x = op(x, factors[:, k])
        return x
    if order.shape != (x.shape[0], 4):
        raise ValueError(f"order must have shape ({x.shape[0]}, 4), got {tuple(order.shape)}")
    for slot in range(4):
        which = order[:, slot].view(-1, 1, 1, 1)
        out = x
        for k, op in enumerate(ops):
            out = torch.where(which == k, op(x, factors[:, k]), out)
        x = out
    return x


def input_scale_noise(x: Tensor, scale: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Multiply example ``b`` by one factor ~ U[1/(1 + s_b), 1 + s_b] (official ``inscale``)."""
    s = _per_example(scale, x, "input scale")
    if not bool((s >= 0).all()):
        raise ValueError("input scale must be >= 0")
    u = torch.rand(s.shape, generator=generator, device=x.device, dtype=x.dtype)
    low = 1.0 / (1.0 + s)
    return x * (low + (1.0 + s - low) * u)


def cutout(
    x: Tensor,
    length: Tensor | float,
    holes: Tensor | float,
    generator: torch.Generator | None = None,
    max_holes: int | None = None,
    fill: Tensor | float = 0.0,
    centers: Tensor | None = None,
) -> Tensor:
    """Cutout (DeVries & Taylor 2017) with a per-example hole count and side length.

    Example ``b`` gets ``holes_b`` square holes of side ``length_b`` whose centres are uniform over the image and
    which are clipped at the border (``y1 = floor(clip(cy − L/2, 0, H))``, ``y2 = floor(clip(cy + L/2, 0, H))``,
    as the official ``Cutout``). Masked pixels are set to ``fill`` (scalar or per channel).

    Args:
        x: (B, C, H, W) images.
        length: Hole side per example (scalar or (B,); non-negative integers after the ``floor`` of discrete
            hyperparameters).
        holes: Number of holes per example (scalar or (B,), non-negative integers).
        generator: Source of the centre draws.
        max_holes: Number of candidate holes drawn per example (default ``holes.max()``; larger values raise).
        fill: Fill value (scalar or (C,)), e.g. the data mean so that normalisation maps holes to 0.
        centers: Explicit hole centres (B, K, 2) as (row, column) instead of random ones.
    """
    if x.dim() != 4:
        raise ValueError(f"cutout expects (B, C, H, W) images, got {tuple(x.shape)}")
    b, _c, hgt, wid = x.shape
    length_b = _per_example(length, x, "cutout length").view(b, 1)
    holes_b = _per_example(holes, x, "cutout holes").view(b, 1)
    if centers is not None:
        if centers.dim() != 3 or centers.shape[0] != b or centers.shape[2] != 2:
            raise ValueError(f"centers must have shape ({b}, K, 2), got {tuple(centers.shape)}")
        max_holes = centers.shape[1]
        cy, cx = centers[..., 0].float(), centers[..., 1].float()
    elif max_holes is None:
        max_holes = int(holes_b.max().item()) if b else 0
    elif bool((holes_b > max_holes).any()):
        raise ValueError(f"cutout holes up to {holes_b.max().item()} exceed max_holes={max_holes}")
    if max_holes <= 0:
        return x
    if centers is None:
        gen_dev = dict(generator=generator, device=x.device)
        cy = torch.floor(torch.rand(b, max_holes, **gen_dev) * hgt)  # type: ignore[arg-type]
        cx = torch.floor(torch.rand(b, max_holes, **gen_dev) * wid)  # type: ignore[arg-type]
    half = length_b.float() / 2
    y1, y2 = torch.floor((cy - half).clamp(0, hgt)), torch.floor((cy + half).clamp(0, hgt))
    x1, x2 = torch.floor((cx - half).clamp(0, wid)), torch.floor((cx + half).clamp(0, wid))
    rows = torch.arange(hgt, device=x.device, dtype=cy.dtype)
    cols = torch.arange(wid, device=x.device, dtype=cx.dtype)
    in_y = (rows >= y1[..., None]) & (rows < y2[..., None])  # (B, K, H)
    in_x = (cols >= x1[..., None]) & (cols < x2[..., None])  # (B, K, W)
    active = torch.arange(max_holes, device=x.device) < holes_b.to(x.device)  # (B, K)
    hole = (in_y[..., :, None] & in_x[..., None, :] & active[..., None, None]).any(dim=1)  # (B, H, W)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    fill_t = fill_t.view(1, -1, 1, 1) if fill_t.dim() == 1 else fill_t
    return torch.where(hole[:, None], fill_t, x)
