"""``cdtrain train | evaluate | check | predict | make-dataset``: the ML core from the command line."""

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
    from .distributed import torchrun_env
    from .trainer import LAST_CHECKPOINT, Trainer
    from schemas.training import TrainConfig

    out = Path(args.out)
    base = None
    if args.resume:
        # A resumed run keeps the configuration it started with; --set may still change keys
        # such as epochs or time_limit_minutes.
        base = TrainConfig.model_validate(load_checkpoint(out / LAST_CHECKPOINT)["config"])
    config = load_config(None if args.resume else args.config, args.set, base=base)
    # Under torchrun (gpus > 1) every process runs this; rank 0 alone writes and logs.
    main_rank = (torchrun_env() or (0, 1, 0))[0] == 0
    out.mkdir(parents=True, exist_ok=True)
    if main_rank:
        (out / "config.yaml").write_text(_dump_yaml(config.model_dump()))
    hooks = [ProgressBars(disable=args.quiet or None)]
    if args.mlflow and main_rank:  # MLflow is imported only when asked for
        try:
            from .mlflow_run import LocalRunHooks
        except ImportError:
            print("error: --mlflow needs MLflow (pip install mlflow)", file=sys.stderr)
            return EXIT_BAD_INPUT
        hooks.append(LocalRunHooks.start(args.mlflow, args.data, out, resume=args.resume))
    result = Trainer(config, args.data, out, hooks=hooks,
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
    from .data.geotiff import ImageSpec
    from .data.layouts import has_split, layout_from_config
    from .data.splits import split_pairs

    # --label-threshold is a shorthand for --set label_threshold=N, validated like the config.
    threshold = [] if args.label_threshold is None else [f"label_threshold={args.label_threshold}"]
    dataset = [] if args.dataset is None else [f"dataset={args.dataset}"]
    config = load_config(args.config, [*args.set, *threshold, *dataset])
    if args.split:
        splits = args.split
    else:  # those a training run reads; a test split only where the dataset has one
        test = config.test_split if config.test_split and has_split(args.data, config.test_split,
                                                                     layout_from_config(config)) else None
        splits = [s for s in (config.train_split, config.val_split, test) if s]
    spec = ImageSpec.from_config(config)
    plans = [split_pairs(args.data, split, config, whole_train=True) for split in dict.fromkeys(splits)]
    reports = [check_pairs(plan.pairs, plan.split, label_threshold=config.label_threshold, image_spec=spec)
               for plan in plans]
    for report in reports:
        print(report.describe())
    return 0 if all(r.ok for r in reports) else 1


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict_scene

    result = predict_scene(args.before, args.after, args.out, model=args.model, checkpoint=args.checkpoint,
                           threshold=args.threshold, tile=args.tile, overlap=args.overlap, blend=args.blend,
                           tta=args.tta, device=args.device, tracking_uri=args.tracking_uri)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1 (exclusive), got {text}")
    return value


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
    train.add_argument("--data", required=True,
                       help="dataset directory: split folders (train|val|test/A,B,label), the tiled layout "
                            "(A/ B/ label/ list/), or a published dataset's layout with the config key dataset")
    train.add_argument("--config", help="YAML with the keys to change (defaults: config/train_config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key (value parsed as YAML, e.g. bands=[3,2,1]); repeatable")
    train.add_argument("--out", default="runs/latest", help="output directory (checkpoints, metrics.json)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/last.pt, inside the epoch it was written in; a finished run "
                            "(last epoch done or stopped early) only redoes the threshold and test")
    train.add_argument("--checkpoint-every", type=_seconds, metavar="SECONDS",
                       help="also write OUT/last.pt inside an epoch, at the first step SECONDS after the last "
                            "checkpoint, so that a killed run loses at most about that much training "
                            "(default: at the end of every epoch, and when the run stops, e.g. at "
                            "time_limit_minutes)")
    train.add_argument("--mlflow", metavar="URI",
                       help="also log the run to MLflow at URI (sqlite:///mlflow.db, http://host:5000, a "
                            "directory) as the service does: params, metrics per epoch, validation panels, "
                            "curves, the best checkpoint and the dataset as input; experiment "
                            "MLFLOW_EXPERIMENT_NAME or cdtrain; with --resume, into the run of --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="score a checkpoint on a split, whole images")
    evaluate.add_argument("--data", required=True,
                          help="dataset directory, in the layout of the checkpoint's config (dataset, folders)")
    evaluate.add_argument("--checkpoint", required=True, help="a trainer checkpoint (best.pt)")
    evaluate.add_argument("--split", default="test", help="the split to score (default: test)")
    evaluate.add_argument("--out", help="also write OUT/evaluation_SPLIT.json")
    evaluate.add_argument("--device", default=None, help="default: the checkpoint's config (auto)")
    evaluate.set_defaults(handler=_evaluate)

    check = subparsers.add_parser("check", help="check a dataset and name every invalid pair")
    check.add_argument("--data", required=True, help="dataset directory to check")
    check.add_argument("--config", help="YAML with the keys to change (layout, bands, label_threshold, splits)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key (value parsed as YAML); repeatable")
    check.add_argument("--dataset", metavar="PRESET",
                       help="a published dataset's layout (levir-cd, levir-cd+, whu-cd, cdd, sysu-cd, s2looking, "
                            "dsifn); short for --set dataset=PRESET")
    check.add_argument("--split", action="append", help="split(s) to check (default: those the config uses)")
    check.add_argument("--label-threshold", type=int, metavar="N",
                       help="label pixels >= N are change (default: the config's label_threshold, 128; "
                            "1 for 0/1 masks)")
    check.set_defaults(handler=_check)

    predict = subparsers.add_parser(
        "predict", help="change map of two co-registered scenes of any size (GeoTIFF in, GeoTIFF + PNG out)",
        description="Predict the change between two dates of one place. The scenes are read and written in "
                    "windows (memory holds a row of tiles, not the scene); the outputs keep the inputs' "
                    "CRS and transform: OUT mask (uint8, 255 = change), probability (float32) and a PNG overlay.")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="URI",
                        help="an MLflow model: models:/NAME@ALIAS (e.g. models:/cdtrain@production), "
                             "models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID; its run's checkpoint is used")
    source.add_argument("--checkpoint", metavar="PATH", help="a trainer checkpoint (best.pt)")
    predict.add_argument("--before", required=True, metavar="IMAGE", help="the first date's scene (GeoTIFF, or PNG/JPEG)")
    predict.add_argument("--after", required=True, metavar="IMAGE",
                         help="the second date's scene, on the same grid (size, CRS, transform) as --before")
    predict.add_argument("--out", required=True,
                         help="an existing directory (or one ending with /): OUT/change_mask.tif, "
                              "OUT/change_probability.tif, OUT/change_overlay.png; otherwise a prefix: "
                              "OUT_mask.tif, OUT_probability.tif, OUT_overlay.png")
    predict.add_argument("--threshold", type=_probability,
                         help="change probability above which a pixel is change (default: the model's, tuned on "
                              "validation)")
    predict.add_argument("--tile", type=int, metavar="PIXELS",
                         help="tile side (default: the model's window_size, 1024 if it has none)")
    predict.add_argument("--overlap", type=int, metavar="PIXELS",
                         help="pixels shared by neighbouring tiles (default: the model's window_overlap, or half a "
                              "tile)")
    predict.add_argument("--blend", choices=["gaussian", "linear", "mean"],
                         help="weights of overlapping tiles (default: the model's window_blend)")
    predict.add_argument("--tta", choices=["none", "flip"],
                         help="flip test-time augmentation (default: the model's tta; flip costs 4x)")
    predict.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the checkpoint's config, auto)")
    predict.add_argument("--tracking-uri", metavar="URI",
                         help="MLflow tracking and registry URI for --model (default: MLFLOW_TRACKING_URI)")
    predict.set_defaults(handler=_predict)

    make = subparsers.add_parser("make-dataset", help="write a synthetic change dataset (tiled layout)")
    make.add_argument("--out", required=True, help="directory to write the dataset to")
    make.add_argument("--pairs", type=int, default=64, help="number of image pairs (default: 64)")
    make.add_argument("--size", type=int, default=256, help="side of each image in pixels (default: 256)")
    make.add_argument("--seed", type=int, default=0, help="random seed of the drawing (default: 0)")
    make.set_defaults(handler=_make_dataset)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ML command; bad input becomes a message and exit code 2, not a traceback."""
    from schemas.training import ConfigError

    from .data.check import InvalidDatasetError
    from .data.geotiff import ImageBandsError
    from .data.layouts import DatasetLayoutError
    from .model_source import ModelSourceError
    from .predict import PredictionSettingsError, ScenePairError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, InvalidDatasetError, DatasetLayoutError, FileNotFoundError, ScenePairError,
            ImageBandsError, ModelSourceError, PredictionSettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
