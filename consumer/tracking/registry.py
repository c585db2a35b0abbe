"""Register a run's model; promote it only when it is good enough and better than production.

Policy (aliases are the source of truth; legacy stages are mirrored where the server has them):

* every new version gets the tags ``val_f1`` (its F1 on its own job's validation split, for
  information only: F1s of different datasets are not comparable), ``logged_model_id`` and the
  alias ``staging`` (legacy stage ``Staging``);
* whether it may replace production is the caller's *judge*'s call
  (:class:`~consumer.tracking.promotion.PromotionJudge` in the worker): given the current
  production version (the champion, or None), it returns a :class:`Verdict`. The worker's judge
  requires the new model's F1 on its job's validation split to be strictly above that split's
  all-change F1 plus a margin (the quality gate, first version included), and strictly above the
  champion's F1 scored on the same split by the same function (a tie keeps the champion);
* a production version without a ``val_f1`` tag (placed by hand or by another pipeline) is
  never replaced automatically (the judge says no, and the settling below never moves it);
* every new version records the decision in words: ``promotion`` (``promoted`` | ``kept``),
  ``promotion_reason``, and the verdict's numbers (``challenger_f1``, ``champion_f1``,
  ``all_change_f1``, ``quality_gate``); a promoted one also ``promoted_over`` and
  ``previous_production_f1`` (the old version's ``val_f1`` tag).

Concurrency: MLflow has no compare-and-set on aliases, so workers finishing together cooperate.
A worker whose judge says yes re-reads production (it may have moved while the champion was
being scored: then it judges the new one), then tags its version ``promotion_request`` =
``"<epoch ms> <base>"``, the base being the version it beat (``none`` for no production), waits
``settle_s`` and *settles*: requests of the last ``intent_window_s`` form trees (each request hangs
under its base); from the root of the tree that holds the current production, each level goes to
its earliest request (first come, first served), and the leaf reached must be production. Whoever
sees otherwise puts it there. Every worker computes the same leaf from the same tags, so the
alias converges whatever the interleaving. A worker whose version is not the leaf lost to a
request it was never compared with: it judges the new production on its own data and asks again
(up to ``max_rounds``), which is what would have happened had the jobs finished one after the
other. A worker that gives up or is judged out removes its request.

Residual races: request times are the workers' clocks, so clock skew larger than the gap between
two requests can reorder them; a worker that stalls for longer than ``intent_window_s``, or dies
between asking and settling, can leave a model in production that no later job compared with the
one it displaced; a person who rolls production back to a version within ``intent_window_s`` of
a promotion over it can be overridden by a concurrent settle. A per-model lock (one conditional
write in the job store) would close all three.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
F1_TAG = "val_f1"
REQUEST_TAG = "promotion_request"  # "<epoch ms> v<base>" or "<epoch ms> none"
MODEL_ID_TAG = "logged_model_id"
PROMOTION_TAG, REASON_TAG = "promotion", "promotion_reason"
PROMOTED, KEPT = "promoted", "kept"


@dataclass(frozen=True)
class Champion:
    """The production version a new version is judged against."""

    version: int
    run_id: str | None
    val_f1: float | None  # its val_f1 tag; None: placed by hand or by another pipeline


@dataclass(frozen=True)
class Verdict:
    """A judge's answer: may the new version replace this champion, and why, in words."""

    promote: bool
    reason: str
    tags: Mapping[str, str] = field(default_factory=dict)  # the numbers behind the reason, tagged on the version


Judge = Callable[[Champion | None], Verdict]


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: int
    alias: str  # "production" when promoted, else "staging"
    promoted: bool
    previous_production_version: int | None  # the champion it was last judged against, if any
    stage: str | None  # legacy stage of the new version; None where the server has no stages
    val_f1: float
    previous_production_f1: float | None  # that champion's val_f1 tag (its own data), for information
    reason: str  # why it was (not) promoted, in words
    decision_tags: dict[str, str] = field(default_factory=dict)  # what was tagged on the version


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


def register_and_promote(client: MlflowClient, run_id: str, model_name: str, val_f1: float, *, judge: Judge,
                         model_id: str | None = None, tags: dict[str, str] | None = None,
                         description: str | None = None, settle_s: float = 1.0, intent_window_s: float = 600.0,
                         await_creation_s: int = 300, max_rounds: int = 5) -> RegistrationResult:
    """Create a version of ``model_name`` from ``run_id``'s logged model; stage it; promote it if
    ``judge`` says it may replace production (see the module docstring). ``tags`` go on the new
    version."""
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

    verdict, champion, promoted = _promote(client, model_name, version, judge, settle_s=settle_s,
                                           intent_window_s=intent_window_s, max_rounds=max_rounds)
    decision = {PROMOTION_TAG: PROMOTED if promoted else KEPT, REASON_TAG: verdict.reason, **verdict.tags}
    if promoted and champion is not None:
        decision["promoted_over"] = str(champion.version)
        if champion.val_f1 is not None:
            decision["previous_production_f1"] = repr(champion.val_f1)
    for key, value in decision.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    if stage is not None:  # a settle (ours or another worker's) may have moved it
        stage = _current_stage(client, model_name, version)

    log.info("registered %s v%d (val_f1 %.4f): %s", model_name, version, val_f1, verdict.reason)
    return RegistrationResult(
        name=model_name, version=version, alias=PRODUCTION if promoted else STAGING, promoted=promoted,
        previous_production_version=champion.version if champion else None, stage=stage, val_f1=val_f1,
        previous_production_f1=champion.val_f1 if champion else None, reason=verdict.reason,
        decision_tags=decision,
    )


