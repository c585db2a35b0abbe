"""``cdtrain submit | status | list | watch`` against the real ingress app on a real socket.

The service is the embedded stack (InProcessBus, InMemoryJobViewStore, LocalObjectStore) with a
Projector on the bus; the worker is simulated by publishing status events. The sync CLI runs
``asyncio.run``, so it is called in a thread while the server runs on the test loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from cdtrain.client import ApiClient, ClientSettings
from cdtrain.client import cli as client_cli
from cdtrain.client.errors import JobNotFound, ServiceUnavailable, ServiceUnreachable
from cdtrain.client.follow import follow
from cdtrain.client.models import EndFrame, StatusFrame, ViewFrame
from cdtrain.client.sse import SseMessage, SseParser
from infra.bus import Delivery, InProcessBus
from infra.objects import LocalObjectStore
from infra.views import InMemoryJobViewStore, Projector
from ingress.app import create_app
from ingress.deps import DEPS
from ingress.settings import IngressSettings
from schemas.events import StatusEvent
from schemas.jobs import JobState, TrainJob, new_job_id

REPO = Path(__file__).resolve().parents[1]
DATASET = "s3://datasets/levir-cd/"
WAIT = 5.0
FAST = {"reconnect_delay_s": 0.05, "reconnect_give_up_s": 5.0}


# --- the service ----------------------------------------------------------------------------------
@dataclass
class Service:
    bus: InProcessBus
    views: InMemoryJobViewStore
    app: web.Application
    server: TestServer
    requests: asyncio.Queue[TrainJob]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def emit(self, job_id: str, sequence: int, state: str, **fields: Any) -> StatusEvent:
        """What a worker does: publish a status event (the projector writes the view)."""
        event = StatusEvent.for_job(job_id, sequence, state, source="/cdtrain/worker/test", **fields)
        await self.bus.publish_status(event, event.routing_key)
        return event

    async def projected(self, job_id: str, sequence: int) -> None:
        async def done() -> bool:
            view = await self.views.get(job_id)
            return view is not None and view.last_sequence >= sequence

        assert await eventually(done), f"view of {job_id} never reached sequence {sequence}"

    def streams(self) -> set[Any]:
        return set(self.app[DEPS].streams)

    async def watched(self, more_than: set[Any] = frozenset()) -> None:  # type: ignore[assignment]
        """Until an event stream other than those in ``more_than`` is open (the watcher subscribed)."""
        async def connected() -> bool:
            return bool(self.streams() - more_than)

        assert await eventually(connected), "the watcher never opened an event stream"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with make_service(tmp_path) as svc:
        yield svc


class make_service:  # noqa: N801 - used as `async with make_service(...)`
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.tmp_path = tmp_path
        self.settings = IngressSettings(**{"store_timeout_s": 3.0, "retry_after_s": 2.0, "sse_heartbeat_s": 0.2,
                                           "instance": "test", **settings})

    async def __aenter__(self) -> Service:
        bus, views = InProcessBus(), InMemoryJobViewStore()
        await bus.connect()
        projector = Projector(views)

        async def project(event: StatusEvent, delivery: Delivery) -> None:
            await projector.handle(event)

        requests: asyncio.Queue[TrainJob] = asyncio.Queue()

        async def take(job: TrainJob, delivery: Delivery) -> None:
            requests.put_nowait(job)

        await bus.consume_projector(project, model=StatusEvent)
        await bus.consume_requests(take, model=TrainJob, prefetch=10)
        app = create_app(self.settings, bus, views, LocalObjectStore(self.tmp_path / "objects"))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.service = Service(bus, views, app, server, requests)
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        await self.service.server.close()
        await self.service.bus.close()


async def eventually(probe: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def cli(*argv: str, environ: dict[str, str] | None = None, **settings: Any) -> int:
    """``cdtrain ARGV`` in a thread (it runs its own event loop); the environment is ``environ``."""
    return await asyncio.to_thread(client_cli.main, list(argv), environ or {}, **settings)


def start_cli(*argv: str, **settings: Any) -> asyncio.Task[int]:
    return asyncio.create_task(cli(*argv, **settings))


async def finish(task: asyncio.Task[int]) -> int:
    return await asyncio.wait_for(task, WAIT)


def squeeze(text: str) -> str:
    """Each line with its runs of spaces (column padding) made single."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


