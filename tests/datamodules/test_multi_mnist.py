"""Multi-MNIST generated from MNIST IDX files: the recipe against a per-image reference, geometry, labels,
determinism, splits, batches, the cache, missing files and download; the real data when ``HYPERLIT_DATA_DIR`` is set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist as tv_mnist
from sklearn.model_selection import train_test_split

import datamodules.multi_mnist as mm
from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.mnist import load_mnist
from datamodules.multi_mnist import MultiMNISTDataModule, generate_multi_mnist
from tests.fakedata import MNIST_DIRS, write_fake_mnist, write_idx


def _digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fake 28×28 digits with no zero pixel (so every box is visible) and labels covering several classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=n)
    labels[:3] = [0, 1, 2]
    return images, labels


def _write(root: Path, n_train: int, n_test: int, compress: bool = True, layout: str = "hyperlit") -> Path:
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = _digits(n, seed)
        write_idx(root / MNIST_DIRS[layout] / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / MNIST_DIRS[layout] / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress)
    return root


def _reference(
    images: np.ndarray, labels: np.ndarray, seed: int, only: np.ndarray | None = None
) -> dict[int, tuple[np.ndarray, tuple[int, int]]]:
    """The recipe written out per image (slow): composite index → (canvas, labels), for ``only`` (default: all)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(labels)
    counts = np.bincount(labels)
    by_label = np.lexsort((np.arange(n), labels))  # indices ordered by (label, index)
    wanted = set(range(2 * n)) if only is None else {int(k) for k in only}
    out: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
    for p in range(2):
        u = rng.integers(0, n - counts[labels])
        off = rng.integers(0, 5, size=(n, 4))
        for i in range(n):
            k = p * n + i
            if k not in wanted:
                continue
            pool = [int(j) for j in by_label if labels[j] != labels[i]]
            j = pool[int(u[i])]
            r1, c1, r2, c2 = int(off[i, 0]), int(off[i, 1]), 4 + int(off[i, 2]), 4 + int(off[i, 3])
            canvas = np.zeros((36, 36), dtype=np.uint8)
            canvas[r1 : r1 + 28, c1 : c1 + 28] = images[i]
            for a in range(28):
                for b in range(28):
                    canvas[r2 + a, c2 + b] = max(canvas[r2 + a, c2 + b], images[j, a, b])
            out[k] = (canvas, (int(labels[i]), int(labels[j])))
    return out


def test_generation_equals_the_per_image_reference() -> None:
    images, labels = _digits(30)
    got = generate_multi_mnist(images, labels, seed=3)
    ref = _reference(images, labels, seed=3)
    assert got.x.shape == (60, 1, 36, 36) and got.x.dtype == np.uint8
    assert got.y.shape == (60, 2) and got.y.dtype == np.int64
    for k, (canvas, pair) in ref.items():
        np.testing.assert_array_equal(got.x[k, 0], canvas, err_msg=f"composite {k}")
        assert tuple(got.y[k]) == pair


def test_geometry_labels_and_the_other_digit_rule() -> None:
    images, labels = _digits(80)
    out = generate_multi_mnist(images, labels, seed=0)
    np.testing.assert_array_equal(out.source, np.tile(np.arange(80), 2))  # pass 0 then pass 1, images in order
    r1, c1, r2, c2 = out.offsets.T
    assert r1.min() == c1.min() == 0 and r1.max() == c1.max() == 4  # top-left box moves 0..4 pixels
    assert r2.min() == c2.min() == 4 and r2.max() == c2.max() == 8  # bottom-right box: (4, 4) + 0..4
    for k in range(len(out.y)):
        top = np.zeros((36, 36), np.uint8)
        top[r1[k] : r1[k] + 28, c1[k] : c1[k] + 28] = images[out.source[k]]
        bottom = np.zeros((36, 36), np.uint8)
        bottom[r2[k] : r2[k] + 28, c2[k] : c2[k] + 28] = images[out.partner[k]]
        np.testing.assert_array_equal(out.x[k, 0], np.maximum(top, bottom))  # overlap = pixel-wise max
        assert (out.x[k, 0][(top == 0) & (bottom == 0)] == 0).all()  # nothing outside the two boxes
    np.testing.assert_array_equal(out.y[:, 0], labels[out.source])  # column 0: top-left digit
    np.testing.assert_array_equal(out.y[:, 1], labels[out.partner])  # column 1: bottom-right digit
    assert (out.y[:, 0] != out.y[:, 1]).all()  # always two different digits
    assert len(np.unique(out.partner)) > 40  # partners are spread over the images, not a few
    assert not np.array_equal(out.partner[:80], out.partner[80:])  # the two passes draw independently


