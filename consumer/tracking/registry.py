"""Register a run's model and promote it when it beats production.

Policy (aliases are the source of truth; legacy stages are mirrored where the server has them):

* every new version gets the tag ``val_f1`` and the alias ``staging`` (legacy stage ``Staging``);
* it becomes ``production`` (legacy stage ``Production``, other Production versions archived)
  when its validation F1 is strictly higher than the current production version's ``val_f1``
  tag, or when there is no production version yet (a user expects a usable production model
  after the first job). A tie keeps the incumbent.
* a production version without a ``val_f1`` tag (promoted by hand or by another pipeline) is
  never replaced automatically.
* the promoted version records ``promoted_over`` and ``previous_production_f1``.

Concurrency: MLflow has no compare-and-set on aliases, so two workers finishing together
cooperate instead. A worker about to promote first tags its version ``promotion_requested_at``,
re-reads the production alias right before setting it, sets it, and after ``settle_s`` seconds
looks again: among the current production version and every version that asked for promotion in
the last ``intent_window_s`` seconds, the one with the highest F1 (ties: the incumbent, then the
older version) must be production, and whichever worker sees otherwise puts it there. Every worker
computes the same answer, so the alias converges to the best candidate whatever the interleaving,
and each result says whether its own version ended up in production. Residual race: a worker that
stalls for longer than ``intent_window_s`` between asking and checking (or dies in between) can
leave a worse version in production until the next registration; a per-model lock (one
conditional write in the job store) would close that too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
F1_TAG = "val_f1"
INTENT_TAG = "promotion_requested_at"  # epoch milliseconds
MODEL_ID_TAG = "logged_model_id"


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: int
    alias: str  # "production" when promoted, else "staging"
    promoted: bool
    previous_production_version: int | None  # production before this registration, if any
    stage: str | None  # legacy stage of the new version; None where the server has no stages
    val_f1: float
    previous_production_f1: float | None
    reason: str  # why it was (not) promoted, in words


def find_logged_model(client: MlflowClient, run_id: str, name: str = "model") -> str:
    """The id of the READY logged model called ``name`` that ``run_id`` produced (latest step)."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    candidates = []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.name == name and model.status == LoggedModelStatus.READY:
            candidates.append((output.step, model.creation_timestamp, model.model_id))
    if not candidates:
        raise LookupError(f"run {run_id} has no READY logged model named {name!r}")
    return max(candidates)[2]


def register_and_promote(client: MlflowClient, run_id: str, model_name: str, val_f1: float, *,
                         model_id: str | None = None, tags: dict[str, str] | None = None,
                         description: str | None = None, settle_s: float = 1.0,
                         intent_window_s: float = 600.0, await_creation_s: int = 300) -> RegistrationResult:
    """Create a version of ``model_name`` from ``run_id``'s logged model; stage it; promote it if
    it beats production (see the module docstring). ``tags`` go on the new version."""
    if not isinstance(val_f1, (int, float)) or not math.isfinite(val_f1):
        raise ValueError(f"val_f1 must be a finite number, got {val_f1!r}")
    val_f1 = float(val_f1)
    model_id = model_id or find_logged_model(client, run_id)
    _ensure_registered_model(client, model_name)
    # The source is the logged model's storage location, not ``models:/<id>``: MLflow's SQL
    # registry resolves a ``models:/`` source through the *global* tracking URI (a TODO in its
    # code), which breaks a client built for another store; a REST server accepts either.
    source = client.get_logged_model(model_id).artifact_location
    mv = client.create_model_version(
        model_name, source=source, run_id=run_id, model_id=model_id,
        # MLflow's SQL registry does not store ``model_id``; the tag keeps the link everywhere.
        tags={F1_TAG: repr(val_f1), MODEL_ID_TAG: model_id, **(tags or {})}, description=description,
        await_creation_for=await_creation_s,
    )
    version = int(mv.version)
    client.set_registered_model_alias(model_name, STAGING, str(version))
    stage = _transition(client, model_name, version, "Staging", archive=False)

    previous = _production(client, model_name)
    promote, reason = _decide(previous, val_f1)
    if promote:
        client.set_model_version_tag(model_name, str(version), INTENT_TAG, str(_now_ms()))
        previous = _production(client, model_name)  # re-read right before the write
        promote, reason = _decide(previous, val_f1)
    if promote:
        client.set_registered_model_alias(model_name, PRODUCTION, str(version))
        if previous is not None:
            client.set_model_version_tag(model_name, str(version), "promoted_over", str(previous[0]))
            client.set_model_version_tag(model_name, str(version), "previous_production_f1", repr(previous[1]))
        stage = _transition(client, model_name, version, "Production", archive=True) or stage
        winner = _settle(client, model_name, settle_s, intent_window_s)
        if winner != version:
            promote = False
            reason = f"a concurrent promotion put v{winner} in production"
            for tag in ("promoted_over", "previous_production_f1"):
                with contextlib.suppress(MlflowException):
                    client.delete_model_version_tag(model_name, str(version), tag)
            stage = _current_stage(client, model_name, version) if stage else None

    prev_version, prev_f1 = previous if previous else (None, None)
    log.info("registered %s v%d (val_f1 %.4f): %s", model_name, version, val_f1, reason)
    return RegistrationResult(
        name=model_name, version=version, alias=PRODUCTION if promote else STAGING, promoted=promote,
        previous_production_version=prev_version, stage=stage, val_f1=val_f1,
        previous_production_f1=prev_f1, reason=reason,
    )


