"""``cdtrain config schema | show``: the training configuration, for editors and before a run.

``schema`` prints the JSON Schema of :class:`schemas.training.TrainConfig`, which a YAML editor uses
to complete and check a config file. ``show`` prints the configuration a run would use: the
defaults merged with ``--config FILE`` and ``--set KEY=VALUE``, validated by the same code as
``cdtrain train`` (:func:`snunet_cbam.config.load_config`). Neither imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT = 2

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_TITLE = "cdtrain training config"
SCHEMA_DESCRIPTION = (
    "Training configuration of SNUNet-CBAM (cdtrain train --config, config_uri of a job, or a "
    "train_config.yaml beside a dataset). A file gives only the keys it changes; the others keep "
    "the defaults of config/train_config.yaml."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="print the training config's JSON Schema, or a resolved config",
                                   description="The training configuration (documented in config/train_config.yaml).")
    commands = config.add_subparsers(dest="config_command", required=True, metavar="{schema,show}")

    schema = commands.add_parser("schema", help="print the JSON Schema of the training config (for editors)",
                                 description="Print the JSON Schema of the training config. Save it and point a "
                                             "YAML editor at it: '# yaml-language-server: $schema=FILE'.")
    schema.set_defaults(runner=_schema)

    show = commands.add_parser("show", help="print the resolved training config as YAML",
                               description="Print the configuration a run would use: the defaults, then the "
                                           "keys of --config FILE, then each --set, validated.")
    show.add_argument("--config", metavar="FILE",
                      help="YAML with the keys to change (defaults: config/train_config.yaml)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one key (value parsed as YAML); repeatable, applied after --config")
    show.set_defaults(runner=_show)


def training_config_schema() -> dict:
    """The JSON Schema of a training config file: every key optional, unknown keys refused."""
    from schemas.training import TrainConfig

    body = TrainConfig.model_json_schema()
    body.pop("title", None)
    # pydantic's titles only restate the key ("Lr"); editors show the key and its description.
    for model in (body, *body.get("$defs", {}).values()):
        for prop in model.get("properties", {}).values():
            prop.pop("title", None)
    # pydantic leaves out the default of a nested model's key (a factory); editors show it.
    defaults = TrainConfig().model_dump(mode="json")
    for key, prop in body.get("properties", {}).items():
        prop.setdefault("default", defaults[key])
    return {"$schema": SCHEMA_DIALECT, "title": SCHEMA_TITLE, "description": SCHEMA_DESCRIPTION, **body}


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(training_config_schema(), indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    import yaml

    from schemas.training import ConfigError
    from snunet_cbam.config import load_config

    try:
        config = load_config(args.config, args.set)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The same form `cdtrain train` writes to OUT/config.yaml, so the output is a valid --config.
    sys.stdout.write(yaml.safe_dump(config.model_dump(), sort_keys=False))
    return 0
