"""Shared DataModule conventions: data_dir default, seeded splits and sampler, DatasetNotFoundError."""

from __future__ import annotations

import pytest
import torch

from datamodules.base import DatasetNotFoundError, HyperlitDataModule, SeededRandomSampler, seeded_split_indices
from datamodules.digits import DigitsDataModule


def test_data_dir_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HYPERLIT_DATA_DIR", str(tmp_path))
    assert HyperlitDataModule().data_dir == tmp_path
    monkeypatch.delenv("HYPERLIT_DATA_DIR")
    assert HyperlitDataModule().data_dir.parts[-2:] == (".cache", "hyperlit")


def test_seeded_split_covers_all_indices() -> None:
    parts = seeded_split_indices(101, [0.7, 0.1, 0.2], seed=3)
    assert [len(p) for p in parts] == [71, 10, 20]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(101))
    again = seeded_split_indices(101, [0.7, 0.1, 0.2], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ValueError, match="sum to 1"):
        seeded_split_indices(10, [0.5, 0.6], seed=0)


def test_sampler_order_depends_on_epoch_only() -> None:
    s = SeededRandomSampler(50, seed=1)
    first = list(s)
    torch.manual_seed(999)
    assert list(s) == first  # global RNG does not matter
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(second) == list(range(50))


def test_dataset_not_found_message(tmp_path) -> None:
    err = DatasetNotFoundError("Foo", tmp_path, ["foo/a.bin"], "  foo/\n    a.bin\n")
    assert isinstance(err, FileNotFoundError)
    for part in ("foo/a.bin", "Expected layout", "--data.data_dir", "download=True"):
        assert part in str(err)


def test_loader_settings_and_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        HyperlitDataModule(batch_size=0)
    dm = DigitsDataModule(batch_size=32, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.hyper_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64) and float(x.max()) <= 1.0 and y.max() <= 9
    assert next(iter(dm.hyper_dataloader()))[0].shape == (32, 64)
