"""Rare-class sampling of labelled source frames (RCS of DAFormer: Hoyer, Dai and Van Gool, "DAFormer: Improving
Network Architectures and Training Strategies for Domain-Adaptive Semantic Segmentation", CVPR 2022, sec. 3.3).

Classes that cover few pixels of the source labels are seen in few frames, and a model trained on uniformly drawn
frames learns them late or not at all. Rare-class sampling draws every training frame in two steps:

1. a class ``c`` with probability ``P(c) = softmax((1 - f_c) / T)`` over the classes, where ``f_c`` is the share of
   the labelled source pixels (the ignore index excluded) that belong to ``c`` and ``T`` the temperature
   (DAFormer: 0.01; a smaller ``T`` favours rare classes more);
2. uniformly one frame whose label holds at least ``min_pixels`` pixels of ``c`` (counted in the label file at its
   own resolution; DAFormer: 3000 pixels of a 1914x1052 GTA frame). Classes without such a frame are left out of
   the softmax.

The random crop then has to show ``c``: the geometric augmentation (resize, random scale, crop, flip) is tried up to
``crop_tries`` times on the loaded frame and the first result whose label holds a pixel of ``c`` is kept (else the
last one), as DAFormer retries its random crop (up to 10 times) until the class is in it.

The pixel counts per frame and class (:class:`ClassStats`) are computed once from the label files and stored in
the run folder as ``class_stats.json`` (:func:`run_class_stats`); a resumed run reads them back, so that it samples
with the probabilities of the uninterrupted run. The draws of batch ``k`` come from a generator seeded with
``(seed, k)`` (:class:`RareClassBatchSampler`), and each frame's augmentation from ``(seed, draw, frame, class)``
(:class:`~segadapt.adapt.data.sampling.SeededSamples`): batch ``k`` is a function of ``(seed, k)`` and the stored
counts, so the steps done are the sampler's whole state and ``--resume`` continues the stream exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from segadapt.adapt.data.datasets import LabeledImageFolder, read_label
from segadapt.adapt.data.sampling import _mix, resumable_loader
from segadapt.runtime.files import write_json

__all__ = ["STATS_FILE", "ClassCrops", "ClassStats", "RareClassBatchSampler", "compute_class_stats",
           "rare_class_loader", "rare_class_probabilities", "rarest_classes", "run_class_stats"]

STATS_FILE = "class_stats.json"
_TAG = 0x2C5  # the rare-class draws' own stream, apart from the uniform sampler's permutations


@dataclass
class ClassStats:
    """Pixel counts of the source labels.

    Attributes:
        names: the K class names, in class-id order.
        frames: the N label file names (``<name>.png``), in dataset order.
        counts: (N, K) int64 >= 0: pixels of class c in frame i at the label file's resolution (ignore excluded).
    """

    names: List[str]
    frames: List[str]
    counts: np.ndarray

    def frequencies(self) -> np.ndarray:
        """(K,) float64 in [0, 1], summing to 1: each class's share of all labelled pixels (f_c).

        Raises:
            ValueError: no labelled pixel at all.
        """
        total = self.counts.sum(0).astype(np.float64)
        if total.sum() <= 0:
            raise ValueError("the source labels hold no labelled pixel (every pixel is the ignore index)")
        return total / total.sum()

    def to_json(self) -> dict:
        return {"classes": list(self.names), "frequency": [round(float(f), 8) for f in self.frequencies()],
                "frames": list(self.frames), "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "") -> "ClassStats":
        """Read :meth:`to_json`'s dict.

        Raises:
            ValueError: a missing key or counts of the wrong shape (the message names ``path``).
        """
        try:
            counts = np.asarray(obj["counts"], dtype=np.int64).reshape(len(obj["frames"]), len(obj["classes"]))
            return cls(list(obj["classes"]), list(obj["frames"]), counts)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a class statistics file ({type(e).__name__}: {e}); delete it to "
                             "recompute it") from None


def compute_class_stats(label_paths: Sequence[str | Path], names: Sequence[str], ignore_index: int) -> ClassStats:
    """Count the pixels of every class in every label file (one pass, full resolution).

    Args:
        label_paths: N single-channel label PNGs (class ids in [0, K) or ``ignore_index``).
        names: the K class names.

    Returns:
        :class:`ClassStats` with (N, K) int64 counts.

    Raises:
        ValueError: a file that cannot be read or holds other values (one line naming the file), or no files.
    """
    if not label_paths:
        raise ValueError("no label files to count class pixels in")
    k = len(names)
    counts = np.zeros((len(label_paths), k), np.int64)
    for i, p in enumerate(label_paths):
        lab = read_label(p, k, ignore_index)
        counts[i] = np.bincount(lab[lab != ignore_index].ravel(), minlength=k)[:k]
    return ClassStats(list(names), [Path(p).name for p in label_paths], counts)


def run_class_stats(out: str | Path, dataset: LabeledImageFolder, resume: bool,
                    log: Callable[[str], None] = print) -> ClassStats:
    """The class statistics of ``dataset``'s labels for a run in folder ``out``: read from ``<out>/class_stats.json``
    when resuming and the file is there, else computed (:func:`compute_class_stats`) and written there atomically.

    Raises:
        ValueError: an unreadable label file, or a stored file made for other frames or classes (named).
    """
    path = Path(out) / STATS_FILE
    names = list(dataset.classes.names)
    if resume and path.is_file():
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read ({e}); delete it to recompute it") from None
        stats = ClassStats.from_json(obj, path)
        if stats.names != names or stats.frames != [p.name for p in dataset.labels]:
            raise ValueError(f"{path}: made for other label files or classes than {dataset.root}; delete it to "
                             "recompute it")
        return stats
    stats = compute_class_stats(dataset.labels, names, dataset.classes.ignore_index)
    write_json(path, stats.to_json(), what="class statistics")
    log(f"class pixel frequencies of {len(stats.frames)} label files -> {path}")
    return stats


def rare_class_probabilities(stats: ClassStats, temperature: float, min_pixels: int
                             ) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """DAFormer's class distribution ``softmax((1 - f_c) / T)`` and the frames each class is drawn from.

    Args:
        stats: the source label counts.
        temperature: T > 0.
        min_pixels: a frame is drawn for class c only with at least ``max(1, min_pixels)`` pixels of c.

    Returns:
        (classes (M,) int64 class ids that have such a frame, probabilities (M,) float64 summing to 1, per class an
        int64 array of the frame indices holding it).

    Raises:
        ValueError: T <= 0, or no class has a frame with ``min_pixels`` pixels.
    """
    if not temperature > 0:
        raise ValueError(f"rare-class sampling: the temperature must be > 0, got {temperature}")
    f = stats.frequencies()
    enough = stats.counts >= max(1, int(min_pixels))  # (N, K)
    classes = np.flatnonzero(enough.any(0))
    if classes.size == 0:
        raise ValueError(f"rare-class sampling: no class has a frame with {min_pixels} pixels or more; lower the "
                         "minimum pixel count")
    z = (1.0 - f[classes]) / temperature
    p = np.exp(z - z.max())
    return classes.astype(np.int64), p / p.sum(), [np.flatnonzero(enough[:, c]) for c in classes]


def rarest_classes(freq: Sequence[float], names: Sequence[str], n: int = 4) -> List[Tuple[str, float]]:
    """The ``n`` classes with the smallest pixel share ``freq`` (K,), rarest first, as (name, share in [0, 1])."""
    order = sorted(range(len(names)), key=lambda c: (freq[c], c))[:n]
    return [(names[c], float(freq[c])) for c in order]


class RareClassBatchSampler(Sampler[List[Tuple[int, int, int]]]):
    """An endless stream of batches of ``(draw, frame, class)`` keys drawn by rare-class sampling.

    Batch ``k`` holds ``batch_size * world_size`` draws from a NumPy generator seeded with ``(seed, k)``: class c
    with :func:`rare_class_probabilities`, then a frame uniformly among those holding c; ``draw`` = ``k * G + j``
    numbers them (G draws per batch). Data-parallel rank r takes draws ``r, r + W, ...`` of each batch, as
    :class:`~segadapt.adapt.data.sampling.SeededBatchSampler` does.

    Args:
        stats: the source label counts (N frames, K classes).
        batch_size: draws per batch (> 0), per rank.
        seed: the run's seed.
        temperature, min_pixels: see :func:`rare_class_probabilities`.
        start: index of the first batch to yield (the batches already consumed).
        rank, world_size: this process's share of a data-parallel run; 0, 1 = all.

    Raises:
        ValueError: as :func:`rare_class_probabilities`; ``batch_size`` < 1, ``start`` < 0 or a bad rank.
    """

    def __init__(self, stats: ClassStats, batch_size: int, seed: int, temperature: float, min_pixels: int,
                 start: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or start < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, start >= 0, 0 <= rank < world_size; got {batch_size}, {start}, "
                             f"{rank}, {world_size}")
        self.classes, self.probs, self.frames = rare_class_probabilities(stats, temperature, min_pixels)
        self.n, self.batch_size, self.seed, self.start = len(stats.frames), batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.temperature, self.min_pixels = temperature, min_pixels

    def position(self, k: int) -> Tuple[int, int]:
        """(0, k): the stream has no epochs."""
        return 0, k

    def describe(self) -> dict:
        """What the checkpoint's data state adds: the sampler and its parameters."""
        return {"sampler": "rare_class", "temperature": self.temperature, "min_pixels": self.min_pixels}

    def draws(self, k: int) -> List[Tuple[int, int, int]]:
        """All ``batch_size * world_size`` (draw, frame, class) keys of stream batch ``k`` (every rank's)."""
        g = self.batch_size * self.world_size
        rng = np.random.Generator(np.random.PCG64(_mix(self.seed, k, _TAG)))
        ci = rng.choice(len(self.classes), size=g, p=self.probs)
        u = rng.random(g)
        keys = []
        for j in range(g):
            frames = self.frames[ci[j]]
            keys.append((k * g + j, int(frames[min(int(u[j] * len(frames)), len(frames) - 1)]),
                         int(self.classes[ci[j]])))
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        k = self.start
        while True:
            yield self.draws(k)[self.rank::self.world_size]
            k += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2 ** 62


