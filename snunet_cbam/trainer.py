"""The training engine: check the data, train with early stopping, checkpoint, report through hooks.

Everything a run depends on comes in through the constructor (a validated ``TrainConfig``, the data
directory, the output directory, hooks and a cancel token), so the CLI and the service drive the
same code.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from schemas.training import TrainConfig

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .data.augment import AugmentParams, PairedAugmentation
from .data.check import DatasetReport, InvalidDatasetError, check_pairs
from .data.dataset import (
    EpochShuffleSampler,
    EvalPairDataset,
    PairLoader,
    TrainPairDataset,
    auto_crops_per_image,
    steps_per_epoch,
)
from .data.layouts import DatasetLayoutError, has_split, list_split
from .scoring import evaluate_model
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
from .metrics import METRIC_NAMES, ChangeMetrics, ConfusionAccumulator, confusion_counts
from .model import count_parameters
from .runtime import (
    Precision,
    capture_rng_state,
    restore_rng_state,
    seed_everything,
    select_device,
    should_compile,
    use_channels_last,
)
from .schedules import build_scheduler
from .step import TrainStep

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.json"


@dataclass
class CheckedSplits:
    reports: dict[str, DatasetReport]  # role (train/val/test) -> report

    def valid(self, role: str) -> list:
        return self.reports[role].valid if role in self.reports else []


def check_dataset(config: TrainConfig, data_root: Path | str) -> CheckedSplits:
    """Check every split the run will use; raise with the full report unless ``skip_invalid``."""
    data_root = Path(data_root)
    roles = {"train": config.train_split, "val": config.val_split}
    if config.test_split and has_split(data_root, config.test_split):
        roles["test"] = config.test_split
    reports = {role: check_pairs(list_split(data_root, split), split) for role, split in roles.items()}
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
    # Two RGB images and one mask per pair, uint8.
    estimate = sum(w * h * 7 for w, h in report.sizes.values()) / 2**30
    if estimate > config.cache_max_gb:
        log.info("not caching decoded images: %.1f GiB > cache_max_gb %.1f", estimate, config.cache_max_gb)
        return False
    return True


class Trainer:
    def __init__(self, config: TrainConfig, data_root: Path | str, out_dir: Path | str,
                 hooks: list[TrainerHooks] | None = None, cancel: CancelToken | None = None) -> None:
        self.config = config
        self.data_root = Path(data_root)
        self.out_dir = Path(out_dir)
        self.hooks = HookList(hooks)
        self.cancel = cancel

    # --- set-up ---------------------------------------------------------------------------------
    def _loaders(self, splits: CheckedSplits, device: torch.device) -> tuple[DataLoader, EpochShuffleSampler, dict[str, DataLoader], int]:
        cfg = self.config
        train_report = splits.reports["train"]
        crops = cfg.crops_per_image
        if crops == "auto":
            crops = auto_crops_per_image(list(train_report.sizes.values()), cfg.crop_size)
        # AugmentParams' fields are named as the config keys they come from.
        augmentation = PairedAugmentation(AugmentParams(**{f.name: getattr(cfg, f.name) for f in fields(AugmentParams)}))
        train_set = TrainPairDataset(PairLoader(train_report.valid, cache=_should_cache(cfg, train_report)),
                                     augmentation, cfg.normalize, crops, cfg.seed)
        sampler = EpochShuffleSampler(len(train_set), cfg.seed)
        workers = cfg.num_workers
        train_loader = DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
            drop_last=len(train_set) >= cfg.batch_size, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        eval_loaders = {
            role: DataLoader(EvalPairDataset(PairLoader(report.valid), cfg.normalize), batch_size=1,
                             num_workers=min(workers, 2), pin_memory=device.type == "cuda")
            for role, report in splits.reports.items() if role != "train"
        }
        return train_loader, sampler, eval_loaders, steps_per_epoch(len(train_set), cfg.batch_size)

    # --- the run --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        best_path, last_path = self.out_dir / BEST_CHECKPOINT, self.out_dir / LAST_CHECKPOINT
        metrics_path = self.out_dir / METRICS_FILE

        splits = check_dataset(cfg, self.data_root)
        device = select_device(cfg.device)
        precision = Precision.choose(device, cfg.amp)
        seed_everything(cfg.seed)
        train_loader, sampler, eval_loaders, epoch_steps = self._loaders(splits, device)
        total_steps = epoch_steps * cfg.epochs

        model = build_model(cfg).to(device)
        loss_fn = HybridLoss(cfg.weight_bce, cfg.weight_dice, cfg.pos_weight).to(device)
        optimizer = torch.optim.AdamW(_split_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        channels_last = use_channels_last(cfg.channels_last, device, precision)
        train_step = TrainStep(model, loss_fn, optimizer, device, precision, channels_last,
                               compile=should_compile(cfg.compile, device))
        scheduler = build_scheduler(
            optimizer, kind=cfg.scheduler, total_steps=total_steps, warmup_ratio=cfg.warmup_ratio,
            base_lr=cfg.lr, min_lr=cfg.min_lr, poly_power=cfg.poly_power, steps_per_epoch=epoch_steps,
            step_size_epochs=cfg.step_size_epochs, step_gamma=cfg.step_gamma,
        )

        start_epoch, global_step, history = 1, 0, []
        best: dict[str, float] = {"epoch": 0, "f1": -1.0}
        epochs_without_improvement = 0
        if resume:
            if not last_path.exists():
                raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
            # On the CPU: RNG states must stay CPU tensors; model and optimizer copy to the device.
            state = load_checkpoint(last_path, map_location="cpu")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            train_step.scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"])
            start_epoch = state["epoch"] + 1
            global_step, history, best = state["global_step"], state["history"], state["best"]
            epochs_without_improvement = state["epochs_without_improvement"]

        self.hooks.on_run_start(RunStartInfo(
            config=cfg.model_dump(), device=str(device), precision=precision.name, compiled=train_step.compiled,
            parameters=count_parameters(model), train_pairs=len(splits.valid("train")),
            val_pairs=len(splits.valid("val")), steps_per_epoch=epoch_steps, total_steps=total_steps,
            start_epoch=start_epoch, out_dir=self.out_dir,
        ))

        def evaluate(role: str) -> dict[str, float]:
            return evaluate_model(model, eval_loaders[role], device, window=cfg.window_size,
                                  overlap=cfg.window_overlap, threshold=cfg.threshold, precision=precision,
                                  loss_fn=loss_fn, channels_last=channels_last)

        def checkpoint_state(epoch: int) -> dict[str, Any]:
            return {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": train_step.scaler.state_dict(), "epoch": epoch,
                "global_step": global_step, "best": best, "history": history,
                "epochs_without_improvement": epochs_without_improvement, "config": cfg.model_dump(),
                "rng": capture_rng_state(),
            }

        status: RunStatus = "completed"
        epoch = start_epoch - 1
        for epoch in range(start_epoch, cfg.epochs + 1):
            epoch_started = time.monotonic()
            sampler.set_epoch(epoch)
            model.train()
            confusion = ConfusionAccumulator(device)
            loss_sum = torch.zeros((), device=device)
            seen = 0
            for step, batch in enumerate(train_loader, start=1):
                stop = self._stop_reason(started)
                if stop:
                    status = stop
                    break
                a, b, label = train_step.inputs(batch)
                loss, logits = train_step(a, b, label)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                global_step += 1

                counts = confusion_counts(logits, label, cfg.threshold)
                confusion.update(counts)
                loss_sum += loss * a.shape[0]
                seen += a.shape[0]
                self.hooks.on_step_end(StepInfo(
                    epoch=epoch, step_in_epoch=step, steps_per_epoch=epoch_steps, global_step=global_step,
                    loss=float(loss), lr=lr, metrics=ChangeMetrics.from_counts(counts).as_dict(),
                ))
            if status != "completed":
                epoch -= 1  # the interrupted epoch does not count; resuming repeats it
                break

            train_metrics = {"loss": float(loss_sum) / max(seen, 1), **confusion.compute().as_dict()}
            val_metrics = evaluate("val")
            is_best = val_metrics["f1"] > best["f1"]
            if val_metrics["f1"] > best["f1"] + cfg.min_delta:
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
            if is_best:
                best = {"epoch": epoch, **{k: val_metrics[k] for k in METRIC_NAMES}}
            history.append({
                "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - epoch_started,
                "train": train_metrics, "val": val_metrics,
            })
            state = checkpoint_state(epoch)
            if is_best:
                save_checkpoint(best_path, state)
                self.hooks.on_checkpoint_saved(CheckpointInfo("best", best_path, epoch))
            save_checkpoint(last_path, state)
            self.hooks.on_checkpoint_saved(CheckpointInfo("last", last_path, epoch))
            self._write_metrics(metrics_path, best, history, None)
            self.hooks.on_epoch_end(EpochInfo(
                epoch=epoch, epochs=cfg.epochs, lr=history[-1]["lr"], train=train_metrics, val=val_metrics,
                is_best=is_best, best_epoch=int(best["epoch"]), best_f1=best["f1"],
                seconds=history[-1]["seconds"],
            ))
            if cfg.patience is not None and epochs_without_improvement >= cfg.patience:
                status = "early_stopped"
                break

        test_metrics = None
        if "test" in eval_loaders and best_path.exists() and status in ("completed", "early_stopped"):
            self.hooks.on_test_start(len(splits.valid("test")))
            model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
            test_metrics = evaluate("test")
        self._write_metrics(metrics_path, best, history, test_metrics)
        result = TrainResult(
            status=status, epochs_run=epoch, best=best if best["epoch"] else {}, history=history,
            test=test_metrics, best_checkpoint=best_path, last_checkpoint=last_path, metrics_path=metrics_path,
        )
        self.hooks.on_run_end(result)
        return result

    def _stop_reason(self, started: float) -> RunStatus | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        limit = self.config.time_limit_minutes
        if limit is not None and time.monotonic() - started > limit * 60:
            return "time_limit"
        return None

    @staticmethod
    def _write_metrics(path: Path, best: dict, history: list, test: dict | None) -> None:
        document: dict[str, Any] = {"best": best if best["epoch"] else None, "history": history}
        if test is not None:
            document["test"] = test
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2))
        tmp.replace(path)
