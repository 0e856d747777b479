"""UCI tabular data sets of the PHN fairness experiment: Adult, Default of credit card clients, Bank Marketing.

Every batch is ``(x, y, group)``: standardized features (float32), the binary label (float32, 0/1) and the
binary sensitive group (int64, 0/1; group 1 is the protected group: Adult ``sex = Female``, Default
``SEX = 2`` (female), Bank ``age < 25``, as in AIF360's BankDataset whose privileged group is age ≥ 25).

Preprocessing (identical for the three): categorical columns are one-hot encoded over the categories found in
the whole file(s) (vocabulary only, no statistics), numerical columns are standardized with the mean and
standard deviation of the **training split only**; the sensitive column is dropped from the features unless
``include_sensitive``. Splits are seeded (``split_seed``): 70/10/20 train/val/test for Default and Bank; Adult
splits ``adult.data`` 7:1 into train/val (the same 70:10 ratio) and tests on ``adult.test``.

Formats (see the data README): ``adult.test`` starts with ``|1x3 Cross validator`` and its labels end with
``.``; Adult marks missing values with ``?`` (kept as a category of its own); the Default CSV is an export of
UCI's ``.xls`` with two header rows (``,X1,…,Y`` then the names), a UTF-8 BOM and CRLF line ends; Bank files are
``;``-separated with quoted strings. Wrong columns, unparsable values or (with ``verify_row_counts``) a row
count that differs from UCI's raise :class:`~datamodules.base.DataFormatError`; missing files raise
:class:`~datamodules.base.DatasetNotFoundError`.

``stratify=True`` draws the training batches with :class:`StratifiedBatchSampler`: every batch holds each
(group, label) cell in proportion. With plain shuffled batches of 256, Bank's smallest cell (age < 25 and
``y = 1``: 148 of the 31,648 training rows with ``split_seed=0``) is missing from 115 of the 372 batches of 3
epochs; a relaxed FPR/FNR gap is exactly 0 on such a batch, and EPO's LP, which needs strictly positive losses,
falls back to the LS weights there (``examples/benchmarks/pareto_epo_variants.py`` counts both).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, TensorDataset
from torchvision.datasets.utils import download_url

from datamodules.base import (
    DataFormatError,
    HyperlitDataModule,
    ResumableDataLoader,
    SeededRandomSampler,
    seeded_split_indices,
)

__all__ = [
    "AdultDataModule",
    "BankDataModule",
    "DefaultDataModule",
    "StratifiedBatchSampler",
    "StratifiedDataLoader",
    "TabularFairnessDataModule",
    "encode_features",
]


class StratifiedBatchSampler(BatchSampler):
    """Batches that hold every stratum (e.g. each (group, label) cell) in proportion, covering each example once
    per epoch.

    Per epoch, with ``G = W·⌈N / (W·batch_size)⌉`` batches over all W ranks: the examples are sorted by stratum
    (a seeded random order inside each stratum) and the i-th goes to batch ``i mod G``; the batches are then put in
    a seeded random order and rank r takes batches r, r + W, … (⌈N / (W·batch_size)⌉ per rank, disjoint). So a
    stratum of ``n_s`` examples has ``⌊n_s/G⌋`` or ``⌈n_s/G⌉`` examples in every batch — at least one wherever
    ``n_s ≥ G`` (a warning names the strata smaller than that) — and batch sizes differ by at most one, none above
    ``batch_size``. The order depends only on ``(seed, epoch)``.

    It follows :class:`~torch.utils.data.BatchSampler`'s API so that Lightning can re-create it around the
    :class:`~torch.utils.data.DistributedSampler` it injects under DDP (``use_distributed_sampler=True``, the
    default): only that sampler's layout (``num_replicas``, ``rank``) and epoch are used, the batches stay
    stratified. With ``use_distributed_sampler=False`` the layout comes from ``torch.distributed`` (or from
    ``num_replicas``/``rank``).

    Args:
        sampler: Carries the epoch (``set_epoch``; Lightning calls it on ``batch_sampler.sampler``) and, for a
            ``DistributedSampler``, the DDP layout. ``None``: a :class:`~datamodules.base.SeededRandomSampler`.
        batch_size: Largest batch (per rank).
        drop_last: Must be ``False`` (there is no short last batch: sizes differ by at most one).
        strata: (N,) integer stratum of each example, e.g. ``2·group + label``.
        seed: Seed of the order (combined with the epoch).
        num_replicas: Number of ranks (default: the DistributedSampler's, else ``torch.distributed``'s, else 1).
        rank: This process's rank (same defaults).
    """

    def __init__(
        self,
        sampler: Sampler[int] | None = None,
        batch_size: int = 256,
        drop_last: bool = False,
        *,
        strata: Tensor | Sequence[int],
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        strata_t = torch.as_tensor(strata)
        if strata_t.dim() != 1 or strata_t.is_floating_point() or strata_t.numel() == 0:
            raise ValueError(
                f"strata must be a non-empty 1-D integer tensor (one stratum per example), got shape "
                f"{tuple(strata_t.shape)} and dtype {strata_t.dtype}"
            )
        if drop_last:
            raise ValueError(
                "StratifiedBatchSampler has no short last batch to drop (batch sizes differ by at most one): "
                "use drop_last=False"
            )
        n = strata_t.numel()
        super().__init__(sampler if sampler is not None else SeededRandomSampler(n, seed=seed), batch_size, False)
        if isinstance(sampler, DistributedSampler):
            num_replicas = sampler.num_replicas if num_replicas is None else num_replicas
            rank = sampler.rank if rank is None else rank
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
        if n < num_replicas:
            raise ValueError(f"{n} examples cannot fill a batch on each of {num_replicas} ranks")
        self.strata = strata_t.long()
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.batches_per_rank = -(-n // (num_replicas * batch_size))
        self.num_batches = num_replicas * self.batches_per_rank
        self._skip: tuple[int, int] | None = None
        values, counts = torch.unique(self.strata, return_counts=True)
        small = {int(v): int(c) for v, c in zip(values, counts) if c < self.num_batches}
        if small and rank == 0:
            rank_zero_warn(
                f"strata {small} (stratum: examples) have fewer examples than the {self.num_batches} batches of an "
                "epoch, so some batches lack them: use a larger batch_size to have every stratum in every batch"
            )

    @property
    def epoch(self) -> int:
        """The epoch whose order is drawn, ``sampler.epoch`` (0 if it has none)."""
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the order (forwarded to ``sampler``, where Lightning sets it)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def resume(self, epoch: int, num_batches: int) -> None:
        """Start the next pass over ``epoch`` after its first ``num_batches`` batches (later passes are whole)."""
        self._skip = (epoch, num_batches) if num_batches > 0 else None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ``G`` batches of ``epoch`` (every rank's), in order; rank r iterates ``[r::num_replicas]``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        key = torch.rand(self.strata.numel(), generator=gen, dtype=torch.float64)
        order = torch.argsort(self.strata.double() * 2 + key, stable=True)  # by stratum, random within
        slots = torch.randperm(self.num_batches, generator=gen)
        return [order[int(j) :: self.num_batches].tolist() for j in slots]

    def __iter__(self) -> Iterator[list[int]]:
        # a generator, like BatchSampler's: nothing (the epoch, a pending resume) is read before the first batch
        # is asked for, so an iterator made and dropped (Lightning's checks) consumes nothing
        epoch = self.epoch
        batches = self.epoch_batches(epoch)[self.rank :: self.num_replicas]
        start = 0
        if self._skip is not None and self._skip[0] <= epoch:
            if self._skip[0] == epoch:
                start = self._skip[1]
            self._skip = None
        yield from batches[start:]

    def __len__(self) -> int:
        return self.batches_per_rank


class StratifiedDataLoader(ResumableDataLoader):
    """A :class:`~datamodules.base.ResumableDataLoader` whose batches come from a :class:`StratifiedBatchSampler`
    (its mid-epoch resume skips batches of that sampler)."""

    def resume(self, epoch: int, consumed_batches: int) -> None:
        if epoch < 0 or consumed_batches <= 0 or len(self) == 0:
            return
        skip = consumed_batches % len(self)
        batch_sampler = self.batch_sampler
        if skip and isinstance(batch_sampler, StratifiedBatchSampler):
            batch_sampler.resume(epoch, skip)


def encode_features(
    frame: pd.DataFrame, categorical: Sequence[str], numerical: Sequence[str], train_index: np.ndarray
) -> tuple[np.ndarray, list[str], dict[str, tuple[float, float]]]:
    """One-hot ``categorical`` (vocabulary of the whole frame, sorted) and standardize ``numerical`` with the
    statistics of the rows ``train_index``. Returns features (N, d) float32, their names and the (mean, std)
    used per numerical column (std 0 is replaced by 1)."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    stats: dict[str, tuple[float, float]] = {}
    for col in numerical:
        values = frame[col].to_numpy(dtype=np.float64)
        train = values[train_index]
        mean, std = float(train.mean()), float(train.std())
        std = std if std > 0 else 1.0
        stats[col] = (mean, std)
        blocks.append(((values - mean) / std)[:, None])
        names.append(col)
    for col in categorical:
        values = frame[col].astype(str).to_numpy()
        cats = sorted(set(values))
        blocks.append((values[:, None] == np.array(cats)[None, :]).astype(np.float64))
        names += [f"{col}={c}" for c in cats]
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
    return x.astype(np.float32), names, stats