EPOCHS = [
    {"train_loss": 0.52, "val_loss": 0.48, "val_f1": 0.70, "val_iou": 0.54, "lr": 1e-3},
    {"train_loss": 0.31, "val_loss": 0.33, "val_f1": 0.78, "val_iou": 0.64, "lr": 5e-4},
    {"train_loss": 0.22, "val_loss": 0.29, "val_f1": 0.81, "val_iou": 0.68, "lr": 1e-4},
]
BEST = {"val_f1": 0.81, "val_iou": 0.68, "val_precision": 0.84, "val_recall": 0.78, "best_epoch": 3.0,
        "test_f1": 0.80}


async def run_job_to_success(svc: Service, job_id: str, *, first: int = 1) -> int:
    """STARTING, RUNNING (3 epochs), REGISTERING, SUCCEEDED; returns the last sequence."""
    seq = first
    await svc.emit(job_id, seq, "starting", phase="downloading")
    await svc.emit(job_id, seq + 1, "running", phase="training", epochs=3, mlflow_run_id="run-123")
    seq += 2
    for epoch, metrics in enumerate(EPOCHS, start=1):
        await svc.emit(job_id, seq, "running", phase="training", epoch=epoch, epochs=3, metrics=metrics,
                       mlflow_run_id="run-123")
        seq += 1
    await svc.emit(job_id, seq, "running", phase="registering", epoch=3, epochs=3, mlflow_run_id="run-123")
    await svc.emit(job_id, seq + 1, "succeeded", epoch=3, epochs=3, metrics=BEST, mlflow_run_id="run-123",
                   model_version="4", model_alias="staging")
    return seq + 1


# --- the dependency rule ----------------------------------------------------------------------------
def test_client_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import cdtrain.client.cli\n"
        "assert 'aiohttp' not in sys.modules, 'cdtrain.client.cli must stay cheap to import'\n"
        "import cdtrain.client, cdtrain.client.api, cdtrain.client.commands, cdtrain.client.follow\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'snunet_cbam'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_commands_register_beside_the_ml_commands() -> None:
    """What cdtrain/cli.py does: both register on one subparsers; ``runner`` picks the client."""
    from snunet_cbam import cli as ml_cli

    parser = argparse.ArgumentParser(prog="cdtrain")
    subparsers = parser.add_subparsers(dest="command", required=True)
    ml_cli.register(subparsers)
    client_cli.register(subparsers)
    args = parser.parse_args(["submit", DATASET, "--set", "epochs=3", "--register", "--watch"])
    assert args.runner is client_cli.run and args.client_command == "submit"
    assert (args.dataset_uri, args.set, args.register, args.watch, args.url) == (DATASET, ["epochs=3"], True, True, None)
    assert parser.parse_args(["train", "--data", "d"]).handler.__name__ == "_train"


def test_sse_parser_handles_split_chunks_comments_and_multiline_data() -> None:
    parser = SseParser()
    stream = (b"retry: 3000\r\n\r\n: ping\n\nevent: view\nid: 0\ndata: {\"a\":\ndata: 1}\n\n"
              b"event: end\ndata: {}\n\ndata: plain\n\n")
    messages: list[SseMessage] = []
    for i in range(0, len(stream), 7):  # frames cut anywhere, even inside "\r\n"
        messages += parser.feed(stream[i:i + 7])
    assert messages == [SseMessage("view", '{"a":\n1}', "0"), SseMessage("end", "{}", "0"),
                        SseMessage("message", "plain", "0")]
    assert parser.retry_ms == 3000 and parser.comments == 1