class ClassCrops(Dataset):
    """Items ``(frame, class)`` of a labelled dataset whose random crop shows ``class``.

    The frame is loaded once; its ``transform`` (the random geometric augmentation) is applied up to ``tries``
    times and the first result whose label holds a pixel of ``class`` is kept, else the last (DAFormer's crop
    retry). A plain int item is the dataset's own item.

    Args:
        dataset: :class:`~segadapt.adapt.data.datasets.LabeledImageFolder` (``load(i)`` -> Sample, ``transform``).
        tries: crops tried per item (>= 1).

    Items: as the dataset's (``image`` (3, H, W) uint8, ``label`` (H, W) int64, ``valid`` (H, W) bool, ``name``).
    """

    def __init__(self, dataset: LabeledImageFolder, tries: int = 10):
        if tries < 1:
            raise ValueError(f"crop tries must be >= 1, got {tries}")
        self.dataset, self.tries = dataset, int(tries)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> dict:
        if isinstance(item, (int, np.integer)):
            return self.dataset[int(item)]
        i, c = item
        s = self.dataset.load(int(i))
        t = self.dataset.transform
        if t is None:
            return s.to_tensors()
        for _ in range(self.tries):
            out = t(s)
            if (out.label == c).any():
                break
        return out.to_tensors()


def rare_class_loader(dataset: LabeledImageFolder, stats: ClassStats, batch_size: int, seed: int, start: int,
                      temperature: float, min_pixels: int, crop_tries: int, num_workers: int = 0,
                      collate_fn: Callable | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The endless, resumable stream of rare-class-sampled batches (:class:`RareClassBatchSampler` over
    :class:`ClassCrops`, loaded as :func:`~segadapt.adapt.data.sampling.resumable_loader` does).

    Args:
        dataset: the labelled training set with its geometric augmentation as ``transform``; ``stats`` its counts.
        batch_size, seed, start, num_workers, collate_fn, rank, world_size: as ``resumable_loader``.
        temperature, min_pixels: :func:`rare_class_probabilities`; crop_tries: :class:`ClassCrops`.

    Raises:
        ValueError: as :class:`RareClassBatchSampler`.
    """
    sampler = RareClassBatchSampler(stats, batch_size, seed, temperature, min_pixels, start, rank, world_size)
    return resumable_loader(ClassCrops(dataset, crop_tries), batch_size, seed, start=start, num_workers=num_workers,
                            collate_fn=collate_fn, rank=rank, world_size=world_size, batch_sampler=sampler)