def test_generation_is_deterministic_and_seeded() -> None:
    images, labels = _digits(40)
    a, b = generate_multi_mnist(images, labels, seed=7), generate_multi_mnist(images, labels, seed=7)
    assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    np.random.seed(123)  # the global NumPy state plays no part
    c = generate_multi_mnist(images, labels, seed=7)
    assert c.x.tobytes() == a.x.tobytes()
    assert generate_multi_mnist(images, labels, seed=8).x.tobytes() != a.x.tobytes()


def test_generation_refuses_bad_sources() -> None:
    images, labels = _digits(10)
    with pytest.raises(ValueError, match="2 distinct"):
        generate_multi_mnist(images, np.full(10, 4), seed=0)
    with pytest.raises(ValueError, match=r"\(n, 28, 28\)"):
        generate_multi_mnist(images[:, :20], labels, seed=0)
    with pytest.raises(ValueError, match=r"\(n, 28, 28\)"):
        generate_multi_mnist(images, labels[:9], seed=0)


def test_datamodule_splits_batches_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, n_train=40, n_test=15)
    dm = MultiMNISTDataModule(data_dir=str(tmp_path), batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_tasks, dm.num_classes, dm.input_shape) == (2, 10, (1, 36, 36))
    assert len(dm.train_set) == 72 and len(dm.val_set) == 8 and len(dm.test_set) == 30
    train_idx, val_idx = train_test_split(np.arange(80), test_size=0.1, random_state=42)
    images, labels = _digits(40)
    full = generate_multi_mnist(images, labels, seed=0)  # the train split's default seed
    np.testing.assert_array_equal(dm.val_set.x.numpy(), full.x[val_idx])  # sklearn's split, PHN's random_state
    np.testing.assert_array_equal(dm.train_set.y.numpy(), full.y[train_idx])
    test_images, test_labels = _digits(15, seed=1)
    np.testing.assert_array_equal(dm.test_set.x.numpy(), generate_multi_mnist(test_images, test_labels, seed=1).x)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 36, 36) and x.dtype == torch.float32 and y.shape == (16, 2) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    x_val, y_val = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(x_val, torch.from_numpy(full.x[val_idx[:8]]).float() / 255)
    torch.testing.assert_close(y_val, torch.from_numpy(full.y[val_idx[:8]]))

    cached = sorted(p.name for p in (tmp_path / "multi_mnist").iterdir())  # data_dir is writable: cached there
    assert len(cached) == 2 and cached[0].startswith("multi_mnist-test-v1-seed1-") and cached[1].endswith(".npz")

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(mm, "generate_multi_mnist", no_generation)
    again = MultiMNISTDataModule(data_dir=str(tmp_path), batch_size=16)
    again.setup("fit")  # cache hit: no generation
    assert torch.equal(again.train_set.x, dm.train_set.x) and torch.equal(again.test_set.y, dm.test_set.y)
    # another source file (other checksum) misses the cache
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.roll(test_labels, 1).astype(np.uint8))
    with pytest.raises(AssertionError, match="generated again"):
        MultiMNISTDataModule(data_dir=str(tmp_path)).setup("test")


def test_cache_location_fallback_corruption_and_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write(tmp_path / "data", n_train=20, n_test=10, compress=False, layout="torchvision")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(mm, "_writable", lambda folder: False)  # a read-only data_dir
    dm = MultiMNISTDataModule(data_dir=str(data))
    assert dm.resolved_cache_dir() == tmp_path / "xdg" / "hyperlit" / "multi_mnist"
    explicit = MultiMNISTDataModule(data_dir=str(data), cache_dir=str(tmp_path / "mine"))
    assert explicit.resolved_cache_dir() == tmp_path / "mine"
    explicit.setup()
    path = explicit.cache_path("train")
    assert path.parent == tmp_path / "mine" and path.is_file()
    path.write_bytes(b"not an npz file")  # a truncated or foreign cache file is regenerated, with a warning
    with pytest.warns(UserWarning, match="unreadable Multi-MNIST cache"):
        x, _ = explicit.arrays("train")
    assert x.shape == (40, 1, 36, 36) and np.load(path)["x"].shape == (40, 1, 36, 36)
    calls: list[str] = []
    real = mm.generate_multi_mnist

    def counting(*args: object, **kwargs: object) -> object:
        calls.append("x")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mm, "generate_multi_mnist", counting)
    off = MultiMNISTDataModule(data_dir=str(data), cache=False)
    off.setup()
    off.setup()
    assert len(calls) == 4  # cache=False: train and test generated on every setup
    assert not (tmp_path / "xdg").exists()
    with pytest.raises(ValueError, match="split must be"):
        off.arrays("val")