# --- submit ---------------------------------------------------------------------------------------
async def test_submit_publishes_the_request_and_prints_the_job_id(service: Service, capsys: Any) -> None:
    argv = ["submit", DATASET, "--url", service.url, "--config", "s3://datasets/levir.yaml",
            "--set", "epochs=3", "--set", "lr=0.0005", "--set", "use_attention=false",
            "--register", "--model-name", "levir-cd", "--idempotency-key", "nightly-1"]
    assert await cli(*argv) == 0
    job_id = new_job_id("nightly-1")
    out = capsys.readouterr()
    assert out.out == f"{job_id}\n" and out.err == ""

    job = await asyncio.wait_for(service.requests.get(), WAIT)  # accepted means: on the bus
    assert job.job_id == job_id and job.source == "api"
    request = job.request
    assert (request.dataset_uri, request.config_uri) == (DATASET, "s3://datasets/levir.yaml")
    assert request.config == {"epochs": 3, "lr": 0.0005, "use_attention": False}
    assert request.register_model and request.model_name == "levir-cd" and request.idempotency_key == "nightly-1"

    # The same key again: 200, the existing job, nothing published.
    assert await cli(*argv) == 0
    out = capsys.readouterr()
    assert out.out == f"{job_id}\n" and "existing job (state QUEUED)" in out.err
    assert service.requests.empty() and await service.bus.request_backlog() == 0


async def test_api_client_submit_answers_202_fields(service: Service) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        accepted = await api.submit(DATASET)
        assert accepted.state == "QUEUED" and not accepted.duplicate
        assert accepted.status_url == f"/train/{accepted.job_id}"
        view = await api.get(accepted.job_id)
    assert view.state is JobState.QUEUED and view.request is not None and view.request.dataset_uri == DATASET
    assert view.request.config is None and not view.request.register_model


@pytest.mark.parametrize(("argv", "field", "message"), [
    (["--set", "epochz=3"], "config.epochz", "unknown key"),
    (["--set", "lr=-1"], "config.lr", "greater than 0"),
    (["--model-name", "bad name!"], "model_name", "pattern"),
])
async def test_submit_rejected_names_the_field(argv: list[str], field: str, message: str, service: Service,
                                                capsys: Any) -> None:
    assert await cli("submit", DATASET, "--url", service.url, *argv) == 2
    err = capsys.readouterr().err
    assert "rejected the request (HTTP 422)" in err
    assert f"  {field}: " in err and message in err.split(f"{field}: ", 1)[1]
    assert await service.bus.request_backlog() == 0 and service.requests.empty()


async def test_bad_dataset_uri_and_bad_override_syntax(service: Service, capsys: Any) -> None:
    assert await cli("submit", "ftp://x/y", "--url", service.url) == 2
    assert "dataset_uri: unsupported scheme 'ftp'" in capsys.readouterr().err
    assert await cli("submit", DATASET, "--url", service.url, "--set", "epochs") == 2  # never sent
    assert "override 'epochs' must look like key=value" in capsys.readouterr().err


async def test_unreachable_service_is_exit_2_with_a_hint(capsys: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["submit", DATASET], ["status", "abc"], ["list"], ["watch", "abc"]):
        assert await cli(*argv, "--url", url) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot reach the cdtrain service at {url}: "), err
        assert err.rstrip().endswith("(is `cdtrain serve` running?)")


async def test_bus_down_is_503_exit_3_with_retry_after(service: Service, capsys: Any) -> None:
    await service.bus.close()
    assert await cli("submit", DATASET, "--url", service.url) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: the service is unavailable (HTTP 503): message bus unavailable: ")
    async with ApiClient(ClientSettings(url=service.url)) as api:
        with pytest.raises(ServiceUnavailable) as caught:
            await api.submit(DATASET)
    seconds = caught.value.retry_after  # from the Retry-After header
    assert seconds is not None and seconds >= 1 and err.rstrip().endswith(f"retry in {seconds:g} s")