def _to_numeric(frame: pd.DataFrame, cols: Sequence[str], path: Path) -> None:
    for col in cols:
        converted = pd.to_numeric(frame[col], errors="coerce")
        bad = converted.isna() & frame[col].notna()
        if bad.any() or converted.isna().any():
            row = int(np.flatnonzero((bad | converted.isna()).to_numpy())[0])
            raise DataFormatError(
                f"{path}: column {col!r} must be numeric; row {row} holds {frame[col].iloc[row]!r} "
                "(truncated or corrupt file?)"
            )
        frame[col] = converted


def _check_complete(frame: pd.DataFrame, path: Path) -> None:
    empty = frame.isna()
    if empty.to_numpy().any():
        row = int(np.flatnonzero(empty.any(axis=1).to_numpy())[0])
        cols = list(frame.columns[empty.iloc[row].to_numpy()])
        raise DataFormatError(f"{path}: data row {row} has empty fields {cols} (truncated or corrupt file?)")


def _check_values(series: pd.Series, allowed: Sequence[Any], what: str, path: Path) -> None:
    bad = ~series.isin(list(allowed))
    if bad.any():
        first = series[bad].iloc[0]
        raise DataFormatError(f"{path}: {what} must be one of {list(allowed)}, found {first!r} ({int(bad.sum())} rows)")


