"""The ``cdtrain`` command as a whole: its help, ``--version``, ``config schema | show``, and the
packaging it is installed with (pyproject.toml's ranges, requirements.lock's pins, ``make setup``)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from cdtrain.cli import build_parser, main
from schemas.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "requirements.lock"
# Heavy modules that neither --version nor the config commands need.
HEAVY = ("torch", "torchvision", "cv2", "albumentations", "aiohttp", "mlflow")


def run_cdtrain(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdtrain", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# --- help and version ---------------------------------------------------------------------------

def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not (helps.get(name) or "").strip():
                    missing.append(f"{path} {name} (the command)")
                missing += _undocumented(sub, f"{path} {name}")
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if not (action.help or "").strip():
            missing.append(f"{path} {'/'.join(action.option_strings) or action.metavar or action.dest}")
    return missing


def test_every_command_and_argument_has_help() -> None:
    missing = _undocumented(build_parser(), "cdtrain")
    assert not missing, "no help text on:\n" + "\n".join(missing)


def test_version_is_the_installed_distributions() -> None:
    result = run_cdtrain("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cdtrain {metadata.version('cdtrain')}"
    assert metadata.version("cdtrain") == PYPROJECT["project"]["version"]


def test_version_and_config_commands_load_no_heavy_module() -> None:
    code = f"""
