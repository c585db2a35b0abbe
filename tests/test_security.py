"""Secure by default (docs/security.md): who may call, what jobs may read, how big a request may be.

The ingress runs over real sockets on the in-process bus and on RabbitMQ (the ``bus`` fixture);
the refusal to start is shown on real ``cdtrain serve`` processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from consumer.stores import StoreResolver
from infra.bus import BusSettings, MessageBus
from infra.objects import LocalObjectStore
from infra.objects.allow_list import UriAllowList
from infra.secret_files import with_secret_files
from infra.views import InMemoryJobViewStore, open_view_store
from ingress.security import InsecureStart, check_startup
from ingress.settings import IngressSettings
from schemas.redact import Redactor, redact_credentials
from schemas.training import ConfigError, TrainConfig
from snunet_cbam.config import parse_yaml_mapping
from tests.test_bucket_trigger import minio_event
from tests.test_ingress import DATASET, REPO, Serve, free_port, make_settings, serve  # noqa: F401 - fixture

TOKEN, HOOK = "api-token-0123456789", "hook-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED = "s3://datasets/levir-cd/, s3://configs"


def secured(**overrides: Any) -> IngressSettings:
    return make_settings(api_token=SecretStr(TOKEN), webhook_token=SecretStr(HOOK),
                         allowed_uris=UriAllowList.parse(ALLOWED), **overrides)


# --- 1. auth: settings and the refusal to start ------------------------------------------------------
@pytest.mark.parametrize("value", ["", "  ", "\n"])
@pytest.mark.parametrize("var", ["CDTRAIN_API_TOKEN", "CDTRAIN_WEBHOOK_TOKEN"])
def test_an_empty_token_is_an_error_not_auth_off(var: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{var} is set but empty"):
        IngressSettings.from_env({var: value})


def test_tokens_and_other_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "api").write_text(TOKEN + "\n")  # as `kubectl create secret --from-file` leaves it
    (tmp_path / "bus").write_text("amqp://cdtrain:p%40ss-word@rabbit:5672/")
    settings = IngressSettings.from_env({"CDTRAIN_API_TOKEN_FILE": str(tmp_path / "api"),
                                         "CDTRAIN_BUS_URL_FILE": str(tmp_path / "bus")})
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    assert settings.bus.url.endswith("@rabbit:5672/")
    (tmp_path / "empty").write_text("\n")
    for env, problem in (
            ({"CDTRAIN_API_TOKEN_FILE": str(tmp_path / "empty")}, "CDTRAIN_API_TOKEN_FILE: .* is empty"),
            ({"CDTRAIN_WEBHOOK_TOKEN_FILE": str(tmp_path / "missing")}, "CDTRAIN_WEBHOOK_TOKEN_FILE: cannot read"),
            ({"CDTRAIN_API_TOKEN": "x", "CDTRAIN_API_TOKEN_FILE": str(tmp_path / "api")}, "both set")):
        with pytest.raises(ValueError, match=problem):
            IngressSettings.from_env(env)
    assert with_secret_files({"OTHER_FILE": "/x"}) == {"OTHER_FILE": "/x"}  # only the secret variables


@pytest.mark.parametrize("env, refused", [
    ({}, []),  # embedded, loopback: nobody else can reach it
    ({"CDTRAIN_HOST": "::1"}, []),
    ({"CDTRAIN_HOST": "0.0.0.0"}, ["CDTRAIN_API_TOKEN and CDTRAIN_WEBHOOK_TOKEN", "CDTRAIN_ALLOWED_URIS"]),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/"}, ["CDTRAIN_API_TOKEN and CDTRAIN_WEBHOOK_TOKEN", "CDTRAIN_ALLOWED_URIS"]),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_API_TOKEN": TOKEN, "CDTRAIN_ALLOWED_URIS": ALLOWED},
     ["CDTRAIN_WEBHOOK_TOKEN not set"]),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_API_TOKEN": TOKEN, "CDTRAIN_WEBHOOK_TOKEN": HOOK},
     ["CDTRAIN_ALLOWED_URIS not set"]),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_API_TOKEN": TOKEN, "CDTRAIN_WEBHOOK_TOKEN": HOOK,
      "CDTRAIN_ALLOWED_URIS": ALLOWED}, []),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_AUTH": "none", "CDTRAIN_ALLOWED_URIS": "*"}, []),
    ({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_AUTH": "none", "CDTRAIN_ALLOWED_URIS": ALLOWED,
      "CDTRAIN_DEFAULT_CONFIG_URI": "s3://elsewhere/c.yaml"}, ["CDTRAIN_DEFAULT_CONFIG_URI"]),
])
def test_the_ingress_refuses_to_start_insecurely(env: dict[str, str], refused: list[str]) -> None:
    settings = IngressSettings.from_env(env)
    if not refused:
        check_startup(settings)
        return
    with pytest.raises(InsecureStart) as caught:
        check_startup(settings)
    for name in refused:
        assert name in str(caught.value)


def test_every_opt_out_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    settings = IngressSettings.from_env({"CDTRAIN_BUS_URL": "amqp://rabbit/", "CDTRAIN_AUTH": "none",
                                         "CDTRAIN_ALLOWED_URIS": "*"})
    with caplog.at_level(logging.WARNING, logger="ingress.security"):
        check_startup(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CDTRAIN_AUTH=none" in w for w in warnings), warnings
    assert any("CDTRAIN_ALLOWED_URIS=*" in w for w in warnings), warnings


def _serve_process(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CDTRAIN_", "AWS_"))}
    return subprocess.Popen([sys.executable, "-m", "cdtrain", "serve", "--role", "ingress"], cwd=REPO, text=True,
                            env={**base, "CDTRAIN_DATA_DIR": str(tmp_path), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_a_real_ingress_process_refuses_then_starts_when_told(amqp_url: str, tmp_path: Path) -> None:
    port = free_port()
    common = {"CDTRAIN_BUS_URL": amqp_url, "CDTRAIN_PORT": str(port), "CDTRAIN_MONGODB_URL": "memory://"}
    refused = _serve_process(common, tmp_path)
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2, out
    assert "refusing to start" in out and "CDTRAIN_API_TOKEN" in out and "CDTRAIN_ALLOWED_URIS" in out, out
    assert "Traceback" not in out

    opted_out = _serve_process({**common, "CDTRAIN_AUTH": "none", "CDTRAIN_ALLOWED_URIS": "*"}, tmp_path)
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                assert opted_out.poll() is None, opted_out.communicate()[0]
                try:
                    async with http.get(f"http://127.0.0.1:{port}/train") as resp:
                        if resp.status == 200:  # no token asked: auth is off, as it was told
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the ingress did not answer within 60 s"
                await asyncio.sleep(0.2)
    finally:
        opted_out.terminate()
        out, _ = opted_out.communicate(timeout=30)
    assert "CDTRAIN_AUTH=none" in out and "WARNING" in out, out


# --- 1. auth: the routes -----------------------------------------------------------------------------
async def test_every_command_and_query_needs_its_token(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured())
    event = minio_event("datasets", "levir-cd/set.zip")
    calls = [("POST", "/train", {"dataset_uri": DATASET}), ("GET", "/train", None), ("GET", "/train/abc", None),
             ("DELETE", "/train/abc", None), ("GET", "/train/abc/events", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {HOOK}"},
                    {"Authorization": TOKEN}):
        for method, path, body in calls:
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert "bearer token" in (await resp.json())["error"]
    # The webhook has its own token: the API token does not open it.
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH, {"Authorization": HOOK}):
        assert (await client.post("/events/s3", json=event, headers=headers)).status == 401, headers
    assert await bus.request_backlog() == 0
    assert (await client.post("/train", json={"dataset_uri": DATASET}, headers=AUTH)).status == 202
    assert (await client.post("/events/s3", json=event, headers={"Authorization": f"Bearer {HOOK}"})).status == 200
    # Open: the probes, and MinIO's HEAD check of its webhook target.
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("HEAD", "/events/s3")):
        assert (await client.request(method, path)).status == 200, path


async def test_auth_none_asks_nobody_even_with_tokens_set(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured(auth="none"))
    assert (await client.post("/train", json={"dataset_uri": DATASET})).status == 202
    assert (await client.get("/train")).status == 200


async def test_readyz_shows_driver_errors_only_to_token_holders(bus: MessageBus, serve: Serve) -> None:
    port = free_port()  # nothing listens there: the view store is down
    views = open_view_store(f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
                            database="cdtrain_readyz")
    try:
        client = await serve(bus, views, settings=secured())
        anonymous = await client.get("/readyz")
        body = await anonymous.text()
        assert anonymous.status == 503 and '"view_store":"down"' in body, body
        assert str(port) not in body and "refused" not in body.lower(), body
        insider = await client.get("/readyz", headers=AUTH)
        detail = await insider.text()
        assert insider.status == 503 and str(port) in detail, detail  # the operator sees which host failed
    finally:
        await views.close()


# --- 2. only allowed data ----------------------------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ({"dataset_uri": "s3://other-bucket/levir-cd/"}, "dataset_uri"),
    ({"dataset_uri": "s3://datasets/levir-cd-private/"}, "dataset_uri"),  # a sibling, not a child
    ({"dataset_uri": "s3://datasets/levir-cd/../secret/"}, "dataset_uri"),
    ({"dataset_uri": DATASET, "config_uri": "s3://datasets/creds.yaml"}, "config_uri"),
    ({"dataset_uri": "file:///srv/data/levir-cd/"}, "dataset_uri"),
])
async def test_locations_outside_the_allow_list_are_refused(bus: MessageBus, serve: Serve, body: dict[str, str],
                                                           field: str) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured())
    resp = await client.post("/train", json=body, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 403 and answer["field"] == field, answer
    assert "CDTRAIN_ALLOWED_URIS" in answer["error"] or "'..' folders" in answer["error"], answer
    assert "s3://configs" not in answer["error"]  # the allow-list itself is not revealed
    assert await bus.request_backlog() == 0
    assert (await (await client.get("/train", headers=AUTH)).json())["jobs"] == []
    allowed = {"dataset_uri": f"{DATASET}tiles/", "config_uri": "s3://configs/team-a/train.yaml"}
    assert (await client.post("/train", json=allowed, headers=AUTH)).status == 202


async def test_bucket_events_from_elsewhere_are_ignored_and_logged(bus: MessageBus, serve: Serve,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured(trigger={"prefix": ""}))
    hook = {"Authorization": f"Bearer {HOOK}"}
    with caplog.at_level(logging.WARNING, logger="ingress.bucket_events"):
        resp = await client.post("/events/s3", json=minio_event("uploads", "datasets/set.zip"), headers=hook)
    result = (await resp.json())["results"][0]
    assert resp.status == 200 and result["action"] == "ignored" and "CDTRAIN_ALLOWED_URIS" in result["reason"]
    assert any("s3://uploads/datasets/set.zip" in r.getMessage() for r in caplog.records), caplog.text
    assert await bus.request_backlog() == 0
    inside = await client.post("/events/s3", json=minio_event("datasets", "levir-cd/set.zip"), headers=hook)
    assert (await inside.json())["results"][0]["action"] == "started"


def test_the_worker_checks_the_allow_list_too(tmp_path: Path) -> None:
    # A request can reach the queue without the ingress (another producer, a replayed message).
    stores = StoreResolver(LocalObjectStore(tmp_path), allowed=UriAllowList.parse(ALLOWED))
    stores.resolve(f"{DATASET}x.zip", field="dataset_uri")
    for uri in ("s3://other/x.zip", "s3://datasets/levir-cd/../x/"):
        with pytest.raises(ValueError, match="dataset_uri"):
            stores.resolve(uri, field="dataset_uri")


@pytest.mark.parametrize("key", ["train_split", "val_split", "test_split"])
@pytest.mark.parametrize("name", ["../etc", "a/b", "/abs", ".hidden", "..", ""])
def test_split_names_cannot_leave_the_dataset(key: str, name: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_mapping({key: name})


def test_a_bad_config_file_is_named_by_key_never_echoed() -> None:
    secret = "hunter2-do-not-print"
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_mapping({"epochs": secret, "lr": -1}, echo_values=False)
    assert "'epochs'" in str(caught.value) and "'lr'" in str(caught.value) and secret not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_yaml_mapping(f"epochs: 3\npassword: [{secret}\n", "s3://configs/x.yaml", echo=False)
    assert "line" in str(caught.value) and secret not in str(caught.value), caught.value
    # The command line is the user's own file: there the value helps.
    with pytest.raises(ConfigError, match=secret):
        TrainConfig.from_mapping({"epochs": secret})


# --- 3. bounded ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("epochs", 10**9), ("batch_size", 10**6), ("num_workers", 10**4),
                                        ("cache_max_gb", 10**7), ("crop_size", 10**6), ("base_channel", 10**5),
                                        ("time_limit_minutes", 10**9), ("window_size", 10**7)])
async def test_config_values_have_upper_bounds(bus: MessageBus, serve: Serve, key: str, value: int) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured())
    resp = await client.post("/train", json={"dataset_uri": DATASET, "config": {key: value}}, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 422 and answer["field"] == f"config.{key}", answer
    assert await bus.request_backlog() == 0


async def test_an_oversized_body_answers_413_and_queues_nothing(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured(client_max_size=64 * 1024))
    body = b'{"dataset_uri": "' + DATASET.encode() + b'", "padding": "' + b"x" * (128 * 1024) + b'"}'
    resp = await client.post("/train", data=body, headers={**AUTH, "Content-Type": "application/json"})
    answer = await resp.json()
    assert resp.status == 413 and "too large" in answer["error"] and "65536" in answer["error"], answer
    assert await bus.request_backlog() == 0


# --- 5. no secrets out (the shapes and the values; end to end in tests/test_no_secrets_out.py) --------
def test_credentials_are_masked_by_shape_and_by_value() -> None:
    text = ("amqp://cdtrain:s3cr%40t-pw@rabbit:5672/ mongodb://u:mongo-pw-123@db/ "
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA1/2026"
            "&X-Amz-Signature=0123abcd&X-Amz-Security-Token=FQoGZX Authorization: Bearer tok.en-123 "
            "AWS4-HMAC-SHA256 Credential=AKIA1/x, SignedHeaders=host, Signature=feedbeef99 raw:" + TOKEN)
    clean = Redactor([TOKEN, "s3cr%40t-pw"])(text)
    for secret in ("s3cr%40t-pw", "s3cr@t-pw", "mongo-pw-123", "0123abcd", "AKIA1", "FQoGZX", "tok.en-123",
                   "feedbeef99", TOKEN):
        assert secret not in clean, (secret, clean)
    assert "rabbit:5672" in clean and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in clean  # the rest stays readable
    assert redact_credentials("s3://datasets/levir-cd/") == "s3://datasets/levir-cd/"


async def test_a_presigned_url_is_refused_without_being_echoed(bus: MessageBus, serve: Serve) -> None:
    client = await serve(bus, InMemoryJobViewStore(), settings=secured())
    signed = "s3://datasets/levir-cd/set.zip?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
    resp = await client.post("/train", json={"dataset_uri": signed}, headers=AUTH)
    text = await resp.text()
    assert resp.status == 422 and "dataset_uri" in text and "credential" in text, text
    assert "deadbeefcafe" not in text and "AKIAEXAMPLE" not in text, text


def test_log_records_are_masked_on_their_way_out(tmp_path: Path) -> None:
    from schemas.redact import RedactingFilter

    logger = logging.getLogger("cdtrain.test.redact")
    handler = logging.FileHandler(tmp_path / "log.txt")
    logger.addHandler(handler)
    RedactingFilter(Redactor([TOKEN])).install(logger)
    try:
        logger.warning("token %s in args", TOKEN)
        try:
            raise RuntimeError(f"connect amqp://u:pw-in-exception@h/ with {TOKEN}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    written = (tmp_path / "log.txt").read_text()
    assert "RuntimeError" in written and "in args" in written
    assert TOKEN not in written and "pw-in-exception" not in written, written
