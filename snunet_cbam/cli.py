"""``cdtrain train | evaluate | check | make-dataset``: the ML core from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _train(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import load_config
    from .progress import ProgressBars
    from .trainer import LAST_CHECKPOINT, Trainer
    from schemas.training import TrainConfig

    out = Path(args.out)
    base = None
    if args.resume:
        # A resumed run keeps the configuration it started with; --set may still change keys
        # such as epochs or time_limit_minutes.
        base = TrainConfig.model_validate(load_checkpoint(out / LAST_CHECKPOINT)["config"])
    config = load_config(None if args.resume else args.config, args.set, base=base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(_dump_yaml(config.model_dump()))
    result = Trainer(config, args.data, out, hooks=[ProgressBars(disable=args.quiet or None)],
                     checkpoint_every_s=args.checkpoint_every).fit(resume=args.resume)
    print(json.dumps({"status": result.status, "best": result.best, "threshold": result.val_at_threshold,
                      "test": result.test, "metrics": str(result.metrics_path),
                      "best_checkpoint": str(result.best_checkpoint)}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .checkpoint_eval import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, device=args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"evaluation_{args.split}.json").write_text(text)
    return 0


def _check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.check import check_pairs
    from .data.layouts import list_split

    # --label-threshold is a shorthand for --set label_threshold=N, validated like the config.
    threshold = [] if args.label_threshold is None else [f"label_threshold={args.label_threshold}"]
    config = load_config(args.config, [*args.set, *threshold])
    splits = args.split or [s for s in (config.train_split, config.val_split, config.test_split) if s]
    reports = [check_pairs(list_split(args.data, split), split, label_threshold=config.label_threshold)
               for split in splits]
    for report in reports:
        print(report.describe())
    return 0 if all(r.ok for r in reports) else 1


def _make_dataset(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_dataset

    summary = make_synthetic_dataset(args.out, pairs=args.pairs, size=args.size, seed=args.seed)
    print(f"wrote {summary.pairs} pairs of {summary.size}x{summary.size} to {summary.root} "
          f"(splits {summary.splits}, {summary.change_fraction:.1%} changed pixels)")
    return 0


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _dump_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train SNUNet-CBAM on a dataset directory")
    train.add_argument("--data", required=True, help="dataset directory (LEVIR-CD or tiled layout)")
    train.add_argument("--config", help="YAML with the keys to change (defaults: config/train_config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    train.add_argument("--out", default="runs/latest", help="output directory (checkpoints, metrics.json)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/last.pt, inside the epoch it was written in; a finished run "
                            "(last epoch done or stopped early) only redoes the threshold and test")
    train.add_argument("--checkpoint-every", type=_seconds, metavar="SECONDS",
                       help="also write OUT/last.pt inside an epoch, at the first step SECONDS after the last "
                            "checkpoint, so that a killed run loses at most about that much training "
                            "(default: at the end of every epoch, and when the run stops, e.g. at "
                            "time_limit_minutes)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="score a checkpoint on a split, whole images")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", help="also write OUT/evaluation_SPLIT.json")
    evaluate.add_argument("--device", default=None, help="default: the checkpoint's config (auto)")
    evaluate.set_defaults(handler=_evaluate)

    check = subparsers.add_parser("check", help="check a dataset and name every invalid pair")
    check.add_argument("--data", required=True)
    check.add_argument("--config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--split", action="append", help="split(s) to check (default: those the config uses)")
    check.add_argument("--label-threshold", type=int, metavar="N",
                       help="label pixels >= N are change (default: the config's label_threshold, 128; "
                            "1 for 0/1 masks)")
    check.set_defaults(handler=_check)

    make = subparsers.add_parser("make-dataset", help="write a synthetic change dataset (tiled layout)")
    make.add_argument("--out", required=True)
    make.add_argument("--pairs", type=int, default=64)
    make.add_argument("--size", type=int, default=256)
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(handler=_make_dataset)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ML command; bad input becomes a message and exit code 2, not a traceback."""
    from schemas.training import ConfigError

    from .data.check import InvalidDatasetError
    from .data.layouts import DatasetLayoutError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, InvalidDatasetError, DatasetLayoutError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
