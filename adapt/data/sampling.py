"""Seeded, checkpointable data order for the training loops (exact ``--resume``).

A training run reads an endless stream of batches. Batch ``k`` of the stream is a pure function of
``(seed, k)``: epoch ``e = k // B`` (``B`` batches per epoch) draws its permutation from a generator seeded with
``(seed, e)``, and batch ``k`` is slice ``k % B`` of it. Each sample's random augmentation is drawn from Python's,
NumPy's and torch's generators seeded with ``(seed, epoch, index)`` inside the worker that loads it
(:class:`SeededSamples`), so neither the number of DataLoader workers nor their prefetching changes what a batch
holds. A run that resumes at batch ``k`` therefore sees exactly the batches the uninterrupted run saw; the loops
store ``k`` (= the steps done, one batch per step) in the checkpoint's training state.

The stream never consumes the global RNGs of the main process: the loop's own random draws (photometric
augmentation, ClassMix, dropout) continue from the RNG state restored from the checkpoint.

Data-parallel runs (:mod:`segadapt.adapt.training.distributed`): with ``world_size`` W processes and per-rank batch
``b``, the stream is that of a one-process run with batch ``W * b`` and rank ``r`` takes samples ``r, r + W, ...`` of
each of its batches: the ranks read disjoint frames, and together exactly the frames (with the same augmentation)
of the one-process run.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Key = Tuple[int, int]  # (epoch, sample index)


def _mix(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (NumPy's SeedSequence: well spread, stable across versions)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededBatchSampler(Sampler[List[Key]]):
    """An endless stream of batches of ``(epoch, index)`` keys over ``n`` samples, reshuffled every epoch.

    Args:
        n: dataset length (> 0).
        batch_size: samples per batch (> 0), per rank.
        seed: the run's seed.
        start: index of the first batch to yield (the batches a resumed run has already consumed).
        drop_last: drop each epoch's last partial batch (always kept when the epoch holds no full batch).
        rank, world_size: data-parallel runs: this rank's share of the ``world_size * batch_size`` batches of the
            stream (module docstring); 0, 1 = the whole stream.

    Batches never straddle epochs. ``position(k)`` gives (epoch, batch in epoch) of stream batch ``k``.

    Raises:
        ValueError: ``n`` or ``batch_size`` < 1, ``start`` < 0, ``rank`` not in [0, ``world_size``), or ``n`` <
            ``world_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1):
        if n < 1 or batch_size < 1 or start < 0:
            raise ValueError(f"need n >= 1, batch_size >= 1, start >= 0; got {n}, {batch_size}, {start}")
        if not 0 <= rank < world_size or n < world_size:
            raise ValueError(f"need 0 <= rank < world_size <= n; got rank {rank}, world_size {world_size}, n {n}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        full = n // (batch_size * world_size)
        self.per_epoch = full if drop_last and full > 0 else -(-n // (batch_size * world_size))

    def position(self, k: int) -> Tuple[int, int]:
        """(epoch, batch within the epoch) of stream batch ``k``."""
        return divmod(k, self.per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """(n,) int64: the sample order of ``epoch``."""
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5A3D))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[List[Key]]:
        k = self.start
        epoch, b = self.position(k)
        while True:
            perm = self.permutation(epoch).tolist()
            g = self.batch_size * self.world_size
            while b < self.per_epoch:
                yield [(epoch, i) for i in perm[b * g:(b + 1) * g][self.rank::self.world_size]]
                b += 1
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2 ** 62


class SeededSamples(Dataset):
    """Wrap a map-style dataset so that item ``(epoch, index)`` is loaded with Python's ``random``, NumPy's and
    torch's CPU generators seeded from ``(seed, epoch, index)``; the generators' previous states are restored
    afterwards (with ``num_workers=0`` the loading runs in the main process, whose RNG stream must not move).
    A longer key of ints ``(draw, index, *extra)`` loads ``dataset[(index, *extra)]`` seeded from the whole key.

    Args:
        dataset: items ``dataset[index]`` (random transforms may use any of the three generators).
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, ...]):
        # (epoch, index) loads dataset[index]; a longer key (draw, index, extra...) loads dataset[(index, extra...)]
        # (e.g. the drawn class of rare-class sampling, :mod:`segadapt.adapt.data.rare_class`)
        item = key[1] if len(key) == 2 else tuple(key[1:])
        s = _mix(self.seed, *key)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            torch.default_generator.manual_seed(s)  # CPU only: the CUDA generators of the main process stay
            try:
                return self.dataset[item]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, start: int = 0, num_workers: int = 0,
                     collate_fn: Callable | None = None, pin_memory: bool = False, rank: int = 0,
                     world_size: int = 1, batch_sampler: Sampler | None = None) -> DataLoader:
    """An endless DataLoader whose batch ``k`` depends only on ``(seed, k)`` (see the module docstring).

    Args:
        dataset: map-style dataset (length > 0).
        batch_size: samples per batch; the last partial batch of an epoch is dropped when the dataset holds at
            least one full batch.
        seed: the run's seed.
        start: batches already consumed (a resumed run passes its step).
        num_workers: DataLoader worker processes (the batches do not depend on it).
        collate_fn: batch collation.
        rank, world_size: this process's share of a data-parallel run (module docstring); 0, 1 = all.
        batch_sampler: another endless stream of key batches whose batch ``k`` depends only on ``(seed, k)``, with
            :class:`SeededBatchSampler`'s ``position``, ``seed``, ``batch_size`` and ``n`` (e.g.
            :class:`~segadapt.adapt.data.rare_class.RareClassBatchSampler`, already at ``start``); None = the
            uniform :class:`SeededBatchSampler` (``batch_size``, ``start``, ``rank`` and ``world_size`` apply).

    Returns:
        a DataLoader to iterate once (``iter(loader)``); ``loader.batch_sampler`` is the
        :class:`SeededBatchSampler` (or ``batch_sampler``).
    """
    sampler = batch_sampler if batch_sampler is not None else SeededBatchSampler(
        len(dataset), batch_size, seed, start, drop_last=len(dataset) >= batch_size * world_size, rank=rank,
        world_size=world_size)
    # a private generator: the loader's base seed must not be drawn from (and move) the main process's torch RNG
    gen = torch.Generator().manual_seed(_mix(seed, 0xB5E))
    return DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, generator=gen, pin_memory=pin_memory)


def data_state(loader: DataLoader, consumed: int) -> dict:
    """What the checkpoint records of the data order after ``consumed`` batches: ``{"consumed", "epoch", "batch",
    "seed", "batch_size", "n"}`` (ints), plus what a sampler other than :class:`SeededBatchSampler` adds through
    its ``describe()`` (e.g. ``"sampler": "rare_class"``)."""
    s: SeededBatchSampler = loader.batch_sampler
    epoch, b = s.position(consumed)
    extra = s.describe() if hasattr(s, "describe") else {}
    return {"consumed": consumed, "epoch": epoch, "batch": b, "seed": s.seed, "batch_size": s.batch_size, "n": s.n,
            **extra}


__all__ = ["SeededBatchSampler", "SeededSamples", "resumable_loader", "data_state"]
