"""PTBDataModule: the reader on generated PTB-format files and on the shared real copy, batchify, BPTT windows,
rank-aware contiguous shards and errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import datamodules.ptb as ptb_module
from datamodules.base import DataFormatError, DatasetNotFoundError
from datamodules.ptb import EOS, UNK, BPTTWindows, PTBDataModule, RepeatedWindows, Vocabulary, batchify
from tests.datamodules.ptb_fakedata import WORDS, count_tokens, write_fake_ptb


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_ptb(tmp_path_factory.mktemp("ptb_fake"))


def _dm(root: Path, tmp_path: Path, **kwargs: object) -> PTBDataModule:
    defaults: dict[str, object] = {"batch_size": 4, "bptt": 7, "eval_batch_size": 3, "test_batch_size": 2}
    defaults.update(kwargs)
    return PTBDataModule(data_dir=str(root), cache_dir=str(tmp_path / "hf"), **defaults)  # type: ignore[arg-type]


def _words(path: Path) -> list[str]:
    return [w for line in path.read_text().splitlines() for w in [*line.split(), EOS]]


def test_reader_counts_and_encoding_on_generated_files(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    for split in ("train", "valid", "test"):
        lines, tokens = count_tokens(fake_root / "ptb" / f"ptb.{split}.txt")
        assert dm.num_lines[split] == lines
        assert dm.num_tokens[split] == tokens
    assert dm.vocab_size == len(WORDS) + 1  # every word plus <eos>
    assert dm.vocab is not None
    decoded = [dm.vocab.itos[i] for i in dm.tokens["valid"].tolist()]
    assert decoded == _words(fake_root / "ptb" / "ptb.valid.txt")


def test_windows_are_contiguous_streams_with_shifted_targets(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path)
    dm.setup("fit")
    tokens = dm.tokens["train"]
    length = tokens.numel() // 4
    batches = list(dm.train_dataloader())
    assert [int(b.index) for b in batches] == list(range(len(batches)))  # in order
    inputs = torch.cat([b.inputs for b in batches])
    targets = torch.cat([b.targets for b in batches])
    for j in range(4):  # stream j is the j-th contiguous slice of the corpus
        stream = tokens[j * length : (j + 1) * length]
        assert torch.equal(inputs[:, j], stream[:-1])
        assert torch.equal(targets[:, j], stream[1:])
    assert all(b.inputs.shape[0] == 7 for b in batches[:-1]) and 1 <= batches[-1].inputs.shape[0] <= 7
    assert isinstance(dm.train_dataloader().sampler, DistributedSampler)  # Lightning leaves it in place under DDP


def test_rank_shards_are_contiguous_disjoint_and_cover_the_global_batch(fake_root: Path, tmp_path: Path) -> None:
    shards = []
    for rank in range(2):
        dm = _dm(fake_root, tmp_path)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, lightning_module=None)  # type: ignore[assignment]
        dm.setup("fit")
        shards.append(dm.train_set.data)
        assert len(dm.train_dataloader()) == len(dm.train_set)
    single = _dm(fake_root, tmp_path, batch_size=8)
    single.setup("fit")
    torch.testing.assert_close(torch.cat(shards, dim=1), single.train_set.data)  # = one process with batch 2·B
    assert shards[0].shape == shards[1].shape


def test_batchify_trims_and_validates() -> None:
    data = torch.arange(23)
    block = batchify(data, 3)
    assert block.shape == (7, 3) and torch.equal(block[:, 1], torch.arange(7, 14))
    assert torch.equal(
        batchify(data, 2, rank=1, world_size=2), torch.stack([torch.arange(10, 15), torch.arange(15, 20)], 1)
    )
    with pytest.raises(ValueError, match="cannot fill"):
        batchify(torch.arange(5), 3)
    with pytest.raises(ValueError, match="rank"):
        batchify(data, 2, rank=2, world_size=2)


def test_bptt_windows_lengths_and_repeat() -> None:
    windows = BPTTWindows(torch.arange(20).view(10, 2), bptt=4)
    assert [windows[i].inputs.shape[0] for i in range(len(windows))] == [4, 4, 1]
    assert windows.num_targets == 18
    with pytest.raises(IndexError):
        windows[3]
    rep = RepeatedWindows(windows, 2)
    assert len(rep) == 6 and [int(rep[i].index) for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_hyper_stream_comes_from_validation_split(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path, hyper_batch_size=2, hyper_repeat=3)
    dm.setup("fit")
    first = next(iter(dm.hyper_dataloader()))
    assert torch.equal(first.inputs[:, 0], dm.tokens["valid"][:7])
    assert first.inputs.shape[1] == 2 and len(dm.hyper_dataloader()) == 3 * len(dm.hyper_set)
    val = next(iter(dm.val_dataloader()))
    test = next(iter(dm.test_dataloader()))
    assert val.inputs.shape[1] == 3 and test.inputs.shape[1] == 2


def test_truncated_corpus(fake_root: Path, tmp_path: Path) -> None:
    dm = _dm(fake_root, tmp_path, max_train_tokens=200, max_eval_tokens=60)
    dm.setup("fit")
    assert dm.train_set.data.numel() == 200 and dm.val_set.data.numel() == 60
    assert dm.vocab_size == len(WORDS) + 1  # the vocabulary still comes from the whole training split


def test_vocabulary_limit_maps_rare_words_to_unk() -> None:
    tokens = ["a", "b", "a", "c", EOS, "a", "b", EOS]
    vocab = Vocabulary(tokens, max_size=3)
    assert set(vocab.itos) == {"a", EOS, UNK}  # <eos> is kept although "b" is as frequent
    assert vocab.encode(["b", "c", "a"]).tolist() == [vocab.stoi[UNK], vocab.stoi[UNK], vocab.stoi["a"]]
    assert Vocabulary(tokens).itos == ["a", "b", "c", EOS]  # ids by first appearance when everything fits
    with pytest.raises(DataFormatError, match="not in the training vocabulary"):
        Vocabulary(tokens).encode(["zzz"], "valid")


def test_missing_files_raise_dataset_not_found(tmp_path: Path) -> None:
    dm = PTBDataModule(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"ptb/ptb.train.txt[\s\S]*download=True"):
        dm.prepare_data()
    with pytest.raises(DatasetNotFoundError, match=r"ptb\.valid\.txt"):
        dm.setup("fit")


def test_download_only_in_prepare_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        # the signature of torchvision.datasets.utils.download_url
        calls.append((url, str(filename), md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / str(filename)).write_text(" a b c \n b c a \n")

    monkeypatch.setattr(ptb_module, "download_url", fake_download)
    dm = PTBDataModule(data_dir=str(tmp_path), download=True, batch_size=1, bptt=2, cache_dir=str(tmp_path / "hf"))
    dm.prepare_data()
    assert sorted(name for _, name, _ in calls) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    assert all(url.endswith(name) and md5 == ptb_module.PTB_MD5[name] for url, name, md5 in calls)
    dm.prepare_data()  # files present: nothing downloaded again
    assert len(calls) == 3


def test_download_with_a_wrong_md5_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's real ``download_url`` (network calls stubbed): a corrupt download is an error and is removed."""
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", lambda url, filename, chunk_size=0: Path(filename).write_text("x"))
    dm = PTBDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataFormatError, match=r"ptb\.train\.txt.*expected md5 f26c4b92c5fdc7b3f8c7cdcb991d8420"):
        dm.prepare_data()
    assert list((tmp_path / "ptb").iterdir()) == []

    def interrupted(url: str, filename: str, chunk_size: int = 0) -> None:
        Path(filename).write_text(" a partial")
        raise OSError("connection reset")

    monkeypatch.setattr(tv_utils, "_urlretrieve", interrupted)
    with pytest.raises(ConnectionError, match="could not download"):
        dm.prepare_data()
    assert list((tmp_path / "ptb").iterdir()) == []  # no partial file that a later run would take for the data


