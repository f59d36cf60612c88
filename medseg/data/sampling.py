"""Which process sees which case, in which order, with which random augmentation.

Three rules make training reproducible whatever the number of processes, loader workers or restarts:

* Each process holds only its own shard of the cases (``shard``), so an in-memory cache is split across ranks
  instead of copied into each one, and validation sees every case exactly once (no padding by repetition).
* The training order of an epoch is drawn from ``(seed, epoch, rank)`` (:class:`EpochSampler`), so it does not
  depend on what ran before: a run resumed at an epoch boundary draws the same order as an uninterrupted one.
* The random augmentation of a case is seeded from ``(seed, epoch, case id)`` just before it is applied
  (:class:`EpochSeededDataset`), so it is the same in any loader worker, with or without resuming.

Both samplers subclass ``DistributedSampler`` only so that Lightning keeps them as they are instead of
wrapping the loader in a sampler of its own (which would shard the shard again and pad validation).
"""

from __future__ import annotations

import math
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset, DistributedSampler


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items process ``rank`` of ``world_size`` owns: every ``world_size``-th one, starting at ``rank``."""
    return list(items[rank::world_size])


def mixed_seed(*parts: int | str) -> int:
    """A 32-bit seed from several integers or strings (strings by CRC32, stable across processes)."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence([w % 2**63 for w in words]).generate_state(1)[0])


def reseed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler(DistributedSampler):
    """Training order of one process: a permutation of its local cases drawn from ``(seed, epoch, rank)``.

    Yields ``(epoch, index)`` pairs for :class:`EpochSeededDataset`. Every rank yields ``ceil(total /
    world_size)`` items (its shard, wrapped around when it is one case short), so ranks take the same number
    of steps, which DDP needs.

    Args:
        local_size: cases in this process's shard.
        total: cases over all processes.
        num_replicas: world size.
        rank: this process's global rank.
        seed: base seed.
    """

    def __init__(self, local_size: int, total: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(local_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if local_size < 1:
            raise ValueError(f"process {rank} of {num_replicas} has no training case ({total} in all)")
        self.local_size = local_size
        self.per_rank = math.ceil(total / num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order = np.random.default_rng(mixed_seed(self.seed, self.epoch, self.rank)).permutation(self.local_size)
        order = np.resize(order, self.per_rank)  # wraps around for the shard that is one case short
        return iter([(self.epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return self.per_rank


class LocalSampler(DistributedSampler):
    """Every local index once, in order: evaluation over this process's shard (no padding, no repeats)."""

    def __init__(self, local_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(local_size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.local_size = local_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.local_size))

    def __len__(self) -> int:
        return self.local_size


class EpochSeededDataset(Dataset):
    """Seeds the random transforms of ``dataset`` from ``(seed, epoch, case id)`` before each item.

    Args:
        dataset: a MONAI dataset whose ``transform`` is a ``Compose`` (random transforms included).
        ids: the case id of each item, in dataset order.
        seed: base seed.
    """

    def __init__(self, dataset: Any, ids: Sequence[str], seed: int) -> None:
        self.dataset = dataset
        self.ids = list(ids)
        self.seed = seed
        self.stream = share_random_state(dataset.transform)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.stream.seed(mixed_seed(self.seed, epoch, self.ids[index]))
        return self.dataset[index]

    def set_random_state(self, seed: int | None = None, state: Any = None) -> EpochSeededDataset:
        """Ignored: MONAI's loaders reseed datasets' transforms at start-up and in each worker; here each case
        is seeded just before it is transformed."""
        return self


def share_random_state(transform: Any) -> np.random.RandomState:
    """Make every random transform in ``transform`` (a MONAI ``Compose``) draw from one generator, returned.

    Reseeding that one generator in place before each case costs microseconds, where MONAI's
    ``set_random_state(seed)`` builds a new generator for every random transform (~0.1 ms each).
    """
    stream = np.random.RandomState(0)
    for step in transform.flatten().transforms:
        if isinstance(step, Randomizable):
            step.set_random_state(state=stream)
    return stream


def run_seed() -> int:
    """The run's seed: the one ``seed_everything`` (LightningCLI's ``seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
