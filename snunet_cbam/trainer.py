"""The training engine: check the data, train with early stopping, checkpoint, report through hooks.

Everything a run depends on comes in through the constructor (a validated ``TrainConfig``, the data
directory, the output directory, hooks and a cancel token), so the CLI and the service drive the
same code. ``fit`` reads as the run: set up, restore, epochs, finish (threshold, test).

``last.pt`` is written at every epoch's end, inside an epoch every ``checkpoint_every_s`` seconds,
and whenever the run is stopped (cancel token, time limit); a resumed run repeats no step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from schemas.training import TrainConfig

from .checkpoint import build_model, eval_weights, load_checkpoint, save_checkpoint
from .data.augment import AugmentParams, PairedAugmentation
from .data.check import DEFAULT_MAX_IMAGE_PIXELS, DatasetReport, InvalidDatasetError, check_pairs
from .data.dataset import (
    EpochShuffleSampler,
    EvalPairDataset,
    PairLoader,
    TrainPairDataset,
    auto_crops_per_image,
    steps_per_epoch,
)
from .data.geotiff import ImageSpec
from .data.layouts import DatasetLayoutError
from .data.splits import run_splits
from .distributed import Session, start_session
from .ema import WeightEma
from .hooks import (
    CancelToken,
    CheckpointInfo,
    EpochInfo,
    HookList,
    RunStartInfo,
    RunStatus,
    StepInfo,
    TrainerHooks,
    TrainResult,
)
from .losses import HybridLoss
from .metrics import METRIC_NAMES, ChangeMetrics, confusion_counts
from .model import count_parameters
from .runtime import (
    Precision,
    capture_rng_state,
    resolve_num_workers,
    restore_rng_state,
    seed_everything,
    select_device,
    should_compile,
    use_channels_last,
)
from .schedules import ScheduleAnchor, build_scheduler
from .scoring import EvalSettings, EvaluationStopped, PanelCapture, evaluate_model
from .step import TrainStep
from .thresholds import ProbabilityHistogram, confusion_document, pr_curve_document

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.json"


class NonFiniteLossError(FloatingPointError):
    """Training diverged (NaN or inf loss): stopped at the next step report, not trained on."""


@dataclass
class CheckedSplits:
    reports: dict[str, DatasetReport]  # role (train/val/test) -> report

    def valid(self, role: str) -> list:
        return self.reports[role].valid if role in self.reports else []


def check_dataset(config: TrainConfig, data_root: Path | str, *,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> CheckedSplits:
    """Check every split the run will use; raise with the full report unless ``skip_invalid``
    (an image over ``max_image_pixels`` raises regardless: see data/check.py)."""
    data_root = Path(data_root)
    planned = run_splits(data_root, config)
    roles = {role: plan.split for role, plan in planned.items()}
    if planned["val"].split != config.val_split:
        log.info("the dataset has no split '%s': %d of the %s pairs are held out for validation (val_fraction %s)",
                 config.val_split, len(planned["val"].pairs), config.train_split, config.val_fraction)
    image_spec = ImageSpec.from_config(config)
    reports = {role: check_pairs(plan.pairs, plan.split, label_threshold=config.label_threshold,
                                 max_image_pixels=max_image_pixels, image_spec=image_spec)
               for role, plan in planned.items()}
    bad = [r for r in reports.values() if not r.ok]
    if bad and not config.skip_invalid:
        raise InvalidDatasetError(bad)
    for report in bad:
        log.warning("skipping invalid pairs (skip_invalid: true)\n%s", report.describe())
    for role in ("train", "val"):
        if not reports[role].valid:
            raise DatasetLayoutError(f"split '{roles[role]}' ({role}) has no valid pair to use")
    return CheckedSplits(reports)


def _split_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases: decaying them only hurts."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _should_cache(config: TrainConfig, report: DatasetReport) -> bool:
    if not config.cache_images:
        return False
    # Two images of in_channels bytes per pixel (RGB: 3) and one mask per pair, uint8.
    estimate = sum(w * h * (2 * config.in_channels + 1) for w, h in report.sizes.values()) / 2**30
    if estimate > config.cache_max_gb:
        log.info("not caching decoded images: %.1f GiB > cache_max_gb %.1f", estimate, config.cache_max_gb)
        return False
    return True


class _EpochTally:
    """The epoch in progress, summed on the device over its steps (confusion counts, loss, samples),
    and the time spent on it: checkpointed inside an epoch, so that a resumed epoch ends with the
    same metrics as an uninterrupted one."""

    def __init__(self, device: torch.device, counts: torch.Tensor | None = None, loss: torch.Tensor | None = None,
                 seen: int = 0, seconds: float = 0.0) -> None:
        self.counts = torch.zeros(4, dtype=torch.int64, device=device) if counts is None else counts.to(device)
        self.loss = torch.zeros((), device=device) if loss is None else loss.to(device)
        self.seen = seen
        self._started = time.monotonic() - seconds  # the epoch's time, not only this process's

    def add(self, loss: torch.Tensor, counts: torch.Tensor, samples: int) -> None:
        self.counts += counts
        self.loss += loss * samples
        self.seen += samples

    def seconds(self) -> float:
        return time.monotonic() - self._started

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss) / max(self.seen, 1), **ChangeMetrics.from_counts(self.counts).as_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.cpu(), "loss": self.loss.cpu(), "seen": self.seen, "seconds": self.seconds()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> "_EpochTally":
        return cls(device, state["counts"], state["loss"], state["seen"], state["seconds"])


@dataclass
class _Progress:
    """What a checkpoint carries from one step to the next (and from a run to its resumption)."""

    epoch: int = 0  # last completed epoch
    global_step: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"epoch": 0, "f1": -1.0})
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_without_improvement: int = 0
    step_in_epoch: int = 0  # steps done of epoch + 1
    tally: _EpochTally | None = None  # of epoch + 1 once it has begun
    finished: RunStatus | None = None  # "completed" or "early_stopped" once training is over


@dataclass
class _Run:
    """The objects one run trains with."""

    splits: CheckedSplits
    device: torch.device
    precision: Precision
    channels_last: bool
    train_loader: DataLoader
    sampler: EpochShuffleSampler
    eval_loaders: dict[str, DataLoader]
    epoch_steps: int
    total_steps: int
    model: torch.nn.Module
    loss_fn: HybridLoss
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    ema: WeightEma | None
    scheduler: Any = None
    anchor: ScheduleAnchor | None = None
    saved_at: float = field(default_factory=time.monotonic)  # when this run last wrote a checkpoint

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated, checkpointed as best and exported."""
        return self.ema.model if self.ema is not None else self.model


