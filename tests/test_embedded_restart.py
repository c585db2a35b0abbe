"""The embedded one-machine service restarted with jobs in its (in-memory) queue loses none.

`cdtrain serve` with no settings keeps its queue in memory; the job views (a JSON file) are what
survives a restart. On start, its watchdog publishes again the request of every queued job
(consumer/watchdog.py, ``republish_unconfirmed(every_queued=True)``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from cdtrain.serve import ROLES, serve
from cdtrain.settings import ServiceSettings
from ingress.settings import IngressSettings
from snunet_cbam.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.slow

TINY = {"base_channel": 4, "crop_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", "compile": False,
        "amp": False, "window_size": 64, "window_overlap": 8, "crops_per_image": 1, "epochs": 1}


async def start(settings: ServiceSettings, roles: tuple[str, ...]) -> tuple[asyncio.Task, asyncio.Event, str]:
    stop = asyncio.Event()
    started: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, roles, stop, on_started=started.set_result))
    await asyncio.wait({task, started}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    assert started.done(), task.exception() if task.done() else "the service did not start"
    return task, stop, started.result()[0]


async def test_a_restart_loses_no_queued_job(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    make_synthetic_dataset(objects / "lake" / "data", pairs=12, size=64, seed=5)
    settings = ServiceSettings(
        ingress=IngressSettings(port=0, view_store_url=str(tmp_path / "views.json"), local_objects_dir=objects),
        data_dir=tmp_path / "data", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        allow_local_paths=True, heartbeat_interval=1.0)

    # First life without a worker: the accepted job waits in the in-memory queue when it stops.
    task, stop, url = await start(settings, ("ingress", "projector"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/train", json={"dataset_uri": "s3://lake/data/", "config": TINY}) as response:
            assert response.status == 202, await response.text()
            job_id = (await response.json())["job_id"]
    stop.set()
    await asyncio.wait_for(task, 60)

    # Second life, every role: the job runs.
    task, stop, url = await start(settings, ROLES)
    try:
        deadline = time.monotonic() + 180
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{url}/train/{job_id}") as response:
                    view = await response.json()
                if view["state"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, f"the queued job never ran after the restart: {view}"
                await asyncio.sleep(0.2)
        assert view["state"] == "succeeded", view
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
