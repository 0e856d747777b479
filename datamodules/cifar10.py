"""CIFAR-10 from the python-pickle batches, read with ``torchvision.datasets.CIFAR10``.

Two layouts under ``data_dir`` are read (the first complete one wins)::

    cifar-10-batches-py/data_batch_1 … data_batch_5, test_batch, batches.meta
        torchvision's layout: what torchvision.datasets.CIFAR10(root=data_dir, download=True) writes, so an
        existing torchvision download is used as it is
    cifar10/cifar-10-batches-py/…   (the same files)
        hyperlit's layout

Splits (STN §5 / official ``cnn/datasets/loaders.py``): 80 % of the training images train the weights (40,000), the
other 20 % (10,000) form the *hyper* split on which the hyperparameters are tuned (a seeded split); the official
test batch is the test set. Images are returned as float tensors (3, 32, 32) in [0, 1], **not** normalised and not
augmented: STN networks normalise internally and augment per example inside the training step.

By default the full data set is expected and every file's md5 is checked against torchvision's values (torchvision's
own ``CIFAR10`` refuses any other file). ``partial=True`` instead loads only ``data_batch_1`` and ``test_batch``
without checksum verification: 8,000 / 2,000 train / hyper images and the 10,000 test images, e.g. for a
reconstructed partial copy whose checksums differ from the originals. Each batch is read by a subclass of
``torchvision.datasets.CIFAR10`` restricted to that one file (:class:`CIFAR10Batch`), after the DataModule has
checked which files exist and, for the full set, their md5. ``download=True`` lets ``prepare_data`` fetch and unpack
torchvision's archive (``download_and_extract_archive`` with its md5) into ``data_dir/cifar-10-batches-py``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

from datamodules.base import DataFormatError, DatasetNotFoundError, HyperlitDataModule, seeded_split_indices

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10Batch",
    "CIFAR10DataModule",
    "CIFAR10Images",
    "find_cifar10_folder",
    "load_cifar_batch",
]

FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
ROOTS = (".", "cifar10")  # the folder holding FOLDER, relative to data_dir: torchvision's layout, then hyperlit's
TRAIN_FILES: dict[str, str] = {name: md5 for name, md5 in CIFAR10.train_list}
TEST_FILES: dict[str, str] = {name: md5 for name, md5 in CIFAR10.test_list}
META_FILES: dict[str, str] = {CIFAR10.meta["filename"]: CIFAR10.meta["md5"]}
PARTIAL_FILES = ("data_batch_1", "test_batch")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUT = (
    f"  {FOLDER}/   (torchvision's layout; torchvision.datasets.CIFAR10(root=data_dir, download=True) writes it)\n"
    + "".join(f"    {f}\n" for f in (*TRAIN_FILES, *TEST_FILES, *META_FILES))
    + f"  or cifar10/{FOLDER}/ with the same files\n"
    + "  (partial=True needs only data_batch_1 and test_batch)"
)


def find_cifar10_folder(data_dir: str | Path, files: Sequence[str], dataset: str = "CIFAR-10") -> Path:
    """The first ``cifar-10-batches-py`` folder of the two layouts under ``data_dir`` that holds all ``files``.

    Raises:
        DatasetNotFoundError: No folder is complete; names the files missing from the most complete one.
    """
    root = Path(data_dir)
    best: list[str] | None = None
    for rel in ROOTS:
        folder = root / rel / FOLDER
        missing = [str(Path(rel, FOLDER, f)) for f in files if not (folder / f).is_file()]
        if not missing:
            return folder
        if best is None or len(missing) < len(best):
            best = missing
    raise DatasetNotFoundError(dataset, root, best or [], LAYOUT)


def find_or_download(find: Callable[[], Path], data_dir: str | Path, download: bool) -> Path:
    """``find()``; if it raises :class:`~datamodules.base.DatasetNotFoundError` and ``download``, fetch
    torchvision's CIFAR-10 archive into ``data_dir`` and look again (otherwise the error stands)."""
    try:
        return find()
    except DatasetNotFoundError:
        if not download:
            raise
        download_and_extract_archive(CIFAR10.url, str(data_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        return find()


class CIFAR10Batch(CIFAR10):
    """``torchvision.datasets.CIFAR10`` reading one pickle batch file, with no md5 check and no ``batches.meta``.

    ``data`` is (N, 32, 32, 3) uint8 (torchvision's HWC), ``targets`` a list of N labels, ``classes`` CIFAR-10's.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.base_folder = path.parent.name
        self.train_list = [[path.name, None]]
        self.test_list: list[list[Any]] = []
        super().__init__(str(path.parent.parent), train=True, download=False)

    def _load_meta(self) -> None:
        self.classes = list(CIFAR10_CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    AttributeError,
    ImportError,
)


def load_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle batch with torchvision: (N, 3, 32, 32) uint8 images and (N,) int64 labels.

    Raises:
        DataFormatError: The file is truncated, not a CIFAR-10 batch, or its images and labels disagree.
    """
    path = Path(path)
    try:
        batch = CIFAR10Batch(path)
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err
    except _READ_ERRORS as err:
        raise DataFormatError(
            f"{path}: not a readable CIFAR-10 batch (truncated or corrupt?): expected a pickled dict with 'data' "
            f"(uint8, shape (N, 3072)) and 'labels' (N ints); {type(err).__name__}: {err}"
        ) from err
    data = np.asarray(batch.data)
    labels = np.asarray(batch.targets, dtype=np.int64)
    if data.dtype != np.uint8:
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype}")
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return np.ascontiguousarray(data.transpose(0, 3, 1, 2)), labels


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
        partial: Load only ``data_batch_1`` and ``test_batch`` without md5 checks (e.g. a reconstructed copy).
        hyper_fraction: Fraction of the training images held out for hyperparameter steps (paper: 0.2).
        verify_md5: Check the files of the full data set against torchvision's md5 values.
        hyper_batch_size: Batch size of the hyper stream (defaults to ``batch_size``).
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    num_classes = 10
    image_shape = (3, 32, 32)

    serves_hyper_stream = True  # train_dataloader() goes through with_hyper_stream

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

    def _required(self) -> dict[str, str]:
        if self.partial:
            return {f: "" for f in PARTIAL_FILES}
        return {**TRAIN_FILES, **TEST_FILES, **META_FILES}

    def _find(self) -> Path:
        name = "CIFAR-10" + (" (partial)" if self.partial else "")
        return find_cifar10_folder(self.data_dir, list(self._required()), name)

    @property
    def root(self) -> Path:
        """The ``cifar-10-batches-py`` folder that is read (see the module docstring for the layouts)."""
        return self._find()

    def prepare_data(self) -> None:
        """Check the files; with ``download=True`` fetch torchvision's archive into ``data_dir`` when missing."""
        find_or_download(self._find, self.data_dir, self.download)

    def check_integrity(self) -> Path:
        """The folder read; :class:`~datamodules.base.DatasetNotFoundError` for missing files,
        :class:`~datamodules.base.DataFormatError` for md5 mismatches of the full data set."""
        folder = self._find()
        if self.partial or not self.verify_md5:
            return folder
        bad = [
            f"{f}: md5 {got}, expected {want}"
            for f, want in self._required().items()
            if (got := calculate_md5(folder / f)) != want
        ]
        if bad:
            raise DataFormatError(
                f"CIFAR-10 files in {folder} do not match the original data set:\n  "
                + "\n  ".join(bad)
                + "\nFor a partial copy (data_batch_1 + test_batch) use partial=True (CLI: --data.partial true); to "
                "skip the check for a full copy you trust, verify_md5=False."
            )
        return folder

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        folder = self.check_integrity()
        train_files = ["data_batch_1"] if self.partial else list(TRAIN_FILES)
        parts = [load_cifar_batch(folder / f) for f in train_files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        train_idx, hyper_idx = seeded_split_indices(
            len(y), (1 - self.hyper_fraction, self.hyper_fraction), self.split_seed
        )
        self.train_set = CIFAR10Images(x[train_idx], y[train_idx])
        self.hyper_set = CIFAR10Images(x[hyper_idx], y[hyper_idx])
        tx, ty = load_cifar_batch(folder / "test_batch")
        self.test_set = CIFAR10Images(torch.from_numpy(tx), torch.from_numpy(ty))

    def train_dataloader(self) -> DataLoader:
        return self.with_hyper_stream(self._loader(self.train_set, shuffle=True, drop_last=True))

    def hyper_dataloader(self) -> DataLoader:
        """Held-out stream for the λ-steps (shuffled; cycled by the tuning modules)."""
        return self._loader(self.hyper_set, shuffle=True, batch_size=self.hyper_batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hyper_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
