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
  ``all_change_f1``, ``quality_gate``); when it was judged against a production version also
  ``champion_version`` and ``previous_production_f1`` (that version's ``val_f1`` tag), and a
  promoted one ``promoted_over``. ``promotion`` is written last: its presence means the decision
  is complete.

One version per job: a job has one run across its attempts, so the versions of ``model_name``
whose ``run_id`` is the job's run are the job's. A later attempt (the worker died, the job was
redelivered) reuses the job's version: with its decision recorded, it returns that decision
without judging again; without one, it finishes staging and promotion. Two attempts that both
found none and both created one converge: each looks again after creating, the lowest version
is the job's, and the others are deleted (their aliases moved to it first).

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
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

STAGING, PRODUCTION = "staging", "production"
F1_TAG = "val_f1"
REQUEST_TAG = "promotion_request"  # "<epoch ms> v<base>" or "<epoch ms> none"
MODEL_ID_TAG = "logged_model_id"
PROMOTION_TAG, REASON_TAG = "promotion", "promotion_reason"
CHAMPION_TAG, PREVIOUS_F1_TAG, PROMOTED_OVER_TAG = "champion_version", "previous_production_f1", "promoted_over"
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


def find_logged_model(client: MlflowClient, run_id: str, name: str = "model", *,
                      tags: Mapping[str, str] | None = None) -> str:
    """The id of the READY logged model called ``name`` that ``run_id`` produced (latest step),
    among those carrying all of ``tags`` when given."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    candidates = []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if (model.name == name and model.status == LoggedModelStatus.READY
                and all(model.tags.get(k) == v for k, v in (tags or {}).items())):
            candidates.append((output.step, model.creation_timestamp, model.model_id))
    if not candidates:
        raise LookupError(f"run {run_id} has no READY logged model named {name!r}"
                          + (f" tagged {dict(tags)}" if tags else ""))
    return max(candidates)[2]


def job_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of ``name`` registered from ``run_id`` (one run per job: the job's version),
    the lowest when a race left several; None when there is none. Reads only."""
    versions = _run_versions(client, name, run_id)
    return versions[0] if versions else None


def register_and_promote(client: MlflowClient, run_id: str, model_name: str, val_f1: float, *, judge: Judge,
                         model_id: str | None = None, tags: dict[str, str] | None = None,
                         description: str | None = None, settle_s: float = 1.0, intent_window_s: float = 600.0,
                         await_creation_s: int = 300, max_rounds: int = 5) -> RegistrationResult:
    """Create a version of ``model_name`` from ``run_id``'s logged model; stage it; promote it if
    ``judge`` says it may replace production (see the module docstring). ``tags`` go on the new
    version. Idempotent per run: a run that already has a version reuses it, and one whose
    decision is recorded gets that decision back without ``judge`` being asked."""
    if not isinstance(val_f1, (int, float)) or not math.isfinite(val_f1):
        raise ValueError(f"val_f1 must be a finite number, got {val_f1!r}")
    val_f1 = float(val_f1)
    _ensure_registered_model(client, model_name)
    mv = _converge_run_versions(client, model_name, run_id)
    if mv is None:
        model_id = model_id or find_logged_model(client, run_id)
        mv = _create_run_version(client, model_name, run_id, model_id,
                                 {F1_TAG: repr(val_f1), MODEL_ID_TAG: model_id, **(tags or {})},
                                 description, await_creation_s)
    registration_keys = {F1_TAG, MODEL_ID_TAG, REQUEST_TAG, *(tags or {})}
    recorded = _recorded_outcome(mv, registration_keys)
    if recorded is not None:
        log.info("%s v%s was registered for run %s already: %s", model_name, mv.version, run_id, recorded.reason)
        return recorded

    version = int(mv.version)
    if _production_version(client, model_name) != version:  # an earlier attempt may have promoted it already
        _stage(client, model_name, version)
    verdict, champion, promoted = _promote(client, model_name, version, judge, settle_s=settle_s,
                                           intent_window_s=intent_window_s, max_rounds=max_rounds)
    _record_decision(client, model_name, version, _decision(verdict, champion, promoted), registration_keys)
    # Read back: the result is what the version records, the same as any later attempt gets.
    outcome = _recorded_outcome(client.get_model_version(model_name, str(version)), registration_keys)
    log.info("registered %s v%d (val_f1 %.4f): %s", model_name, version, val_f1, outcome.reason)
    return outcome


# --- one version per job --------------------------------------------------------------------------
def _run_versions(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """The versions of ``name`` registered from ``run_id``, lowest first.

    The filter is ``run_id`` alone, and the name is checked here: ``run_id`` is a column of every
    version (the filter works on the SQL store and over REST), a run id never needs quoting, and
    a deleted version loses its run id, so it is never found. A tag filter (``tags.job_id``)
    silently matched nothing for a value holding an (escaped) quote."""
    found = client.search_model_versions(f"run_id = '{_quote(run_id)}'")
    return sorted((mv for mv in found if mv.name == name), key=lambda mv: int(mv.version))


def _converge_run_versions(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The run's version, after deleting any other the run has: the lowest is the run's."""
    versions = _run_versions(client, name, run_id)
    if not versions:
        return None
    keeper, *duplicates = versions
    for duplicate in duplicates:
        _delete_duplicate(client, name, int(duplicate.version), int(keeper.version))
    return keeper


def _delete_duplicate(client: MlflowClient, name: str, duplicate: int, keeper: int) -> None:
    # Deleting a version drops its aliases: move them to the run's version first, so that a
    # production or staging alias is never lost with a duplicate (normally it has none: only
    # the lowest version of a run is ever staged).
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        if int(version) == duplicate:
            _upsert(lambda alias=alias: client.set_registered_model_alias(name, alias, str(keeper)))
    log.warning("%s: v%d duplicates v%d (same run); deleting it", name, duplicate, keeper)
    try:
        client.delete_model_version(name, str(duplicate))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # another attempt deleted it first
            raise


def _create_run_version(client: MlflowClient, name: str, run_id: str, model_id: str, tags: dict[str, str],
                        description: str | None, await_creation_s: int) -> ModelVersion:
    """Create a version from ``model_id``, then converge with any attempt that raced us."""
    # The source is the logged model's storage location, not ``models:/<id>``: MLflow's SQL
    # registry resolves a ``models:/`` source through the *global* tracking URI (a TODO in its
    # code), which breaks a client built for another store; a REST server accepts either.
    source = client.get_logged_model(model_id).artifact_location
    # MLflow's SQL registry does not store ``model_id``; the logged_model_id tag keeps the link.
    created = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id, tags=tags,
                                          description=description, await_creation_for=await_creation_s)
    return _converge_run_versions(client, name, run_id) or created


def _stage(client: MlflowClient, name: str, version: int) -> None:
    """Alias ``staging`` (legacy stage ``Staging``), unless a newer version holds the alias: a
    later attempt finishing an old version must not take it back."""
    staged = (client.get_registered_model(name).aliases or {}).get(STAGING)
    if staged is None or int(staged) <= version:
        _upsert(lambda: client.set_registered_model_alias(name, STAGING, str(version)))
    _transition(client, name, version, "Staging", archive=False)


def _decision(verdict: Verdict, champion: Champion | None, promoted: bool) -> dict[str, str]:
    decision = {REASON_TAG: verdict.reason, **verdict.tags}
    if champion is not None:
        decision[CHAMPION_TAG] = str(champion.version)
        if champion.val_f1 is not None:
            decision[PREVIOUS_F1_TAG] = repr(champion.val_f1)
        if promoted:
            decision[PROMOTED_OVER_TAG] = str(champion.version)
    decision[PROMOTION_TAG] = PROMOTED if promoted else KEPT
    return decision


def _record_decision(client: MlflowClient, name: str, version: int, decision: Mapping[str, str],
                     registration_keys: set[str]) -> None:
    """Tag the decision, ``promotion`` last, so that its presence means the decision is complete;
    a concurrent attempt of the same job that recorded one first keeps it."""
    if _recorded_outcome(client.get_model_version(name, str(version)), registration_keys) is not None:
        return
    for key, value in sorted(decision.items(), key=lambda item: item[0] == PROMOTION_TAG):
        _upsert(lambda key=key, value=value: client.set_model_version_tag(name, str(version), key, value))


def _recorded_outcome(mv: ModelVersion, registration_keys: set[str]) -> RegistrationResult | None:
    """The outcome ``mv``'s tags record, or None when its decision is not (completely) recorded.
    ``registration_keys``: the tags set at creation, which are not part of the decision."""
    tags = mv.tags or {}
    if PROMOTION_TAG not in tags:
        return None
    promoted = tags[PROMOTION_TAG] == PROMOTED
    champion = tags.get(CHAMPION_TAG)
    return RegistrationResult(
        name=mv.name, version=int(mv.version), alias=PRODUCTION if promoted else STAGING, promoted=promoted,
        previous_production_version=int(champion) if champion and champion.isdigit() else None,
        stage=_stage_name(mv), val_f1=_as_f1(tags.get(F1_TAG)),
        previous_production_f1=_as_f1(tags.get(PREVIOUS_F1_TAG)), reason=tags.get(REASON_TAG, ""),
        decision_tags={k: v for k, v in tags.items() if k not in registration_keys},
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
            base = _base_of(client, name, version)
            if not verdicts:  # before any judgement here: an earlier or concurrent attempt of this job asked
                verdict = Verdict(True, "already in production, promoted over "
                                        f"{f'v{base.version}' if base else 'no production version'} at the "
                                        "request of another attempt of this job")
            return verdict, base, True
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
    request = f"{_now_ms()} {'none' if base is None else f'v{base}'}"
    _upsert(lambda: client.set_model_version_tag(name, str(version), REQUEST_TAG, request))


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
        _upsert(lambda: client.set_registered_model_alias(name, PRODUCTION, str(best)))
        _transition(client, name, best, "Production", archive=True)
    return best


# --- helpers ------------------------------------------------------------------------------------
def _upsert(write: Callable[[], object]) -> None:
    """Set an alias or a tag. MLflow's SQL registry writes them as select-then-insert: two workers
    writing the same new key at once make one fail on the unique key (``BAD_REQUEST``, seen with
    two attempts of one job staging together). The key exists then, so a second write updates it."""
    try:
        write()
    except MlflowException as exc:
        if exc.error_code != "BAD_REQUEST":
            raise
        write()


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


def _stage_name(mv: ModelVersion) -> str | None:
    """The version's legacy stage; None where the registry has no stages (or it has none)."""
    stage = getattr(mv, "current_stage", None)
    return stage if stage and stage != "None" else None