class _StepWindow:
    """Step loss and confusion counts summed on the device, read once every ``log_every_steps``:
    a ``float(loss)`` per step would wait for the GPU at every step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.steps = 0
        self.lr = 0.0  # of the last step

    def add(self, loss: torch.Tensor, counts: torch.Tensor, lr: float) -> None:
        self.loss += loss
        self.counts += counts
        self.steps += 1
        self.lr = lr

    def read(self) -> tuple[float, ChangeMetrics, int, float]:
        loss, metrics, steps = float(self.loss) / self.steps, ChangeMetrics.from_counts(self.counts), self.steps
        self.loss.zero_()
        self.counts.zero_()
        self.steps = 0
        return loss, metrics, steps, self.lr


class _StopCondition:
    """Whether the run must stop now, and why: the cancel token is set or the time limit passed. A
    cancel token itself (``is_set``), so that the evaluation passes stop on it too."""

    def __init__(self, cancel: CancelToken | None, time_limit_minutes: float | None) -> None:
        self.cancel = cancel
        self.deadline = None if time_limit_minutes is None else time.monotonic() + time_limit_minutes * 60
        self.agreed: RunStatus | None = None  # the stop all ranks agreed on (data parallel)

    def shared_reason(self, session: Session) -> RunStatus | None:
        """Rank 0's decision, on every rank: data-parallel ranks stop at the same step."""
        self.agreed = session.broadcast_stop(self.reason())
        return self.agreed

    def reason(self) -> RunStatus | None:
        if self.agreed is not None:
            return self.agreed
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "time_limit"
        return None

    def is_set(self) -> bool:
        return self.reason() is not None


