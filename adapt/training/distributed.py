"""Data-parallel training with ``torchrun``: process group, sharding, reductions, DDP wrapping.

``torchrun --nproc-per-node N -m segadapt adapt ...`` (or ``train-source``; ``--nnodes`` with a rendezvous endpoint
for several machines) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment. :func:`session` joins the process group (NCCL on CUDA, gloo on CPU) and each
process trains on GPU ``LOCAL_RANK`` (:func:`local_device`). Without those variables (or with ``WORLD_SIZE=1``)
every function here is a no-op that returns its input: the command runs exactly as it does without torchrun.

What the training loops get from this module:

* the models that train (student, RGB-D stream, rectifier; the source model in ``train-source``) wrapped in
  DistributedDataParallel (:func:`wrap`; gradients averaged over the ranks during backward), identical on every rank
  at every step, so the EMA teacher, updated from them, is identical too;
* the data split between ranks: batch ``k`` of a run of N processes with per-rank batch ``b`` holds the frames of
  batch ``k`` of a one-process run with batch ``N * b`` (image folders; :mod:`~segadapt.adapt.data.sampling`), or
  each rank reads a disjoint range of a video's frames (:func:`shard_frames`);
* pseudo-label statistics pooled over ranks (:func:`pool_class_thresholds`, :func:`all_reduce_sum`) so that every
  rank labels with the same thresholds and class weights; AdaBN statistics pooled over every rank's frames
  (:func:`pool_batchnorm`); logged losses averaged over ranks (:func:`mean_over_ranks`);
* checkpoints, logs and progress bars from rank 0 only (:func:`is_main`, :func:`main_only`, :func:`bar_kwargs`); the
  RNG state of every rank in the checkpoint (:func:`gather_object`, :func:`rank_rng`) so that ``--resume`` with the
  same number of processes continues exactly (:func:`check_world_size`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) as one of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in [0, world_size); 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` (this process's GPU on its machine); 0 when not set."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the process that writes checkpoints and logs."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process,
    an index given on the command line is ignored); anything else is returned unchanged."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """Join the torchrun process group for the duration of a command (nothing happens when not launched by torchrun
    or when a group is already active); on leaving, wait for every rank, then leave the group.

    Args:
        device: the command's ``--device`` (auto, cpu, cuda, cuda:N): NCCL for CUDA, gloo for the CPU.

    Raises:
        ValueError: CUDA requested by a launched process but not available, or fewer GPUs than ``LOCAL_RANK`` + 1.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) on this machine; "
                             "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        yield
        dist.barrier()  # rank 0 may still be writing its last checkpoint
    finally:
        dist.destroy_process_group()


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, a function that drops its message on the other ranks."""
    return log if is_main() else (lambda *_a, **_k: None)


def bar_kwargs() -> dict:
    """Extra tqdm arguments: ``disable=True`` on ranks other than 0, nothing otherwise (so that tqdm's own
    ``TQDM_*`` environment defaults still apply on rank 0)."""
    return {} if is_main() else {"disable": True}


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


# ---- reductions ----------------------------------------------------------------------------------------------------

def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks (a new tensor, same device and dtype; ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a float tensor ``t`` over the ranks (``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / world_size()


def mean_over_ranks(values: dict) -> dict:
    """The float values of a flat dict averaged over ranks (other values, and the keys, from this rank). Every rank
    must call it with the same keys in the same order (no-op when not distributed)."""
    if not is_distributed():
        return values
    keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not keys:
        return values
    mean = all_reduce_mean(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {**values, **{k: float(v) for k, v in zip(keys, mean)}}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank (e.g. a stopping decision taken from rank 0's signals)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def broadcast_float(x: float) -> float:
    """Rank 0's value of ``x`` on every rank (e.g. elapsed time, so that all ranks stop at the same step)."""
    if not is_distributed():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return float(t.item())


def pool_class_thresholds(thresholds: torch.Tensor, counts: torch.Tensor) -> tuple:
    """Combine the per-class confidence thresholds of each rank's batch into one set, the same on every rank.

    Each class's threshold becomes the mean of the ranks' thresholds weighted by how many pixels each rank predicted
    as that class [our design: the exact quantile over all ranks' pixels would need every rank's confidences]; a
    class no rank predicted keeps this rank's threshold (the cap, the same everywhere).

    Args:
        thresholds: (K,) float thresholds of this rank's batch.
        counts: (K,) int or float pixel counts per predicted class of this rank's batch.

    Returns:
        ((K,) pooled thresholds, dtype and device of ``thresholds``; (K,) counts summed over ranks, float64 when
        distributed). Unchanged inputs when not distributed.
    """
    if not is_distributed():
        return thresholds, counts
    c = counts.to(torch.float64)
    buf = all_reduce_sum(torch.stack([thresholds.to(torch.float64) * c, c]))
    total = buf[1]
    pooled = torch.where(total > 0, buf[0] / total.clamp_min(1.0), thresholds.to(torch.float64))
    return pooled.to(thresholds.dtype), total