# --- promotion ----------------------------------------------------------------------------------
def _promote(client: MlflowClient, name: str, version: int, judge: Judge, *, settle_s: float,
             intent_window_s: float, max_rounds: int) -> tuple[Verdict, Champion | None, bool]:
    """Judge production, ask, settle; after losing to a concurrent request, judge the new
    production and ask again. Returns the last verdict, the champion it was about, and whether
    ``version`` ended up in production."""
    verdicts: dict[int | None, Verdict] = {}  # one judgement per champion: scoring is slow
    verdict, champion = Verdict(False, "not judged"), None
    for _ in range(max_rounds):
        champion = _production(client, name)
        if champion is not None and champion.version == version:  # another worker's settle put it there
            return verdict, _base_of(client, name, version), True
        key = champion.version if champion else None
        if key not in verdicts:
            verdicts[key] = judge(champion)
        verdict = verdicts[key]
        if not verdict.promote:
            return verdict, champion, False
        if _production_version(client, name) != key:
            continue  # production moved while the champion was being scored: judge the new one
        _request(client, name, version, key)
        winner = None
        try:
            if settle_s > 0:
                time.sleep(settle_s)
            winner = _settle(client, name, intent_window_s)
        finally:
            if winner != version:  # a request left behind could win someone else's settle
                _withdraw(client, name, version)
        if winner == version:
            return verdict, champion, True
        log.info("%s v%d: a concurrent request won (v%s in production); judging it on this job's data",
                 name, version, winner)
    return Verdict(False, f"production kept changing while this job compared ({max_rounds} rounds of "
                          "concurrent promotions); promote by hand", verdict.tags), champion, False


def _withdraw(client: MlflowClient, name: str, version: int) -> None:
    with contextlib.suppress(MlflowException):
        client.delete_model_version_tag(name, str(version), REQUEST_TAG)


def _request(client: MlflowClient, name: str, version: int, base: int | None) -> None:
    # One tag for time and base: two tags would let a settle see one without the other.
    client.set_model_version_tag(name, str(version), REQUEST_TAG,
                                 f"{_now_ms()} {'none' if base is None else f'v{base}'}")


@dataclass(frozen=True)
class PromotionRequest:
    """A version's ``promotion_request`` tag: when it asked, and the version it beat (None: none)."""

    at_ms: int
    base: int | None


def _parse_request(raw: str | None) -> PromotionRequest | None:
    if not raw:
        return None
    parts = raw.split()
    if len(parts) != 2:
        return None
    try:
        base = None if parts[1] == "none" else int(parts[1].removeprefix("v"))
        return PromotionRequest(int(parts[0]), base)
    except ValueError:
        return None


def _requests(client: MlflowClient, name: str, intent_window_s: float) -> dict[int, PromotionRequest]:
    oldest = _now_ms() - intent_window_s * 1000
    found = {}
    for mv in client.search_model_versions(f"name = '{_quote(name)}'"):
        request = _parse_request(mv.tags.get(REQUEST_TAG))
        if request is not None and request.at_ms >= oldest:
            found[int(mv.version)] = request
    return found


def _base_of(client: MlflowClient, name: str, version: int) -> Champion | None:
    """The champion ``version`` was promoted over, from its own request tag."""
    request = _parse_request(client.get_model_version(name, str(version)).tags.get(REQUEST_TAG))
    if request is None or request.base is None:
        return None
    mv = client.get_model_version(name, str(request.base))
    return Champion(request.base, mv.run_id, _as_f1(mv.tags.get(F1_TAG)))


def rightful_production(current: int | None, requests: Mapping[int, PromotionRequest]) -> int | None:
    """The version that must be production: from the root of the request tree holding
    ``current``, each level's earliest request, down to a leaf (see the module docstring)."""
    root, seen = current, set()
    while root in requests and root not in seen:  # climb to the version everyone was judged against
        seen.add(root)
        root = requests[root].base
    node, seen = root, set()
    while node not in seen:  # seen: stale tags could form a cycle; never loop on one
        seen.add(node)
        children = [v for v, r in requests.items() if r.base == node and v not in seen]
        if not children:
            return node
        # First come, first served: the later siblings were never compared with it, and their
        # workers judge it next.
        node = min(children, key=lambda v: (requests[v].at_ms, v))
    return node


def _settle(client: MlflowClient, name: str, intent_window_s: float) -> int | None:
    """Make production the rightful version; returns the version in production. Every concurrent
    worker reaches the same choice."""
    current = _production(client, name)
    if current is not None and current.val_f1 is None:
        return current.version  # placed by hand (no val_f1): never touched
    current_version = current.version if current else None
    best = rightful_production(current_version, _requests(client, name, intent_window_s))
    if best is not None and best != current_version:
        if current_version is not None:
            log.warning("%s: concurrent promotions; putting v%d in production instead of v%d", name, best,
                        current_version)
        client.set_registered_model_alias(name, PRODUCTION, str(best))
        _transition(client, name, best, "Production", archive=True)
    return best


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


def _production_version(client: MlflowClient, name: str) -> int | None:
    aliases = client.get_registered_model(name).aliases or {}
    return int(aliases[PRODUCTION]) if PRODUCTION in aliases else None


def _production(client: MlflowClient, name: str) -> Champion | None:
    """The production version (its run and val_f1 tag), or None when the alias is unset."""
    version = _production_version(client, name)
    if version is None:
        return None
    mv = client.get_model_version(name, str(version))
    return Champion(version, mv.run_id, _as_f1(mv.tags.get(F1_TAG)))


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


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _current_stage(client: MlflowClient, name: str, version: int) -> str | None:
    with contextlib.suppress(Exception):
        return client.get_model_version(name, str(version)).current_stage
    return None
