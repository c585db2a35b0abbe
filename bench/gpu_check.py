#!/usr/bin/env python
"""The GPU check, in one script that fits in 8 minutes on an H100/H200 (runs on a CPU too, slowly).

1. Training pairs/s at widths 16 and 32: eager fp32 against the trainer's path (channels_last,
   ``Precision.choose`` and ``torch.compile`` by the trainer's ``auto`` rules), through
   ``bench/train_step.py`` (each variant in its own process, interleaved repeats, medians).
2. Does the loader keep up? A synthetic dataset of 1024² pairs; the training DataLoader exactly as
   the trainer builds it, iterated alone (pairs/s it can deliver), beside the model's consumption
   from step 1 at the same width and batch; then a short real ``Trainer.fit`` of the recipe on
   that dataset, whose epoch time covers data, steps and whole-image validation together.

    python bench/gpu_check.py --json runs/gpu-check.json            # on the GPU machine
    python bench/gpu_check.py --quick                                 # a CPU smoke run

Writes one table to stdout and everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402


def step_throughput(width: int, batch: int, crop: int, device: str, repeats: int, steps: int) -> dict:
    """Median pairs/s of eager fp32 and of the trainer's path, from bench/train_step.py."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--base-channel", str(width),
               "--batch", str(batch), "--crop", str(crop), "--device", device, "--variants", "eager,optimized",
               "--repeats", str(repeats), "--steps", str(steps), "--json", str(out)]
        subprocess.run(cmd, check=False, stdout=sys.stderr)  # a failed variant is reported, not fatal
        return json.loads(out.read_text())


def _variant(result: dict, name: str) -> dict:
    row = result["variants"][name]
    return {"median_img_s": row.get("median_images_per_s"), "ratio": row.get("ratio_vs_eager"),
            "compile_s": row.get("compile_s"), "memory": row.get("memory"), "error": row.get("error")}


def loader_throughput(data: Path, batch: int, crop: int, batches: int) -> dict:
    """Pairs/s the trainer's training DataLoader delivers on its own (decode cache, augmentation,
    collation, worker processes as configured by ``num_workers: auto``)."""
    from schemas.training import TrainConfig
    from snunet_cbam.runtime import select_device
    from snunet_cbam.trainer import Trainer, check_dataset

    config = TrainConfig(batch_size=batch, crop_size=crop, test_split=None)
    trainer = Trainer(config, data, Path(tempfile.mkdtemp()))
    splits = check_dataset(config, data)
    loader, sampler, _, _ = trainer._loaders(splits, select_device("auto"))
    sampler.set_epoch(1)
    seen, started = 0, None
    for i, item in enumerate(loader):
        if i == 1:  # the first batch pays for starting the workers
            started = time.perf_counter()
        elif i > 1:
            seen += item["a"].shape[0]
        if i > batches:
            break
    seconds = time.perf_counter() - started
    return {"pairs_per_s": seen / seconds, "batches": batches, "workers": loader.num_workers}


def short_fit(data: Path, width: int, batch: int, epochs: int) -> dict:
    from schemas.training import TrainConfig
    from snunet_cbam.trainer import Trainer

    config = TrainConfig(base_channel=width, batch_size=batch, epochs=epochs, test_split="test")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = Trainer(config, data, tmp).fit()
        total = time.perf_counter() - started
    return {"seconds": total, "epoch_seconds": [h["seconds"] for h in result.history],
            "val_f1": [h["val"]["f1"] for h in result.history], "test": result.test, "threshold": result.threshold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--widths", default="16,32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--pairs", type=int, default=48, help="synthetic 1024² pairs for the loader and the short fit")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes, seconds not minutes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.widths, args.batch, args.crop, args.pairs, args.epochs = "8", 2, 64, 4, 1
    size = 256 if args.quick else 1024

    import torch

    from snunet_cbam.synthetic import make_synthetic_dataset

    report: dict = {"cpu": cpu_model(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "steps": {}}
    for width in (int(w) for w in args.widths.split(",")):
        result = step_throughput(width, args.batch, args.crop, args.device, repeats=2 if args.quick else 5,
                                 steps=2 if args.quick else 10)
        report["steps"][width] = {name: _variant(result, name) for name in ("eager", "optimized")}

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        made = time.perf_counter()
        make_synthetic_dataset(data, pairs=args.pairs, size=size, seed=0)
        report["dataset"] = {"pairs": args.pairs, "size": size, "seconds": time.perf_counter() - made}
        report["loader"] = loader_throughput(data, args.batch, args.crop, batches=4 if args.quick else 30)
        width = int(args.widths.split(",")[-1])
        report["fit"] = short_fit(data, width, args.batch, args.epochs)

    print(f"\nGPU check on {report['cuda'] or report['cpu']} (torch {report['torch']})\n")
    print("| width | eager fp32 pairs/s | trainer path pairs/s | ratio |")
    print("| --- | --- | --- | --- |")
    for width, rows in report["steps"].items():
        eager = rows["eager"]["median_img_s"] or float("nan")
        fast = rows["optimized"]["median_img_s"] or float("nan")
        print(f"| {width} | {eager:.1f} | {fast:.1f} | {fast / eager:.2f}x |")
    consumed = report["steps"][width]["optimized"].get("median_img_s") or float("nan")
    delivered = report["loader"]["pairs_per_s"]
    print(f"\nloader: {delivered:.1f} pairs/s with {report['loader']['workers']} workers; the model consumes "
          f"{consumed:.1f} pairs/s at width {width}: the loader {'keeps up' if delivered >= consumed else 'is the bottleneck'}")
    print(f"short fit ({args.epochs} epochs of {args.pairs} x {size}² pairs, width {width}): "
          f"{report['fit']['seconds']:.0f} s, epochs {', '.join(f'{s:.1f}' for s in report['fit']['epoch_seconds'])} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
