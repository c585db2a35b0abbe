"""Trainer hooks that turn training progress into status events (from the training thread)."""

from __future__ import annotations

from schemas import JobPhase, JobState
from snunet_cbam.hooks import EpochInfo, StepInfo, TrainerHooks

from .status import JobStatusPublisher


def epoch_metrics(info: EpochInfo) -> dict[str, float]:
    metrics = {f"train_{k}": float(v) for k, v in info.train.items()}
    metrics.update({f"val_{k}": float(v) for k, v in info.val.items() if k not in ("tp", "fp", "fn", "tn")})
    metrics["lr"] = float(info.lr)
    metrics["epoch_seconds"] = float(info.seconds)
    return metrics


class StatusHooks(TrainerHooks):
    """A RUNNING event per epoch with its metrics; the step count rides on heartbeats."""

    def __init__(self, status: JobStatusPublisher) -> None:
        self.status = status

    def on_step_end(self, info: StepInfo) -> None:
        self.status.note(step=info.global_step)

    def on_epoch_end(self, info: EpochInfo) -> None:
        self.status.emit_threadsafe(JobState.RUNNING, JobPhase.TRAINING, epoch=info.epoch, epochs=info.epochs,
                                    metrics=epoch_metrics(info))

    def on_test_start(self, pairs: int) -> None:
        self.status.emit_threadsafe(JobState.RUNNING, JobPhase.EVALUATING)
