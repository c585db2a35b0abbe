"""Data parallel inside one training run (``gpus: N``): one process per device, DDP.

Semantics (docs/training.md, "Data parallel"):
- ``batch_size`` is per process: the global batch is ``batch_size × N``. Every rank draws the same
  permutation of the epoch and trains on its own ``rank::N`` shard of it
  (:class:`~snunet_cbam.data.dataset.EpochShuffleSampler`), so step k of N processes trains on
  the very batch one process with ``batch_size × N`` trains on at step k. ``lr`` is used as given,
  for that global batch: it is never scaled by N.
- BatchNorm statistics and the batch-wide Dice sums are taken over the global batch (SyncBatchNorm
  on CUDA, :class:`CpuSyncBatchNorm` with gloo), and DDP averages the gradients: N processes
  compute, up to float rounding, the single-process step of the global batch.
- The step loss and confusion counts are all-reduced every step, so every rank holds the global
  figures (and a checkpoint's epoch tally is the global one).
- Rank 0 alone evaluates (whole images, exactly the single-process figures for the same weights),
  writes checkpoints and ``metrics.json`` and calls the hooks; the others get the evaluation's
  result by broadcast and have no hooks. Rank 0 decides whether to stop (cancel token, time limit)
  before every step and broadcasts that decision, so all ranks stop at the same step.

Two ways in: ``Trainer.fit`` with ``gpus: N`` spawns ranks 1..N-1 (``torch.multiprocessing``,
start method spawn) and is rank 0 itself, so the caller's hooks and cancel token stay in its
process; or the processes were started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
set), and each joins that group (``env://``). Spawned ranks join the same way, through those
variables.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .runtime import seed_everything, usable_cpu_count
from .scoring import EvaluationStopped

if TYPE_CHECKING:
    from schemas.training import TrainConfig

    from .step import TrainStep

T = TypeVar("T")

# A collective of the training loop waits at most this long for a missing rank (a crashed or hung
# process ends the run with an error instead of hanging).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# Ranks other than 0 wait this long for rank 0's evaluation (validation or test of a large split,
# with flips, may take long), on a separate gloo group.
EVALUATION_TIMEOUT = datetime.timedelta(hours=4)
# How long rank 0 waits for the spawned ranks to exit once training is over.
CHILD_EXIT_TIMEOUT_S = 120.0

# Broadcast as an integer: the index in this tuple (RunStatus values that stop a run).
_STOP_CODES: tuple[str | None, ...] = (None, "cancelled", "time_limit")


class DeviceUnavailableError(RuntimeError):
    """The run asks for more devices (``gpus``) than this machine has: refused before it starts."""


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel run failed."""


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when this process was started by torchrun (or spawned
    by :func:`start_session`), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def resolve_device_type(device: str, gpus: int, local_devices: int | None = None) -> str:
    """The device type of a run of ``gpus`` processes: ``cpu`` (backend gloo) or ``cuda`` (nccl).

    ``device: cpu`` runs ``gpus`` CPU processes. ``auto`` and ``cuda`` need that many CUDA devices
    on this machine (``local_devices`` of them when torchrun starts fewer processes per machine):
    asking for more is refused here, with the counts, before any process starts."""
    if device == "cpu":
        return "cpu"
    needed = gpus if local_devices is None else local_devices
    if device in ("auto", "cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count >= needed:
            return "cuda"
        hint = f"; set device: cpu to train {gpus} CPU processes" if count == 0 else \
            f"; set gpus to at most {count}, or run the job on a worker with {needed} GPUs"
        raise DeviceUnavailableError(
            f"gpus: {gpus} asks for {needed} CUDA device(s) on this machine, but it has {count}{hint}")
    raise DeviceUnavailableError(f"gpus: {gpus} needs device auto, cuda or cpu, not '{device}'")


class _GlobalSum(torch.autograd.Function):
    """All-reduce (sum) with a gradient: the gradient of the summed value is itself summed over
    the ranks, so each rank's inputs get the gradient of every rank's loss (DDP then averages)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every rank, with gradients flowing back to each rank's part."""
    return _GlobalSum.apply(tensor)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, for CPU processes
    (torch's SyncBatchNorm takes GPU tensors only). The same state as BatchNorm2d; in eval mode,
    or outside a process group, it is BatchNorm2d. Sums are taken in float64 (CPU only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        channels = x.shape[1]
        xd = x.double()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64)
        stats = global_sum(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels:2 * channels] / n - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xd - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


class Session:
    """This process's place in a training run: rank 0 of 1 (every method a no-op), or one rank
    of a data-parallel group."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None, *,
                 control: Any = None, owns_group: bool = False, children: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device  # None: the trainer selects it from the config (one process)
        self.control = control  # a gloo group for stop decisions and evaluation results
        self.owns_group = owns_group
        self.children = children  # the ProcessContext of the ranks this process spawned
        self._threads: int | None = None  # the thread count to restore at close (CPU ranks)
        self._excepthook: Any = None  # init_process_group replaces it; restored at close

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the model and the step ----------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """BatchNorm over the global batch (before the optimiser and DDP see the model)."""
        if not self.distributed:
            return model
        if self.device is not None and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for module in model.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = CpuSyncBatchNorm  # the same state: only forward differs
        return model

    def wrap_step(self, step: "TrainStep") -> None:
        """DDP around the step's model (compiled after wrapping, when the step compiles), and
        the Dice sums over the global batch."""
        if not self.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        ddp = DistributedDataParallel(step.model, device_ids=device_ids)
        step.forward = torch.compile(ddp) if step.compiled else ddp
        # A copy: evaluation on rank 0 alone uses the trainer's loss, which must not reduce.
        loss_fn = copy.copy(step.loss_fn)
        loss_fn.batch_sum = global_sum
        step.loss_fn = loss_fn

    def reduce_step(self, loss: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global step figures: the loss averaged over the ranks (each the mean over an equal
        share of the batch) and the confusion counts summed. Stays on the device (no host sync)."""
        if not self.distributed:
            return loss, counts
        packed = torch.cat([loss.detach().double().reshape(1), counts.double()])  # counts < 2**53: exact
        dist.all_reduce(packed)
        return (packed[0] / self.world_size).to(loss.dtype), packed[1:].to(torch.int64)

    # --- decisions of rank 0 -------------------------------------------------------------------
    def broadcast_stop(self, reason: str | None) -> str | None:
        """Rank 0's stop decision on every rank (a small broadcast on the CPU gloo group: no
        device sync)."""
        if not self.distributed:
            return reason
        code = torch.tensor([_STOP_CODES.index(reason) if self.is_main else 0], dtype=torch.int64)
        dist.broadcast(code, src=0, group=self.control)
        return _STOP_CODES[int(code)]

    def on_main(self, fn: Callable[[], T], stop: Any) -> T:
        """``fn()`` on rank 0 alone, its result on every rank. ``EvaluationStopped`` on rank 0 is
        raised on every rank, with rank 0's stop reason adopted (``stop.agreed``); any other
        error on rank 0 raises :class:`RankFailedError` on the others."""
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                value = fn()
            except EvaluationStopped:
                self._send(("stopped", stop.reason()))
                raise
            except BaseException as exc:
                self._send(("error", f"{type(exc).__name__}: {exc}"))
                raise
            self._send(("ok", value))
            return value
        kind, value = self._receive()
        if kind == "ok":
            return value
        if kind == "stopped":
            stop.agreed = value or "cancelled"
            raise EvaluationStopped(f"rank 0 stopped its evaluation ({stop.agreed})")
        raise RankFailedError(f"rank 0 failed: {value}")

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.control)

    def _receive(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def seed_rank(self, seed: int, global_step: int) -> None:
        """Distinct global RNG streams on ranks other than 0 (rank 0 keeps the single-process
        stream, which its checkpoints record). Augmentation needs none of this: each sample's
        randomness is a function of (seed, epoch, index), so it is the same whichever rank draws it."""
        if self.rank > 0:
            seed_everything(seed + 1_000_003 * self.rank + global_step)

    # --- the end -------------------------------------------------------------------------------
    def close(self, ok: bool) -> None:
        """Leave the group; rank 0 waits for the ranks it spawned (or ends them when it failed)
        and raises if one of them failed while rank 0 did not."""
        failure = None
        if self.children is not None:
            failure = _reap(self.children, wait=ok)
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        elif self.control is not None and dist.is_initialized():
            dist.destroy_process_group(self.control)  # the caller's group stays; ours goes
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        if self._excepthook is not None:
            sys.excepthook = self._excepthook
        if failure and ok:
            raise RankFailedError(failure)


def _reap(children: Any, wait: bool) -> str | None:
    """Join the spawned ranks (terminate them at once when ``wait`` is false); the first
    failure's message, if any."""
    deadline = time.monotonic() + (CHILD_EXIT_TIMEOUT_S if wait else 0.0)
    try:
        while not children.join(timeout=1.0):
            if time.monotonic() > deadline:
                break
    except Exception as exc:  # noqa: BLE001 - a rank raised: its traceback is the message
        return f"a spawned rank failed: {exc}"
    finally:
        for process in children.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return None


def start_session(config: "TrainConfig", child_args: tuple, resume: bool) -> Session:
    """This process's session for a run of ``config``: a single process (``gpus: 1``), a rank of
    torchrun's group, or rank 0 of ``gpus`` processes, spawning the other ranks. ``child_args``
    build the Trainer of a spawned rank (config, data root, output directory, keyword
    arguments). The device check comes first: a run that asks for more devices than the machine
    has is refused before anything starts."""
    env = torchrun_env()
    gpus = config.gpus
    if env is not None and env[1] > 1:
        rank, world, local_rank = env
        if world != gpus:
            raise ValueError(f"this process is one of {world} (WORLD_SIZE), but the config says gpus: {gpus}; "
                             f"set gpus: {world}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device_type = resolve_device_type(config.device, gpus, local_devices=local)
        return _join(rank, world, local_rank, device_type, init_method="env://", store=None)
    if gpus == 1:
        return Session()
    device_type = resolve_device_type(config.device, gpus)
    if dist.is_initialized():
        # The group is per process: a second data-parallel run beside the first would join it.
        raise RuntimeError("this process already runs a data-parallel training run; run one at a time "
                           "(the worker with --max-jobs 1)")
    # Port 0: the store picks a free port itself (no race with another run on this machine).
    store = dist.TCPStore("127.0.0.1", 0, gpus, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    import torch.multiprocessing as mp

    children = mp.start_processes(_spawned_rank, args=(gpus, store.port, child_args, resume), nprocs=gpus - 1,
                                  join=False, start_method="spawn")
    try:
        session = _join(0, gpus, 0, device_type, init_method=None, store=dist.PrefixStore("default_pg", store))
    except BaseException:
        _reap(children, wait=False)
        raise
    session.children = children
    return session


def _join(rank: int, world: int, local_rank: int, device_type: str, *, init_method: str | None,
          store: Any) -> Session:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns = not dist.is_initialized()  # a caller's group (torchrun script) is used, not replaced
    excepthook = sys.excepthook
    if owns:
        dist.init_process_group(backend, init_method=init_method, store=store, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=EVALUATION_TIMEOUT)
    session = Session(rank, world, device, control=control, owns_group=owns)
    session._excepthook = excepthook
    if device_type == "cpu":
        # N CPU processes share the cores: each its share, not all of them (oversubscription).
        session._threads = torch.get_num_threads()
        torch.set_num_threads(max(1, usable_cpu_count() // world))
    return session


def _spawned_rank(index: int, world: int, port: int, child_args: tuple, resume: bool) -> None:
    """Rank ``index + 1`` of a run rank 0 spawned: joins through torchrun's variables, trains
    with no hooks and no cancel token (rank 0 decides when to stop), writes nothing."""
    from .trainer import Trainer

    rank = index + 1
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config, data_root, out_dir, kwargs = child_args
    Trainer(config, data_root, out_dir, **kwargs).fit(resume=resume)


__all__ = ["CpuSyncBatchNorm", "DeviceUnavailableError", "RankFailedError", "Session", "resolve_device_type",
           "start_session", "torchrun_env"]
