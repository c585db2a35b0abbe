"""Progress bars for people at a terminal, drawn from the trainer's hooks."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .hooks import EpochInfo, RunStartInfo, StepInfo, TrainerHooks, TrainResult


class ProgressBars(TrainerHooks):
    def __init__(self, stream=sys.stderr, disable: bool | None = None) -> None:
        self.stream = stream
        self.disable = disable
        self.bar: tqdm | None = None

    def on_run_start(self, info: RunStartInfo) -> None:
        compiled = ", compiled" if info.compiled else ""
        tqdm.write(
            f"training on {info.device} ({info.precision}{compiled}): {info.parameters / 1e6:.2f} M parameters, "
            f"{info.train_pairs} train / {info.val_pairs} val pairs, {info.steps_per_epoch} steps per epoch",
            file=self.stream,
        )

    def on_step_end(self, info: StepInfo) -> None:
        if self.bar is None:
            self.bar = tqdm(total=info.steps_per_epoch, desc=f"epoch {info.epoch}", unit="step",
                            file=self.stream, leave=False, disable=self.disable, dynamic_ncols=True)
        self.bar.update(info.steps)
        self.bar.set_postfix(loss=f"{info.loss:.4f}", f1=f"{info.metrics['f1']:.3f}", lr=f"{info.lr:.2e}")

    def on_epoch_end(self, info: EpochInfo) -> None:
        self._close_bar()
        mark = " *best*" if info.is_best else ""
        tqdm.write(
            f"epoch {info.epoch}/{info.epochs}  train loss {info.train['loss']:.4f} f1 {info.train['f1']:.4f}  "
            f"val loss {info.val['loss']:.4f} f1 {info.val['f1']:.4f} iou {info.val['iou']:.4f}  "
            f"({info.seconds:.1f} s){mark}",
            file=self.stream,
        )

    def on_run_end(self, result: TrainResult) -> None:
        self._close_bar()
        best = result.best
        summary = (f"best epoch {best['epoch']}: val f1 {best['f1']:.4f} iou {best['iou']:.4f}"
                   if best else "no epoch completed")
        tqdm.write(f"run {result.status} after {result.epochs_run} epoch(s); {summary}", file=self.stream)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
