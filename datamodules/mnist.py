"""MNIST from LeCun's IDX files (``.gz`` or raw), the reader shared by every MNIST-based DataModule.

Expected layout under ``data_dir``::

    mnist/train-images-idx3-ubyte.gz   (or without .gz)
    mnist/train-labels-idx1-ubyte.gz
    mnist/t10k-images-idx3-ubyte.gz
    mnist/t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from datamodules.base import DataFormatError, DatasetNotFoundError, HyperlitDataModule, download_url

__all__ = ["MNISTDataModule", "load_mnist", "read_idx"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_LAYOUT = "  mnist/\n" + "".join(f"    {f}.gz  (or uncompressed)\n" for f in MNIST_FILES.values())
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array, checking its header and size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataFormatError(
            f"{path}: header says shape {dims} ({expected} bytes) but the file holds {len(data) - header} bytes "
            "(truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    return None


def load_mnist(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the train or test split."""
    root = Path(data_dir) / "mnist"
    keys = ("train_images", "train_labels") if train else ("test_images", "test_labels")
    paths = [_find(root, MNIST_FILES[k]) for k in keys]
    missing = [MNIST_FILES[k] + ".gz" for k, p in zip(keys, paths) if p is None]
    if missing:
        raise DatasetNotFoundError("MNIST", root.parent, [f"mnist/{m}" for m in missing], MNIST_LAYOUT)
    images, labels = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(
            f"MNIST in {root}: images {images.shape} and labels {labels.shape} do not form an (N, 28, 28) / (N,) pair"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class MNISTDataModule(HyperlitDataModule):
    """MNIST with a seeded train/validation split of the 60k training images and the official test set.

    Args:
        train_size: Number of training examples (the rest of the 60k pool, up to ``val_size``, is validation);
            ``None`` takes everything not used for validation. L&D's toy uses 10.
        val_size: Size of the validation ("hyper") split drawn from the training pool.
        test_size: Use only the first ``test_size`` test images (``None``: all 10,000).
        flatten: Return 784-vectors instead of 1×28×28 images.
        normalize: Standardize with MNIST's mean/std (else scale to [0, 1]).
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    num_classes = 10

    def __init__(
        self,
        train_size: int | None = None,
        val_size: int = 10000,
        test_size: int | None = None,
        flatten: bool = True,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val_size < 0 or (train_size is not None and train_size < 1):
            raise ValueError(f"need train_size >= 1 and val_size >= 0, got {train_size}, {val_size}")
        if train_size is not None and train_size + val_size > 60000:
            raise ValueError(f"train_size + val_size = {train_size + val_size} exceeds MNIST's 60,000 training images")
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.flatten = flatten
        self.normalize = normalize
        self.input_dim = 784

    def prepare_data(self) -> None:
        root = self.data_dir / "mnist"
        if all(_find(root, f) for f in MNIST_FILES.values()):
            return
        if not self.download:
            missing = [f"mnist/{f}.gz" for f in MNIST_FILES.values() if _find(root, f) is None]
            raise DatasetNotFoundError("MNIST", self.data_dir, missing, MNIST_LAYOUT)
        for f in MNIST_FILES.values():
            if _find(root, f) is None:
                download_url(MNIST_URL + f + ".gz", root / (f + ".gz"))

    def _to_float(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if self.normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        return x.reshape(len(x), -1) if self.flatten else x.unsqueeze(1)

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_mnist(self.data_dir, train=True)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx = perm[: self.val_size]
        rest = perm[self.val_size :]
        train_idx = rest if self.train_size is None else rest[: self.train_size]
        x = self._to_float(images)
        self.train_set = TensorDataset(x[train_idx], labels[train_idx])
        self.val_set = TensorDataset(x[val_idx], labels[val_idx])
        test_images, test_labels = load_mnist(self.data_dir, train=False)
        if self.test_size is not None:
            test_images, test_labels = test_images[: self.test_size], test_labels[: self.test_size]
        self.test_set = TensorDataset(self._to_float(test_images), test_labels)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, batch_size=min(self.batch_size, len(self.train_set)))

    def hyper_dataloader(self) -> DataLoader:
        """The validation split, shuffled, for hyperparameter steps."""
        return self._loader(self.val_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
