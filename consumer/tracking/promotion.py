"""Who may replace production: the quality gate, and champion vs challenger on the same data.

Two F1s measured on different datasets say nothing about which model is better, and a model can
score a respectable-looking F1 on a split where calling every pixel "change" scores more. So a
new model (the challenger) is judged on its own job's validation split only:

* **Quality gate.** Its F1 must be strictly above the split's *all-change F1* plus a margin
  (``promotion_margin``, default 0.10). The all-change F1 is the F1 of predicting change
  everywhere: with ``p`` the fraction of change pixels, precision ``p`` and recall 1 give
  ``2p / (1 + p)``. This holds for the first version of a name too.
* **Champion vs challenger.** The production model (the champion) is scored with the very same
  function on the same split, with this job's evaluation settings (window, blending, TTA, label
  threshold); each model keeps its own decision threshold. The challenger must be strictly
  better (a tie keeps the champion).
* A champion without a ``val_f1`` tag (placed by hand) is never replaced automatically; one
  without a ``checkpoint/best.pt`` artifact cannot be scored, so it is not replaced either.

:class:`PromotionJudge` turns that into a :class:`~consumer.tracking.registry.Verdict` for a
given champion; the registry asks it again whenever production changes under it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from schemas.training import TrainConfig

from snunet_cbam.model_source import CHECKPOINT_ARTIFACT, CHECKPOINT_DIR
from .registry import Champion, Verdict

log = logging.getLogger(__name__)

DEFAULT_PROMOTION_MARGIN = 0.10

ScoreFn = Callable[[Path], Mapping[str, Any]]
"""A checkpoint -> its metrics (``f1`` and the counts ``tp, fp, fn, tn``) on one split."""


class CheckpointMissing(LookupError):
    """The version's run has no ``checkpoint/best.pt``: it was registered before checkpoints were
    logged, or by something else than this service."""


def all_change_f1(tp: float, fp: float, fn: float, tn: float) -> float:
    """F1 of predicting every pixel as change: ``2p / (1 + p)``, ``p`` = change pixels / all pixels."""
    total = tp + fp + fn + tn
    if total <= 0:
        return 0.0
    p = (tp + fn) / total
    return 2 * p / (1 + p)


@dataclass(frozen=True)
class SplitScore:
    """A model's F1 on one split, and the all-change F1 of that split."""

    f1: float
    all_change_f1: float

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> "SplitScore":
        f1 = float(metrics["f1"])
        if not math.isfinite(f1):
            raise ValueError(f"the scoring gave a non-finite F1 ({f1})")
        return cls(f1=f1, all_change_f1=all_change_f1(*(float(metrics[k]) for k in ("tp", "fp", "fn", "tn"))))


def validation_scorer(data_dir: Path, config: TrainConfig) -> ScoreFn:
    """The one function champion and challenger are both scored with: this job's validation split,
    with this job's evaluation settings (``settings=config``) on this worker's device."""
    from snunet_cbam.checkpoint_eval import evaluate_checkpoint  # torch: only where scoring happens

    def score(checkpoint: Path) -> Mapping[str, Any]:
        return evaluate_checkpoint(checkpoint, data_dir, config.val_split, device=config.device, settings=config)

    return score


