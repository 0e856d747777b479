"""Generators of tiny data files in the real on-disk formats, so tests exercise the real readers."""

from __future__ import annotations

import gzip
import pickle
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


MNIST_DIRS = {"hyperlit": "mnist", "torchvision": "MNIST/raw"}


def write_fake_mnist(
    root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0, compress: bool = True, layout: str = "hyperlit"
) -> Path:
    """Create ``root/mnist/*-ubyte(.gz)`` (``layout="torchvision"``: ``root/MNIST/raw/``) with class-dependent blobs,
    so a model can learn from them."""
    rng = np.random.default_rng(seed)
    mnist = root / MNIST_DIRS[layout]
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):  # a bright 6x6 square whose position encodes the class
            r, col = 2 + 2 * (c // 5) * 5, 2 + 5 * (c % 5)
            images[i, r : r + 6, col : col + 6] = 250
        write_idx(mnist / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(mnist / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_DIRS = {"hyperlit": "cifar10/cifar-10-batches-py", "torchvision": "cifar-10-batches-py"}


def write_fake_cifar(
    root: Path, per_batch: int = 20, files: list[str] | None = None, seed: int = 0, layout: str = "hyperlit"
) -> Path:
    """``root/cifar10/cifar-10-batches-py/*`` (``layout="torchvision"``: ``root/cifar-10-batches-py/``) as protocol-2
    pickles of ``{'batch_label', 'labels', 'data', 'filenames'}`` (pixel 0 of every image marks its batch); returns
    the folder."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_DIRS[layout]
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(files if files is not None else [*CIFAR_TRAIN, "test_batch", "batches.meta"]):
        if name == "batches.meta":
            entry: dict[str, object] = {"num_cases_per_batch": per_batch, "label_names": ["c"] * 10, "num_vis": 3072}
        else:
            labels = rng.integers(0, 10, per_batch).tolist()
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            data[:, 0] = k  # marks the batch an image came from
            entry = {
                "batch_label": name,
                "labels": labels,
                "data": data,
                "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
            }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return folder