# --- helpers ------------------------------------------------------------------------------------
def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description="SNUNet-CBAM change detection (cdtrain)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another worker created it meanwhile
            raise


def _production(client: MlflowClient, name: str) -> tuple[int, float | None] | None:
    """(version, its val_f1 tag or None) of the production alias, or None when unset."""
    aliases = client.get_registered_model(name).aliases or {}
    if PRODUCTION not in aliases:
        return None
    version = int(aliases[PRODUCTION])
    return version, _as_f1(client.get_model_version(name, str(version)).tags.get(F1_TAG))


def _decide(previous: tuple[int, float | None] | None, val_f1: float) -> tuple[bool, str]:
    if previous is None:
        return True, "first production version"
    version, f1 = previous
    if f1 is None:
        return False, f"production v{version} has no {F1_TAG} tag; it is never replaced automatically"
    if val_f1 > f1:
        return True, f"val_f1 {val_f1:.4f} > production v{version} {f1:.4f}"
    return False, f"val_f1 {val_f1:.4f} <= production v{version} {f1:.4f}"


def _settle(client: MlflowClient, name: str, settle_s: float, intent_window_s: float) -> int | None:
    """After ``settle_s``, make production the best of (current production, recent requests);
    returns the version in production. Every concurrent worker reaches the same choice."""
    if settle_s > 0:
        time.sleep(settle_s)
    current = _production(client, name)
    if current is not None and current[1] is None:
        return current[0]  # placed by hand (no val_f1): never touched
    oldest = _now_ms() - intent_window_s * 1000
    candidates: dict[int, float] = {}
    for mv in client.search_model_versions(f"name = '{_quote(name)}'"):
        requested, f1 = mv.tags.get(INTENT_TAG), _as_f1(mv.tags.get(F1_TAG))
        if requested is not None and f1 is not None and _as_int(requested) >= oldest:
            candidates[int(mv.version)] = f1
    if current is not None:
        candidates[current[0]] = current[1]
    if not candidates:
        return None
    incumbent = current[0] if current else None
    best = max(candidates, key=lambda v: (candidates[v], v == incumbent, -v))
    if best != incumbent:
        log.warning("%s: concurrent promotions; putting v%d (val_f1 %.4f) in production instead of v%s",
                    name, best, candidates[best], incumbent)
        client.set_registered_model_alias(name, PRODUCTION, str(best))
        _transition(client, name, best, "Production", archive=True)
    return best


def _transition(client: MlflowClient, name: str, version: int, stage: str, archive: bool) -> str | None:
    """Legacy stage, mirrored for older clients; deprecated in MLflow and absent from some
    registries (Unity Catalog), so a failure only logs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mv = client.transition_model_version_stage(name, str(version), stage,
                                                       archive_existing_versions=archive)
        return mv.current_stage
    except Exception as exc:  # noqa: BLE001
        log.info("legacy stage %s not set on %s v%d (%s); aliases only", stage, name, version, exc)
        return None


def _as_f1(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _as_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _current_stage(client: MlflowClient, name: str, version: int) -> str | None:
    with contextlib.suppress(Exception):
        return client.get_model_version(name, str(version)).current_stage
    return None
