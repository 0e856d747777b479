"""Vectorized per-example augmentation vs torchvision's functional ops, image by image.

Tolerance: 1e-5 absolute on float32 images in [0, 1] (the ops are the same formulas; differences are float
rounding, e.g. the HSV→RGB sector selection by comparisons instead of torchvision's einsum).
"""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from hyperlit.nn.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    cutout,
    hsv_to_rgb,
    input_scale_noise,
    jitter_factors,
    rgb_to_hsv,
)

TOL = dict(atol=1e-5, rtol=0)


def _images(b: int = 6, size: int = 9) -> torch.Tensor:
    x = torch.rand(b, 3, size, size)
    x[0, :, :3, :3] = 0.4  # grey pixels (max == min, hue undefined)
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure colours at sector boundaries
    x[1, :, 0, 1] = torch.tensor([0.0, 1.0, 1.0])
    x[2] = x[2].round()  # saturated corners of the cube
    return x


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 1.0, 1.7, 2.0, 0.95]),
        (adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 1.0, 1.7, 2.0, 0.95]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 1.0, 1.7, 2.0, 0.95]),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.23, 0.0, 0.1, 0.37, 0.5]),
    ],
)
def test_colour_ops_match_torchvision_per_image(ours, theirs, factors) -> None:
    x = _images()
    out = ours(x, torch.tensor(factors))
    for b, f in enumerate(factors):
        torch.testing.assert_close(out[b], theirs(x[b], f), **TOL)


def test_hsv_round_trip() -> None:
    x = _images(4, 16)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, **TOL)


def test_color_jitter_matches_torchvision_sequence() -> None:
    x = _images(8)
    g = torch.Generator().manual_seed(3)
    factors = jitter_factors(torch.full((8,), 0.4), 0.3, torch.linspace(0, 1, 8), 0.2, 8, generator=g)
    out = color_jitter(x, factors=factors)
    for b in range(8):
        bri, con, sat, hue = factors[b].tolist()
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[b], bri), con), sat), hue)
        torch.testing.assert_close(out[b], ref, **TOL)


def test_color_jitter_random_order_per_example() -> None:
    x = _images(5)
    factors = torch.tensor([[1.3, 0.6, 1.5, 0.2]] * 5)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    out = color_jitter(x, factors=factors, order=order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(5):
        ref = x[b]
        for k in order[b].tolist():
            ref = ops[k](ref, factors[b, k].item())
        torch.testing.assert_close(out[b], ref, **TOL)


def test_jitter_factor_ranges_follow_colorjitter() -> None:
    s = torch.tensor([0.0, 0.5, 1.0, 2.0]).repeat_interleave(2000)
    f = jitter_factors(s, s, s, s.clamp(max=0.5), len(s), generator=torch.Generator().manual_seed(0))
    for k in range(3):  # U[max(0, 1 - s), 1 + s]
        assert (f[:, k] >= (1 - s).clamp_min(0) - 1e-6).all() and (f[:, k] <= 1 + s + 1e-6).all()
    assert (f[:2000, :3] == 1).all() and (f[:2000, 3] == 0).all()  # zero strength: identity factors
    assert (f[:, 3].abs() <= s.clamp(max=0.5) + 1e-6).all()
    assert f[2000:4000, 0].mean().item() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="hue"):
        jitter_factors(0.1, 0.1, 0.1, 0.7, 4)
    with pytest.raises(ValueError):
        jitter_factors(float("nan"), 0.1, 0.1, 0.1, 4)


def _reference_cutout(img: torch.Tensor, centers: list[tuple[int, int]], length: int) -> torch.Tensor:
    """The official Cutout for one image with given centres (np.clip then int())."""
    h, w = img.shape[1:]
    mask = torch.ones(h, w)
    for y, x in centers:
        y1, y2 = int(min(max(y - length / 2, 0), h)), int(min(max(y + length / 2, 0), h))
        x1, x2 = int(min(max(x - length / 2, 0), w)), int(min(max(x + length / 2, 0), w))
        mask[y1:y2, x1:x2] = 0.0
    return img * mask


def test_cutout_matches_reference_with_per_example_holes_and_lengths() -> None:
    b, k = 6, 3
    x = torch.rand(b, 3, 12, 12) + 0.1
    g = torch.Generator().manual_seed(0)
    centers = torch.randint(0, 12, (b, k, 2), generator=g)
    holes = torch.tensor([0, 1, 2, 3, 1, 2])
    length = torch.tensor([4, 4, 5, 2, 0, 11])
    out = cutout(x, length.float(), holes.float(), centers=centers)
    for i in range(b):
        cs = [tuple(c) for c in centers[i, : holes[i]].tolist()]
        torch.testing.assert_close(out[i], _reference_cutout(x[i], cs, int(length[i])), atol=0, rtol=0)


def test_cutout_random_holes_and_fill() -> None:
    x = torch.ones(400, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    out = cutout(x, 8.0, torch.tensor([0.0, 1.0]).repeat(200), generator=g, fill=torch.tensor([0.1, 0.2, 0.3]))
    cut = (out != 1).all(dim=1)  # (B, H, W): every channel filled
    assert cut[0::2].sum() == 0  # zero holes → unchanged
    area = cut[1::2].flatten(1).sum(1).float()
    assert area.max() == 64 and area.min() >= 16  # an 8×8 square, clipped at the border
    assert torch.equal(out[1, :, cut[1]].unique(dim=1).flatten(), torch.tensor([0.1, 0.2, 0.3]))
    # reproducible from the generator
    out2 = cutout(x, 8.0, torch.tensor([0.0, 1.0]).repeat(200), generator=torch.Generator().manual_seed(1))
    assert torch.equal((out2 != 1).all(1), cut)
    with pytest.raises(ValueError, match="max_holes"):
        cutout(x[:2], 4.0, torch.tensor([1.0, 3.0]), max_holes=2)


def test_input_scale_noise_is_one_factor_per_example_in_range() -> None:
    x = torch.rand(500, 3, 4, 4) + 0.5
    s = torch.linspace(0, 0.3, 500)
    out = input_scale_noise(x, s, generator=torch.Generator().manual_seed(0))
    ratio = out / x
    flat = ratio.flatten(1)
    torch.testing.assert_close(flat.min(1).values, flat.max(1).values, atol=1e-5, rtol=1e-5)
    r = flat[:, 0]
    assert (r >= 1 / (1 + s) - 1e-5).all() and (r <= 1 + s + 1e-5).all()
    assert torch.equal(out[0], x[0])  # s = 0: identity