class TabularFairnessDataModule(HyperlitDataModule):
    """Shared machinery of the UCI fairness DataModules (subclasses define the files and columns).

    Args:
        fractions: (train, val, test) fractions of the seeded split (Adult: only train:val is used, its test set
            is ``adult.test``).
        include_sensitive: Keep the raw sensitive column among the features.
        verify_row_counts: Check the row counts against UCI's (turn off for subsets of the files).
        stratify: Draw the training batches with :class:`StratifiedBatchSampler` over the four (group, label)
            cells (each in every batch, in proportion; seeded by ``split_seed``; one shard per DDP rank) instead of
            plain shuffling.
        **kwargs: See :class:`~datamodules.base.HyperlitDataModule` (``data_dir``, ``batch_size``, …).
    """

    name: ClassVar[str] = ""
    subdir: ClassVar[str] = ""
    categorical: ClassVar[tuple[str, ...]] = ()
    numerical: ClassVar[tuple[str, ...]] = ()
    sensitive: ClassVar[str] = ""

    serves_hyper_stream = True  # train_dataloader() goes through with_hyper_stream

    def __init__(
        self,
        fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        include_sensitive: bool = False,
        verify_row_counts: bool = True,
        stratify: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_size", 256)
        super().__init__(**kwargs)
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
        self.fractions = tuple(float(f) for f in fractions)
        self.include_sensitive = include_sensitive
        self.verify_row_counts = verify_row_counts
        self.stratify = stratify
        self.input_dim: int | None = None
        self.feature_names: list[str] = []
        self.standardization: dict[str, tuple[float, float]] = {}

    # -- subclass interface ------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.data_dir / self.subdir

    def files(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def layout(self) -> str:
        return f"  {self.subdir}/\n" + "".join(f"    {f}\n" for f in self.files())

    def read(self) -> tuple[pd.DataFrame, int | None]:  # pragma: no cover - interface
        """The whole table (numerical columns parsed) and, for a fixed test file, the number of its last rows
        that form the test set (``None``: seeded split of all rows)."""
        raise NotImplementedError

    def labels_and_groups(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _check_rows(self, path: Path, n: int, expected: int) -> None:
        if self.verify_row_counts and n != expected:
            raise DataFormatError(
                f"{path}: {n} data rows, expected {expected} (UCI's file). The file is truncated, padded or another "
                "version; pass verify_row_counts=False to use it anyway"
            )

    # -- LightningDataModule ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        missing = [f for f in self.files() if not (self.root / f).exists()]
        if missing and self.download:
            self._download(missing)
        self.check_files(self.name, self.data_dir, [f"{self.subdir}/{f}" for f in self.files()], self.layout())

    def _download(self, missing: Sequence[str]) -> None:  # pragma: no cover - needs internet
        raise DataFormatError(
            f"{self.name} cannot be downloaded automatically; fetch it from UCI (see {self.layout()})"
        )

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        self.check_files(self.name, self.data_dir, [f"{self.subdir}/{f}" for f in self.files()], self.layout())
        frame, n_test = self.read()
        y, group = self.labels_and_groups(frame)
        n = len(frame)
        if n_test is None:
            train_idx, val_idx, test_idx = (i.numpy() for i in seeded_split_indices(n, self.fractions, self.split_seed))
        else:
            n_trval = n - n_test
            tr, va = self.fractions[0], self.fractions[1]
            train_idx, val_idx = (
                i.numpy() for i in seeded_split_indices(n_trval, (tr / (tr + va), va / (tr + va)), self.split_seed)
            )
            test_idx = np.arange(n_trval, n)
        numerical = [c for c in self.numerical if self.include_sensitive or c != self.sensitive]
        categorical = [c for c in self.categorical if self.include_sensitive or c != self.sensitive]
        x, self.feature_names, self.standardization = encode_features(frame, categorical, numerical, train_idx)
        self.input_dim = x.shape[1]
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(y.astype(np.float32))
        gt = torch.from_numpy(group.astype(np.int64))
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(xt[i], yt[i], gt[i]) for i in (train_idx, val_idx, test_idx)
        )

    def train_dataloader(self) -> DataLoader:
        if not self.stratify:
            return self.with_hyper_stream(self._loader(self.train_set, shuffle=True))
        _, y, group = self.train_set.tensors
        batch_sampler = StratifiedBatchSampler(None, self.batch_size, strata=2 * group + y.long(), seed=self.split_seed)
        loader = StratifiedDataLoader(
            self.train_set,
            batch_sampler=batch_sampler,
            datamodule=self,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if self._resume is not None:
            loader.resume(*self._resume)
        return self.with_hyper_stream(loader)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class AdultDataModule(TabularFairnessDataModule):
    """UCI Adult (census income > 50K), sensitive attribute ``sex`` (group 1 = Female).

    Expected layout: ``adult/adult.data`` (32,561 rows) and ``adult/adult.test`` (16,281 rows).
    """

    name = "UCI Adult"
    subdir = "adult"
    columns = (
        "age",
        "workclass",
        "fnlwgt",
        "education",
        "education-num",
        "marital-status",
        "occupation",
        "relationship",
        "race",
        "sex",
        "capital-gain",
        "capital-loss",
        "hours-per-week",
        "native-country",
        "income",
    )
    numerical = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
    categorical = (
        "workclass",
        "education",
        "marital-status",
        "occupation",
        "relationship",
        "race",
        "sex",
        "native-country",
    )
    sensitive = "sex"
    expected_rows: ClassVar[dict[str, int]] = {"adult.data": 32561, "adult.test": 16281}
    urls: ClassVar[dict[str, tuple[str, str]]] = {
        "adult.data": (
            "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/adult.data",
            "5d7c39d7b8804f071cdd1f2a7c460872",
        ),
        "adult.test": (
            "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/adult.test",
            "35238206dfdf7f1fe215bbb874adecdc",
        ),
    }

    def files(self) -> list[str]:
        return ["adult.data", "adult.test"]

    def _download(self, missing: Sequence[str]) -> None:
        for f in missing:  # torchvision's downloader; it checks the md5 and raises RuntimeError on a mismatch
            url, md5 = self.urls[f]
            try:
                download_url(url, str(self.root), filename=f, md5=md5)
            except (RuntimeError, OSError) as err:  # it writes in place: never leave a partial or corrupt file
                (self.root / f).unlink(missing_ok=True)
                if isinstance(err, OSError):  # URLError is an OSError
                    raise ConnectionError(f"could not download {url}: {err}") from err
                raise DataFormatError(f"downloading {url}: {err} (expected md5 {md5})") from err

    def _read_one(self, path: Path) -> pd.DataFrame:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        skip = 1 if first.startswith("|") else 0  # adult.test: "|1x3 Cross validator"
        try:
            frame = pd.read_csv(path, header=None, skiprows=skip, skipinitialspace=True, dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataFormatError(f"{path}: not a UCI Adult file ({err})") from err
        if frame.shape[1] != len(self.columns):
            raise DataFormatError(
                f"{path}: {frame.shape[1]} columns, expected {len(self.columns)} ({list(self.columns)})"
            )
        frame.columns = list(self.columns)
        _check_complete(frame, path)
        self._check_rows(path, len(frame), self.expected_rows[path.name])
        frame["income"] = frame["income"].str.strip().str.rstrip(".")  # adult.test labels end with '.'
        _check_values(frame["income"], ["<=50K", ">50K"], "income", path)
        _check_values(frame["sex"], ["Male", "Female"], "sex", path)
        _to_numeric(frame, self.numerical, path)
        return frame

    def read(self) -> tuple[pd.DataFrame, int | None]:
        train = self._read_one(self.root / "adult.data")
        test = self._read_one(self.root / "adult.test")
        return pd.concat([train, test], ignore_index=True), len(test)

    def labels_and_groups(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return (frame["income"] == ">50K").to_numpy(), (frame["sex"] == "Female").to_numpy()


class DefaultDataModule(TabularFairnessDataModule):
    """UCI Default of credit card clients, sensitive attribute ``SEX`` (group 1 = 2, female).

    Expected layout: ``credit_default/default_of_credit_card_clients.csv`` (30,000 rows; the CSV export of UCI's
    ``.xls`` with its two header rows; the one-header Kaggle export ``UCI_Credit_Card.csv`` format is accepted too).
    ``ID`` is dropped; EDUCATION, MARRIAGE and the PAY_* status codes are categorical.
    """

    name = "UCI Default of credit card clients"
    subdir = "credit_default"
    filename = "default_of_credit_card_clients.csv"
    pay = ("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6")
    categorical = ("SEX", "EDUCATION", "MARRIAGE", *pay)
    numerical = (
        "LIMIT_BAL",
        "AGE",
        *(f"BILL_AMT{i}" for i in range(1, 7)),
        *(f"PAY_AMT{i}" for i in range(1, 7)),
    )
    sensitive = "SEX"
    labels = ("default payment next month", "default.payment.next.month")
    expected_rows = 30000

    def files(self) -> list[str]:
        return [self.filename]

    def read(self) -> tuple[pd.DataFrame, int | None]:
        path = self.root / self.filename
        with open(path, encoding="utf-8-sig") as fh:
            first = fh.readline()
        header = 1 if first.startswith(",X1") else 0  # the .xls export has a row of X1..X23,Y first
        try:
            frame = pd.read_csv(path, header=header, encoding="utf-8-sig", dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataFormatError(f"{path}: not a Default-of-credit-card-clients CSV ({err})") from err
        label = next((c for c in self.labels if c in frame.columns), None)
        missing = [c for c in (*self.categorical, *self.numerical) if c not in frame.columns]
        if label is None or missing:
            raise DataFormatError(
                f"{path}: missing columns {missing + ([] if label else [self.labels[0]])}; found {list(frame.columns)}"
            )
        frame = frame.rename(columns={label: "default"})
        _check_complete(frame, path)
        self._check_rows(path, len(frame), self.expected_rows)
        _to_numeric(frame, [*self.numerical, *self.categorical, "default"], path)
        _check_values(frame["default"], [0, 1], "the label", path)
        _check_values(frame["SEX"], [1, 2], "SEX", path)
        return frame, None

    def labels_and_groups(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return (frame["default"] == 1).to_numpy(), (frame["SEX"] == 2).to_numpy()


class BankDataModule(TabularFairnessDataModule):
    """UCI Bank Marketing (term-deposit subscription ``y``), sensitive attribute ``age`` (group 1 = age < 25).

    Expected layout: ``bank_marketing/bank/bank-full.csv`` (45,211 rows; ``variant="bank"`` for the 10% sample
    ``bank/bank.csv``; ``bank-additional-full`` / ``bank-additional`` for the 21-column version under
    ``bank_marketing/bank-additional/``). ``;``-separated, quoted strings. Object columns are categorical.

    Args:
        variant: Which UCI file to read.
        **kwargs: See :class:`TabularFairnessDataModule`.
    """

    name = "UCI Bank Marketing"
    subdir = "bank_marketing"
    sensitive = "age"
    variants: ClassVar[dict[str, tuple[str, int]]] = {
        "bank-full": ("bank/bank-full.csv", 45211),
        "bank": ("bank/bank.csv", 4521),
        "bank-additional-full": ("bank-additional/bank-additional-full.csv", 41188),
        "bank-additional": ("bank-additional/bank-additional.csv", 4119),
    }
    bank_numerical = ("age", "balance", "day", "duration", "campaign", "pdays", "previous")
    bank_categorical = ("job", "marital", "education", "default", "housing", "loan", "contact", "month", "poutcome")
    additional_numerical = (
        "age",
        "duration",
        "campaign",
        "pdays",
        "previous",
        "emp.var.rate",
        "cons.price.idx",
        "cons.conf.idx",
        "euribor3m",
        "nr.employed",
    )
    additional_categorical = (*bank_categorical[:-1], "day_of_week", "poutcome")

    def __init__(
        self,
        variant: Literal["bank-full", "bank", "bank-additional-full", "bank-additional"] = "bank-full",
        **kwargs: Any,
    ) -> None:
        if variant not in self.variants:
            raise ValueError(f"unknown Bank Marketing variant {variant!r}; choose from {sorted(self.variants)}")
        super().__init__(**kwargs)
        self.variant = variant
        additional = variant.startswith("bank-additional")
        self.numerical = self.additional_numerical if additional else self.bank_numerical
        self.categorical = self.additional_categorical if additional else self.bank_categorical

    def files(self) -> list[str]:
        return [self.variants[self.variant][0]]

    def read(self) -> tuple[pd.DataFrame, int | None]:
        rel, expected = self.variants[self.variant]
        path = self.root / rel
        try:
            frame = pd.read_csv(path, sep=";", quotechar='"', dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataFormatError(f"{path}: not a ';'-separated Bank Marketing file ({err})") from err
        expected_cols = [*self.numerical, *self.categorical, "y"]
        if sorted(frame.columns) != sorted(expected_cols):
            raise DataFormatError(
                f"{path}: columns {list(frame.columns)} differ from UCI's {expected_cols} "
                "(is the separator ';'? is it the right variant?)"
            )
        _check_complete(frame, path)
        self._check_rows(path, len(frame), expected)
        _check_values(frame["y"], ["yes", "no"], "y", path)
        _to_numeric(frame, self.numerical, path)
        return frame, None

    def labels_and_groups(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return (frame["y"] == "yes").to_numpy(), (frame["age"] < 25).to_numpy()
