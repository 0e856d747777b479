"""Multi-MNIST generated deterministically from MNIST's IDX files (Navon et al. 2021, Table 1; Lin et al. 2019, §6.1).

Each example is a 36×36 canvas holding two MNIST digits: one near the top-left corner (task 0) and one near the
bottom-right corner (task 1), overlapping in the middle. The PMTL/PHN pickles (120,000 train / 20,000 test, shared
through a Google-Drive folder) were made by unpublished code; this module is a **deterministic reconstruction**
following PMTL's text and CPMTL's geometry, so it does **not** reproduce those pickles byte for byte, and published
Multi-MNIST numbers are not directly comparable with results on it.

Recipe (version :data:`RECIPE_VERSION`), per split with ``n`` source images (60,000 train / 10,000 test), a generator
``np.random.Generator(np.random.PCG64(seed))`` (``seed`` fixed per split: ``generation_seeds``; never NumPy's global
state) and two passes ``p ∈ {0, 1}`` (so 2n composites: 120,000 / 20,000), pass 0 first:

1. ``u = rng.integers(0, n − count[label_i])`` for every ``i`` (one array draw), then
   ``offsets = rng.integers(0, 5, size=(n, 4))`` = ``(r1, c1, r2 − 4, c2 − 4)``.
2. The partner ``j`` of image ``i`` is entry ``u_i`` of the images whose label differs from ``label_i``, listed by
   ``(label, index)`` — uniform over the images of another digit.
3. ``C = zeros(36, 36)``; ``C[r1:r1+28, c1:c1+28] = A_i``; ``C[r2:r2+28, c2:c2+28] = max(C[…], A_j)``: the top-left
   digit anywhere in rows/columns 0–31, the bottom-right one in 4–35, the overlap is the pixel-wise maximum.
4. Labels ``(label_i, label_j)``: column 0 = top-left = objective ``ce_0``, column 1 = bottom-right = ``ce_1``.

Generation is vectorised (one paste per offset pair, 25 per corner). The arrays (uint8 images, int64 labels) are
cached in an ``.npz`` file named by the split, the recipe version, the seed and the SHA-256 of the two source files,
so a second ``setup`` only loads it. The cache folder is ``cache_dir`` if given, else ``data_dir/multi_mnist`` when
``data_dir`` is writable, else ``$XDG_CACHE_HOME/hyperlit/multi_mnist`` (``~/.cache/hyperlit/multi_mnist``).
``verify_md5=True`` checks that the decompressed IDX bytes are LeCun's (torchvision's md5 of the raw files; the
``.gz`` wrappers are not compared: re-compressed copies of the original bytes are common), so that a generated
data set is the same everywhere.

Validation: 10% of the training part, ``sklearn.model_selection.train_test_split(test_size=0.1,
random_state=42)`` as PHN, COSMOS and PHN-HVI do. Batches are ``(x, targets)``: x float32 ``(B, 1, 36, 36)`` in
[0, 1] (``normalize=True``: standardised with the mean and std of the training split), targets int64 ``(B, 2)`` —
the batch contract of :class:`~hyperlit.pareto.objectives.MultiTaskObjectives`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import MNIST

from datamodules.base import DataFormatError, DatasetNotFoundError, HyperlitDataModule
from datamodules.mnist import MNIST_FILES, MNIST_LAYOUT, _find_file, find_mnist_folder, read_mnist_file

__all__ = ["MNIST_RAW_MD5", "RECIPE_VERSION", "MultiMNISTArrays", "MultiMNISTDataModule", "generate_multi_mnist"]

#: md5 of LeCun's uncompressed IDX files (torchvision's ``MNIST`` checks the same bytes).
MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Version of the generation recipe (module docstring); part of every cache file's name.
RECIPE_VERSION = 1
CANVAS = 36
DIGIT = 28
MAX_SHIFT = 4  # each digit moves by 0..4 pixels in each direction
PASSES = 2  # composites per source image


@dataclass(frozen=True)
class MultiMNISTArrays:
    """One generated split: images, labels and how each composite was made.

    Attributes:
        x: Images ``(2n, 1, 36, 36)`` uint8.
        y: Labels ``(2n, 2)`` int64: ``[top-left, bottom-right]``.
        source: Index of the top-left source image ``(2n,)`` (``0..n−1`` twice).
        partner: Index of the bottom-right source image ``(2n,)``.
        offsets: ``(2n, 4)`` = ``(r1, c1, r2, c2)``, the top-left corners of the two 28×28 boxes.
    """

    x: np.ndarray
    y: np.ndarray
    source: np.ndarray
    partner: np.ndarray
    offsets: np.ndarray


def _partners(labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Entry ``u_i`` of the images with a label other than ``labels[i]``, ordered by ``(label, index)``."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    own_start, own_count = starts[labels], counts[labels]
    pos = np.where(u < own_start, u, u + own_count)  # skip the block of the image's own label
    return order[pos]


def generate_multi_mnist(images: np.ndarray, labels: np.ndarray, seed: int) -> MultiMNISTArrays:
    """Two Multi-MNIST composites per source image (recipe in the module docstring), vectorised with NumPy.

    Args:
        images: Source digits ``(n, 28, 28)`` uint8.
        labels: Their labels ``(n,)`` (non-negative integers).
        seed: Seed of the ``PCG64`` generator (one per split).

    Raises:
        ValueError: Shapes do not match, or fewer than two distinct labels (no partner of another digit).
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (DIGIT, DIGIT) or len(images) != len(labels) or labels.ndim != 1:
        raise ValueError(f"need images (n, {DIGIT}, {DIGIT}) and labels (n,), got {images.shape} and {labels.shape}")
    n = len(labels)
    if n == 0 or labels.min() < 0 or len(np.unique(labels)) < 2:
        raise ValueError(
            "Multi-MNIST pairs each digit with one of another label: the source needs >= 2 distinct non-negative "
            f"labels, got {np.unique(labels).tolist()}"
        )
    counts = np.bincount(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    total = PASSES * n
    x = np.zeros((total, CANVAS, CANVAS), dtype=np.uint8)
    source = np.tile(np.arange(n), PASSES)
    partner = np.empty(total, dtype=np.int64)
    offsets = np.empty((total, 4), dtype=np.int64)
    for p in range(PASSES):
        u = rng.integers(0, n - counts[labels])
        off = rng.integers(0, MAX_SHIFT + 1, size=(n, 4))
        off[:, 2:] += MAX_SHIFT
        partner[p * n : (p + 1) * n] = _partners(labels, u)
        offsets[p * n : (p + 1) * n] = off
    for corner, donor in ((0, source), (2, partner)):
        code = offsets[:, corner] * CANVAS + offsets[:, corner + 1]
        for value in np.unique(code):
            idx = np.flatnonzero(code == value)
            r, c = divmod(int(value), CANVAS)
            box = (idx, slice(r, r + DIGIT), slice(c, c + DIGIT))
            x[box] = images[donor[idx]] if corner == 0 else np.maximum(x[box], images[donor[idx]])
    y = np.stack([labels[source], labels[partner]], axis=1)
    return MultiMNISTArrays(x[:, None], y, source, partner, offsets)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _idx_md5(path: Path) -> str:
    """md5 of an IDX file's bytes (decompressed first when it is ``.gz``)."""
    digest = hashlib.md5(usedforsecurity=False)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError) as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err
    return digest.hexdigest()


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists (or can be created) and accepts files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


