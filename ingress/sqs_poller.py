"""Bucket events from SQS (AWS S3 -> SQS notifications, also via SNS): long-poll, handle, delete.

A message is deleted only after its objects were handled (jobs confirmed on the bus). On a
transient failure it is left in the queue and made visible again after ``retry_visibility_s``;
SQS then redelivers it, and a redrive policy on the queue bounds how often. A body that is not
a bucket notification is deleted at once (it never becomes valid), with an error logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ingress.bucket_events import BucketEventHandler
from ingress.errors import Unavailable
from ingress.settings import SqsSettings
from schemas.bucket_events import BucketEventError

log = logging.getLogger(__name__)


class SqsBucketPoller:
    """``client`` is an open aioboto3/aiobotocore SQS client (the caller owns it)."""

    def __init__(self, client: Any, settings: SqsSettings, handler: BucketEventHandler) -> None:
        self.client = client
        self.settings = settings
        self.handler = handler
        self.handled = 0  # messages deleted after handling (poison ones included)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="sqs-bucket-poller")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # a message being handled stays invisible, then comes back
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        log.info("polling %s for bucket events", self.settings.queue_url)
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - network/credentials: keep polling
                log.warning("SQS receive from %s failed (%s); retrying in %g s", self.settings.queue_url,
                            exc, self.settings.error_backoff_s)
                await asyncio.sleep(self.settings.error_backoff_s)

    async def poll_once(self) -> int:
        """One long poll; returns how many messages were received."""
        s = self.settings
        response = await self.client.receive_message(
            QueueUrl=s.queue_url, MaxNumberOfMessages=s.max_messages, WaitTimeSeconds=s.wait_time_s)
        messages = response.get("Messages", [])
        for message in messages:  # in order: a batch rarely holds more than a few objects
            await self._process(message)
        return len(messages)

    async def _process(self, message: dict[str, Any]) -> None:
        try:
            results = await self.handler.handle(message["Body"])
        except BucketEventError as exc:
            log.error("deleting SQS message %s: not a bucket notification: %s (body starts %r)",
                      message.get("MessageId"), exc, message["Body"][:200])
        except Exception as exc:  # noqa: BLE001 - Unavailable or a bug: keep the message
            log.log(logging.WARNING if isinstance(exc, Unavailable) else logging.ERROR,
                    "bucket event not handled (%s); SQS redelivers it in %d s", exc,
                    self.settings.retry_visibility_s, exc_info=not isinstance(exc, Unavailable))
            await self._retry_later(message)
            return
        else:
            for r in results:
                log.debug("SQS bucket event %s: %s %s", r.uri, r.action, r.job_id or r.reason)
        await self.client.delete_message(QueueUrl=self.settings.queue_url, ReceiptHandle=message["ReceiptHandle"])
        self.handled += 1

    async def _retry_later(self, message: dict[str, Any]) -> None:
        try:
            await self.client.change_message_visibility(
                QueueUrl=self.settings.queue_url, ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=self.settings.retry_visibility_s)
        except Exception as exc:  # noqa: BLE001 - it comes back after the queue's own timeout then
            log.warning("could not shorten the visibility of SQS message %s: %s", message.get("MessageId"), exc)
