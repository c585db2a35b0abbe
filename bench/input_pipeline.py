#!/usr/bin/env python
"""The training loader's samples/s beside the model's consumption, with the trainer's own objects.

``Trainer._set_up`` builds the run exactly as ``cdtrain train`` does (dataset check, decoded-image
cache, paired augmentation, ``DataLoader`` with ``num_workers: auto``, model, ``TrainStep``) from
the shipped config (``config/train_config.yaml``) plus ``--set`` overrides, on ``--data`` (the
sample LEVIR-CD tiles by default). Then, alternating for ``--rounds``:

- **loader**: ``--loader-batches`` batches drawn from the train loader alone: samples (crops) per
  second;
- **model**: ``--model-steps`` training steps (forward, loss, backward, update) on one batch
  already in memory: samples per second the model consumes.

The ratio loader/model says whether the input pipeline keeps up: above 1 the GPU or CPU running
the model never waits for data (the loader runs in worker processes, beside the model). Medians
over rounds; the first batch of each loader pass (worker start) is not timed.

    .venv/bin/python bench/input_pipeline.py                             # about 2 minutes on 2 cores
    .venv/bin/python bench/input_pipeline.py --set base_channel=32 --set batch_size=8 --json OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import core_count, cpu_model  # noqa: E402

SAMPLE_DATA = ROOT.parent / "shared" / "data" / "levir-cd-samples"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from snunet_cbam.config import load_config
    from snunet_cbam.trainer import Trainer

    # The sample tiles hold one broken pair on purpose (see their README): skip it, as a user would.
    config = load_config(None, ["skip_invalid=true", *args.set])
    with tempfile.TemporaryDirectory(prefix="bench-input-") as out:
        run = Trainer(config, args.data, out)._set_up()
        loader = run.train_loader
        run.sampler.set_epoch(0)
        batch = next(iter(loader))
        a, b, label = run.train_step.inputs(batch)
        batch_size = a.shape[0]
        loader_rates, model_rates = [], []
        for _ in range(args.rounds):
            batches = iter(loader)
            next(batches)  # a pass's first batch waits for the workers to start
            started = time.perf_counter()
            taken = 0
            for _ in range(args.loader_batches):
                try:
                    taken += next(batches)["a"].shape[0]
                except StopIteration:
                    batches = iter(loader)
            loader_rates.append(taken / (time.perf_counter() - started))
            del batches

            started = time.perf_counter()
            for _ in range(args.model_steps):
                loss, _ = run.train_step(a, b, label)
            float(loss)  # wait for the device
            model_rates.append(args.model_steps * batch_size / (time.perf_counter() - started))
        loader_rate, model_rate = statistics.median(loader_rates), statistics.median(model_rates)
        return {
            "machine": {"cpu": cpu_model(), "cores": core_count(), "device": str(run.device),
                        "torch_threads": torch.get_num_threads()},
            "config": {"batch_size": config.batch_size, "crop_size": config.crop_size,
                       "base_channel": config.base_channel, "num_workers": loader.num_workers,
                       "cache": run.train_loader.dataset.loader._cache is not None,
                       "overrides": args.set},
            "data": str(args.data), "loader_batches": args.loader_batches, "model_steps": args.model_steps,
            "rounds": args.rounds,
            "loader_samples_s": loader_rate, "model_samples_s": model_rate,
            "loader_vs_model": loader_rate / model_rate,
            "samples": {"loader": loader_rates, "model": model_rates},
        }


def report(res: dict[str, Any]) -> str:
    c, m = res["config"], res["machine"]
    return "\n".join([
        f"input pipeline on {res['data']}: batch {c['batch_size']}, crop {c['crop_size']}, width {c['base_channel']}, "
        f"{c['num_workers']} loader workers, decoded-image cache {'on' if c['cache'] else 'off'}; {m['cpu']}, "
        f"{m['cores']} cores, {m['device']}; median of {res['rounds']} rounds ({res['loader_batches']} loader batches, "
        f"{res['model_steps']} model steps each)",
        "| side | samples/s |", "| --- | ---: |",
        f"| loader (decode cache, augmentation, crops, collation) | {res['loader_samples_s']:.1f} |",
        f"| model (forward, loss, backward, update) | {res['model_samples_s']:.2f} |",
        f"loader/model: {res['loader_vs_model']:.1f}× "
        + ("(the loader keeps up)" if res["loader_vs_model"] >= 1 else "(the model waits for data)"),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA, help="a dataset directory (the sample tiles)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the shipped config; repeatable")
    parser.add_argument("--loader-batches", type=int, default=24, help="batches drawn from the loader per round (24)")
    parser.add_argument("--model-steps", type=int, default=3, help="training steps per round (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, loader then model (3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a directory")
    res = measure(args)
    print(report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