class _CompositeDataset(Dataset):
    """uint8 images converted to float32 per example (``/255``, then optionally standardised)."""

    def __init__(self, x: Tensor, y: Tensor, mean: float = 0.0, std: float = 1.0) -> None:
        self.x, self.y, self.mean, self.std = x, y, mean, std

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.x[i].float() / 255.0 - self.mean) / self.std, self.y[i]


class MultiMNISTDataModule(HyperlitDataModule):
    """Multi-MNIST (two overlapping digits, two 10-class tasks) generated from MNIST (module docstring).

    Reads the MNIST IDX files from ``data_dir`` (layouts of :mod:`datamodules.mnist`: ``MNIST/raw/`` or ``mnist/``,
    raw or ``.gz``); ``download=True`` lets ``prepare_data`` fetch them through torchvision.

    Args:
        val_fraction: Share of the generated training part held out for validation (PHN: 0.1).
        val_seed: ``random_state`` of the validation split (PHN/COSMOS/PHN-HVI: 42).
        generation_seeds: Seeds of the (train, test) generators.
        normalize: Standardise with the mean/std of the training split (else pixels in [0, 1], as PMTL).
        cache_dir: Folder of the generated arrays (``None``: ``data_dir/multi_mnist`` if writable, else the user
            cache); ``cache=False`` generates on every ``setup``.
        cache: Read/write the cache.
        verify_md5: Check the decompressed MNIST files against LeCun's md5 before generating (off: any IDX files
            of the right shape are used, e.g. generated test files).
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule`.
    """

    num_tasks = 2
    num_classes = 10
    input_shape = (1, CANVAS, CANVAS)

    def __init__(
        self,
        val_fraction: float = 0.1,
        val_seed: int = 42,
        generation_seeds: tuple[int, int] = (0, 1),
        normalize: bool = False,
        cache_dir: str | None = None,
        cache: bool = True,
        verify_md5: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_size", 256)
        super().__init__(**kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(generation_seeds) != 2:
            raise ValueError(f"generation_seeds needs two seeds (train, test), got {list(generation_seeds)}")
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.generation_seeds = (int(generation_seeds[0]), int(generation_seeds[1]))
        self.normalize = normalize
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache = cache
        self.verify_md5 = verify_md5
        self.mean, self.std = 0.0, 1.0

    # -- files and cache ------------------------------------------------------------------------------------
    def _mnist_folder(self) -> Path:
        try:
            return find_mnist_folder(self.data_dir)
        except DatasetNotFoundError as err:
            raise DatasetNotFoundError(
                "MNIST (the source Multi-MNIST is generated from)", self.data_dir, err.missing, MNIST_LAYOUT
            ) from err

    def prepare_data(self) -> None:
        """Check the MNIST files (``download=True``: fetch missing ones via torchvision), then generate and cache."""
        try:
            self._mnist_folder()
        except DatasetNotFoundError:
            if not self.download:
                raise
            MNIST(str(self.data_dir), train=False, download=True)  # torchvision: mirrors + md5 of every .gz
            self._mnist_folder()
        if self.cache:
            for split in ("train", "test"):
                self.arrays(split)

    def resolved_cache_dir(self) -> Path:
        """Where the generated arrays are cached (see the module docstring)."""
        if self.cache_dir is not None:
            return self.cache_dir
        local = self.data_dir / "multi_mnist"
        if _writable(local):
            return local
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser())
        return base / "hyperlit" / "multi_mnist"

    def _sources(self, split: str) -> tuple[Path, Path]:
        folder = self._mnist_folder()
        prefix = "train" if split == "train" else "test"
        images = _find_file(folder, MNIST_FILES[f"{prefix}_images"])
        labels = _find_file(folder, MNIST_FILES[f"{prefix}_labels"])
        assert images is not None and labels is not None  # find_mnist_folder checked
        return images, labels

    def cache_path(self, split: str) -> Path:
        """The cache file of ``split`` (``train``/``test``): recipe version, seed and SHA-256 of the source files."""
        images, labels = self._sources(split)
        key = hashlib.sha256(f"{_sha256(images)}:{_sha256(labels)}".encode()).hexdigest()[:16]
        seed = self.generation_seeds[0 if split == "train" else 1]
        return self.resolved_cache_dir() / f"multi_mnist-{split}-v{RECIPE_VERSION}-seed{seed}-{key}.npz"

    def _generate(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images_path, labels_path = self._sources(split)
        if self.verify_md5:
            for path in (images_path, labels_path):
                expected = MNIST_RAW_MD5[path.name.removesuffix(".gz")]
                if (found := _idx_md5(path)) != expected:
                    raise DataFormatError(
                        f"{path}: md5 of the IDX bytes is {found}, not LeCun's {expected} (another or a corrupt copy "
                        "of MNIST); pass verify_md5=False to generate from it anyway"
                    )
        images = read_mnist_file(images_path, "images").numpy()
        labels = read_mnist_file(labels_path, "labels").numpy()
        if images.shape[1:] != (DIGIT, DIGIT) or len(images) != len(labels):
            raise DataFormatError(
                f"MNIST in {images_path.parent}: images {images.shape} and labels {labels.shape} do not form an "
                "(N, 28, 28) / (N,) pair"
            )
        out = generate_multi_mnist(images, labels, self.generation_seeds[0 if split == "train" else 1])
        return out.x, out.y

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(2n, 1, 36, 36)`` uint8 and labels ``(2n, 2)`` int64 of ``split``, from the cache if present."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not self.cache:
            return self._generate(split)
        path = self.cache_path(split)
        if path.is_file():
            try:
                with np.load(path) as data:
                    x, y = data["x"], data["y"]
                if x.dtype == np.uint8 and x.shape[1:] == self.input_shape and y.shape == (len(x), 2):
                    return x, y.astype(np.int64)
                problem = f"arrays {x.shape} {x.dtype} / {y.shape}"
            except (OSError, ValueError, KeyError) as err:  # truncated or foreign file
                problem = str(err)
            rank_zero_warn(f"ignoring the unreadable Multi-MNIST cache {path} ({problem}); generating it again")
        x, y = self._generate(split)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, x=x, y=y)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        except OSError as err:
            rank_zero_warn(f"cannot write the Multi-MNIST cache {path} ({err}); pass cache_dir= to cache it")
        return x, y

    # -- splits and loaders -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        from sklearn.model_selection import train_test_split

        x, y = self.arrays("train")
        train_idx, val_idx = train_test_split(
            np.arange(len(y)), test_size=self.val_fraction, random_state=self.val_seed
        )
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.normalize:
            hist = np.bincount(x[train_idx].ravel(), minlength=256).astype(np.float64)  # exact, no float copy
            values = np.arange(256) / 255.0
            mean = float(hist @ values / hist.sum())
            self.mean, self.std = mean, float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum()))
        tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        self.train_set = _CompositeDataset(xt[tr], yt[tr], self.mean, self.std)
        self.val_set = _CompositeDataset(xt[va], yt[va], self.mean, self.std)
        x_test, y_test = self.arrays("test")
        self.test_set = _CompositeDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), self.mean, self.std)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