async def test_token_and_url_come_from_the_environment(tmp_path: Path, capsys: Any) -> None:
    async with make_service(tmp_path, api_token=SecretStr("s3cret")) as svc:
        assert await cli("list", "--url", svc.url) == 2
        err = capsys.readouterr().err
        assert "refused the request: missing or wrong bearer token" in err and "CDTRAIN_API_TOKEN" in err
        env = {"CDTRAIN_URL": svc.url, "CDTRAIN_API_TOKEN": "s3cret"}
        assert await cli("submit", DATASET, environ=env) == 0
        job_id = capsys.readouterr().out.strip()
        assert await cli("status", job_id, environ=env) == 0
        assert "state      QUEUED" in capsys.readouterr().out
    assert await cli("list", "--url", "not-a-url") == 2
    assert "bad service URL: 'not-a-url' is not an http:// or https:// URL" in capsys.readouterr().err


# --- watch ----------------------------------------------------------------------------------------
async def test_watch_follows_a_job_to_success(service: Service, capsys: Any) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        job_id = (await api.submit(DATASET, register_model=True, model_name="levir-cd")).job_id
    watcher = start_cli("watch", job_id, "--url", service.url)
    await service.watched()
    await run_job_to_success(service, job_id)
    assert await finish(watcher) == 0

    out = capsys.readouterr().out.splitlines()
    lines = [" ".join(line.split()[1:]) for line in out]  # without the times
    assert lines[:4] == ["QUEUED", "STARTING downloading", "RUNNING training epoch 0/3"] + [
        "RUNNING training epoch 1/3 val F1 0.7000 IoU 0.5400 loss 0.5200 val loss 0.4800"]
    assert lines[4:7] == [
        "RUNNING training epoch 2/3 val F1 0.7800 IoU 0.6400 loss 0.3100 val loss 0.3300",
        "RUNNING training epoch 3/3 val F1 0.8100 IoU 0.6800 loss 0.2200 val loss 0.2900",
        "RUNNING registering epoch 3/3"]
    assert lines[7].startswith("SUCCEEDED epoch 3/3 best val F1 0.8100 (epoch 3), val IoU 0.6800")
    summary = out[8:]
    assert summary[0].startswith(f"job {job_id} SUCCEEDED after 0m0")
    assert summary[0].endswith(": val F1 0.8100 (epoch 3), val IoU 0.6800, val precision 0.8400, "
                               "val recall 0.7800, test F1 0.8000")
    assert summary[1:] == ["  MLflow run run-123", "  model      levir-cd version 4 (alias staging)"]


async def test_watch_a_failed_job_exits_1_with_the_error(service: Service, capsys: Any) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        job_id = (await api.submit(DATASET)).job_id
    watcher = start_cli("watch", job_id, "--url", service.url)
    await service.watched()
    await service.emit(job_id, 1, "starting", phase="downloading")
    await service.emit(job_id, 2, "running", phase="training", epochs=5, mlflow_run_id="run-9")
    await service.emit(job_id, 3, "failed", phase="training", epochs=5, mlflow_run_id="run-9",
                       error="training failed: RuntimeError: CUDA out of memory")
    assert await finish(watcher) == 1
    out = capsys.readouterr().out
    assert "FAILED training epoch 0/5 error: training failed: RuntimeError: CUDA out of memory" in squeeze(out)
    assert (f"job {job_id} FAILED after " in out
            and "(phase training): training failed: RuntimeError: CUDA out of memory\n  MLflow run run-9" in out)


async def test_submit_watch_follows_the_new_job(service: Service, capsys: Any) -> None:
    job_id = new_job_id("watch-me")
    task = start_cli("submit", DATASET, "--url", service.url, "--idempotency-key", "watch-me", "--watch")
    await service.watched()
    await service.emit(job_id, 1, "cancelled", error="cancelled")
    assert await finish(task) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == job_id and "QUEUED" in out[1] and "CANCELLED" in out[2]
    assert out[3].startswith(f"job {job_id} CANCELLED after") and out[3].endswith(": cancelled")