def test_corrupt_or_empty_files_raise_format_errors(fake_root: Path, tmp_path: Path) -> None:
    root = write_fake_ptb(tmp_path / "bad")
    (root / "ptb" / "ptb.valid.txt").write_bytes(b"\xff\xfe\x00 binary \x80\x81\n")
    with pytest.raises(DataFormatError, match="UTF-8"):
        _dm(root, tmp_path).setup("fit")
    root = write_fake_ptb(tmp_path / "empty")
    (root / "ptb" / "ptb.test.txt").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no words"):
        _dm(root, tmp_path).setup("fit")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="bptt"):
        PTBDataModule(bptt=0)
    with pytest.raises(ValueError, match="hyper_repeat"):
        PTBDataModule(hyper_repeat=0)


def test_real_ptb_counts_match_the_readme(real_data_dir: Path, tmp_path: Path) -> None:
    if not (real_data_dir / "ptb" / "ptb.train.txt").exists():
        pytest.skip("no ptb/ in HYPERLIT_DATA_DIR")
    dm = PTBDataModule(data_dir=str(real_data_dir), cache_dir=str(tmp_path / "hf"))
    dm.setup("fit")
    assert dm.num_lines == {"train": 42068, "valid": 3370, "test": 3761}
    assert dm.num_tokens == {"train": 929589, "valid": 73760, "test": 82430}
    assert dm.vocab_size == 10000 and dm.vocab is not None and EOS in dm.vocab.stoi and UNK in dm.vocab.stoi
    # no word of valid/test is missing from train: encoding without an <unk> fallback succeeds
    strict = Vocabulary([w for w in dm.vocab.itos if w != UNK])
    for split in ("valid", "test"):
        words = _words(real_data_dir / "ptb" / f"ptb.{split}.txt")
        strict.encode([w for w in words if w != UNK], split)
    assert dm.train_set.data.shape == (929589 // 40, 40) and len(dm.train_dataloader()) == 332