import contextlib, io, sys
from cdtrain.cli import main
for argv in (["--version"], ["config", "schema"], ["config", "show", "--set", "epochs=3"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- cdtrain config schema ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema() -> dict:
    result = run_cdtrain("config", "schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_config_schema_has_every_key_and_refuses_unknown_ones(schema: dict) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"]) == list(TrainConfig.model_fields)
    assert schema["additionalProperties"] is False
    assert not schema.get("required"), "a config file gives only the keys it changes"
    defaults = TrainConfig().model_dump(mode="json")
    assert {key: prop.get("default", "(none)") for key, prop in schema["properties"].items()} == defaults


def test_config_schema_describes_every_key(schema: dict) -> None:
    models = {"": schema, **{f"{name}.": model for name, model in schema.get("$defs", {}).items()}}
    undescribed = [f"{prefix}{key}" for prefix, model in models.items()
                   for key, prop in model.get("properties", {}).items() if not (prop.get("description") or "").strip()]
    assert not undescribed, f"keys without a description: {undescribed}"
    nested = [name for name, model in schema.get("$defs", {}).items() if model.get("additionalProperties") is not False]
    assert not nested, f"nested keys an editor would not flag when misspelt: {nested}"


def test_config_schema_accepts_valid_configs_and_rejects_bad_ones(schema: dict) -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = yaml.safe_load((ROOT / "config" / "train_config.yaml").read_text())
    for good in (shipped, TrainConfig().model_dump(), {}, {"crops_per_image": "auto"}, {"crops_per_image": 4},
                 {"test_split": None, "device": "cuda:1"}, {"scale": {"range": [0, 10000]}}):
        assert not list(validator.iter_errors(good)), good
    for bad in ({"epochz": 3}, {"epochs": 0}, {"scheduler": "linear"}, {"crops_per_image": "all"},
                {"train_split": "../up"}, {"amp": "maybe"}, {"scale": {"rnage": [0, 1]}}):
        assert list(validator.iter_errors(bad)), bad


# --- cdtrain config show --------------------------------------------------------------------------

def test_config_show_prints_the_documented_defaults() -> None:
    result = run_cdtrain("config", "show")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown == yaml.safe_load((ROOT / "config" / "train_config.yaml").read_text())
    assert list(shown) == list(TrainConfig.model_fields)


def test_config_show_applies_the_file_then_each_set(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("epochs: 5\nlr: 0.01\ncrops_per_image: 2\n")
    result = run_cdtrain("config", "show", "--config", str(config), "--set", "epochs=7", "--set", "test_split=null")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (shown["epochs"], shown["lr"], shown["crops_per_image"], shown["test_split"]) == (7, 0.01, 2, None)
    assert shown["batch_size"] == TrainConfig().batch_size
    # What it prints is a config file that gives the same configuration back.
    again = tmp_path / "shown.yaml"
    again.write_text(result.stdout)
    assert yaml.safe_load(run_cdtrain("config", "show", "--config", str(again)).stdout) == shown


@pytest.mark.parametrize(("file_text", "sets", "named"), [
    (None, ["epochz=3"], "unknown key 'epochz'"),
    ("bach_size: 4\n", [], "unknown key 'bach_size'"),
    (None, ["lr=-1"], "'lr'"),
    ("scheduler: linear\n", [], "'scheduler'"),
    (None, ["epochs"], "key=value"),
    ("- not\n- a mapping\n", [], "mapping"),
])
def test_config_show_names_the_bad_key(tmp_path: Path, file_text: str | None, sets: list[str], named: str) -> None:
    argv = ["config", "show"]
    if file_text is not None:
        (tmp_path / "bad.yaml").write_text(file_text)
        argv += ["--config", str(tmp_path / "bad.yaml")]
    for pair in sets:
        argv += ["--set", pair]
    result = run_cdtrain(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


# --- packaging: pyproject ranges, lock pins, make setup --------------------------------------------

def _locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def _declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "cdtrain"]  # cdtrain[service] in dev


def test_lock_pins_every_dependency_within_its_range() -> None:
    pins = _locked()
    assert "cdtrain" not in pins, "the lock holds the dependencies, not the project"
    problems = []
    for req in _declared():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} is outside pyproject's {req}")
    assert not problems, "requirements.lock (make lock after installing):\n" + "\n".join(problems)


def test_torch_has_a_lower_bound_in_pyproject_and_its_pin_in_the_lock() -> None:
    declared = {canonicalize_name(r.name): r for r in _declared()}
    pins = _locked()
    for name, pin in (("torch", "2.14.1"), ("torchvision", "0.29.1")):
        spec = declared[name].specifier
        assert not [s for s in spec if s.operator in ("==", "===")], f"pyproject pins {name} exactly: {spec}"
        assert [s for s in spec if s.operator in (">=", ">", "~=")], f"pyproject gives {name} no lower bound: {spec}"
        # The CUDA build the worker image and its base image are made for (tests/test_deploy.py).
        assert pins[name] == Version(pin)
        assert spec.contains(pins[name])


def test_installed_versions_are_the_locked_ones() -> None:
    """What ``make setup`` installed is what the lock says (a new pin needs ``make setup``)."""
    drift = []
    for name, pin in _locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drift.append(f"{name}=={pin} is not installed")
            continue
        if installed != pin:
            drift.append(f"{name}: installed {installed}, locked {pin}")
    assert not drift, "run make setup (or make lock after an intended upgrade):\n" + "\n".join(drift)


def test_make_setup_installs_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule, "no $(STAMP) rule in the Makefile"
    prerequisites, recipe = rule.group(1).split(), rule.group(2)
    assert {"pyproject.toml", "requirements.lock"} <= set(prerequisites)
    assert re.search(r"pip install .*-r requirements\.lock .*-e '\.\[dev\]'", recipe), recipe


def _dependency_installs(dockerfile: Path) -> list[str]:
    """Each ``pip install`` / ``uv pip install`` command of the file's RUN instructions that
    resolves dependencies (``--no-deps`` installs resolve none)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    commands = []
    for line in text.splitlines():
        if re.match(r"\s*RUN\s", line):
            commands += [c.strip() for c in re.split(r"&&|;|\|\|", line) if re.search(r"\bpip install\b", c)]
    return [c for c in commands if "--no-deps" not in c]


def test_images_install_under_the_lock() -> None:
    """An image gets the tested versions, not the newest ones on the day it is built."""
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*")):
        installs = _dependency_installs(dockerfile)
        if not installs:
            continue
        assert re.search(r"^COPY\s+requirements\.lock\s", dockerfile.read_text(), re.M), \
            f"{dockerfile.name} does not copy requirements.lock"
        for command in installs:
            assert re.search(r"(-c|--constraint|-r|--requirement)[ =]\S*requirements\.lock\b", command), \
                f"{dockerfile.name}: {command!r} does not install under requirements.lock"


def test_python_versions_agree() -> None:
    project = PYPROJECT["project"]
    supported = SpecifierSet(project["requires-python"])
    classified = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert classified == {"3.11", "3.12", "3.13"}
    assert all(supported.contains(f"{v}.0") for v in classified)
    assert not supported.contains("3.10.0") and not supported.contains("3.14.0")
    assert supported.contains(".".join(map(str, sys.version_info[:3])))
