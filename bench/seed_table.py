"""Does every seed learn? The shipped recipe on the real LEVIR-CD sample tiles, seed by seed.

Runs ``config/train_config.yaml`` as shipped, changing only what makes it fit a CPU (width,
crop, batch, epochs, evaluation window) and the data split (train = val = every valid tile), for
each seed and each value of ``spatial_attention``; prints a Markdown table of the best validation
F1 per run beside the all-change F1 (what a model that calls every pixel change scores), and
writes every run's history as JSON.

    python bench/seed_table.py --seeds 0-9 --gate on off --epochs 30 --out runs/seed-table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from schemas.training import TrainConfig  # noqa: E402
from snunet_cbam.config import load_config  # noqa: E402
from snunet_cbam.data.imageio import read_mask  # noqa: E402
from snunet_cbam.data.layouts import list_split  # noqa: E402
from snunet_cbam.trainer import Trainer  # noqa: E402

SAMPLES = Path(os.environ.get("CDTRAIN_SAMPLES", REPO.parent / "shared" / "data" / "levir-cd-samples"))

# What a CPU run changes in the shipped recipe; everything else stays as shipped.
CPU_FIT = dict(base_channel=8, crop_size=128, batch_size=4, train_split="all", val_split="all", test_split=None,
               skip_invalid=True, num_workers=0, window_size=None, compile=False)


def seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def all_change_f1(root: Path) -> float:
    """F1 of predicting change everywhere: 2p / (1 + p), p = change pixels / all pixels."""
    changed = total = 0
    for pair in list_split(root, "all"):
        if pair.label is None or not pair.label.exists():
            continue
        try:
            mask = read_mask(pair.label)
        except (OSError, ValueError):
            continue
        changed += int(mask.sum())
        total += mask.size
    p = changed / total
    return 2 * p / (1 + p)


def run(seed: int, gate: bool | None, epochs: int, out: Path, extra: dict) -> dict:
    values = {**CPU_FIT, "epochs": epochs, "seed": seed, **extra}
    if gate is not None:
        values["spatial_attention"] = gate
    known = {k: v for k, v in values.items() if k in TrainConfig.model_fields}
    config = load_config(REPO / "config" / "train_config.yaml", known)
    started = time.monotonic()
    result = Trainer(config, SAMPLES, out).fit()
    f1s = [h["val"]["f1"] for h in result.history]
    return {"seed": seed, "gate": gate, "best_f1": max(f1s), "best_epoch": 1 + f1s.index(max(f1s)),
            "final_f1": f1s[-1], "epochs_run": len(f1s), "seconds": time.monotonic() - started, "f1_history": f1s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--gate", nargs="+", default=["on", "off"], choices=["on", "off", "default"],
                        help="spatial_attention values to run ('default' leaves the key alone)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], help="another key=value over the recipe")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "seed-table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from snunet_cbam.config import parse_overrides

    extra = parse_overrides(args.set)
    baseline = all_change_f1(SAMPLES)
    gates = {"on": True, "off": False, "default": None}
    rows = []
    for gate_name in args.gate:
        for seed in seeds(args.seeds):
            row = run(seed, gates[gate_name], args.epochs, args.out / f"gate-{gate_name}" / f"seed-{seed}", extra)
            rows.append(row)
            print(f"gate {gate_name} seed {seed}: best F1 {row['best_f1']:.3f} (epoch {row['best_epoch']}), "
                  f"final {row['final_f1']:.3f}, {row['seconds']:.0f} s", flush=True)
            (args.out / "results.json").write_text(json.dumps({"all_change_f1": baseline, "rows": rows}, indent=1))

    print(f"\nall-change F1 of these tiles: {baseline:.3f}\n")
    print("| seed | " + " | ".join(f"spatial_attention {g}" for g in args.gate) + " |")
    print("| --- |" + " --- |" * len(args.gate))
    for seed in seeds(args.seeds):
        cells = [next(f"{r['best_f1']:.3f}" for r in rows if r["seed"] == seed and r["gate"] == gates[g])
                 for g in args.gate]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    for g in args.gate:
        f1s = [r["best_f1"] for r in rows if r["gate"] == gates[g]]
        print(f"| median {g} | {statistics.median(f1s):.3f} (min {min(f1s):.3f}) |")


if __name__ == "__main__":
    main()
