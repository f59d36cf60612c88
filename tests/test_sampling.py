"""Sharding, epoch-keyed order and per-case seeded augmentation (medseg.data.sampling), without DDP."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai import data as md
from monai import transforms as mt
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from pytorch_lightning.strategies import DDPStrategy

from medseg.data.datamodule import MedSegDataModule
from medseg.data.sampling import EpochSampler, EpochSeededDataset, LocalSampler, shard
from medseg.errors import ConfigError
from medseg.lightning_cli import MedSegCLI
from medseg.tasks.segmentation import dice_summary, dice_sums

CONFIGS = Path(__file__).parents[1] / "configs"


def test_shards_cover_every_case_once_and_ranks_take_equal_steps() -> None:
    cases = [f"c{i}" for i in range(10)]
    shards = [shard(cases, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(cases)
    samplers = [EpochSampler(len(s), len(cases), 3, rank, seed=1) for rank, s in enumerate(shards)]
    drawn = [[index for _, index in sampler] for sampler in samplers]
    assert [len(d) for d in drawn] == [4, 4, 4]  # ceil(10 / 3): the short shards wrap around
    for local, indices in zip(shards, drawn, strict=True):
        assert set(indices) == set(range(len(local)))
    assert list(LocalSampler(3)) == [0, 1, 2]


def test_training_order_depends_on_seed_epoch_and_rank_only() -> None:
    def order(epoch: int, rank: int = 0, seed: int = 0) -> list[tuple[int, int]]:
        sampler = EpochSampler(20, 40, 2, rank, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3) == order(3)  # a new sampler (a resumed run) draws the same order
    assert all(epoch == 3 for epoch, _ in order(3))
    assert order(3) != order(4) and order(3) != order(3, rank=1) and order(3) != order(3, seed=1)


def _noisy(items: list[dict], seed: int) -> EpochSeededDataset:
    transform = mt.Compose([mt.RandGaussianNoised(keys="image", prob=1.0, std=1.0)])
    return EpochSeededDataset(md.Dataset(items, transform), [item["id"] for item in items], seed)


def test_augmentation_is_seeded_per_case_and_epoch_not_by_what_ran_before() -> None:
    items = [{"id": f"case{i}", "image": torch.zeros(1, 4, 4)} for i in range(3)]
    first, second = _noisy(items, seed=0), _noisy(items, seed=0)
    for _ in range(5):
        first[(0, 2)]  # draws that would move a shared random stream along
    assert torch.equal(first[(1, 0)]["image"], second[(1, 0)]["image"])
    assert not torch.equal(first[(1, 0)]["image"], first[(2, 0)]["image"])  # a new epoch, new noise
    assert not torch.equal(first[(1, 0)]["image"], first[(1, 1)]["image"])  # another case, other noise
    # Same case in another shard position (another world size) gets the same noise: seeded by id.
    moved = _noisy(items[::-1], seed=0)
    assert torch.equal(moved[(1, 2)]["image"], second[(1, 0)]["image"])
    # Loader workers do not change it.
    loader = md.DataLoader(first, batch_size=1, sampler=[(1, 0)], num_workers=2)
    assert torch.equal(next(iter(loader))["image"][0], second[(1, 0)]["image"])


def _fake_trainer(rank: int, world_size: int, limit_val_batches: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size, limit_val_batches=limit_val_batches)


def test_each_process_builds_and_caches_only_its_shard(seg3d_root: Path) -> None:
    dm = MedSegDataModule(
        str(seg3d_root), patch_size=[16, 16, 8], val_cases=["case_004", "case_005"], cache="memory",
        check_data=False,
    )
    seen: dict[str, list[str]] = {"train": [], "val": []}
    for rank in range(2):
        dm_rank = MedSegDataModule(**dm.hparams)
        dm_rank.trainer = _fake_trainer(rank, 2)
        dm_rank.setup("fit")
        train = dm_rank._datasets["train"].dataset
        assert isinstance(train, md.CacheDataset) and len(train) == 2  # 4 training cases on 2 processes
        seen["train"] += [item["id"] for item in train.data]
        seen["val"] += [item["id"] for item in dm_rank._datasets["val"].data]
        assert isinstance(dm_rank.val_dataloader().sampler, LocalSampler)
    assert sorted(seen["train"]) == sorted(c["id"] for c in dm.train_cases)
    assert sorted(seen["val"]) == ["case_004", "case_005"]


def test_fewer_validation_cases_than_processes_is_refused(seg3d_root: Path) -> None:
    dm = MedSegDataModule(
        str(seg3d_root), patch_size=[16, 16, 8], val_cases=["case_004", "case_005"], check_data=False
    )
    dm.trainer = _fake_trainer(0, 3)
    with pytest.raises(ValueError, match="val split has 2 case.*3 processes"):
        dm.setup("fit")


def test_dice_sums_over_shards_equal_the_dice_of_all_cases() -> None:
    nan = float("nan")
    table = torch.tensor([[0.9, nan], [0.5, 0.2], [nan, 0.7], [0.1, nan], [0.8, 0.6]])
    parts = [dice_sums(table[rank::2]) for rank in range(2)]
    sums, counts = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    mean, per_class = dice_summary(table)
    assert torch.allclose((sums / counts).float(), per_class)
    assert torch.nanmean((sums / counts).float()).item() == pytest.approx(mean.item())


def test_ddp_trainer_config_composes_with_an_experiment(seg3d_root: Path, tmp_path: Path) -> None:
    cli = MedSegCLI(
        args=[
            "--config", str(CONFIGS / "seg3d_unet.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
            "--data.root", str(seg3d_root), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert isinstance(cli.trainer.strategy._layer_sync, TorchSyncBatchNorm)  # BatchNorm -> SyncBatchNorm
    assert (tmp_path / "seg3d_unet" / "version_0").is_dir()  # named after the experiment, not "ddp"


def test_a_fraction_of_validation_batches_is_refused_under_ddp(seg3d_root: Path) -> None:
    # 0.5 of a 1-case share is no batch on that process only, which stalls the others in DDP.
    dm = MedSegDataModule(str(seg3d_root), patch_size=[16, 16, 8], val_cases=["case_004", "case_005"],
                          check_data=False)
    dm.trainer = _fake_trainer(0, 2, limit_val_batches=0.5)
    with pytest.raises(ConfigError, match="limit_val_batches=0.5"):
        dm.setup("fit")
