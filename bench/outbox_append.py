"""What a status event's append to the worker's outbox costs (an fsync'd SQLite commit on this
disk), and how long it holds the event loop. Run: .venv/bin/python bench/outbox_append.py

The broker refuses every publish, so only the appends are measured; a 1 ms ticker on the loop
shows the longest stall. Prints medians and p99 of --events appends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumer.outbox import StatusOutbox  # noqa: E402
from consumer.status_relay import StatusRelay  # noqa: E402
from infra.backoff import RetryBackoff  # noqa: E402
from infra.bus import BusUnavailable  # noqa: E402
from schemas import StatusEvent  # noqa: E402


class RefusingBus:
    async def publish_status(self, *_: object, **__: object) -> str:
        raise BusUnavailable("refused: only the appends are measured")


async def measure(events: int, directory: Path) -> dict[str, float]:
    relay = StatusRelay(RefusingBus(), StatusOutbox(directory / "outbox.sqlite3"),  # type: ignore[arg-type]
                        backoff=RetryBackoff(first_s=60))
    relay.start()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    durations, on_loop = [], []
    for sequence in range(1, events + 1):
        event = StatusEvent.for_job("bench", sequence, "running", source="/bench/worker")
        started = time.perf_counter()
        future = relay.submit(event)
        on_loop.append(time.perf_counter() - started)
        await asyncio.wrap_future(future)
        durations.append(time.perf_counter() - started)
    stop.set()
    await ticker
    await relay.close(timeout=0)
    return {"append_median_ms": statistics.median(durations) * 1e3,
            "append_p99_ms": sorted(durations)[int(0.99 * len(durations))] * 1e3,
            "on_loop_median_us": statistics.median(on_loop) * 1e6, "on_loop_max_us": max(on_loop) * 1e6,
            "longest_loop_gap_ms": max(gaps) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        result = asyncio.run(measure(args.events, Path(directory)))
    print(" ".join(f"{k}={v:.2f}" for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
