"""Generators of tiny data files in the real on-disk formats, so tests exercise the real readers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file (LeCun's format), gzip-compressed if ``compress``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fake_mnist(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0, compress: bool = True) -> Path:
    """Create ``root/mnist/*-ubyte(.gz)`` with class-dependent blobs, so a model can learn from them."""
    rng = np.random.default_rng(seed)
    mnist = root / "mnist"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):  # a bright 6x6 square whose position encodes the class
            r, col = 2 + 2 * (c // 5) * 5, 2 + 5 * (c % 5)
            images[i, r : r + 6, col : col + 6] = 250
        write_idx(mnist / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(mnist / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root