class Trainer:
    def __init__(self, config: TrainConfig, data_root: Path | str, out_dir: Path | str,
                 hooks: list[TrainerHooks] | None = None, cancel: CancelToken | None = None,
                 checkpoint_every_s: float | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        """``checkpoint_every_s``: also write ``last.pt`` inside an epoch, at the first step boundary
        that many seconds after the last checkpoint, so that a killed run loses at most about that
        much training (None: at epoch ends and on a stop only). ``max_image_pixels``: the dataset
        check's limit on one image (the machine's setting, not a config key: a job must not raise it)."""
        if checkpoint_every_s is not None and checkpoint_every_s < 0:
            raise ValueError(f"checkpoint_every_s must be >= 0, got {checkpoint_every_s}")
        self.config = config
        self.data_root = Path(data_root)
        self.out_dir = Path(out_dir)
        self.hooks = HookList(hooks)
        self.cancel = cancel
        self.checkpoint_every_s = checkpoint_every_s
        self.max_image_pixels = max_image_pixels
        self.best_path = self.out_dir / BEST_CHECKPOINT
        self.last_path = self.out_dir / LAST_CHECKPOINT
        self.metrics_path = self.out_dir / METRICS_FILE
        self.dist = Session()  # one process until fit starts a data-parallel run (gpus > 1)

    # --- the run --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train; with ``gpus: N`` this process is rank 0 of N (distributed.py), or the rank
        torchrun made it."""
        self.dist = start_session(self.config, (self.config, self.data_root, self.out_dir, {
            "max_image_pixels": self.max_image_pixels}), resume)
        ok = False
        try:
            result = self._fit(resume)
            ok = True
            return result
        finally:
            self.dist.close(ok)

    def _fit(self, resume: bool) -> TrainResult:
        stop = _StopCondition(self.cancel, self.config.time_limit_minutes)
        if not self.dist.is_main:
            self.hooks = HookList()  # rank 0 alone talks to the outside world
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run = self._set_up()
        progress = self._restore(run) if resume else self._start_fresh(run)
        self.dist.seed_rank(self.config.seed, progress.global_step)
        self.hooks.on_run_start(RunStartInfo(
            config=self.config.model_dump(), device=str(run.device), precision=run.precision.name,
            compiled=run.train_step.compiled, parameters=count_parameters(run.model),
            train_pairs=len(run.splits.valid("train")), val_pairs=len(run.splits.valid("val")),
            steps_per_epoch=run.epoch_steps, total_steps=run.total_steps, start_epoch=progress.epoch + 1,
            out_dir=self.out_dir, start_step=progress.global_step, history=tuple(progress.history),
        ))

        status = self._train(run, progress, stop)
        threshold, test_metrics, curves = None, None, {}
        if status in ("completed", "early_stopped"):
            try:
                # On rank 0, which wrote best.pt; the other ranks get its figures.
                threshold, test_metrics, curves = self.dist.on_main(
                    lambda: self._finish(run, stop) if self.best_path.exists() else (None, None, {}), stop)
            except EvaluationStopped:
                # Training is over and checkpointed: a resumed run does only this end of the run.
                status = stop.reason() or "cancelled"
        self._write_metrics(progress, threshold, test_metrics)
        result = TrainResult(
            status=status, epochs_run=progress.epoch, best=progress.best if progress.best["epoch"] else {},
            history=progress.history, test=test_metrics, best_checkpoint=self.best_path,
            last_checkpoint=self.last_path, metrics_path=self.metrics_path,
            threshold=threshold["threshold"] if threshold else None, val_at_threshold=threshold,
            curves=curves,
        )
        self.hooks.on_run_end(result)
        return result

    # --- set-up ---------------------------------------------------------------------------------
    def _set_up(self) -> _Run:
        cfg = self.config
        splits = check_dataset(cfg, self.data_root, max_image_pixels=self.max_image_pixels)
        device = self.dist.device or select_device(cfg.device)
        precision = Precision.choose(device, cfg.amp)
        seed_everything(cfg.seed)
        train_loader, sampler, eval_loaders, epoch_steps = self._loaders(splits, device)

        model = self.dist.prepare_model(build_model(cfg)).to(device)
        loss_fn = HybridLoss(cfg.weight_bce, cfg.weight_dice, cfg.pos_weight).to(device)
        optimizer = torch.optim.AdamW(_split_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        channels_last = use_channels_last(cfg.channels_last, device, precision)
        train_step = TrainStep(model, loss_fn, optimizer, device, precision, channels_last,
                               compile=should_compile(cfg.compile, device, epoch_steps * cfg.epochs))
        self.dist.wrap_step(train_step)
        ema = WeightEma(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        return _Run(splits=splits, device=device, precision=precision, channels_last=channels_last,
                    train_loader=train_loader, sampler=sampler, eval_loaders=eval_loaders, epoch_steps=epoch_steps,
                    total_steps=epoch_steps * cfg.epochs, model=model, loss_fn=loss_fn, optimizer=optimizer,
                    train_step=train_step, ema=ema)

    def _loaders(self, splits: CheckedSplits, device: torch.device) -> tuple[DataLoader, EpochShuffleSampler, dict[str, DataLoader], int]:
        cfg = self.config
        train_report = splits.reports["train"]
        crops = cfg.crops_per_image
        if crops == "auto":
            crops = auto_crops_per_image(list(train_report.sizes.values()), cfg.crop_size)
        # AugmentParams' fields are named as the config keys they come from.
        augmentation = PairedAugmentation(AugmentParams(**{f.name: getattr(cfg, f.name) for f in fields(AugmentParams)}))
        image_spec = ImageSpec.from_config(cfg)
        pairs = PairLoader(train_report.valid, cache=_should_cache(cfg, train_report), label_threshold=cfg.label_threshold,
                           image_spec=image_spec)
        train_set = TrainPairDataset(pairs, augmentation, cfg.normalize, crops, cfg.seed)
        # One permutation per epoch on every rank, each rank its shard (the whole set on one process).
        sampler = EpochShuffleSampler(len(train_set), cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        if sampler.shard_length == 0:
            raise DatasetLayoutError(f"{len(train_set)} training sample(s) cannot be shared by gpus: {cfg.gpus}")
        workers = resolve_num_workers(cfg.num_workers, processes=self.dist.world_size)
        train_loader = DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
            drop_last=sampler.shard_length >= cfg.batch_size, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        # Validation runs every epoch: decode its images once, like the training images.
        eval_loaders = {
            role: DataLoader(EvalPairDataset(PairLoader(report.valid, cache=role == "val" and self.dist.is_main
                                                        and _should_cache(cfg, report),
                                                        label_threshold=cfg.label_threshold, image_spec=image_spec),
                                             cfg.normalize),
                             batch_size=1, num_workers=min(workers, 2), pin_memory=device.type == "cuda")
            for role, report in splits.reports.items() if role != "train"
        }
        return train_loader, sampler, eval_loaders, steps_per_epoch(sampler.shard_length, cfg.batch_size)

    def _build_scheduler(self, run: _Run) -> None:
        cfg = self.config
        run.scheduler = build_scheduler(
            run.optimizer, kind=cfg.scheduler, total_steps=run.total_steps, warmup_ratio=cfg.warmup_ratio,
            base_lr=cfg.lr, min_lr=cfg.min_lr, poly_power=cfg.poly_power, steps_per_epoch=run.epoch_steps,
            step_size_epochs=cfg.step_size_epochs, step_gamma=cfg.step_gamma, anchor=run.anchor,
        )

    def _start_fresh(self, run: _Run) -> _Progress:
        self._build_scheduler(run)
        return _Progress()

    def _restore(self, run: _Run) -> _Progress:
        if not self.last_path.exists():
            raise FileNotFoundError(f"cannot resume: {self.last_path} does not exist")
        # On the CPU: RNG states must stay CPU tensors; model and optimizer copy to the device.
        state = load_checkpoint(self.last_path, map_location="cpu")
        schedule = state.get("schedule", {})
        anchor = schedule.get("anchor")
        run.anchor = ScheduleAnchor(**anchor) if anchor else None
        if schedule.get("total_steps", run.total_steps) != run.total_steps:
            # A new length (epochs raised or lowered): decay on from where the run is, no jump.
            reached = state["optimizer"]["param_groups"][0]["lr"]
            run.anchor = ScheduleAnchor(step=state["global_step"], factor=reached / self.config.lr)
        # The scheduler first: building it sets the optimiser's lr, which the saved state then restores.
        self._build_scheduler(run)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.train_step.scaler.load_state_dict(state["scaler"])
        if run.ema is not None:
            if "ema" in state:
                run.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for the resumed part: start it from the current weights
                run.ema.model.load_state_dict(state["model"])
        restore_rng_state(state["rng"])
        tally = state.get("epoch_tally")  # these three are absent from checkpoints of older versions
        return _Progress(epoch=state["epoch"], global_step=state["global_step"], best=state["best"],
                         history=state["history"], epochs_without_improvement=state["epochs_without_improvement"],
                         step_in_epoch=state.get("step_in_epoch", 0), finished=state.get("finished"),
                         tally=_EpochTally.from_state_dict(tally, run.device) if tally else None)

    # --- the epochs -----------------------------------------------------------------------------
    def _train(self, run: _Run, progress: _Progress, stop: _StopCondition) -> RunStatus:
        """Train the epochs left; how training ended. A stop, in training or in validation, ends
        in a checkpoint of the steps done, so a resumed run repeats none of them."""
        # Judged against this run's config: a finished run resumed with more epochs trains on.
        progress.finished = self._finished(progress)
        while not progress.finished:
            epoch = progress.epoch + 1
            train_metrics = self._train_epoch(run, progress, epoch, stop)
            if not isinstance(train_metrics, dict):
                return self._save_stopped(run, progress, train_metrics)
            panel = self._panel_capture(run) if self.dist.is_main else None
            try:
                # On rank 0 alone (whole images, the single-process figures); every rank gets them.
                val_metrics = self.dist.on_main(lambda: self._evaluate(
                    run, "val", EvalSettings.from_config(self.config), cancel=stop, on_prediction=panel), stop)
            except EvaluationStopped:
                # Every step of the epoch is in the checkpoint: a resumed run only validates again.
                return self._save_stopped(run, progress, stop.reason() or "cancelled")
            self._end_epoch(run, progress, epoch, train_metrics, val_metrics)
            shown = panel.panel(epoch) if panel is not None else None
            if shown is not None:
                self.hooks.on_validation_panel(shown)
        return progress.finished

    def _train_epoch(self, run: _Run, progress: _Progress, epoch: int,
                     stop: _StopCondition) -> dict[str, float] | RunStatus:
        """Train one epoch, or what is left of one after a checkpoint taken inside it; its
        metrics, or why it stopped before the end (the steps done are in ``progress``)."""
        cfg = self.config
        if progress.tally is None:  # a new epoch, not one resumed inside
            progress.tally = _EpochTally(run.device)
        # From the first sample not trained on yet: the ones before are neither loaded nor augmented.
        run.sampler.set_epoch(epoch, start=progress.step_in_epoch * cfg.batch_size)
        run.model.train()
        window = _StepWindow(run.device)
        for step, batch in enumerate(run.train_loader, start=progress.step_in_epoch + 1):
            reason = stop.shared_reason(self.dist)
            if reason:
                self._report_steps(run, progress, epoch, window)
                return reason
            a, b, label = run.train_step.inputs(batch)
            loss, logits = run.train_step(a, b, label)
            lr = run.optimizer.param_groups[0]["lr"]
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update(run.model)
            progress.global_step += 1
            progress.step_in_epoch = step

            # The global figures on every rank (data parallel): the tally a checkpoint holds is the epoch's.
            loss, counts = self.dist.reduce_step(loss, confusion_counts(logits, label, cfg.threshold))
            progress.tally.add(loss, counts, a.shape[0] * self.dist.world_size)
            window.add(loss, counts, lr)
            if step % cfg.log_every_steps == 0 or step == run.epoch_steps:
                self._report_steps(run, progress, epoch, window)
            if self._checkpoint_due(run):
                # Reported first: the steps a checkpoint holds have been announced, with a finite loss.
                self._report_steps(run, progress, epoch, window)
                self._save(run, "last", self._checkpoint_state(run, progress))
        return progress.tally.metrics()

    def _report_steps(self, run: _Run, progress: _Progress, epoch: int, window: _StepWindow) -> None:
        """Tell the hooks about the steps since the last report; stop the run if the loss diverged."""
        if not window.steps:
            return
        mean_loss, metrics, steps, lr = window.read()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"the training loss is {mean_loss} at step {progress.global_step} (precision "
                f"{run.precision.name}, compiled: {run.train_step.compiled}); lower lr, or set amp: false "
                f"or compile: false to rule out the fast paths")
        self.hooks.on_step_end(StepInfo(
            epoch=epoch, step_in_epoch=progress.step_in_epoch, steps_per_epoch=run.epoch_steps,
            global_step=progress.global_step, loss=mean_loss, lr=lr, metrics=metrics.as_dict(), steps=steps,
        ))

    def _evaluate(self, run: _Run, role: str, settings: EvalSettings, histogram: ProbabilityHistogram | None = None,
                  *, cancel: CancelToken | None = None, on_prediction: PanelCapture | None = None) -> dict[str, float]:
        return evaluate_model(run.eval_model, run.eval_loaders[role], run.device, settings, precision=run.precision,
                              loss_fn=run.loss_fn, channels_last=run.channels_last, histogram=histogram,
                              on_prediction=on_prediction, cancel=cancel)

    def _panel_capture(self, run: _Run) -> PanelCapture | None:
        """Collects the epoch's panel tiles from the validation pass itself (``panel_tiles``)."""
        if not self.config.panel_tiles:
            return None
        pairs = run.eval_loaders["val"].dataset.loader  # decoded (and cached) images, as displayed
        return PanelCapture(len(pairs), self.config.panel_tiles, lambda index: pairs[index][:2])

    def _end_epoch(self, run: _Run, progress: _Progress, epoch: int, train_metrics: dict[str, float],
                   val_metrics: dict[str, float]) -> None:
        """Record the epoch, checkpoint it, tell the hooks; the last epoch or early stopping
        finishes training."""
        cfg = self.config
        seconds = progress.tally.seconds()
        is_best = val_metrics["f1"] > progress.best["f1"]
        if val_metrics["f1"] > progress.best["f1"] + cfg.min_delta:
            progress.epochs_without_improvement = 0
        else:
            progress.epochs_without_improvement += 1
        if is_best:
            progress.best = {"epoch": epoch, **{k: val_metrics[k] for k in METRIC_NAMES}}
        progress.epoch = epoch
        progress.step_in_epoch, progress.tally = 0, None
        progress.history.append({
            "epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds,
            "train": train_metrics, "val": val_metrics,
        })
        progress.finished = "early_stopped" if self._stops_early(progress) else self._finished(progress)
        # Saved (and uploaded by a hook) before the epoch is announced.
        state = self._checkpoint_state(run, progress)
        if is_best:
            self._save(run, "best", state)
        self._save(run, "last", state)
        self._write_metrics(progress, None, None)
        self.hooks.on_epoch_end(EpochInfo(
            epoch=epoch, epochs=cfg.epochs, lr=progress.history[-1]["lr"], train=train_metrics, val=val_metrics,
            is_best=is_best, best_epoch=int(progress.best["epoch"]), best_f1=progress.best["f1"], seconds=seconds,
        ))

    def _stops_early(self, progress: _Progress) -> bool:
        cfg = self.config
        # Never before the learning rate has had time to decay: an early plateau is not the end.
        may_stop = progress.epoch >= math.ceil(cfg.min_epochs_fraction * cfg.epochs)
        return cfg.patience is not None and may_stop and progress.epochs_without_improvement >= cfg.patience

    def _finished(self, progress: _Progress) -> RunStatus | None:
        """Why training is over, or None. Early stopping is final; the epochs are counted against
        this run's ``epochs``."""
        if progress.finished == "early_stopped":
            return "early_stopped"
        return "completed" if progress.epoch >= self.config.epochs else None

    # --- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_state(self, run: _Run, progress: _Progress) -> dict[str, Any]:
        state = {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.train_step.scaler.state_dict(),
            "schedule": {"total_steps": run.total_steps, "anchor": run.anchor.as_dict() if run.anchor else None},
            "epoch": progress.epoch, "global_step": progress.global_step, "best": progress.best,
            "history": progress.history, "epochs_without_improvement": progress.epochs_without_improvement,
            "step_in_epoch": progress.step_in_epoch, "finished": progress.finished,
            "epoch_tally": progress.tally.state_dict() if progress.tally is not None else None,
            "config": self.config.model_dump(), "rng": capture_rng_state(),
        }
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        return state

    def _save(self, run: _Run, kind: Literal["best", "last"], state: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return  # rank 0 writes the run's files
        path = self.best_path if kind == "best" else self.last_path
        save_checkpoint(path, state)
        self.hooks.on_checkpoint_saved(CheckpointInfo(
            kind, path, epoch=state["epoch"], global_step=state["global_step"],
            step_in_epoch=state["step_in_epoch"], finished=state["finished"] is not None,
        ))
        # After the hooks: a slow upload must not make every following step a checkpoint.
        run.saved_at = time.monotonic()

    def _checkpoint_due(self, run: _Run) -> bool:
        return self.checkpoint_every_s is not None and time.monotonic() - run.saved_at >= self.checkpoint_every_s

    def _save_stopped(self, run: _Run, progress: _Progress, reason: RunStatus) -> RunStatus:
        """Checkpoint the steps done of the epoch in progress: a stop loses none of them."""
        self._save(run, "last", self._checkpoint_state(run, progress))
        return reason

    # --- the end of a run -----------------------------------------------------------------------
    def _finish(self, run: _Run, stop: _StopCondition
                ) -> tuple[dict[str, float], dict[str, float] | None, dict[str, dict[str, Any]]]:
        """Tune the decision threshold on validation with the best weights, store it in the best
        checkpoint, and score the test split with it; raises ``EvaluationStopped`` on a stop.
        Returns the threshold with its validation metrics, the test metrics, and the curves by role
        (``TrainResult.curves``)."""
        cfg = self.config
        best_state = load_checkpoint(self.best_path, map_location="cpu")
        run.eval_model.load_state_dict(eval_weights(best_state))
        # The histogram of this pass also draws the precision-recall curve (TrainResult.curves).
        histogram = ProbabilityHistogram(run.device)
        if cfg.tune_threshold:
            self._evaluate(run, "val", EvalSettings.from_config(cfg, tta=True), histogram, cancel=stop)
            tuned = histogram.best()
            threshold, val_counts = tuned.as_dict(), tuned.metrics
        else:
            val = self._evaluate(run, "val", EvalSettings.from_config(cfg, tta=True), histogram, cancel=stop)
            threshold = {"threshold": cfg.threshold, **{k: val[k] for k in METRIC_NAMES}}
            val_counts = _counts(val)
        curves = {"val": _curves(histogram, val_counts, threshold["threshold"])}
        best_state["threshold"] = threshold["threshold"]
        save_checkpoint(self.best_path, best_state)
        log.info("decision threshold %.3f: validation F1 %.4f", threshold["threshold"], threshold["f1"])

        test_metrics = None
        if "test" in run.eval_loaders:
            self.hooks.on_test_start(len(run.splits.valid("test")))
            test_histogram = ProbabilityHistogram(run.device)
            test_metrics = self._evaluate(run, "test", EvalSettings.from_config(
                cfg, tta=True, threshold=threshold["threshold"]), test_histogram, cancel=stop)
            curves["test"] = _curves(test_histogram, _counts(test_metrics), threshold["threshold"])
        return threshold, test_metrics, curves

    def _write_metrics(self, progress: _Progress, threshold: dict | None, test: dict | None) -> None:
        if not self.dist.is_main:
            return
        document: dict[str, Any] = {"best": progress.best if progress.best["epoch"] else None,
                                    "history": progress.history}
        if threshold is not None:
            document["threshold"] = threshold
        if test is not None:
            document["test"] = test
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2))
        tmp.replace(self.metrics_path)


def _counts(metrics: dict[str, float]) -> ChangeMetrics:
    return ChangeMetrics(metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"])


def _curves(histogram: ProbabilityHistogram, counts: ChangeMetrics, threshold: float) -> dict[str, Any]:
    """A role's entry of ``TrainResult.curves``."""
    return {"pr_curve": pr_curve_document(histogram, threshold), "confusion": confusion_document(counts, threshold)}
