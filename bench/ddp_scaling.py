#!/usr/bin/env python
"""Training throughput of one run with 1 and N processes (``gpus: N``), for the record.

The same synthetic dataset and the same global batch for every process count (``batch_size`` =
global batch / N per process, so every run trains the same steps on the same samples), through
``Trainer.fit`` as ``cdtrain train`` runs it. Throughput is training samples per second between
the second and the last step report of the epoch (``log_every_steps: 1``; the first step holds
the start-up: spawning, the process group, DataLoader start), median over ``--repeats`` runs.

On a CPU (``--device cpu``, backend gloo) the N processes share the machine's cores (each gets
cores / N threads), so this measures the cost of the process group, the all-reduces and the
per-step stop broadcast rather than a speed-up; on a machine with N GPUs (``--device cuda``) it
measures the scaling.

    .venv/bin/python bench/ddp_scaling.py --processes 1,2 --json runs/bench/ddp_scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.training import TrainConfig  # noqa: E402
from snunet_cbam.hooks import TrainerHooks  # noqa: E402
from snunet_cbam.synthetic import make_synthetic_dataset  # noqa: E402
from snunet_cbam.trainer import Trainer  # noqa: E402


class StepClock(TrainerHooks):
    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []

    def on_step_end(self, info) -> None:
        self.times.append((info.global_step, time.perf_counter()))


def run_once(data: Path, out: Path, processes: int, args: argparse.Namespace) -> dict[str, float]:
    config = TrainConfig(
        gpus=processes, device=args.device, batch_size=args.global_batch // processes, epochs=1,
        base_channel=args.base_channel, crop_size=args.crop, crops_per_image=args.crops_per_image,
        num_workers=0, compile=False, amp=args.amp, log_every_steps=1, train_split="train", val_split="val",
        test_split=None, tune_threshold=False, window_size=None, window_overlap=0, patience=None,
    )
    clock = StepClock()
    started = time.perf_counter()
    Trainer(config, data, out, hooks=[clock]).fit()
    total = time.perf_counter() - started
    (first_step, first), (last_step, last) = clock.times[0], clock.times[-1]
    samples = (last_step - first_step) * args.global_batch
    return {"samples_per_s": samples / (last - first), "steps": last_step, "run_s": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pairs", type=int, default=40, help="synthetic pairs (70%% of them train)")
    parser.add_argument("--size", type=int, default=128, help="side of the synthetic tiles")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--crops-per-image", type=int, default=2)
    parser.add_argument("--base-channel", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--amp", action="store_true", help="mixed precision where the device has it")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    if any(args.global_batch % n for n in counts):
        parser.error("--global-batch must divide by every process count")

    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", pairs=args.pairs, size=args.size, seed=0).root
        for repeat in range(args.repeats):
            for n in counts:  # interleaved: a noisy neighbour slows every count alike
                results[n].append(run_once(data, Path(tmp) / f"run-{n}-{repeat}", n, args))

    base = statistics.median(r["samples_per_s"] for r in results[counts[0]])
    rows = []
    print(f"{'processes':>9} {'samples/s':>10} {'vs ' + str(counts[0]):>6} {'run s':>7}")
    for n in counts:
        rate = statistics.median(r["samples_per_s"] for r in results[n])
        run_s = statistics.median(r["run_s"] for r in results[n])
        rows.append({"processes": n, "samples_per_s": rate, "ratio": rate / base, "run_s": run_s,
                     "runs": results[n]})
        print(f"{n:>9} {rate:>10.1f} {rate / base:>6.2f} {run_s:>7.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
