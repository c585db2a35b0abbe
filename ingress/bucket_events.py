"""Bucket notifications in, jobs out: shared by the webhook, the AMQP listener and the SQS poller.

Every delivery path is at-least-once (and moto announces a multipart upload twice), so each
object version maps to one job id (:func:`ingress.trigger.idempotency_key`) and the submitter
answers "duplicate" for an id it has seen.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ingress.errors import IdempotencyConflict, LocationNotAllowed, Unavailable
from ingress.models import TriggerResult
from ingress.submit import Submitter
from ingress.trigger import decide
from schemas.bucket_events import ObjectCreated, parse_bucket_event

if TYPE_CHECKING:
    from infra.objects.store import ObjectStore
    from ingress.settings import TriggerSettings

log = logging.getLogger(__name__)


class BucketEventHandler:
    def __init__(self, rule: TriggerSettings, objects: ObjectStore, submitter: Submitter, *,
                 retry_after_s: float) -> None:
        self.rule = rule
        self.objects = objects
        self.submitter = submitter
        self.retry_after_s = retry_after_s

    async def handle(self, payload: dict[str, Any] | bytes | str) -> list[TriggerResult]:
        """One result per created object. Raises BucketEventError for a payload that is not a
        bucket notification (never retry it) and Unavailable (retry it later; objects already
        started are answered as duplicates then)."""
        return [await self.handle_object(obj) for obj in parse_bucket_event(payload)]

    async def handle_object(self, obj: ObjectCreated) -> TriggerResult:
        try:
            decision = await decide(obj, self.rule, self.objects)
        except ValueError as exc:  # a request the schema refuses (odd bucket name...)
            return TriggerResult(uri=obj.uri, action="ignored", reason=f"not a valid train request: {exc}")
        except Exception as exc:  # noqa: BLE001 - any store failure means "cannot decide now"
            raise Unavailable("object store", f"looking for a config beside {obj.uri}: {exc}",
                              retry_after=self.retry_after_s) from exc
        request = decision.request
        if request is None:
            log.log(logging.WARNING if decision.notable else logging.DEBUG, "ignored %s: %s", obj.uri, decision.reason)
            return TriggerResult(uri=obj.uri, action="ignored", reason=decision.reason)
        common = dict(uri=obj.uri, dataset_uri=request.dataset_uri, config_uri=request.config_uri)
        try:
            sub = await self.submitter.submit(request, source="bucket", trigger=obj.to_trigger())
        except LocationNotAllowed as exc:
            # Another bucket's events reaching this target, or a trigger prefix wider than the
            # allow-list: an operator wants to know, and nothing starts.
            log.warning("ignored %s: %s", obj.uri, exc)
            return TriggerResult(action="ignored", reason=str(exc), **common)
        except IdempotencyConflict as exc:
            # Same object version, but e.g. a train_config.yaml appeared since: still one job.
            return TriggerResult(action="duplicate", job_id=exc.job_id,
                                 reason="this object version already started a job", **common)
        if not sub.created:
            return TriggerResult(action="duplicate", job_id=sub.job_id,
                                 reason="this object version already started a job", **common)
        log.info("bucket event %s (%s) started job %s", obj.uri, decision.reason, sub.job_id)
        return TriggerResult(action="started", job_id=sub.job_id, reason=decision.reason, **common)