async def test_watch_reconnects_when_the_stream_drops(service: Service, capsys: Any) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        job_id = (await api.submit(DATASET)).job_id
    watcher = start_cli("watch", job_id, "--url", service.url, reconnect_delay_s=0.3)
    await service.watched()
    await service.emit(job_id, 1, "running", phase="training", epoch=1, epochs=3, metrics=EPOCHS[0])
    await service.projected(job_id, 1)
    first = service.streams()
    for inbox in first:  # what a graceful ingress shutdown does: close streams without `end`
        inbox.put_nowait(None)
    # While the watcher is away, epoch 2 happens: it comes back in the view read on reconnect.
    await service.emit(job_id, 2, "running", phase="training", epoch=2, epochs=3, metrics=EPOCHS[1])
    await service.projected(job_id, 2)
    await service.watched(more_than=first)
    await service.emit(job_id, 3, "succeeded", epoch=3, epochs=3, metrics=BEST)
    assert await finish(watcher) == 0

    captured = capsys.readouterr()
    assert "note: the service closed the event stream before the job ended; reconnecting in 0.3 s" in captured.err
    out = squeeze(captured.out)
    assert out.count("epoch 1/3") == 1 and out.count("epoch 2/3 val F1 0.7800") == 1
    assert out.index("epoch 1/3") < out.index("epoch 2/3") < out.index("SUCCEEDED")
    assert f"job {job_id} SUCCEEDED" in out


async def test_watch_gives_up_when_the_service_stays_away(tmp_path: Path, capsys: Any) -> None:
    svc = await make_service(tmp_path).__aenter__()
    async with ApiClient(ClientSettings(url=svc.url)) as api:
        job_id = (await api.submit(DATASET)).job_id
    url = svc.url
    watcher = start_cli("watch", job_id, "--url", url, reconnect_delay_s=0.05, reconnect_give_up_s=0.4)
    await svc.watched()
    await svc.server.close()  # ends the stream, then refuses connections
    await svc.bus.close()
    assert await finish(watcher) == 2
    err = capsys.readouterr().err
    assert "reconnecting in 0.05 s" in err
    assert err.splitlines()[-1].startswith(f"error: cannot reach the cdtrain service at {url}: ")


async def test_watch_a_finished_job_reports_at_once(service: Service, capsys: Any) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        job_id = (await api.submit(DATASET)).job_id
    last = await run_job_to_success(service, job_id)
    await service.projected(job_id, last)
    assert await cli("watch", job_id, "--url", service.url) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "SUCCEEDED" in out[0] and out[1].startswith(f"job {job_id} SUCCEEDED")


async def test_follow_yields_typed_frames(service: Service) -> None:
    async with ApiClient(ClientSettings(url=service.url, **FAST)) as api:
        job_id = (await api.submit(DATASET)).job_id
        frames = []

        async def read() -> None:
            async for frame in api.events(job_id):
                frames.append(frame)

        reader = asyncio.create_task(read())
        await service.watched()
        await service.emit(job_id, 1, "running", epoch=1, epochs=2, metrics={"val_f1": 0.5})
        await service.emit(job_id, 2, "succeeded", metrics={"val_f1": 0.5})
        await asyncio.wait_for(reader, WAIT)
        assert [type(f) for f in frames] == [ViewFrame, StatusFrame, StatusFrame, EndFrame]
        assert isinstance(frames[0], ViewFrame) and frames[0].view.state is JobState.QUEUED
        assert isinstance(frames[-1], EndFrame) and frames[-1].state is JobState.SUCCEEDED

        # follow() folds the events into the view as the projector does.
        final = await follow(api, job_id, lambda view, event: None)
        assert final.state is JobState.SUCCEEDED and final.best_metrics == {"val_f1": 0.5}
        assert [h.epoch for h in final.history] == [1]
        with pytest.raises(JobNotFound, match="job nope not found"):
            await follow(api, "nope", lambda view, event: None)

    with pytest.raises(ServiceUnreachable):
        async with ApiClient(ClientSettings(url=f"http://127.0.0.1:{free_port()}")) as api:
            await follow(api, job_id, lambda view, event: None)


