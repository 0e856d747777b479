"""CIFAR-10 from the python-pickle batches (torchvision's on-disk format), read by our own loader.

Expected layout under ``data_dir``::

    cifar10/cifar-10-batches-py/data_batch_1 … data_batch_5   (10,000 images each)
    cifar10/cifar-10-batches-py/test_batch                    (10,000 images)
    cifar10/cifar-10-batches-py/batches.meta

Splits (STN §5 / official ``cnn/datasets/loaders.py``): 80 % of the training images train the weights (40,000), the
other 20 % (10,000) form the *hyper* split on which the hyperparameters are tuned (a seeded split); the official
test batch is the test set. Images are returned as float tensors (3, 32, 32) in [0, 1], **not** normalised and not
augmented: STN networks normalise internally and augment per example inside the training step.

By default the full data set is expected and every file's md5 is checked against torchvision's values.
``partial=True`` instead loads only ``data_batch_1`` and ``test_batch`` without checksum verification — this is how
the reconstructed partial copy in the shared data folder is used (its checksums differ from the originals; see its
README): 8,000 / 2,000 train / hyper images and the 10,000 test images.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.base import (
    DataFormatError,
    HyperlitDataModule,
    download_url,
    seeded_split_indices,
)

__all__ = ["CIFAR10_CLASSES", "CIFAR10DataModule", "CIFAR10Images", "load_cifar_batch"]

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST_FILES = {"test_batch": "40351d587109b95175f43aff81a1287e"}
META_FILES = {"batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
PARTIAL_FILES = ("data_batch_1", "test_batch")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUT = (
    f"  cifar10/{FOLDER}/\n"
    + "".join(f"    {f}\n" for f in (*TRAIN_FILES, *TEST_FILES, *META_FILES))
    + "  (partial=True needs only data_batch_1 and test_batch)"
)


def load_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle batch: (N, 3, 32, 32) uint8 images and (N,) int64 labels, with format checks."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataFormatError(f"{path}: not a readable CIFAR pickle batch ({err})") from err
    if not isinstance(entry, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(entry).__name__}")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or ("labels" not in entry and "fine_labels" not in entry):
        raise DataFormatError(f"{path}: missing 'data'/'labels' keys (found {sorted(entry)})")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class CIFAR10Images(Dataset[tuple[Tensor, Tensor]]):
    """uint8 images held in memory, served as float tensors in [0, 1] (batched fetch via ``__getitems__``)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i].float().div_(255.0), self.labels[i]

    def __getitems__(self, idx: list[int]) -> list[tuple[Tensor, Tensor]]:
        index = torch.as_tensor(idx)
        x = self.images[index].float().div_(255.0)
        return list(zip(x.unbind(0), self.labels[index].unbind(0)))


class CIFAR10DataModule(HyperlitDataModule):
    """CIFAR-10 with a train / hyper split of the training batches and the official test batch.

    Args:
        partial: Load only ``data_batch_1`` and ``test_batch`` without md5 checks (the shared partial copy).
        hyper_fraction: Fraction of the training images held out for hyperparameter steps (paper: 0.2).
        verify_md5: Check the files of the full data set against torchvision's md5 values.
        hyper_batch_size: Batch size of the hyper stream (defaults to ``batch_size``).
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(
        self,
        partial: bool = False,
        hyper_fraction: float = 0.2,
        verify_md5: bool = True,
        hyper_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < hyper_fraction < 1.0:
            raise ValueError(f"hyper_fraction must be in (0, 1), got {hyper_fraction}")
        self.partial = partial
        self.hyper_fraction = hyper_fraction
        self.verify_md5 = verify_md5
        self.hyper_batch_size = hyper_batch_size or self.batch_size
        self.save_hyperparameters()

    @property
    def root(self) -> Path:
        return self.data_dir / "cifar10" / FOLDER

    def _required(self) -> dict[str, str]:
        if self.partial:
            return {f: "" for f in PARTIAL_FILES}
        return {**TRAIN_FILES, **TEST_FILES, **META_FILES}

    def prepare_data(self) -> None:
        if not self.download or self.partial:
            return
        if all((self.root / f).exists() for f in self._required()):
            return
        archive = download_url(URL, self.data_dir / "cifar10" / "cifar-10-python.tar.gz", md5=TGZ_MD5)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(self.data_dir / "cifar10", filter="data")

    def check_integrity(self) -> None:
        """Raise :class:`DatasetNotFoundError` for missing files and :class:`DataFormatError` for md5 mismatches."""
        required = self._required()
        self.check_files(
            "CIFAR-10" + (" (partial)" if self.partial else ""),
            self.data_dir,
            [f"cifar10/{FOLDER}/{f}" for f in required],
            LAYOUT,
        )
        if self.partial or not self.verify_md5:
            return
        bad = [
            f"{f}: md5 {got}, expected {want}" for f, want in required.items() if (got := _md5(self.root / f)) != want
        ]
        if bad:
            raise DataFormatError(
                "CIFAR-10 files do not match the original data set:\n  "
                + "\n  ".join(bad)
                + "\nFor the reconstructed partial copy use partial=True (CLI: --data.partial true); to skip the check "
                "for a full copy you trust, verify_md5=False."
            )

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        self.check_integrity()
        train_files = ["data_batch_1"] if self.partial else list(TRAIN_FILES)
        parts = [load_cifar_batch(self.root / f) for f in train_files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        train_idx, hyper_idx = seeded_split_indices(
            len(y), (1 - self.hyper_fraction, self.hyper_fraction), self.split_seed
        )
        self.train_set = CIFAR10Images(x[train_idx], y[train_idx])
        self.hyper_set = CIFAR10Images(x[hyper_idx], y[hyper_idx])
        tx, ty = load_cifar_batch(self.root / "test_batch")
        self.test_set = CIFAR10Images(torch.from_numpy(tx), torch.from_numpy(ty))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def hyper_dataloader(self) -> DataLoader:
        """Held-out stream for the λ-steps (shuffled; cycled by the tuning modules)."""
        return self._loader(self.hyper_set, shuffle=True, batch_size=self.hyper_batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hyper_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
