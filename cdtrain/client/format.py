"""Human-readable text for the commands: progress lines, summaries, the job table.

Times are UTC (``Z``): the same job is read from many machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from cdtrain.client.models import JobView, StatusEvent
from schemas.jobs import JobState

_BEST_KEYS = ("val_f1", "val_iou", "val_precision", "val_recall", "test_f1", "test_iou", "test_precision",
              "test_recall")
_LABELS = {"f1": "F1", "iou": "IoU"}


def utc(moment: datetime, *, date: bool = True) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ" if date else "%H:%M:%SZ")


def duration(start: datetime, end: datetime) -> str:
    seconds = max(0, int((end - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def label(key: str) -> str:
    """``val_f1`` -> ``val F1``, ``test_iou`` -> ``test IoU``."""
    split, _, name = key.partition("_")
    return f"{split} {_LABELS.get(name, name)}"


def latest_val_f1(view: JobView) -> tuple[float | None, int | None]:
    """The newest epoch's validation F1, and that epoch."""
    for entry in reversed(view.history):
        if entry.metrics.get("val_f1") is not None:
            return entry.metrics["val_f1"], entry.epoch
    if view.state is not JobState.SUCCEEDED and view.metrics and view.metrics.get("val_f1") is not None:
        return view.metrics["val_f1"], view.epoch
    return None, None


def epoch_text(epoch: int | None, epochs: int | None) -> str:
    if epoch is None and epochs is None:
        return ""
    return f"{epoch or 0}/{epochs if epochs is not None else '?'}"


def best_text(metrics: Mapping[str, float | None]) -> str:
    """``val F1 0.8123 (epoch 48), val IoU 0.6841, ..., test F1 0.8010``."""
    parts = [f"{label(k)} {number(metrics[k])}" for k in _BEST_KEYS if k in metrics]
    if parts and metrics.get("best_epoch") is not None:
        parts[0] += f" (epoch {int(metrics['best_epoch'] or 0)})"
    return ", ".join(parts)


def progress_line(view: JobView, event: StatusEvent | None = None) -> str:
    """One line per change: ``12:00:09Z  RUNNING    training     epoch 2/3  val F1 0.7012 ...``."""
    data = event.data if event is not None else view
    when = event.time if event is not None else view.updated_at
    parts = [utc(when, date=False), f"{data.state.name:<9}", f"{data.phase.value if data.phase else '':<11}"]
    epochs = epoch_text(data.epoch, data.epochs)
    parts.append(f"epoch {epochs:<7}" if epochs else " " * 13)
    metrics = data.metrics or {}
    if data.state is JobState.SUCCEEDED:
        parts.append(f"best {best_text(metrics)}" if metrics else "")
    elif data.state is JobState.RUNNING and metrics:
        shown = [("val_f1", "val F1"), ("val_iou", "IoU"), ("train_loss", "loss"), ("val_loss", "val loss")]
        parts.append("  ".join(f"{name} {number(metrics[key])}" for key, name in shown if key in metrics))
    if data.error:
        parts.append(f"error: {data.error}")
    return "  ".join(p for p in parts if p).rstrip()


def summary(view: JobView) -> str:
    """The final report of ``watch``: outcome, duration, best metrics or error, MLflow, model."""
    head = f"job {view.job_id} {view.state.name} after {duration(view.submitted_at, view.updated_at)}"
    if view.state is JobState.SUCCEEDED:
        best = best_text(view.best_metrics or view.metrics or {})
        lines = [f"{head}: {best}" if best else head]
    else:
        where = f" (phase {view.phase.value})" if view.phase else ""
        lines = [f"{head}{where}: {view.error or 'no reason given'}"]
    lines += [f"  {name:<11}{value}" for name, value in _facts(view)]
    return "\n".join(lines)


def status_text(view: JobView) -> str:
    """``cdtrain status``: one fact per line, leaving out what is not known yet."""
    state = view.state.name + (f" ({view.phase.value})" if view.phase else "")
    f1, f1_epoch = latest_val_f1(view)
    rows: list[tuple[str, str | None]] = [
        ("job", view.job_id),
        ("state", state),
        ("epoch", epoch_text(view.epoch, view.epochs) or None),
        ("val F1", f"{number(f1)} (epoch {f1_epoch})" if f1 is not None else None),
        ("best", best_text(view.best_metrics) if view.best_metrics else None),
        ("error", view.error),
        # Until its worker has stopped it, a cancelled job still shows its old state.
        ("cancel", _cancel_text(view)),
        ("dataset", view.request.dataset_uri if view.request else None),
        ("config", view.request.config_uri if view.request else None),
        ("submitted", f"{utc(view.submitted_at)}" + (f" ({view.source})" if view.source else "")),
        ("updated", f"{utc(view.updated_at)} (event {view.last_sequence})"),
        *_facts(view),
    ]
    return "\n".join(f"{name:<11}{value}" for name, value in rows if value)


def _cancel_text(view: JobView) -> str | None:
    if view.cancel_requested_at is None:
        return None
    return f"requested {utc(view.cancel_requested_at)}" + ("" if view.state.is_terminal else "; not stopped yet")


def _facts(view: JobView) -> list[tuple[str, str]]:
    facts = []
    if view.mlflow_run_id:
        facts.append(("MLflow run", view.mlflow_run_id))
    if view.model_version:
        alias = f" (alias {view.model_alias})" if view.model_alias else ""
        facts.append(("model", f"{view.model_name or '?'} version {view.model_version}{alias}"))
        if view.model_decision:  # why it did (not) reach production
            facts.append(("promotion", view.model_decision))
    elif view.request is not None and view.request.register_model and not view.state.is_terminal:
        facts.append(("model", f"{view.request.model_name} (registered when training succeeds)"))
    return facts


def jobs_table(jobs: Sequence[JobView]) -> str:
    """``cdtrain list``: newest first, as the service sorts them."""
    header = ("JOB ID", "STATE", "PHASE", "EPOCH", "VAL F1", "SUBMITTED", "DATASET")
    rows = [header]
    for view in jobs:
        f1, _ = latest_val_f1(view)
        rows.append((view.job_id, view.state.name, view.phase.value if view.phase else "-",
                     epoch_text(view.epoch, view.epochs) or "-", number(f1) if f1 is not None else "-",
                     utc(view.submitted_at), view.request.dataset_uri if view.request else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows)
