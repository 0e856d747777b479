"""Adult / Default / Bank DataModules on tiny files in the real formats, plus row counts of the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import datamodules.tabular as tabular_module
from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.tabular import AdultDataModule, BankDataModule, DefaultDataModule
from tests.datamodules.tabular_fakedata import (
    DEFAULT_NAMES,
    write_fake_adult,
    write_fake_bank,
    write_fake_default,
)


def _setup(dm):  # type: ignore[no-untyped-def]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_adult_reads_quirks_splits_and_groups(tmp_path: Path) -> None:
    write_fake_adult(tmp_path, n_train=160, n_test=80)
    dm = _setup(AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False, batch_size=16))
    # adult.data is split 7:1 into train/val; adult.test (first line skipped) is the test set
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (140, 20, 80)
    raw_test = pd.read_csv(tmp_path / "adult/adult.test", header=None, skiprows=1, skipinitialspace=True)
    assert dm.test_set.tensors[1].sum().item() == (raw_test[14] == ">50K.").sum()  # trailing '.' handled
    assert dm.test_set.tensors[2].sum().item() == (raw_test[9] == "Female").sum()  # group 1 = Female, in order
    assert "workclass=?" in dm.feature_names  # missing values are a category of their own
    assert not any(n.startswith("sex") for n in dm.feature_names)  # sensitive column dropped
    x, y, g = next(iter(dm.train_dataloader()))
    assert x.shape == (16, dm.input_dim) and x.dtype == torch.float32
    assert y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    assert g.dtype == torch.int64 and set(g.unique().tolist()) <= {0, 1}
    with_sex = _setup(AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False, include_sensitive=True))
    assert with_sex.input_dim == dm.input_dim + 2


def test_standardization_uses_training_split_only(tmp_path: Path) -> None:
    write_fake_adult(tmp_path)
    dm = _setup(AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False))
    raw = pd.read_csv(tmp_path / "adult/adult.data", header=None, skipinitialspace=True)
    # recover the training rows from the seeded split and compare the stored statistics with theirs
    from datamodules.base import seeded_split_indices

    train_idx = seeded_split_indices(len(raw), (7 / 8, 1 / 8), dm.split_seed)[0].numpy()
    mean, std = dm.standardization["age"]
    assert mean == pytest.approx(raw[0].to_numpy()[train_idx].mean())
    assert std == pytest.approx(raw[0].to_numpy()[train_idx].std())
    col = dm.feature_names.index("age")
    assert dm.train_set.tensors[0][:, col].mean().abs() < 1e-5
    assert dm.train_set.tensors[0][:, col].std(unbiased=False) == pytest.approx(1.0, abs=1e-4)
    # an extreme test-set value changes neither the statistics nor the training features
    text = (tmp_path / "adult/adult.test").read_text().splitlines()
    text[1] = "90" + text[1][text[1].index(",") :]
    (tmp_path / "adult/adult.test").write_text("\n".join(text) + "\n")
    dm2 = _setup(AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False))
    assert dm2.standardization["age"] == (mean, std)
    assert torch.equal(dm2.train_set.tensors[0], dm.train_set.tensors[0])


def test_split_is_seeded(tmp_path: Path) -> None:
    write_fake_default(tmp_path, n=100)
    a = _setup(DefaultDataModule(data_dir=str(tmp_path), verify_row_counts=False, split_seed=3))
    b = _setup(DefaultDataModule(data_dir=str(tmp_path), verify_row_counts=False, split_seed=3))
    c = _setup(DefaultDataModule(data_dir=str(tmp_path), verify_row_counts=False, split_seed=4))
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (70, 10, 20)
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])


def test_default_two_header_export_and_kaggle_layout_agree(tmp_path: Path) -> None:
    write_fake_default(tmp_path / "xls", n=120)
    write_fake_default(tmp_path / "kaggle", n=120, kaggle=True)
    raw = (tmp_path / "xls/credit_default/default_of_credit_card_clients.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf,X1") and b"\r\n" in raw and not raw.endswith(b"\n")
    a = _setup(DefaultDataModule(data_dir=str(tmp_path / "xls"), verify_row_counts=False))
    b = _setup(DefaultDataModule(data_dir=str(tmp_path / "kaggle"), verify_row_counts=False))
    assert a.feature_names == b.feature_names and "ID" not in a.feature_names
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    frame = pd.read_csv(
        tmp_path / "xls/credit_default/default_of_credit_card_clients.csv", header=1, encoding="utf-8-sig"
    )
    assert list(frame.columns) == DEFAULT_NAMES
    all_y = torch.cat([s.tensors[1] for s in (a.train_set, a.val_set, a.test_set)])
    assert all_y.sum().item() == frame["default payment next month"].sum()
    all_g = torch.cat([s.tensors[2] for s in (a.train_set, a.val_set, a.test_set)])
    assert all_g.sum().item() == (frame["SEX"] == 2).sum()


def test_bank_semicolon_file_and_age_group(tmp_path: Path) -> None:
    path = write_fake_bank(tmp_path, n=150)
    dm = _setup(BankDataModule(data_dir=str(tmp_path), verify_row_counts=False))
    frame = pd.read_csv(path, sep=";")
    groups = torch.cat([s.tensors[2] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert groups.sum().item() == (frame["age"] < 25).sum()
    labels = torch.cat([s.tensors[1] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert labels.sum().item() == (frame["y"] == "yes").sum()
    assert "job=student" in dm.feature_names and "age" not in dm.feature_names
    assert dm.input_dim == len(dm.feature_names)


def test_missing_files_name_the_file_and_layout(tmp_path: Path) -> None:
    write_fake_adult(tmp_path)
    (tmp_path / "adult/adult.test").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"adult\.test") as err:
        AdultDataModule(data_dir=str(tmp_path)).prepare_data()
    assert "adult.data" in str(err.value) and "download" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match=r"bank-full\.csv"):
        BankDataModule(data_dir=str(tmp_path)).setup()


def test_adult_downloads_only_with_download_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_fake_adult(tmp_path / "source")
    calls: list[tuple[str, str | None, str | None]] = []

    def fake_download(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        # the signature of torchvision.datasets.utils.download_url
        calls.append((url, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / str(filename)).write_bytes((source / str(filename)).read_bytes())

    monkeypatch.setattr(tabular_module, "download_url", fake_download)
    data = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError):
        AdultDataModule(data_dir=str(data)).prepare_data()
    assert calls == []
    dm = _setup(AdultDataModule(data_dir=str(data), download=True, verify_row_counts=False))
    assert sorted(calls) == sorted((url, f, md5) for f, (url, md5) in AdultDataModule.urls.items())
    assert len(dm.test_set) == 80
    dm.prepare_data()  # present: nothing downloaded again
    assert len(calls) == 2


def test_row_count_check(tmp_path: Path) -> None:
    write_fake_adult(tmp_path, n_train=50, n_test=20)
    with pytest.raises(DataFormatError, match=r"50 data rows, expected 32561"):
        AdultDataModule(data_dir=str(tmp_path)).setup()
    write_fake_bank(tmp_path, n=30)
    with pytest.raises(DataFormatError, match=r"30 data rows, expected 45211"):
        BankDataModule(data_dir=str(tmp_path)).setup()


@pytest.mark.parametrize("corruption", ["columns", "numeric", "label", "truncated"])
def test_corrupt_adult_raises_data_format_error(tmp_path: Path, corruption: str) -> None:
    write_fake_adult(tmp_path, n_train=40, n_test=20)
    path = tmp_path / "adult/adult.data"
    lines = [ln for ln in path.read_text().splitlines() if ln]
    if corruption == "columns":
        lines = [ln.rsplit(",", 1)[0] for ln in lines]
        match = "14 columns, expected 15"
    elif corruption == "numeric":
        lines[3] = "forty" + lines[3][lines[3].index(",") :]
        match = "'age' must be numeric; row 3 holds 'forty'"
    elif corruption == "label":
        lines[5] = lines[5].rsplit(",", 1)[0] + ", maybe"
        match = "income must be one of"
    else:
        lines[-1] = lines[-1][:20]
        match = r"data row 39 has empty fields \['education'"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=match):
        AdultDataModule(data_dir=str(tmp_path), verify_row_counts=False).setup()


def test_bank_with_wrong_separator_is_rejected(tmp_path: Path) -> None:
    write_fake_bank(tmp_path, n=20, sep=",")
    with pytest.raises(DataFormatError, match="separator"):
        BankDataModule(data_dir=str(tmp_path), verify_row_counts=False).setup()


def test_default_missing_column_is_named(tmp_path: Path) -> None:
    path = write_fake_default(tmp_path, n=20)
    text = path.read_bytes().decode("utf-8-sig").replace("LIMIT_BAL", "LIMIT")
    path.write_bytes(("\ufeff" + text).encode())
    with pytest.raises(DataFormatError, match="LIMIT_BAL"):
        DefaultDataModule(data_dir=str(tmp_path), verify_row_counts=False).setup()


def test_bad_fractions_raise() -> None:
    with pytest.raises(ValueError, match="fractions"):
        DefaultDataModule(fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="variant"):
        BankDataModule(variant="bank-tiny")  # type: ignore[arg-type]


# -- the real files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "sizes", "pos_rate"),
    [
        (AdultDataModule, (28491, 4070, 16281), (24720 + 12435, 7841 + 3846)),
        (DefaultDataModule, (21000, 3000, 6000), (23364, 6636)),
        (BankDataModule, (31648, 4521, 9042), (39922, 5289)),
    ],
)
def test_real_files(real_data_dir: Path, cls, sizes, pos_rate) -> None:  # type: ignore[no-untyped-def]
    dm = _setup(cls(data_dir=str(real_data_dir)))  # verify_row_counts=True: UCI's counts
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == sizes
    y = torch.cat([s.tensors[1] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert (int((y == 0).sum()), int((y == 1).sum())) == pos_rate  # the README's label counts
    x = dm.train_set.tensors[0]
    assert np.isfinite(x.numpy()).all() and x.shape[1] == dm.input_dim
