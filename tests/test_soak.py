"""Nothing lost in transit, point 4: a soak on loopback, bounded in time (bench/soak.py).

200 concurrent POST /train on the real parts (the ingress app and the projector with its watchdog
in this process; RabbitMQ; nx-27017 over the MongoDB protocol; three ``bench/soak_worker.py``
processes running the real ``TrainingWorker`` with a tracker that records each attempt in a trace
file) while a load generator sends 300 RUNNING events a second for 50 other job ids through the
bus. One worker is SIGKILLed while it trains (a replacement starts on its data directory) and the
broker is restarted (``rabbitmqctl stop_app`` / ``start_app``) in the middle.

What must hold: every job answered 202 ends SUCCEEDED; every one is finished (the tracker's
``finish``, where MLflow would register the model) exactly once; no two attempts of a job train at
the same time; the killed job is resumed by a later attempt. The projector's lag per phase and the
drain time after the restart are printed (``-s``).

It restarts the machine's RabbitMQ application: every other client of that broker is disconnected
for a few seconds. The broker is started again whatever happens (``finally``).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from bench.soak import SoakParams, report, restore_broker, run_soak

pytestmark = pytest.mark.slow

PARAMS = dict(jobs=200, event_rate=300.0, synthetic_jobs=50, workers=3, kill=True, kill_after=0.25,
              restart_broker=True, restart_after=0.5, broker_down_s=1.0, stale_after=5.0, sweep_interval=0.5,
              time_limit=180.0)


def _require_tools() -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: the soak restarts the broker with it (install RabbitMQ's CLI, "
                    "run as a user allowed to use it)", pytrace=False)
    from tests.fixtures.mongo import _nx_executable

    _nx_executable()  # fails with the reason when nx-27017 is missing


async def test_a_soak_with_a_worker_killed_and_the_broker_restarted_loses_nothing_and_trains_nothing_twice(
        amqp_url: str, tmp_path: Path) -> None:
    _require_tools()
    params = SoakParams(amqp_url=amqp_url, **PARAMS)
    started = time.monotonic()
    try:
        summary, _ = await run_soak(params, tmp=tmp_path)
    finally:
        # The soak restores the broker itself; this also covers a failure inside it.
        await asyncio.to_thread(restore_broker, amqp_url)
    print(f"\n{report(summary)}\n(test body {time.monotonic() - started:.0f} s; logs under {tmp_path / 'logs'})")

    assert summary.accepted == params.jobs, f"not every POST was accepted: {summary.http_status}"
    assert not summary.not_ended, f"{len(summary.not_ended)} accepted jobs never ended: {summary.not_ended[:5]}"
    assert not summary.not_succeeded, (
        f"{len(summary.not_succeeded)} accepted jobs did not end SUCCEEDED: {dict(list(summary.not_succeeded.items())[:3])}")
    assert not summary.jobs_finished_twice, (
        f"{len(summary.jobs_finished_twice)} jobs were finished (trained to the end) more than once; "
        f"finishes per job {summary.finishes_per_job}, watchdog re-queues {summary.watchdog_requeues}, "
        f"failed sweeps {summary.watchdog_failed_sweeps}; see the violations: {summary.violations}")
    assert summary.finishes_per_job == {"1": params.jobs}, f"finishes per job: {summary.finishes_per_job}"
    assert not summary.overlapping_attempts, f"attempts trained one job at once: {summary.overlapping_attempts[:3]}"
    assert summary.kill is not None and summary.kill.resumed_attempt is not None, (
        f"the killed job was not resumed by a later attempt: {summary.kill}")
    assert summary.kill.final_state == "succeeded", summary.kill
    assert summary.restart is not None and summary.restart.drain_s is not None, (
        f"the projector queue never drained after the broker restart: {summary.restart}")
    assert summary.lag["before_faults"].samples > 0 and summary.lag["after_drain"].samples > 0, summary.lag
    assert not summary.violations, summary.violations
