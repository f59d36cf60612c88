"""The LightningDataModule: dataset description -> checked case lists -> cached, augmented loaders."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from monai import data as md
from monai import transforms as mt
from torch.utils.data import DataLoader

from medseg.data.augment import augment_collated, augmentation_transforms
from medseg.data.checks import assert_dataset_ok
from medseg.data.datalist import CLASSIFICATION, ENHANCEMENT, MULTITASK, DatasetSpec, load_dataset
from medseg.data.io import DEFAULT_MAX_VOXELS
from medseg.data.sampling import (
    EpochSampler,
    EpochSeededDataset,
    LocalSampler,
    run_seed,
    shard,
    share_random_state,
)
from medseg.data.transforms import (
    Preprocessing,
    keys_for,
    paired_patch_transforms,
    patch_sampling_transforms,
    preprocess_transforms,
)
from medseg.errors import ConfigError

CACHE_MODES = ("none", "memory", "disk")
LOADERS = ("process", "thread")


class MedSegDataModule(pl.LightningDataModule):
    """Segmentation, classification, multitask or enhancement data from a Decathlon-style ``dataset.json`` (or a
    CSV); see :mod:`medseg.data.datalist`.

    Args:
        root: dataset folder (holding ``dataset.json``/``dataset.csv``) or the description file.
        spatial_dims: 2 or 3.
        patch_size: segmentation, multitask and enhancement: training patch and sliding-window roi;
            classification: the input size every image is resized to (unless ``preprocessing.resize`` says
            otherwise).
        batch_size: training batch size; for segmentation the number of volumes per step, each giving
            ``samples_per_volume`` patches (so a step sees ``batch_size * samples_per_volume`` patches).
        samples_per_volume: random patches drawn per loaded volume (segmentation).
        pos_fraction: share of patches centred on foreground (segmentation).
        val_fraction: share of patients held out for validation when ``val_cases`` is not given.
        val_cases: explicit validation case ids (the rest trains); used by cross-validation.
        cache: ``none``, ``memory`` (MONAI CacheDataset) or ``disk`` (PersistentDataset in ``cache_dir``).
            Under DDP each process caches only its own shard of the cases.
        cache_rate: share of cases cached in memory.
        cache_dir: folder of the on-disk cache (default ``<root>/.medseg_cache``), shared by all processes.
        num_workers: DataLoader workers.
        loader: ``process`` (torch DataLoader, ``num_workers`` worker processes) or ``thread`` (MONAI
            ThreadDataLoader: batches are prepared in a background thread, fed by ``num_workers`` worker
            processes if any; the fast choice with ``cache: memory`` on a GPU).
        preprocessing: preprocessing spec (see :mod:`medseg.data.transforms`).
        augmentation: augmentation spec (see :mod:`medseg.data.augment`).
        augment_on_device: 3D only: apply the augmentation to each training batch after it reached the
            training device (the GPU) instead of in the loader, case by case, seeded as in the loader by
            ``(seed, epoch, case)``; frees loader CPUs when they are the bottleneck.
        check_data: read every case and refuse bad data before training (see ``medseg check-data``); with
            ``false`` only the headers are read (files exist, and claim no more than they hold).
        max_voxels: the most voxels an image header may claim; a larger claim (or one the file is too small
            to hold) is refused before any of its voxels are read.
        seed: seed of the train/validation split, the training order and the augmentation; ``None`` (the
            default) takes the run's ``seed_everything``.

    Under DDP (``trainer.world_size > 1``) each process gets every ``world_size``-th case of the training and
    validation lists (see :mod:`medseg.data.sampling`): validation sees every case exactly once, and the
    training order and augmentation of each epoch are drawn from ``(seed, epoch)``, so a run resumed from an
    end-of-epoch checkpoint continues exactly as it would have.
    """

    def __init__(
        self,
        root: str,
        spatial_dims: int = 3,
        patch_size: list[int] | None = None,
        batch_size: int = 2,
        samples_per_volume: int = 2,
        pos_fraction: float = 0.67,
        val_fraction: float = 0.2,
        val_cases: list[str] | None = None,
        cache: str = "none",
        cache_rate: float = 1.0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        loader: str = "process",
        preprocessing: dict[str, Any] | None = None,
        augmentation: dict[str, dict[str, Any]] | None = None,
        augment_on_device: bool = False,
        check_data: bool = True,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {list(CACHE_MODES)}, got {cache!r}")
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {list(LOADERS)}, got {loader!r}")
        self.seed = run_seed() if seed is None else seed
        if augment_on_device and spatial_dims != 3:
            raise ValueError("augment_on_device is for 3D data: 2D augmentation (albumentations) runs on the CPU")
        self.spec: DatasetSpec = load_dataset(root)
        self.patch_size = list(patch_size or ([96, 96] if spatial_dims == 2 else [64, 64, 32]))
        if len(self.patch_size) != spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} needs {spatial_dims} values")
        prep = Preprocessing.from_dict(preprocessing)
        if self.task == CLASSIFICATION and prep.resize is None:
            prep.resize = list(self.patch_size)
        if self.task == ENHANCEMENT and augmentation:
            raise ConfigError(f"{self.spec.source}: an enhancement dataset trains without augmentation for now "
                              f"(the config asks for {sorted(augmentation)}); set data.augmentation: null")
        self.preprocessing = prep
        if augmentation and "rotate90" in augmentation:
            square = self.patch_size if self.is_segmentation else prep.resize
            if square[0] != square[1]:
                raise ValueError(
                    f"augmentation rotate90 turns axes 0 and 1 and needs them equal, got patch/resize size {square}"
                )
        self.train_cases, self.val_cases = split_cases(self.spec.training, val_fraction, val_cases, self.seed)
        self._datasets: dict[str, Any] = {}
        self._totals: dict[str, int] = {}
        self._device_augmentation: tuple[mt.Compose, Any] | None = None  # (transform, its one generator)
        self._checked = False

    # Values the model needs, linked in the CLI (stated once, in the data config).
    @property
    def is_segmentation(self) -> bool:
        """Whether training takes random patches and validation whole images (every task but classification)."""
        return self.spec.task != CLASSIFICATION

    @property
    def spatial_dims(self) -> int:
        return self.hparams.spatial_dims

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def num_classes(self) -> int:
        """Output channels: the classes (background included), or one per region."""
        return len(self.spec.regions) if self.spec.regions else self.spec.num_classes

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def label_names(self) -> list[str]:
        """One name per output channel: class names, or region names."""
        return [name for name, _ in self.spec.regions] if self.spec.regions else self.spec.label_names

    @property
    def regions(self) -> list[list[int]] | None:
        """Region-based datasets: the label values of each region (one output channel each)."""
        return [list(values) for _, values in self.spec.regions] if self.spec.regions else None

    @property
    def region_order(self) -> list[int] | None:
        return list(self.spec.region_order) if self.spec.region_order else None

    @property
    def class_names(self) -> list[str] | None:
        """Multitask datasets: the image-level class names (the classification head's outputs)."""
        return self.spec.class_names

    @property
    def has_labels(self) -> bool:
        """Whether every case has a label map (enhancement: the label-conditioned generator needs them)."""
        return all(isinstance(case["label"], str) for case in self.spec.training)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the case dicts holding images (an enhancement dataset's label maps when all have one)."""
        return keys_for(self.task, with_label=self.task == ENHANCEMENT and self.has_labels)

    @property
    def roi_size(self) -> list[int]:
        """Sliding-window roi (segmentation) or network input size (classification)."""
        return list(self.patch_size) if self.is_segmentation else list(self.preprocessing.resize)

    @property
    def preprocessing_spec(self) -> dict[str, Any]:
        return self.preprocessing.to_dict()

    def transforms(self, train: bool) -> mt.Compose:
        """The transform chain of training (random patches + augmentation) or evaluation (whole images)."""
        dims = self.hparams.spatial_dims
        chain = preprocess_transforms(self.preprocessing, self.task, dims, self.keys)
        if train:
            if self.task == ENHANCEMENT:
                chain += paired_patch_transforms(self.keys, self.patch_size, self.hparams.samples_per_volume)
            elif self.is_segmentation:
                chain += patch_sampling_transforms(
                    self.patch_size, self.hparams.pos_fraction, self.hparams.samples_per_volume
                )
            if not self.hparams.augment_on_device:
                chain += augmentation_transforms(self.hparams.augmentation, self.task, dims, self.seed)
        # Batches carry plain tensors: per-case metadata (affines, file names) differs between cases and the
        # training loop does not need it; prediction keeps it (medseg.inference.native).
        chain.append(mt.EnsureTyped(keys=self.keys, track_meta=False))
        return mt.Compose(chain)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``augment_on_device``, augment training batches where they now lie (Lightning hook)."""
        trainer = self.trainer
        if self.hparams.augment_on_device and trainer is not None and trainer.training:
            return self.augment_batch(batch, trainer.current_epoch)
        return batch

    def augment_batch(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The augmentation of the config applied to each case of a collated batch, on the batch's device.

        Args:
            batch: ``image`` ``(B, C, *spatial)``, ``label`` ``(B, 1, *spatial)`` (segmentation), ``id`` (B,).
            epoch: the training epoch, part of each case's seed.
        """
        if self._device_augmentation is None:
            spec, dims = self.hparams.augmentation, self.spatial_dims
            transform = mt.Compose(augmentation_transforms(spec, self.task, dims, self.seed))
            self._device_augmentation = (transform, share_random_state(transform))
        transform, stream = self._device_augmentation
        return augment_collated(transform, stream, batch, self.keys, self.seed, epoch)

    def setup(self, stage: str | None = None) -> None:
        """Check the data once (before any training), then build this process's share of the datasets
        ``stage`` needs."""
        rank, world_size = self._rank_and_world_size()
        if world_size > 1:
            self._check_distributed_options()
        if not self._checked:
            # Each process reads its shard of the files; all of them then stop with the full report. Without
            # check_data, the headers are still checked: no file makes the loader allocate what it claims.
            assert_dataset_ok(self.spec.source, spatial_dims=self.spatial_dims, shard=(rank, world_size),
                              max_voxels=self.hparams.max_voxels, headers_only=not self.hparams.check_data)
            self._checked = True
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "fit", ("val",))
        for name in needed:
            if name in self._datasets:
                continue
            cases = self._cases(name)
            if world_size > len(cases) > 0:
                raise ValueError(
                    f"{self.spec.source}: the {name} split has {len(cases)} case(s) for {world_size} processes; "
                    "each process needs at least one (use fewer devices or more validation cases)"
                )
            self._totals[name] = len(cases)
            self._datasets[name] = self._dataset(shard(cases, rank, world_size), train=name == "train")

    def _check_distributed_options(self) -> None:
        """What DDP needs of the data: one split for every process, and every process validating."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A random seed_everything under torchrun/srun gives each process its own seed: take rank 0's split.
            val_ids = [[case["id"] for case in self.val_cases]]
            torch.distributed.broadcast_object_list(val_ids, src=0)
            self.train_cases, self.val_cases = split_cases(self.spec.training, 0.0, val_ids[0], self.seed)
        limit = self.trainer.limit_val_batches
        if isinstance(limit, float) and 0.0 < limit < 1.0:
            raise ConfigError(
                f"trainer.limit_val_batches={limit}: a fraction of each process's validation share can be no "
                "batch at all on some processes, which stalls DDP; give a number of batches instead"
            )

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _cases(self, name: str) -> list[dict[str, Any]]:
        if name != "test":
            return self.train_cases if name == "train" else self.val_cases
        labelled = [case for case in self.spec.test if case["label"] is not None]
        if not labelled:
            raise ValueError(
                f"{self.spec.source}: `test` needs a 'test' list with labels; use `validate` for the validation split"
            )
        return labelled

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: which cases trained and validated, and the channel and label order."""
        return {
            "train_ids": [c["id"] for c in self.train_cases],
            "val_ids": [c["id"] for c in self.val_cases],
            "channel_names": list(self.spec.channel_names),
            "label_names": self.label_names,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume on data whose classes, channels or validation cases differ from the checkpoint's."""
        for key in ("channel_names", "label_names", "val_ids"):
            if key in state_dict and list(state_dict[key]) != list(self.state_dict()[key]):
                raise ValueError(
                    f"{self.spec.source}: the checkpoint was trained with {key} {state_dict[key]}, "
                    f"this dataset has {self.state_dict()[key]}"
                )

    def _dataset(self, cases: list[dict[str, Any]], train: bool) -> md.Dataset:
        items = [self._item(case) for case in cases]
        transform = self.transforms(train)
        if self.hparams.cache == "memory":
            dataset = md.CacheDataset(items, transform, cache_rate=self.hparams.cache_rate, progress=False)
        elif self.hparams.cache == "disk":
            dataset = md.PersistentDataset(items, transform, cache_dir=self._disk_cache_dir(train))
        else:
            dataset = md.Dataset(items, transform)
        return EpochSeededDataset(dataset, [item["id"] for item in items], self.seed) if train else dataset

    def _disk_cache_dir(self, train: bool) -> Path:
        """A cache folder per preprocessing setting: PersistentDataset keys its files on the case dict only,
        so a run with other preprocessing must not find (and silently reuse) another run's tensors."""
        settings = {
            "task": self.task, "keys": self.keys, "dims": self.spatial_dims, "preprocessing": self.preprocessing_spec,
            "patch": self.patch_size if train else None,
        }
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return Path(self.hparams.cache_dir or self.spec.root / ".medseg_cache") / digest

    def _item(self, case: dict[str, Any]) -> dict[str, Any]:
        image = case["image"] if len(case["image"]) > 1 else case["image"][0]
        item = {"id": case["id"], "image": image, "label": case["label"]}
        if self.task == MULTITASK:
            item["class"] = case["class"]
        if self.task == ENHANCEMENT:
            item["target"] = case["target"]
            if not self.has_labels:
                del item["label"]
        return item

    def train_dataloader(self) -> DataLoader:
        dataset = self._datasets["train"]
        rank, world_size = self._rank_and_world_size()
        sampler = EpochSampler(len(dataset), self._totals["train"], world_size, rank, self.seed)
        if self.trainer is not None:
            # A resumed run creates its first iterator (and loader workers fetch from it) before Lightning calls
            # set_epoch, so the sampler must already know the epoch it resumes at.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return self._loader(dataset, self.hparams.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        """Whole images in a fixed order (one volume per batch for sliding-window segmentation), each case of
        this process's shard once."""
        dataset = self._datasets[name]
        rank, world_size = self._rank_and_world_size()
        batch_size = 1 if self.is_segmentation else self.hparams.batch_size
        return self._loader(dataset, batch_size, LocalSampler(len(dataset), world_size, rank))

    def _loader(self, dataset: Any, batch_size: int, sampler: Any) -> DataLoader:
        workers = self.hparams.num_workers
        options = {"batch_size": batch_size, "sampler": sampler, "num_workers": workers}
        if self.hparams.loader == "thread":
            return md.ThreadDataLoader(dataset, use_thread_workers=False, **options)
        return md.DataLoader(dataset, persistent_workers=workers > 0, **options)


def split_cases(
    cases: list[dict[str, Any]], val_fraction: float, val_ids: list[str] | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/validation split that never puts one patient on both sides.

    Args:
        cases: training case dicts (``id``, ``patient``).
        val_fraction: share of patients (cases without a patient id count as their own patient) held out.
        val_ids: explicit validation ids; overrides ``val_fraction``. Unknown ids raise ``ValueError``.
        seed: shuffling seed.
    """
    if val_ids is not None:
        known = {case["id"] for case in cases}
        missing = sorted(set(val_ids) - known)
        if missing:
            raise ValueError(f"val_cases not in the dataset: {missing}")
        chosen = set(val_ids)
        train = [c for c in cases if c["id"] not in chosen]
        val = [c for c in cases if c["id"] in chosen]
        shared = sorted({c["patient"] for c in val if c["patient"]} & {c["patient"] for c in train if c["patient"]})
        if shared:
            raise ValueError(f"val_cases split patient(s) {shared} between training and validation")
        return train, val
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in cases:
        groups[case["patient"] or f"case:{case['id']}"].append(case)
    patients = sorted(groups)
    random.Random(seed).shuffle(patients)
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * len(patients)))
    if n_val >= len(patients) and len(patients) > 1:
        n_val = len(patients) - 1
    val_patients = set(patients[:n_val])
    train = [c for c in cases if (c["patient"] or f"case:{c['id']}") not in val_patients]
    val = [c for c in cases if (c["patient"] or f"case:{c['id']}") in val_patients]
    return train, val