def test_normalize_standardises_with_the_training_split(tmp_path: Path) -> None:
    _write(tmp_path, n_train=30, n_test=10)
    dm = MultiMNISTDataModule(data_dir=str(tmp_path), normalize=True, cache=False)
    dm.setup()
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))]).double()
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5) and float(x.std(unbiased=False)) == pytest.approx(1.0, 1e-4)
    raw = dm.train_set.x.double() / 255
    assert dm.mean == pytest.approx(float(raw.mean())) and dm.std == pytest.approx(float(raw.std(unbiased=False)))


def test_verify_md5_refuses_other_files(tmp_path: Path) -> None:
    _write(tmp_path, n_train=10, n_test=5)
    dm = MultiMNISTDataModule(data_dir=str(tmp_path), verify_md5=True, cache=False)
    with pytest.raises(
        DataFormatError, match=r"train-images-idx3-ubyte\.gz: md5 of the IDX bytes is .*not LeCun's 6bbc"
    ):
        dm.setup()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataFormatError, match="cannot read"):
        dm.setup()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        MultiMNISTDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="two seeds"):
        MultiMNISTDataModule(generation_seeds=(0,))  # type: ignore[arg-type]


def test_missing_files_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        MultiMNISTDataModule(data_dir=str(tmp_path / "empty")).prepare_data()
    msg = str(info.value)
    assert "Multi-MNIST is generated from" in msg and "MNIST/raw/" in msg and "mnist/" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "download=True" in msg
    with pytest.raises(DatasetNotFoundError, match="Multi-MNIST"):
        MultiMNISTDataModule(data_dir=str(tmp_path / "empty")).setup()  # setup without prepare_data
    calls: list[str] = []
    source = write_fake_mnist(tmp_path / "source", n_train=20, n_test=10) / "mnist"

    def fake_download(url: str, download_root: str, filename: str | None = None, md5: str | None = None) -> None:
        calls.append(url)
        name = Path(url).name
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / name).write_bytes((source / name).read_bytes())
        tv_mnist.extract_archive(str(Path(download_root) / name), download_root)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    dm = MultiMNISTDataModule(data_dir=str(tmp_path / "data"), download=True)
    dm.prepare_data()  # downloads through torchvision, then generates and caches
    assert len(calls) == 4 and (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert len(list((tmp_path / "data" / "multi_mnist").glob("*.npz"))) == 2
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 40 and len(dm.test_set) == 20


@pytest.mark.slow
def test_real_multi_mnist(real_data_dir: Path, tmp_path: Path) -> None:
    """120,000 / 20,000 composites from the real MNIST, deterministic, spot-checked against the reference."""
    dm = MultiMNISTDataModule(data_dir=str(real_data_dir), cache_dir=str(tmp_path), verify_md5=True)
    dm.setup()
    assert len(dm.train_set) == 108_000 and len(dm.val_set) == 12_000 and len(dm.test_set) == 20_000
    images, labels = (t.numpy() for t in load_mnist(real_data_dir, train=False))
    test = generate_multi_mnist(images, labels, seed=1)
    assert test.x.tobytes() == dm.test_set.x.numpy().tobytes()  # a second generation is byte-equal
    assert (test.y[:, 0] != test.y[:, 1]).all()
    pick = np.random.default_rng(0).choice(20_000, size=40, replace=False)
    for k, (canvas, pair) in _reference(images, labels, seed=1, only=pick).items():
        np.testing.assert_array_equal(test.x[k, 0], canvas)
        assert tuple(test.y[k]) == pair
    x_train, _ = dm.arrays("train")  # from the cache written by setup
    assert x_train.shape == (120_000, 1, 36, 36)
