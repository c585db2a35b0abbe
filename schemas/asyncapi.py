"""The AsyncAPI 3.0 document of the message bus, built from the topology and the message models.

Every exchange and queue comes from :class:`~schemas.topology.Topology` (AMQP 0.3.0 bindings; the
queue arguments and bindings, which that binding has no field for, as ``x-arguments`` and
``x-bound-to``), and every payload schema from the pydantic model the bus encodes and decodes
(``model_json_schema(mode="serialization")``, each model's ``$defs`` moved to
``components/schemas``). So the document cannot drift from the code: the ingress serves it at
``GET /asyncapi.json``, :func:`infra.contracts.write_asyncapi` writes it to a file, and
tests/test_event_contracts.py validates it against the official AsyncAPI 3.0 JSON Schema.

Channels: a routing key on an exchange (``is: routingKey``: what a publisher sends to) or a queue
(``is: queue``: what a consumer reads). Operations are the service's own: ``send`` for what its
processes publish, ``receive`` for what they consume. Pure: no I/O.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from schemas.control import CancelCommand
from schemas.events import CLOUDEVENTS_CONTENT_TYPE, STATUS_DATA_SCHEMA, STATUS_DATA_SCHEMA_PATH, StatusEvent
from schemas.jobs import ATTEMPT_HEADER, JOB_ID_PATTERN, JobState, TrainJob
from schemas.topology import ALL_CANCELS, ALL_JOBS, ExchangeSpec, QueueSpec, Topology

__all__ = ["AMQP_BINDING_VERSION", "ASYNCAPI_VERSION", "MESSAGE_MODELS", "REF_TEMPLATE", "build_asyncapi"]

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
REF_TEMPLATE = "#/components/schemas/{model}"
JSON = "application/json"

Json = dict[str, Any]

# components/messages name -> (model, content type, summary)
MESSAGE_MODELS: dict[str, tuple[type[BaseModel], str, str]] = {
    "trainJob": (TrainJob, JSON, "An accepted training job: what a worker runs."),
    "statusEvent": (StatusEvent, CLOUDEVENTS_CONTENT_TYPE,
                    "A job's state change or progress: a CloudEvent 1.0 in structured mode."),
    "cancelCommand": (CancelCommand, JSON, "Stop a running job at its next step (fire-and-forget)."),
}

_DEAD_LETTER_NOTE = ("RabbitMQ adds `x-first-death-reason` (`delivery_limit` or `rejected`), "
                     "`x-first-death-queue` and `x-death`; the body is the message as it died.")


class _Schemas:
    """``components/schemas`` from pydantic models; two different schemas under one name is an error."""

    def __init__(self) -> None:
        self.components: dict[str, Json] = {}

    def ref(self, model: type[BaseModel]) -> Json:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode="serialization")
        for name, definition in schema.pop("$defs", {}).items():
            self._add(name, definition)
        self._add(model.__name__, schema)
        return {"$ref": REF_TEMPLATE.format(model=model.__name__)}

    def _add(self, name: str, schema: Json) -> None:
        if self.components.setdefault(name, schema) != schema:
            raise ValueError(f"two different JSON schemas are named {name!r}; rename one of the models")


def _exchange(spec: ExchangeSpec) -> Json:
    return {"name": spec.name, "type": spec.type.value, "durable": spec.durable,
            "autoDelete": spec.auto_delete, "vhost": "/"}


def _routing_key_channel(address: str, exchange: ExchangeSpec, message: str, description: str,
                         parameters: Json | None = None) -> Json:
    channel: Json = {
        "address": address,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {"amqp": {"is": "routingKey", "exchange": _exchange(exchange),
                              "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if parameters:
        channel["parameters"] = parameters
    return channel


def _queue_channel(spec: QueueSpec, message: str, description: str, *, address: str | None = None,
                   parameters: Json | None = None) -> Json:
    name = address or spec.name
    channel: Json = {
        "address": name,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {"amqp": {
            "is": "queue",
            "queue": {"name": name, "durable": spec.durable, "exclusive": spec.exclusive,
                      "autoDelete": spec.auto_delete, "vhost": "/"},
            # What the AMQP binding has no field for: declared arguments and the exchange bindings.
            "x-arguments": dict(spec.arguments),
            "x-bound-to": [{"exchange": b.exchange, "routingKey": b.routing_key} for b in spec.bindings],
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
    }
    if parameters:
        channel["parameters"] = parameters
    return channel


def _channels(t: Topology) -> Json:
    job_id = {"description": f"The job's id (`{JOB_ID_PATTERN}`: one routing-key word)."}
    state = {"description": "The job's state, in lower case.", "enum": [s.value for s in JobState]}
    status_parameters = {"jobId": job_id, "state": state}
    # Per-subscriber queues: the owner id is a placeholder the topology would refuse, so the
    # spec is built with a valid one and named by its template.
    watcher = t.watcher_queue(ALL_JOBS, "owner")
    control = t.control_queue(ALL_CANCELS, "owner")
    return {
        "trainRequest": _routing_key_channel(
            t.request_routing_key, t.requests_exchange, "trainJob",
            "Train requests; the ingress publishes each accepted job once, the watchdog re-publishes a "
            f"lost one (header `{ATTEMPT_HEADER}`: its attempt)."),
        "trainRequestsQueue": _queue_channel(
            t.requests_queue, "trainJob",
            "The work queue the GPU workers consume (quorum; after `x-delivery-limit` failed deliveries a "
            "request is dead-lettered)."),
        "trainRequestDeadLetter": _routing_key_channel(
            t.request_routing_key, t.requests_dlx, "trainJob",
            "Requests dead-lettered by the work queue (the broker publishes here). " + _DEAD_LETTER_NOTE),
        "trainRequestsDeadQueue": _queue_channel(
            t.requests_dead_queue, "trainJob",
            "Dead-lettered requests; the projector role ends their jobs FAILED. " + _DEAD_LETTER_NOTE),
        "statusEvent": _routing_key_channel(
            "job.{jobId}.{state}", t.status_exchange, "statusEvent",
            "Status events of every job (ingress, workers, watchdog, dead-letter handler). Bind "
            "`job.<id>.*` for one job, `job.#` for all.", status_parameters),
        "projectorQueue": _queue_channel(
            t.projector_queue, "statusEvent", "Every status event, for the projector of the job views."),
        "statusEventDeadLetter": _routing_key_channel(
            "job.{jobId}.{state}", t.status_dlx, "statusEvent",
            "Status events dead-lettered by the projector queue (the broker publishes here). "
            + _DEAD_LETTER_NOTE, status_parameters),
        "projectorDeadQueue": _queue_channel(
            t.projector_dead_queue, "statusEvent",
            "Dead-lettered status events; the projector role applies them. " + _DEAD_LETTER_NOTE),
        "watcherQueue": _queue_channel(
            watcher, "statusEvent",
            "One live watcher's queue (an SSE client, a CLI follow), bound `job.<id>.*` or `job.#`; lives "
            "as long as its connection, drops its oldest events past `x-max-length`.",
            address=f"{t.prefix}.watch.{{watcherId}}",
            parameters={"watcherId": {"description": "A random id per watcher."}}),
        "cancelCommand": _routing_key_channel(
            "cancel.{jobId}", t.control_exchange, "cancelCommand",
            "Cancel commands (not mandatory: no worker listening is normal; the job view holds the "
            "cancel request).", {"jobId": job_id}),
        "controlQueue": _queue_channel(
            control, "cancelCommand", "One worker's control queue, bound `cancel.*`; lives as long as "
            "the worker's connection.",
            address=f"{t.prefix}.control.{{workerId}}",
            parameters={"workerId": {"description": "A random id per worker process."}}),
    }


def _operation(action: str, channel: str, message: str, summary: str, amqp: Json) -> Json:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": summary,
        "bindings": {"amqp": {**amqp, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _operations() -> Json:
    # Publishes are persistent (deliveryMode 2) and confirmed; mandatory unless nobody need listen.
    sent = {"deliveryMode": 2, "mandatory": True}
    acked = {"ack": True}
    return {
        "sendTrainJob": _operation("send", "trainRequest", "trainJob",
                                   "The ingress submits a job; the watchdog re-queues a lost one.", sent),
        "receiveTrainJob": _operation("receive", "trainRequestsQueue", "trainJob",
                                      "A worker runs a job (claims it, then acks early: docs/bus.md).", acked),
        "receiveDeadTrainJob": _operation("receive", "trainRequestsDeadQueue", "trainJob",
                                          "The projector role ends a dead-lettered job FAILED.", acked),
        "sendStatusEvent": _operation("send", "statusEvent", "statusEvent",
                                      "Every producer of a job's status.", sent),
        "receiveStatusEvent": _operation("receive", "projectorQueue", "statusEvent",
                                         "The projector applies the event to the job views.", acked),
        "receiveDeadStatusEvent": _operation("receive", "projectorDeadQueue", "statusEvent",
                                             "The projector role applies a dead-lettered event.", acked),
        "watchStatusEvents": _operation("receive", "watcherQueue", "statusEvent",
                                        "A live watcher follows one job or all jobs.", acked),
        "sendCancelCommand": _operation("send", "cancelCommand", "cancelCommand",
                                        "The ingress (DELETE /train/{id}) or the watchdog (a deadline) stops "
                                        "a job.", {"deliveryMode": 2, "mandatory": False}),
        "receiveCancelCommand": _operation("receive", "controlQueue", "cancelCommand",
                                           "Every worker gets every command; the one running the job stops it.",
                                           acked),
    }


def _messages(schemas: _Schemas) -> Json:
    messages: Json = {}
    for name, (model, content_type, summary) in MESSAGE_MODELS.items():
        message: Json = {
            "name": model.__name__,
            "title": model.__name__,
            "summary": summary,
            "contentType": content_type,
            "payload": schemas.ref(model),
            # The AMQP `type` property the bus sets: the model's class name.
            "bindings": {"amqp": {"messageType": model.__name__, "bindingVersion": AMQP_BINDING_VERSION}},
        }
        if model is TrainJob:
            message["headers"] = {"type": "object", "properties": {ATTEMPT_HEADER: {
                "type": "integer", "minimum": 0,
                "description": "The attempt this copy of the job starts (0 for the first)."}}}
        if model is StatusEvent:
            message["description"] = (
                f"`dataschema` is `{STATUS_DATA_SCHEMA}` (the ingress serves that JSON Schema at "
                f"`{STATUS_DATA_SCHEMA_PATH}`); `traceparent` (CloudEvents distributed tracing) is the "
                "W3C trace context of the span that made the event, in the trace of the job's POST. Events "
                "of older producers came as `application/json` with the same body.")
        messages[name] = message
    return messages


def build_asyncapi(topology: Topology | None = None, *, version: str = "0+unknown",
                   host: str = "localhost:5672") -> Json:
    """The whole document for ``topology`` (default: the production one, prefix ``cdtrain``)."""
    topology = topology or Topology()
    schemas = _Schemas()
    messages = _messages(schemas)
    return copy.deepcopy({
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "cdtrain message bus",
            "version": version,
            "description": "Train requests in a quorum work queue, job status events (CloudEvents) on a topic "
                           "exchange, cancel commands to workers, and the dead letters of both queues. Every "
                           "publish is persistent and confirmed; delivery is at least once (deduplicate on "
                           "`message_id`: the job id for requests, the event id for events).",
        },
        "defaultContentType": JSON,
        "servers": {"rabbitmq": {"host": host, "protocol": "amqp", "protocolVersion": "0.9.1",
                                 "description": "RabbitMQ 3.10+ (quorum queues, at-least-once dead-lettering)."}},
        "channels": _channels(topology),
        "operations": _operations(),
        "components": {"messages": messages, "schemas": dict(sorted(schemas.components.items()))},
    })
