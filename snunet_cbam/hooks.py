"""What the trainer tells the outside world, and how it is told to stop.

The service logs to MLflow and publishes status events through these hooks; the CLI draws progress
bars with them. None of them can change the training itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .panels import ValidationPanel

RunStatus = Literal["completed", "early_stopped", "cancelled", "time_limit"]


class CancelToken(Protocol):
    """Anything with ``is_set()``; ``threading.Event`` is the usual one."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class RunStartInfo:
    config: dict[str, Any]
    device: str
    precision: str
    compiled: bool
    parameters: int
    train_pairs: int
    val_pairs: int
    steps_per_epoch: int
    total_steps: int
    start_epoch: int  # 1-based; > 1 when resumed
    out_dir: Path
    # Where a resumed run picks up: the global step already trained (0 for a fresh run; a run
    # resumed from a checkpoint taken inside an epoch continues that epoch at start_step + 1),
    # and the epochs it completed before (the checkpoint's history records, oldest first).
    start_step: int = 0
    history: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class StepInfo:
    """The last ``steps`` training steps, ending at ``global_step``: reported every
    ``log_every_steps`` steps (and at the end of an epoch), not every step, so that reading the
    loss from the device does not stall it."""

    epoch: int
    step_in_epoch: int  # 1-based
    steps_per_epoch: int
    global_step: int  # 1-based, over the whole run
    loss: float  # mean over those steps
    lr: float  # of the last one
    metrics: dict[str, float]  # from the confusion counts summed over those steps
    steps: int = 1


@dataclass(frozen=True)
class EpochInfo:
    epoch: int
    epochs: int
    lr: float
    train: dict[str, float]
    val: dict[str, float]
    is_best: bool
    best_epoch: int
    best_f1: float
    seconds: float


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint just written (atomically) to ``path``: ``best`` then ``last`` at an epoch's
    end, ``last`` alone inside an epoch (every ``checkpoint_every_s``, or when the run stops).

    ``epoch`` is the last completed epoch and ``global_step`` the steps trained in all;
    ``step_in_epoch`` the steps already trained of the next epoch (0 at an epoch's end), where a
    resumed run continues. ``finished``: training is over (the last epoch ran, or early stopping
    ended it); a resumed run only does the end of the run (threshold, test).
    """

    kind: Literal["best", "last"]
    path: Path
    epoch: int
    global_step: int = 0
    step_in_epoch: int = 0
    finished: bool = False


@dataclass
class TrainResult:
    status: RunStatus
    epochs_run: int
    best: dict[str, float]  # epoch, f1, iou, precision, recall, accuracy (validation)
    history: list[dict[str, Any]]
    test: dict[str, float] | None
    best_checkpoint: Path
    last_checkpoint: Path
    metrics_path: Path
    threshold: float | None = None  # decision threshold stored in the best checkpoint
    val_at_threshold: dict[str, float] | None = None  # validation metrics at that threshold
    extra: dict[str, Any] = field(default_factory=dict)
    # The final model's pictures in numbers, by role ("val", and "test" when scored): "pr_curve"
    # (thresholds.pr_curve_document, from the pass that chose the threshold) and "confusion"
    # (thresholds.confusion_document, the counts behind the reported metrics at that threshold).
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)


class TrainerHooks:
    """Override what you need; every method defaults to doing nothing."""

    def on_run_start(self, info: RunStartInfo) -> None: ...

    def on_step_end(self, info: StepInfo) -> None: ...

    def on_epoch_end(self, info: EpochInfo) -> None: ...

    def on_validation_panel(self, panel: "ValidationPanel") -> None:
        """The panel tiles of the epoch just validated (config ``panel_tiles``), after
        ``on_epoch_end``: the same tiles every epoch, their decision the one that was scored."""

    def on_checkpoint_saved(self, info: CheckpointInfo) -> None: ...

    def on_test_start(self, pairs: int) -> None:
        """The best checkpoint is about to be scored on the test split."""

    def on_run_end(self, result: TrainResult) -> None: ...


class HookList(TrainerHooks):
    def __init__(self, hooks: list[TrainerHooks] | None = None) -> None:
        self.hooks = list(hooks or [])

    def on_run_start(self, info: RunStartInfo) -> None:
        for h in self.hooks:
            h.on_run_start(info)

    def on_step_end(self, info: StepInfo) -> None:
        for h in self.hooks:
            h.on_step_end(info)

    def on_epoch_end(self, info: EpochInfo) -> None:
        for h in self.hooks:
            h.on_epoch_end(info)

    def on_validation_panel(self, panel: "ValidationPanel") -> None:
        for h in self.hooks:
            h.on_validation_panel(panel)

    def on_checkpoint_saved(self, info: CheckpointInfo) -> None:
        for h in self.hooks:
            h.on_checkpoint_saved(info)

    def on_test_start(self, pairs: int) -> None:
        for h in self.hooks:
            h.on_test_start(pairs)

    def on_run_end(self, result: TrainResult) -> None:
        for h in self.hooks:
            h.on_run_end(result)
