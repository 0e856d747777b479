"""StratifiedBatchSampler and ``stratify=True`` on the fairness DataModules: every (group, label) cell in every
batch, each example once per epoch, seeded order, disjoint DDP shards (also through Lightning's sampler
injection), mid-epoch resume, and PHN-EPO without LP fallbacks where plain shuffling has them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DistributedSampler

from datamodules.tabular import BankDataModule, StratifiedBatchSampler, StratifiedDataLoader
from hyperlit.pareto import ParetoHyperNetModule
from tests.datamodules.tabular_fakedata import write_fake_bank

# 4 strata of very different sizes: 3 + 5 + 40 + 152 = 200 examples, in a scrambled order
COUNTS = (3, 5, 40, 152)


def _strata() -> torch.Tensor:
    s = torch.cat([torch.full((c,), i) for i, c in enumerate(COUNTS)])
    return s[torch.randperm(len(s), generator=torch.Generator().manual_seed(1))]


def _bank(tmp_path: Path, **kwargs) -> BankDataModule:  # type: ignore[no-untyped-def]
    write_fake_bank(tmp_path, n=400)  # 280 training rows, cells (g, y) = 126, 111, 21, 22
    dm = BankDataModule(data_dir=str(tmp_path), verify_row_counts=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_every_batch_holds_every_stratum_in_proportion() -> None:
    strata = _strata()
    sampler = StratifiedBatchSampler(None, 64, strata=strata[strata >= 1] - 1)  # 5, 40, 152: 197 examples
    assert len(sampler) == 4  # ⌈197 / 64⌉
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        s = strata[strata >= 1] - 1
        for b in batches:
            counts = torch.bincount(s[b], minlength=3)
            # ⌊n_s/G⌋ or ⌈n_s/G⌉ of each stratum: 1-2, 10, 38
            assert counts.tolist()[1] == 10 and 1 <= counts[0] <= 2 and counts[2] == 38
        sizes = [len(b) for b in batches]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 64 and sum(sizes) == 197


@pytest.mark.filterwarnings("ignore:strata")
def test_each_example_once_per_epoch_and_seeded_order() -> None:
    strata = _strata()
    a = StratifiedBatchSampler(None, 16, strata=strata, seed=3, num_replicas=1, rank=0)
    with pytest.warns(UserWarning, match=r"strata \{0: 3, 1: 5\}.*fewer examples than the 13 batches"):
        b = StratifiedBatchSampler(None, 16, strata=strata, seed=3)
    c = StratifiedBatchSampler(None, 16, strata=strata, seed=4, num_replicas=1, rank=0)
    epoch0 = list(a)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(len(strata)))
    assert list(b) == epoch0  # same seed, same epoch: same batches
    assert list(c) != epoch0
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0 and sorted(i for batch in epoch1 for i in batch) == list(range(len(strata)))
    # a stratum smaller than the number of batches: at most one per batch (spread, never doubled up)
    assert all(int((strata[batch] == 0).sum()) <= 1 for batch in epoch1)


@pytest.mark.filterwarnings("ignore:strata")
def test_ddp_shards_are_disjoint_and_cover_the_epoch() -> None:
    strata = _strata()
    shards = [StratifiedBatchSampler(None, 16, strata=strata, seed=0, num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 5):
        for s in shards:
            s.set_epoch(epoch)
        batches = [list(s) for s in shards]
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(shards[0]) == 5  # ⌈200 / 48⌉
        flat = [i for shard in batches for batch in shard for i in batch]
        assert sorted(flat) == list(range(len(strata)))  # disjoint and complete
        assert batches[1] == shards[0].epoch_batches(epoch)[1::3]
        for shard in batches:  # the 40 and 152 strata are in every batch of every rank
            assert all({2, 3} <= set(strata[b].tolist()) for b in shard)


def test_lightning_injects_its_distributed_sampler_and_epoch(tmp_path: Path) -> None:
    dm = _bank(tmp_path, batch_size=16, stratify=True)
    with _replace_dunder_methods(BatchSampler):  # as the Trainer does around train_dataloader()
        loader = dm.train_dataloader()
    assert isinstance(loader, StratifiedDataLoader) and isinstance(loader.batch_sampler, StratifiedBatchSampler)
    injected = DistributedSampler(dm.train_set, num_replicas=2, rank=1, shuffle=True, seed=0)
    ddp_loader = _update_dataloader(loader, injected)  # what use_distributed_sampler=True does on each rank
    bs = ddp_loader.batch_sampler
    assert isinstance(ddp_loader, StratifiedDataLoader) and isinstance(bs, StratifiedBatchSampler)
    assert (bs.num_replicas, bs.rank, bs.sampler) == (2, 1, injected)
    _set_sampler_epoch(ddp_loader, 2)  # the fit loop's call at each epoch start
    assert injected.epoch == 2
    got = [batch[1].tolist() for batch in ddp_loader]
    _, y, _ = dm.train_set.tensors
    assert got == [y[b].tolist() for b in bs.epoch_batches(2)[1::2]]
    assert len(ddp_loader) == 9  # ⌈280 / (2·16)⌉ per rank


def test_datamodule_batches_and_mid_epoch_resume(tmp_path: Path) -> None:
    dm = _bank(tmp_path, batch_size=16, stratify=True, split_seed=2)
    loader = dm.train_dataloader()
    y = dm.train_set.tensors[1]
    full = [batch for batch in loader]
    assert len(full) == 18
    for _, yb, gb in full:
        assert torch.bincount(2 * gb + yb.long(), minlength=4).min() >= 1
    assert torch.equal(torch.cat([b[1] for b in full]).sort().values, y.sort().values)
    loader.resume(0, 18 + 5)  # a cycled stream: 5 batches of epoch 0 trained
    iter(loader)  # an iterator made and dropped (as Lightning's checks do) does not use up the resume
    rest = list(loader)
    assert len(rest) == 13 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[5:]))
    assert len(list(loader)) == 18  # the next pass is whole


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strata": torch.zeros(4), "batch_size": 2}, "integer tensor"),
        ({"strata": torch.zeros(4, dtype=torch.long), "batch_size": 2, "drop_last": True}, "drop_last=False"),
        ({"strata": torch.zeros(4, dtype=torch.long), "batch_size": 2, "num_replicas": 2, "rank": 2}, "rank <"),
        ({"strata": torch.zeros(2, dtype=torch.long), "batch_size": 2, "num_replicas": 3, "rank": 0}, "3 ranks"),
    ],
)
def test_bad_arguments_raise(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        StratifiedBatchSampler(None, **kwargs)


def _epo_fallbacks(tmp_path: Path, stratify: bool) -> tuple[int, int]:
    torch.manual_seed(0)
    dm = _bank(tmp_path, batch_size=16, stratify=stratify)
    model = ParetoHyperNetModule(solver="epo", target_hidden=(8,), hnet_hidden=(16,))
    trainer = pl.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    return int(model.epo_fallbacks), int(model.epo_solves)


@pytest.mark.filterwarnings("ignore:EPO LP fell back")
def test_stratified_batches_remove_epo_fallbacks(tmp_path: Path) -> None:
    fallbacks, solves = _epo_fallbacks(tmp_path / "plain", stratify=False)
    assert solves == 36 and fallbacks > 0  # some of the 18 plain batches per epoch lack a cell: a gap is 0
    fallbacks, solves = _epo_fallbacks(tmp_path / "strat", stratify=True)
    assert (fallbacks, solves) == (0, 36)


class RecordBatches(pl.Callback):
    """Each rank writes the labels of the batches it trained on, per epoch, and its sampler's layout."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.seen: dict[str, list[list[float]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, idx: int) -> None:  # type: ignore[no-untyped-def]
        x = batch[0]
        self.seen.setdefault(str(trainer.current_epoch), []).append(x[:, :2].sum(1).tolist())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bs = trainer.train_dataloader.batch_sampler  # type: ignore[union-attr]
        out = {"seen": self.seen, "layout": [bs.num_replicas, bs.rank, type(bs.sampler).__name__]}
        (Path(self.directory) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("use_distributed_sampler", [True, False])
def test_ddp_ranks_get_disjoint_stratified_shards(tmp_path: Path, use_distributed_sampler: bool) -> None:
    dm = _bank(tmp_path, batch_size=16, stratify=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=use_distributed_sampler,
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordBatches(str(tmp_path))],
    )
    trainer.fit(ParetoHyperNetModule(solver="ls", target_hidden=(8,), hnet_hidden=(16,)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sampler_kind = "DistributedSampler" if use_distributed_sampler else "SeededRandomSampler"
    assert [r["layout"] for r in ranks] == [[2, 0, sampler_kind], [2, 1, sampler_kind]]
    x = dm.train_set.tensors[0][:, :2].sum(1)
    ref = StratifiedBatchSampler(None, 16, strata=torch.zeros(len(x), dtype=torch.long), num_replicas=2, rank=0)
    assert len(ref) == 9
    for epoch in ("0", "1"):
        seen = [torch.tensor([v for b in r["seen"][epoch] for v in b]) for r in ranks]
        assert [len(r["seen"][epoch]) for r in ranks] == [9, 9]  # ⌈280 / (2·16)⌉ batches on each rank
        assert torch.allclose(torch.cat(seen).sort().values, x.sort().values)  # disjoint shards, whole epoch
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # the epoch reaches the sampler


@pytest.mark.slow
def test_stratified_run_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    """PHN-EPO on fake Bank with ``stratify=True``: SIGKILL mid-epoch, ``--ckpt_path last`` resumes bit for bit."""
    import yaml

    from tests.test_fault_tolerance import ROOT, _assert_same_state, _kill_and_resume, _kill_point

    write_fake_bank(tmp_path / "data", n=400)
    config = yaml.safe_load((ROOT / "examples" / "phn_adult.yaml").read_text())
    config["model"]["init_args"].update(target_hidden=[8], hnet_hidden=[16], test_ray_partitions=4)
    config["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}
    config["data"] = {
        "class_path": "datamodules.tabular.BankDataModule",
        "init_args": {
            "data_dir": str(tmp_path / "data"),
            "verify_row_counts": False,
            "batch_size": 32,
            "stratify": True,
        },
    }
    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": 0},
    }
    config["trainer"] = {"max_epochs": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 4, "callbacks": [ckpt]}
    batch = _kill_point("stratified", 4, 2 * 9 - 1)  # 2 epochs of ⌈280 / 32⌉ = 9 batches
    runs = _kill_and_resume(tmp_path, config, {"batch": batch})
    assert runs["reference"]["batches_here"] == 18
    _assert_same_state(runs["reference"], runs["resumed"])