# --- status and list ------------------------------------------------------------------------------
async def test_status_human_and_json(service: Service, capsys: Any) -> None:
    async with ApiClient(ClientSettings(url=service.url)) as api:
        job_id = (await api.submit(DATASET, config={"epochs": 3}, register_model=True)).job_id
    await service.emit(job_id, 1, "running", phase="training", epochs=3, mlflow_run_id="run-7")
    await service.emit(job_id, 2, "running", phase="training", epoch=1, epochs=3, metrics=EPOCHS[0],
                       mlflow_run_id="run-7")
    await service.emit(job_id, 3, "running", phase="training", epoch=2, epochs=3, metrics=EPOCHS[1],
                       mlflow_run_id="run-7")
    await service.projected(job_id, 3)

    assert await cli("status", job_id, "--url", service.url) == 0
    text = capsys.readouterr().out
    for row in (f"job        {job_id}", "state      RUNNING (training)", "epoch      2/3",
                "val F1     0.7800 (epoch 2)", f"dataset    {DATASET}", "MLflow run run-7",
                "model      snunet-cbam (registered when training succeeds)"):
        assert row in text.splitlines(), (row, text)
    assert "best" not in text and "error" not in text

    assert await cli("status", job_id, "--json", "--url", service.url) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["state"], view["epoch"], view["mlflow_run_id"]) == ("running", 2, "run-7")
    assert [h["epoch"] for h in view["history"]] == [1, 2]

    await service.emit(job_id, 4, "succeeded", epoch=3, epochs=3, metrics=BEST, mlflow_run_id="run-7",
                       model_version="2", model_alias="production")
    await service.projected(job_id, 4)
    assert await cli("status", job_id, "--url", service.url) == 0
    text = capsys.readouterr().out
    assert "state      SUCCEEDED" in text
    assert "best       val F1 0.8100 (epoch 3), val IoU 0.6800, val precision 0.8400" in text
    assert "model      snunet-cbam version 2 (alias production)" in text


async def test_status_of_an_unknown_job_is_exit_2(service: Service, capsys: Any) -> None:
    for job_id in ("0" * 32, "not.a.job"):
        assert await cli("status", job_id, "--url", service.url) == 2
        assert capsys.readouterr().err == f"error: job {job_id} not found\n"
    assert await cli("watch", "0" * 32, "--url", service.url) == 2
    assert "job 00000000000000000000000000000000 not found" in capsys.readouterr().err


async def test_list_is_a_table_newest_first(service: Service, capsys: Any) -> None:
    ids = []
    async with ApiClient(ClientSettings(url=service.url)) as api:
        for name in ("a", "b", "c"):
            ids.append((await api.submit(f"s3://datasets/{name}/")).job_id)
            await asyncio.sleep(0.005)  # distinct submitted_at (milliseconds)
    await service.emit(ids[1], 1, "running", phase="training", epoch=1, epochs=4, metrics=EPOCHS[0])
    await service.projected(ids[1], 1)

    assert await cli("list", "--url", service.url) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["JOB", "ID", "STATE", "PHASE", "EPOCH", "VAL", "F1", "SUBMITTED", "DATASET"]
    assert [row.split()[0] for row in rows[1:]] == ids[::-1]
    running = rows[2].split()
    assert running[:5] == [ids[1], "RUNNING", "training", "1/4", "0.7000"] and running[-1] == "s3://datasets/b/"
    assert rows[1].split()[1:5] == ["QUEUED", "-", "-", "-"] and rows[1].endswith("s3://datasets/c/")

    assert await cli("list", "--status", "RUNNING", "--url", service.url) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and rows[1].startswith(ids[1])

    assert await cli("list", "--limit", "2", "--json", "--url", service.url) == 0
    page = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in page["jobs"]] == ids[:0:-1] and page["next_cursor"]
    assert await cli("list", "--limit", "2", "--cursor", page["next_cursor"], "--url", service.url) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:]] == [ids[0]]

    assert await cli("list", "--limit", "2", "--url", service.url) == 0
    assert "more: cdtrain list --cursor " in capsys.readouterr().err
    assert await cli("list", "--status", "failed", "--url", service.url) == 0
    assert capsys.readouterr().out == "no jobs in state failed\n"
    assert await cli("list", "--status", "bogus", "--url", service.url) == 2
    assert "  status: unknown state 'bogus'" in capsys.readouterr().err