def pool_batchnorm(model: nn.Module) -> int:
    """Pool the BatchNorm running statistics that :func:`~segadapt.adapt.adabn.adapt_batchnorm` estimated on each
    rank's frames into the statistics over every rank's frames, the same on every rank (layers it left alone,
    ``adabn_layers`` < 1, hold the same source statistics on every rank and pool to themselves).

    Each rank's ``running_mean``/``running_var`` is the average over its ``num_batches_tracked`` batches; the
    pooled value is the batch-count-weighted mean (= the average over all ranks' batches, what one process holding
    all the batches computes; a rank with no batch contributes nothing).

    Returns:
        number of BatchNorm layers pooled (0 when not distributed).
    """
    if not is_distributed():
        return 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        n = m.num_batches_tracked.to(torch.float64)
        stats = torch.cat([m.running_mean.double() * n, m.running_var.double() * n, n.reshape(1)])
        total = all_reduce_sum(stats)
        c, nt = m.running_mean.numel(), total[-1]
        if nt > 0:
            m.running_mean.copy_(total[:c] / nt)
            m.running_var.copy_(total[c:2 * c] / nt)
            m.num_batches_tracked.fill_(int(nt))
    return len(bns)


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; None when not distributed."""
    if not is_distributed():
        return None
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- sharding -----------------------------------------------------------------------------------------------------

def shard_batches(ds: Dataset, batch_size: int) -> Dataset:
    """This rank's share of ``ds`` read in order in batches of ``batch_size``: whole batches, batch ``j`` to rank
    ``j % world_size``, so the samples of every batch stay together (AdaBN averages per batch: pooling the ranks'
    averages, :func:`pool_batchnorm`, gives what one process reading all the batches gets). ``ds`` itself when not
    distributed or when ``ds`` is already sharded (``world_size`` attribute > 1)."""
    if not is_distributed() or getattr(ds, "world_size", 1) > 1:
        return ds
    r, w, n = rank(), world_size(), len(ds)
    idx = [i for j, s in enumerate(range(0, n, batch_size)) if j % w == r for i in range(s, min(n, s + batch_size))]
    return Subset(ds, idx)


def shard_range(n: int) -> range:
    """This rank's contiguous range of ``n`` frames (rank r: ``[r * n // W, (r + 1) * n // W)``); all when not
    distributed.

    Raises:
        ValueError: fewer frames than processes.
    """
    r, w = rank(), world_size()
    if n < w:
        raise ValueError(f"{n} target frames for {w} processes; use fewer processes or more frames")
    return range(r * n // w, (r + 1) * n // w)


def shard_frames(ds: Dataset) -> Dataset:
    """This rank's disjoint, contiguous range of a video dataset's frames (:func:`shard_range`); a dataset that is
    already sharded (``world_size`` attribute > 1, e.g. built with ``rank``/``world_size``) or a run that is not
    distributed get ``ds`` itself."""
    if not is_distributed() or getattr(ds, "world_size", 1) > 1:
        return ds
    return Subset(ds, shard_range(len(ds)))


def rank_seed(seed: int) -> int:
    """A seed of this rank's own derived from the run's ``seed`` (``seed`` itself on rank 0)."""
    return seed if rank() == 0 else int(np.random.SeedSequence([seed, rank(), 0xD15]).generate_state(1)[0])


def rank_rng(seed: int, state: dict | None, set_rng_state: Callable[[dict], None]) -> None:
    """Give each rank its own random stream for the loop's draws (photometric augmentation, ClassMix, dropout),
    after the models are built (with the same seed everywhere) and before the first step.

    Args:
        seed: the run's seed; a fresh run reseeds ranks > 0 from :func:`rank_seed` (rank 0 keeps its stream).
        state: the training state being resumed (None when fresh): each rank restores its own saved RNG state
            (``rng_ranks``, written by :func:`gather_object` of every rank's state).
        set_rng_state: :func:`~segadapt.adapt.training.train_utils.set_rng_state`.
    """
    if not is_distributed():
        return
    if state is not None and "rng_ranks" in state:
        set_rng_state(state["rng_ranks"][rank()])
    elif state is None and rank() > 0:
        s = rank_seed(seed)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        torch.manual_seed(s)


def check_world_size(state: dict, where: str) -> None:
    """Refuse to resume a training state written by a run with a different number of processes.

    Raises:
        ValueError: one line naming ``where`` and both numbers.
    """
    saved, now = int(state.get("world_size", 1)), world_size()
    if saved != now:
        raise ValueError(f"{where}: written by a run of {saved} process(es), this run has {now}; resume it with the "
                         f"same number of processes (torchrun --nnodes x --nproc-per-node = {saved})")


# ---- DistributedDataParallel ----------------------------------------------------------------------------------------

class _Dispatch(nn.Module):
    """Runs ``model(...)`` or another of its methods (``_method``) as its forward, so that DDP syncs the gradients
    of e.g. ``forward_features`` too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, _method: str = "forward", **kwargs):
        fn = self.model if _method == "forward" else getattr(self.model, _method)
        return fn(*args, **kwargs)