def fetch_checkpoint(client: MlflowClient, run_id: str | None, dst_dir: Path) -> Path:
    """Download ``checkpoint/best.pt`` of ``run_id`` into ``dst_dir``; :class:`CheckpointMissing`
    when the run has none."""
    if not run_id:
        raise CheckpointMissing("the version has no run")
    if CHECKPOINT_ARTIFACT not in {a.path for a in client.list_artifacts(run_id, CHECKPOINT_DIR)}:
        raise CheckpointMissing(f"run {run_id} has no {CHECKPOINT_ARTIFACT}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst_dir)))


def _tag(value: float) -> str:
    return repr(round(value, 6))


class PromotionJudge:
    """The registry's judge for one challenger (see the module docstring).

    The challenger is scored once, on first use; each champion once (the registry may ask about
    several when concurrent promotions move production). Scoring failures do not raise: they
    become a verdict that keeps the challenger out, with the reason in words.
    """

    def __init__(self, client: MlflowClient, challenger_checkpoint: Path, score: ScoreFn, *, margin: float,
                 work_dir: Path) -> None:
        self.client = client
        self.challenger_checkpoint = Path(challenger_checkpoint)
        self.score = score
        self.margin = margin
        self.work_dir = Path(work_dir)  # champion checkpoints are downloaded here
        self._challenger: SplitScore | str | None = None  # the score, or why there is none
        self._champions: dict[int, float | str] = {}  # version -> F1 on this job's data, or why none

    def __call__(self, champion: Champion | None) -> Verdict:
        challenger = self.challenger()
        if isinstance(challenger, str):
            return Verdict(False, challenger)
        gate = challenger.all_change_f1 + self.margin
        numbers = {"challenger_f1": _tag(challenger.f1), "all_change_f1": _tag(challenger.all_change_f1),
                   "quality_gate": _tag(gate)}
        # Strictly above: a model that only matches "change everywhere" (plus the margin) is no use.
        if not challenger.f1 > gate:
            return Verdict(False, f"below the quality gate: F1 {challenger.f1:.4f} <= all-change F1 "
                                  f"{challenger.all_change_f1:.4f} + margin {self.margin:.2f}", numbers)
        if champion is None:
            return Verdict(True, f"first production version: F1 {challenger.f1:.4f} on this job's validation "
                                 f"split is above the quality gate {gate:.4f}", numbers)
        if champion.val_f1 is None:
            return Verdict(False, f"production v{champion.version} has no val_f1 tag (placed by hand); it is never "
                                  "replaced automatically", numbers)
        champion_f1 = self.champion_f1(champion)
        if isinstance(champion_f1, str):
            return Verdict(False, champion_f1, numbers)
        numbers["champion_f1"] = _tag(champion_f1)
        if challenger.f1 > champion_f1:  # strictly: a tie keeps the champion
            return Verdict(True, f"F1 {challenger.f1:.4f} on this job's validation split beats production "
                                 f"v{champion.version}'s {champion_f1:.4f} on the same data", numbers)
        return Verdict(False, f"F1 {challenger.f1:.4f} on this job's validation split does not beat production "
                              f"v{champion.version}'s {champion_f1:.4f} on the same data", numbers)

    def challenger(self) -> SplitScore | str:
        if self._challenger is None:
            try:
                self._challenger = SplitScore.from_metrics(self.score(self.challenger_checkpoint))
            except Exception as exc:  # noqa: BLE001 - the job trained; only the promotion is lost
                log.exception("could not score the new model on its validation split")
                self._challenger = (f"this job's model could not be scored on its validation split "
                                    f"({type(exc).__name__}: {exc}); not promoted")
        return self._challenger

    def champion_f1(self, champion: Champion) -> float | str:
        """The champion's F1 on this job's validation split, or why it has none."""
        if champion.version not in self._champions:
            self._champions[champion.version] = self._score_champion(champion)
        return self._champions[champion.version]

    def _score_champion(self, champion: Champion) -> float | str:
        where = f"production v{champion.version}"
        try:
            checkpoint = fetch_checkpoint(self.client, champion.run_id, self.work_dir / f"v{champion.version}")
        except CheckpointMissing:
            return f"{where} has no checkpoint to score on this job's data; promote by hand"
        except Exception as exc:  # noqa: BLE001
            log.exception("could not fetch the checkpoint of %s", where)
            return f"{where}'s checkpoint could not be fetched ({type(exc).__name__}: {exc}); promote by hand"
        try:
            return SplitScore.from_metrics(self.score(checkpoint)).f1
        except Exception as exc:  # noqa: BLE001 - e.g. an architecture this code no longer builds
            log.exception("could not score %s on this job's data", where)
            return f"{where} could not be scored on this job's data ({type(exc).__name__}: {exc}); promote by hand"
