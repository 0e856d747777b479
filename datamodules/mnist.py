"""MNIST from LeCun's IDX files, read with torchvision's IDX reader; shared by every MNIST-based DataModule.

Two layouts under ``data_dir`` are read (the first complete one wins); each file may be raw or ``.gz``::

    MNIST/raw/train-images-idx3-ubyte       torchvision's layout: what torchvision.datasets.MNIST(root=data_dir,
    MNIST/raw/train-labels-idx1-ubyte       download=True) writes, so an existing torchvision download is used
    MNIST/raw/t10k-images-idx3-ubyte        as it is
    MNIST/raw/t10k-labels-idx1-ubyte

    mnist/train-images-idx3-ubyte.gz        hyperlit's flat layout: the four files as LeCun distributes them
    mnist/train-labels-idx1-ubyte.gz
    mnist/t10k-images-idx3-ubyte.gz
    mnist/t10k-labels-idx1-ubyte.gz

Files are parsed by ``torchvision.datasets.mnist.read_image_file`` / ``read_label_file``; those read only
uncompressed files, so a ``.gz`` file is first decompressed (``torchvision.datasets.utils.extract_archive``) into a
temporary folder that is deleted right after (``data_dir`` may be read-only). No checksum is verified when reading:
re-compressed ``.gz`` wrappers of the original bytes are common. ``download=True`` lets ``prepare_data`` call
``torchvision.datasets.MNIST(download=True)``, which fetches the four files into ``MNIST/raw/`` with md5 checks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from datamodules.base import DataFormatError, DatasetNotFoundError, HyperlitDataModule

__all__ = ["MNIST_FOLDERS", "MNISTDataModule", "find_mnist_folder", "load_mnist", "read_mnist_file"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Folders under ``data_dir`` searched for the four IDX files, in this order (torchvision's layout, then hyperlit's).
MNIST_FOLDERS = ("MNIST/raw", "mnist")
MNIST_LAYOUT = (
    "  MNIST/raw/   (torchvision's layout; torchvision.datasets.MNIST(root=data_dir, download=True) writes it)\n"
    + "".join(f"    {f}\n" for f in MNIST_FILES.values())
    + "  or mnist/\n"
    + "".join(f"    {f}.gz\n" for f in MNIST_FILES.values())
    + "  (in either folder each file may be raw or .gz)"
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # the raw file first: no decompression needed
        if (folder / name).is_file():
            return folder / name
    return None


def find_mnist_folder(data_dir: str | Path) -> Path:
    """The first folder of :data:`MNIST_FOLDERS` under ``data_dir`` that holds all four files.

    Raises:
        DatasetNotFoundError: No folder is complete; names the files missing from the most complete one.
    """
    root = Path(data_dir)
    best: list[str] | None = None
    for rel in MNIST_FOLDERS:
        suffix = "" if rel == MNIST_FOLDERS[0] else ".gz"  # how each layout usually stores them (both are read)
        missing = [f"{rel}/{stem}{suffix}" for stem in MNIST_FILES.values() if _find_file(root / rel, stem) is None]
        if not missing:
            return root / rel
        if best is None or len(missing) < len(best):
            best = missing
    raise DatasetNotFoundError("MNIST", root, best or [], MNIST_LAYOUT)


def _idx_error(path: Path, raw: Path, err: Exception) -> DataFormatError:
    head = b""
    if raw.is_file():
        with open(raw, "rb") as fh:
            head = fh.read(4)
    if len(head) < 4 or head[:2] != b"\x00\x00" or not 0x08 <= head[2] <= 0x0E or not 1 <= head[3] <= 3:
        return DataFormatError(f"{path}: not an IDX file (bad magic number {head!r})")
    return DataFormatError(f"{path}: header and size do not match (truncated or corrupt file: {err})")


def _read_raw(path: Path, raw: Path, kind: Literal["images", "labels"]) -> Tensor:
    reader = read_image_file if kind == "images" else read_label_file
    try:
        return reader(str(raw))
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err
    except (AssertionError, KeyError, RuntimeError) as err:  # torchvision's checks of magic number and size
        raise _idx_error(path, raw, err) from err
    except (TypeError, ValueError) as err:  # wrong dtype or number of dimensions for `kind`
        raise DataFormatError(f"{path}: not an MNIST {kind} file ({err})") from err


def read_mnist_file(path: str | Path, kind: Literal["images", "labels"]) -> Tensor:
    """One IDX file (raw or ``.gz``) read by torchvision: images (N, H, W) uint8 or labels (N,) int64.

    Raises:
        DataFormatError: The file is not a gzip/IDX file of that kind, or is truncated (names the file).
    """
    path = Path(path)
    if path.suffix != ".gz":
        return _read_raw(path, path, kind)
    with tempfile.TemporaryDirectory(prefix="hyperlit-mnist-") as tmp:
        try:
            raw = Path(extract_archive(str(path), tmp))
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; EOFError: truncated .gz
            raise DataFormatError(f"{path}: cannot decompress ({err})") from err
        return _read_raw(path, raw, kind)


def load_mnist(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the train or test split (layouts: module docstring)."""
    folder = find_mnist_folder(data_dir)
    prefix = "train" if train else "test"
    images_path = _find_file(folder, MNIST_FILES[f"{prefix}_images"])
    labels_path = _find_file(folder, MNIST_FILES[f"{prefix}_labels"])
    assert images_path is not None and labels_path is not None  # find_mnist_folder checked
    images = read_mnist_file(images_path, "images")
    labels = read_mnist_file(labels_path, "labels")
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataFormatError(
            f"MNIST in {folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not form an "
            "(N, 28, 28) / (N,) pair"
        )
    return images, labels


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

    serves_hyper_stream = True  # train_dataloader() goes through with_hyper_stream

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
        """Check the files; with ``download=True`` let torchvision fetch missing ones into ``MNIST/raw/``."""
        try:
            find_mnist_folder(self.data_dir)
        except DatasetNotFoundError:
            if not self.download:
                raise
            MNIST(str(self.data_dir), train=False, download=True)  # torchvision: mirrors + md5 of every .gz
            find_mnist_folder(self.data_dir)

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
        return self.with_hyper_stream(
            self._loader(self.train_set, shuffle=True, batch_size=min(self.batch_size, len(self.train_set)))
        )

    def hyper_dataloader(self) -> DataLoader:
        """The validation split, shuffled, for hyperparameter steps."""
        return self._loader(self.val_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