class DistributedModel(DistributedDataParallel):
    """DistributedDataParallel that still looks like the model it wraps: ``m(x)`` and ``m.forward_features(x)`` run
    through DDP (gradients averaged over ranks in backward); other attributes and methods (``param_groups``,
    ``feature_channels``...) are the wrapped model's. ``state_dict`` is DDP's (prefixed keys): save
    :func:`unwrap` ``(m)``."""

    def __init__(self, model: nn.Module, device: torch.device, static_graph: bool = True,
                 broadcast_buffers: bool = True):
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        super().__init__(_Dispatch(model), device_ids=ids, static_graph=static_graph,
                         broadcast_buffers=broadcast_buffers)

    def forward_features(self, *args, **kwargs):
        return self(*args, _method="forward_features", **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "_modules") or "_modules" not in self.__dict__:
                raise
            return getattr(self.module.model, name)


def unwrapped_params(optimizer: torch.optim.Optimizer, wrapped: Sequence) -> list[torch.Tensor]:
    """The trainable parameters of ``optimizer`` that no :class:`DistributedModel` in ``wrapped`` holds (their
    gradients need :func:`average_gradients`); [] when not distributed."""
    if not is_distributed():
        return []
    held = {id(p) for m in wrapped if isinstance(m, DistributedModel) for p in m.parameters()}
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in held]


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in place, after ``backward`` (what DDP does during
    backward for the models it wraps; here for trained parameters outside them, e.g. loss components' heads). A
    parameter without a gradient counts as a zero gradient; one without a gradient on every rank keeps None.
    No-op when not distributed."""
    if not is_distributed() or not params:
        return
    grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
             for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = all_reduce_sum(torch.cat(grads + [flags]))
    off, seen = 0, flat[-len(params):]
    for p, s in zip(params, seen):
        n = p.numel()
        if s > 0:
            p.grad = (flat[off:off + n] / world_size()).view_as(p).to(p.dtype)
        off += n


def wrap(model: nn.Module | None, device: torch.device, static_graph: bool = True,
         broadcast_buffers: bool = True, sync_batchnorm: bool = False):
    """``model`` in :class:`DistributedModel` when distributed (rank 0's weights and buffers are copied to every
    rank here), ``model`` itself otherwise (and for None).

    Args:
        static_graph: the same parameters take part in every step (DDP finds the unused ones, e.g. the final
            1x1 convolution of HF's MobileNetV2 that its segmentation head skips, in the first step, and no longer
            looks for them afterwards). False: every step's set must be all parameters.
        broadcast_buffers: copy rank 0's buffers (BatchNorm statistics) to every rank at each forward; unneeded
            when they are frozen and identical.
        sync_batchnorm: on CUDA, BatchNorm in training mode normalises with the statistics of all ranks' batches
            (``nn.SyncBatchNorm``; PyTorch supports it on GPUs only, so it is ignored on the CPU).
    """
    if model is None or not is_distributed():
        return model
    if sync_batchnorm and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedModel(model, device, static_graph, broadcast_buffers)


def unwrap(model):
    """The model inside a :class:`DistributedModel` (anything else is returned as it is)."""
    return model.module.model if isinstance(model, DistributedModel) else model


__all__ = [
    "DistributedModel",
    "all_reduce_mean",
    "all_reduce_sum",
    "average_gradients",
    "bar_kwargs",
    "barrier",
    "broadcast_float",
    "broadcast_object",
    "check_world_size",
    "gather_object",
    "is_distributed",
    "is_main",
    "launched",
    "local_device",
    "local_rank",
    "main_only",
    "mean_over_ranks",
    "pool_batchnorm",
    "pool_class_thresholds",
    "rank",
    "rank_rng",
    "rank_seed",
    "session",
    "shard_batches",
    "shard_frames",
    "shard_range",
    "unwrap",
    "unwrapped_params",
    "world_size",
    "wrap",
]
