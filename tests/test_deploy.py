"""Static checks of deploy/: the container images, the compose stack and the Kubernetes manifests.

There is no Docker engine or cluster on the development machines, so nothing here builds or starts a
container. Instead the files are parsed and checked against the code's own contracts: the settings
each role reads, the queue names of the topology, the versions pinned in pyproject.toml, the imports
of the ingress. A rename in the code or a typo in a manifest fails here, not in production.
"""

from __future__ import annotations

import argparse
import ast
import base64
import functools
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cdtrain.settings import SERVICE_ENV_VARS, ServiceSettings
from infra.objects.models import S3Settings
from ingress.settings import ENV_VARS, IngressSettings
from schemas.jobs import JobState
from schemas.topology import Topology
from tests import kustomize_lite

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SECRETS_EXAMPLE = K8S / "secrets.env.example"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# CDTRAIN_* variables read outside ingress/settings.py's ENV_VARS table:
# - by `cdtrain serve` for every role (cdtrain/settings.py, SERVICE_ENV_VARS; checked below to agree);
# - by S3Settings.from_env (infra/objects/models.py), with the standard AWS_* variables.
NON_INGRESS_CDTRAIN_VARS = {
    "CDTRAIN_DATA_DIR",           # worker cache, run directories, embedded stores
    "CDTRAIN_MLFLOW_EXPERIMENT",  # experiment of the job runs
    "CDTRAIN_HEARTBEAT_S",        # a running job's heartbeat interval
    "CDTRAIN_PROMOTION_MARGIN",   # quality gate: F1 above the all-change F1 needed for production
    "CDTRAIN_STALE_AFTER_S",      # watchdog: silence before a job is re-queued
    "CDTRAIN_WATCHDOG_INTERVAL_S",  # watchdog: time between sweeps
    "CDTRAIN_ACCEPT_GRACE_S",     # watchdog: wait before a queued job's unconfirmed request is published again
    "CDTRAIN_CHECKPOINT_URI",     # where workers keep job checkpoints (s3://bucket/prefix/ or a directory)
    "CDTRAIN_CHECKPOINT_EVERY_S",  # a checkpoint inside an epoch at least this often
    "CDTRAIN_STEP_STALL_S",       # watchdog: time without a training step before a job is re-queued
    "CDTRAIN_JOB_DEADLINE_S",     # watchdog: default deadline of a job (train request: deadline_s)
    "CDTRAIN_WORKER_CONFIG",      # YAML overrides applied to every job on a worker
    "CDTRAIN_WORKER_MAX_JOBS",    # a worker exits after this many jobs (one Kubernetes Job per request)
    "CDTRAIN_WORKER_IDLE_EXIT_S",  # ... and after this long without a job
    "CDTRAIN_METRICS_PORT",       # the worker's and projector's Prometheus port
    "CDTRAIN_ALLOW_LOCAL_PATHS",  # let jobs read file:// datasets
    # a worker's limits on a job's dataset and config, and its dataset cache's bound (consumer/limits.py)
    "CDTRAIN_MAX_ARCHIVE_BYTES", "CDTRAIN_MAX_EXTRACTED_BYTES", "CDTRAIN_MAX_ARCHIVE_MEMBERS",
    "CDTRAIN_MAX_DATASET_BYTES", "CDTRAIN_MAX_DATASET_OBJECTS", "CDTRAIN_MAX_CONFIG_BYTES",
    "CDTRAIN_MAX_IMAGE_PIXELS", "CDTRAIN_CACHE_MAX_BYTES",
    "CDTRAIN_S3_ENDPOINT_URL",    # S3/MinIO endpoint
    "CDTRAIN_S3_ADDRESSING_STYLE",  # path / virtual / auto
}
KNOWN_CDTRAIN_VARS = set(ENV_VARS) | NON_INGRESS_CDTRAIN_VARS

ROLES = {"ingress", "consumer", "projector", "all"}
# The command each container of ours runs, per compose service / k8s Deployment. The ingress runs
# `python -m ingress` (= `cdtrain serve --role ingress` for real services): the `cdtrain` command
# imports snunet_cbam's CLI, and with it Pillow, which the ingress image leaves out (see
# test_cdtrain_serve_starts_without_the_ml_packages).
INGRESS_COMMAND = ["python", "-m", "ingress"]
COMPOSE_COMMANDS = {
    "ingress": INGRESS_COMMAND,
    "projector": ["cdtrain", "serve", "--role", "projector"],
    "worker": ["cdtrain", "serve", "--role", "consumer"],
}
# On Kubernetes a worker is a Job that takes one request and exits (KEDA's ScaledJob).
K8S_COMMANDS = {
    "cdtrain-ingress": INGRESS_COMMAND,
    "cdtrain-projector": COMPOSE_COMMANDS["projector"],
    "cdtrain-worker": [*COMPOSE_COMMANDS["worker"], "--max-jobs", "1"],
}
# Image each role's container must use: the ingress image has no torch.
INGRESS_DOCKERFILE = "deploy/docker/Dockerfile.ingress"
WORKER_DOCKERFILE = "deploy/docker/Dockerfile.worker"


# --- helpers --------------------------------------------------------------------------------------

def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


_COMPOSE_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def compose_references(value: Any, refs: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Variables interpolated in the compose file's values -> the operators used with each ('' for
    none). Comments are not interpolated, so the parsed document is walked, not the text."""
    refs = {} if refs is None else refs
    if isinstance(value, dict):
        for item in value.values():
            compose_references(item, refs)
    elif isinstance(value, list):
        for item in value:
            compose_references(item, refs)
    elif isinstance(value, str):
        for m in _COMPOSE_VAR.finditer(value):
            if not m["escaped"]:
                refs.setdefault(m["name"] or m["bare"], set()).add(m["op"] or "")
    return refs


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, ...)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg = m["op"] or "", m["arg"] or ""
        current = env.get(name)
        is_set, non_empty = current is not None, bool(current)
        if op in (":-", "-"):
            return current if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise ValueError(f"compose would refuse to start: {name}: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (non_empty if op == ":+" else is_set) else ""
        return current or ""

    return _COMPOSE_VAR.sub(one, value)


def filled_env_example() -> dict[str, str]:
    """deploy/.env.example with every empty secret filled in, as the operator is told to."""
    return {k: v or f"test-{k.lower().replace('_', '-')}-0123456789" for k, v in read_env_file(ENV_EXAMPLE).items()}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict[str, Any]:
    return interpolate(compose()["services"], filled_env_example())


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if line.endswith("\\"):
            continue
        word, _, rest = current.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile(name: str) -> list[tuple[str, str]]:
    return parse_dockerfile(ROOT / name)


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for item in re.findall(r"(\w+)=(\S+)", rest):
                env[item[0]] = item[1]
    return env


def dockerfile_workdir(instructions: list[tuple[str, str]]) -> str:
    workdirs = [rest for word, rest in instructions if word == "WORKDIR"]
    return workdirs[-1] if workdirs else "/"


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def run_text(instructions: list[tuple[str, str]]) -> str:
    return "\n".join(rest for word, rest in instructions if word == "RUN")


def pip_installs(text: str) -> list[str]:
    """The package arguments of every `pip install` / `uv pip install` in ``text`` (RUN lines)."""
    packages = []
    commands: list[list[str]] = []
    for line in text.splitlines():
        commands.append([])
        for word in shlex.split(line):
            if word in ("&&", "||", ";"):
                commands.append([])
            else:
                commands[-1].append(word)
    for words in commands:
        if "pip" in words and "install" in words[words.index("pip"):]:
            args = words[words.index("install", words.index("pip")) + 1:]
            skip = False
            for arg in args:
                if skip:
                    skip = False
                elif arg in ("-r", "-c", "--requirement", "--constraint", "--index-url", "--extra-index-url"):
                    skip = True
                elif not arg.startswith("-"):
                    packages.append(arg)
    return packages


def pinned(text: str, package: str) -> set[str]:
    return set(re.findall(rf"(?<![\w.-]){re.escape(package)}==([0-9][0-9A-Za-z.+]*)", text))


def project_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["service"]]
    return {canonicalize_name(r.name): r for r in reqs}


def locked_version(name: str) -> str:
    """The exact version requirements.lock pins (pyproject.toml gives only a range)."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        locked, sep, version = line.partition("==")
        if sep and canonicalize_name(locked) == canonicalize_name(name):
            return version.strip()
    raise AssertionError(f"requirements.lock does not pin {name}")


def k8s_kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


@functools.cache
def _rendered(overlay: str) -> str:
    """The overlay as `kustomize build` renders it (tests/kustomize_lite.py), with the Secret
    generated from the template (the real secrets.env is git-ignored)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
        shutil.copy(SECRETS_EXAMPLE, tree / "overlays" / overlay / "secrets.env")
        return yaml.safe_dump_all(kustomize_lite.build(tree / "overlays" / overlay))


def k8s_objects(overlay: str = "prod") -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(_rendered(overlay)))  # a fresh copy: tests may change it


def k8s_one(kind: str, name: str, overlay: str = "prod") -> dict[str, Any]:
    found = [o for o in k8s_objects(overlay) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a Deployment or of KEDA's ScaledJob (a Job per request)."""
    if workload["kind"] == "ScaledJob":
        return workload["spec"]["jobTargetRef"]["template"]
    return workload["spec"]["template"]


def k8s_workloads(overlay: str = "prod") -> dict[str, dict[str, Any]]:
    """Everything that runs pods of ours, by name: the Deployments and the worker's ScaledJob."""
    return {o["metadata"]["name"]: o for o in k8s_objects(overlay) if o["kind"] in ("Deployment", "ScaledJob")}


def k8s_deployments(overlay: str = "prod") -> dict[str, dict[str, Any]]:
    return {n: o for n, o in k8s_workloads(overlay).items() if o["kind"] == "Deployment"}


def k8s_configmap(overlay: str = "prod") -> dict[str, str]:
    return {k: str(v) for k, v in k8s_one("ConfigMap", "cdtrain-config", overlay)["data"].items()}


def k8s_container_env(workload: dict[str, Any], overlay: str = "prod") -> dict[str, str]:
    """What the container's environment holds: ConfigMap and Secret (envFrom), then env."""
    (container,) = pod_template(workload)["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "cdtrain-config"
            env.update(k8s_configmap(overlay))
        if "secretRef" in source:
            assert source["secretRef"]["name"] == secret_name()
            secret = k8s_one("Secret", secret_name(), overlay)
            env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    env.update({item["name"]: str(item.get("value", "")) for item in container.get("env", [])})
    return env


def secret_name() -> str:
    names = set()
    for overlay in OVERLAYS:
        (generator,) = k8s_kustomization(K8S / "overlays" / overlay)["secretGenerator"]
        names.add(generator["name"])
    (name,) = names
    return name


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory or storage quantity (binary or decimal suffix) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert match, f"not a quantity: {text!r}"
    units = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(match[1]) * units[match[2]]


def image_of_container(image: str) -> str:
    """The Dockerfile behind an image name used in compose.yaml or the k8s manifests."""
    if "ingress" in image:
        return INGRESS_DOCKERFILE
    if "worker" in image:
        return WORKER_DOCKERFILE
    raise AssertionError(f"unknown image {image!r}")


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def worker_stop_timeout_s() -> float:
    """Default of TrainingWorker.stop(timeout=...), read from the source (no torch import)."""
    tree = ast.parse((ROOT / "consumer" / "worker.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "stop":
            names = [a.arg for a in node.args.args]
            defaults = dict(zip(names[len(names) - len(node.args.defaults):], node.args.defaults))
            return float(ast.literal_eval(defaults["timeout"]))
    raise AssertionError("TrainingWorker.stop not found")


def serve_role_choices() -> set[str]:
    from cdtrain.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = subparsers.choices["serve"]
    (role,) = [a for a in serve._actions if "--role" in a.option_strings]
    return set(role.choices)


def python_blocking(modules: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


# --- every file parses ----------------------------------------------------------------------------

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_deploy_tree_has_the_expected_files() -> None:
    expected = [
        "compose.yaml", ".env.example", "docker/Dockerfile.ingress", "docker/Dockerfile.worker",
        "docker/Dockerfile.mlflow", "docker/ingress-requirements.txt", "docker/healthcheck.py",
        "rabbitmq/20-cdtrain.conf", "minio/init.sh", "k8s/base/kustomization.yaml", "k8s/overlays/dev/kustomization.yaml",
        "k8s/overlays/prod/kustomization.yaml", "k8s/secrets.env.example",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing
    assert len(YAML_FILES) >= 7


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        if path in _json_patch_files():  # a list of JSON 6902 operations
            assert isinstance(doc, list) and all({"op", "path"} <= set(op) for op in doc), path
            continue
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"


def _json_patch_files() -> set[Path]:
    return {K8S / "overlays" / overlay / patch["path"] for overlay in OVERLAYS
            for patch in k8s_kustomization(K8S / "overlays" / overlay).get("patches", []) if "path" in patch}


# --- compose --------------------------------------------------------------------------------------

def test_compose_depends_on_only_defined_services_and_valid_conditions() -> None:
    services = compose_services()
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on undefined service {dep!r}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert has_healthcheck(services[dep]), f"{name} waits for {dep} to be healthy, it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is a one-shot job: restart must be 'no'"
    # No cycle (compose would refuse to start).
    done: set[str] = set()
    while len(done) < len(graph):
        ready = [s for s, deps in graph.items() if s not in done and deps <= done]
        assert ready, f"depends_on cycle among {sorted(set(graph) - done)}"
        done.update(ready)


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable") and check.get("test") not in (None, ["NONE"])
    if "build" in service:
        for word, rest in final_stage(dockerfile(service["build"]["dockerfile"])):
            if word == "HEALTHCHECK":
                return rest.strip().upper() != "NONE"
    return False


def test_compose_long_running_services_have_healthchecks() -> None:
    services = compose_services()
    for name in ("rabbitmq", "mongo", "minio", "mlflow", "ingress"):
        assert has_healthcheck(services[name]), name


def test_compose_variables_come_from_env_example() -> None:
    refs = compose_references(compose())
    example = read_env_file(ENV_EXAMPLE)
    for name, ops in refs.items():
        if not ops & {":-", "-"}:
            assert name in example, f"compose uses ${{{name}}} without a default; add it to deploy/.env.example"
        if ops & {":?", "?"}:
            assert example.get(name, "") == "", f"{name} is a secret: .env.example must leave it empty"
    unused = set(example) - set(refs)
    assert not unused, f"deploy/.env.example sets variables compose does not use: {sorted(unused)}"
    with pytest.raises(ValueError, match="RABBITMQ_PASSWORD"):  # secrets left empty: compose refuses
        interpolate(compose()["services"]["rabbitmq"], read_env_file(ENV_EXAMPLE))


def test_compose_cdtrain_variables_are_read_by_the_service() -> None:
    services = compose_services()
    for name in COMPOSE_COMMANDS:
        env = compose_environment(services[name])
        unknown = {k for k in env if k.startswith("CDTRAIN_")} - KNOWN_CDTRAIN_VARS
        assert not unknown, f"compose service {name} sets variables nothing reads: {sorted(unknown)}"


def test_non_ingress_variable_list_agrees_with_the_code() -> None:
    service_vars = {v for v in SERVICE_ENV_VARS if v.startswith("CDTRAIN_")}
    assert service_vars <= NON_INGRESS_CDTRAIN_VARS, "cdtrain/settings.py reads variables this test does not know"
    s3 = S3Settings.from_env({"CDTRAIN_S3_ENDPOINT_URL": "http://minio:9000", "CDTRAIN_S3_ADDRESSING_STYLE": "virtual"})
    assert (s3.endpoint_url, s3.addressing_style) == ("http://minio:9000", "virtual")
    assert NON_INGRESS_CDTRAIN_VARS - service_vars == {"CDTRAIN_S3_ENDPOINT_URL", "CDTRAIN_S3_ADDRESSING_STYLE"}


def test_compose_roles_and_commands() -> None:
    services = compose_services()
    roles = {cmd[-1] for cmd in COMPOSE_COMMANDS.values() if cmd[:2] == ["cdtrain", "serve"]}
    assert roles <= serve_role_choices() <= ROLES
    for name, command in COMPOSE_COMMANDS.items():
        assert services[name]["command"] == command, name
    assert services["minio-init"].get("restart") == "no"


def test_compose_settings_build_for_every_role() -> None:
    services = compose_services()
    for name in COMPOSE_COMMANDS:
        env = dockerfile_env(final_stage(dockerfile(services[name]["build"]["dockerfile"])))
        env.update(compose_environment(services[name]))
        settings = ServiceSettings.from_env(env)
        # Real services, never the embedded fallbacks.
        assert settings.ingress.bus.url.startswith("amqp://") and "@rabbitmq:5672" in settings.ingress.bus.url
        assert settings.ingress.view_store_url.startswith("mongodb://") and "@mongo:27017" in settings.ingress.view_store_url
        assert settings.ingress.local_objects_dir is None
        assert settings.ingress.s3.endpoint_url == "http://minio:9000"
        assert settings.ingress.s3.access_key_id is not None and settings.ingress.s3.secret_access_key is not None
        assert settings.mlflow_tracking_uri == "http://mlflow:5000"
        assert not settings.allow_local_paths
        assert settings.ingress.api_token is not None and settings.ingress.webhook_token is not None


def test_compose_ingress_is_reachable_by_minio_and_the_host() -> None:
    services = compose_services()
    ingress = services["ingress"]
    settings = IngressSettings.from_env(compose_environment(ingress))
    assert settings.host == "0.0.0.0"
    assert f"127.0.0.1:{settings.port}:{settings.port}" in ingress["ports"]
    minio_env = compose_environment(services["minio"])
    assert minio_env["MINIO_NOTIFY_WEBHOOK_ENABLE_cdtrain"] == "on"
    assert minio_env["MINIO_NOTIFY_WEBHOOK_ENDPOINT_cdtrain"] == f"http://ingress:{settings.port}/events/s3"
    assert minio_env["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_cdtrain"] == settings.webhook_token.get_secret_value()
    # The bucket and prefix MinIO notifies about are the ones that trigger jobs.
    init = (DEPLOY / "minio" / "init.sh").read_text()
    event_add = re.search(r"mc event add local/(\S+) \"?\$ARN\"? --event put --prefix (\S+)", init)
    assert event_add, "init.sh must bind the datasets bucket to the webhook target"
    assert 'ARN="arn:minio:sqs::cdtrain:webhook"' in init
    bucket, prefix = event_add.groups()
    assert bucket in settings.trigger.buckets and prefix == settings.trigger.prefix
    assert f"local/{bucket}" in re.search(r"mc mb .*", init)[0]
    # MLflow's artifact bucket exists before the server starts.
    mlflow = services["mlflow"]
    assert "--artifacts-destination=s3://mlflow" in mlflow["command"] and "local/mlflow" in init
    assert "mlflow:5000" in compose_environment(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_compose_worker_has_a_gpu_and_time_to_stop() -> None:
    services = compose_services()
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("ingress", "projector", "mlflow"):
        assert "deploy" not in services[name] and "gpus" not in services[name], f"{name} must not take a GPU"
    assert duration_s(worker["stop_grace_period"]) >= worker_stop_timeout_s() + 60
    assert worker["shm_size"] in ("8gb", "8g") or worker["shm_size"].endswith(("gb", "g"))
    data_dir = compose_environment(worker)["CDTRAIN_DATA_DIR"]
    assert any(v.split(":")[1] == data_dir for v in worker["volumes"]), "the worker's data dir must be a volume"


def test_compose_rabbitmq_keeps_the_default_consumer_timeout() -> None:
    conf = (DEPLOY / "rabbitmq" / "20-cdtrain.conf").read_text()
    settings = dict(re.findall(r"^(\w[\w.]*)\s*=\s*(\S+)", conf, re.M))
    assert settings.get("consumer_timeout") == "1800000"  # the default, written out (docs/bus.md)
    from infra.bus.settings import BusSettings

    assert BusSettings().claim_timeout * 1000 < int(settings["consumer_timeout"])
    assert "default_queue_type" not in settings  # watcher queues are exclusive: they must stay classic
    services = compose_services()
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13")


# --- Kubernetes -----------------------------------------------------------------------------------
# The manifests are checked as `kubectl apply -k deploy/k8s/overlays/<env>` would send them: each
# overlay rendered (tests/kustomize_lite.py; compared with kustomize itself where kubectl is
# installed), then every object validated against the Kubernetes schemas and, for KEDA's and the
# Prometheus operator's kinds, against their CRDs' schemas (tests/k8s_crds/).

K8S_BASE = K8S / "base"
CRD_SCHEMAS = ROOT / "tests" / "k8s_crds"
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", "1.37.0"]


def test_kustomize_base_and_overlays_use_every_file() -> None:
    base = k8s_kustomization(K8S_BASE)
    assert set(base["resources"]) == {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert "secretGenerator" not in base, "each environment generates its own Secret"
    assert not list(K8S.glob("*.yaml")), "manifests belong in base/ or an overlay"
    assert OVERLAYS == ["dev", "prod"]
    for overlay in OVERLAYS:
        directory = K8S / "overlays" / overlay
        kustomization = k8s_kustomization(directory)
        assert "../../base" in kustomization["resources"]
        used = {r for r in kustomization["resources"] if not r.startswith("..")}
        used |= {p["path"] for p in kustomization.get("patches", []) if "path" in p}
        assert used == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}, overlay
        (generator,) = kustomization["secretGenerator"]
        assert generator["envs"] == ["secrets.env"] and SECRETS_EXAMPLE.is_file()
        assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # KEDA refers to it by name
        objects = k8s_objects(overlay)
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"] == [base["namespace"]]
        assert all(o["metadata"]["namespace"] == base["namespace"] for o in objects if o["kind"] != "Namespace")
        for name, workload in k8s_workloads(overlay).items():
            for container in pod_template(workload)["spec"]["containers"]:
                assert re.fullmatch(r"registry\.example\.com/cdtrain/(ingress|worker):[\w.-]+", container["image"]), name
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/overlays/prod/secrets.env"], cwd=ROOT)
    assert ignored.returncode == 0, "filled-in secrets must be git-ignored"


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kustomize(overlay: str, tmp_path: Path) -> None:
    command = _kustomize_command()
    if command is None:  # a missing tool fails the run: the renderer is only trusted against the real one
        pytest.fail("neither kustomize nor kubectl is on PATH: install one (kubectl kustomize renders the "
                    "overlays this test compares the Python renderer against)", pytrace=False)
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(SECRETS_EXAMPLE, tmp_path / "k8s" / "overlays" / overlay / "secrets.env")
    out = subprocess.run([*command, str(tmp_path / "k8s" / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr

    def keyed(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        for obj in objects:  # kustomize folds long base64 values; the bytes are what count
            if obj["kind"] == "Secret":
                obj["data"] = {k: base64.b64decode(v) for k, v in obj["data"].items()}
        return {(o["kind"], o["metadata"]["name"]): o for o in objects}

    ours, theirs = keyed(k8s_objects(overlay)), keyed(list(yaml.safe_load_all(out.stdout)))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_the_renderer_applies_patches_and_images_as_kustomize(tmp_path: Path) -> None:
    """The renderer's own rules, on a small tree (the comparison above covers what deploy/k8s uses)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [app.yaml]\n")
    (tmp_path / "base" / "app.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [
            {"name": "x", "image": "localhost:5000/x:old"}, {"name": "y", "image": "y@sha256:00"}]}}}}))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["base"], "namespace": "ns",
        "images": [{"name": "localhost:5000/x", "newTag": "new"}, {"name": "y", "newName": "r/y", "newTag": "1"}],
        "patches": [{"target": {"kind": "Deployment", "name": "a"}, "patch": yaml.safe_dump([
            {"op": "test", "path": "/spec/replicas", "value": 2},
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "c"}},
            {"op": "add", "path": "/spec/template/spec/containers/-", "value": {"name": "z", "image": "z"}},
            {"op": "remove", "path": "/metadata/annotations/a~1b"}])}]}))
    (obj,) = kustomize_lite.build(tmp_path)
    assert obj["metadata"] == {"name": "a", "namespace": "ns", "annotations": {}}
    assert obj["spec"]["replicas"] == 1
    assert [c["image"] for c in obj["spec"]["template"]["spec"]["containers"]] == ["localhost:5000/x:new", "r/y:1", "z"]

    failing = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    failing["patches"][0]["target"]["name"] = "nothing"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(failing))
    with pytest.raises(ValueError, match="matches nothing"):
        kustomize_lite.build(tmp_path)
    failing["patches"][0]["target"]["name"] = "a"
    failing["replicas"] = [{"name": "a", "count": 3}]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(failing))
    with pytest.raises(kustomize_lite.Unsupported):
        kustomize_lite.build(tmp_path)


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields: the API server would drop them without a word
    (pruning), and a mistyped field is then silently not set."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validators() -> dict[tuple[str, str, str], Any]:
    import jsonschema

    validators = {}
    for path in CRD_SCHEMAS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        schema = _strict(crd["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
        validators[(crd["group"], crd["version"], crd["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


def _schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    import kubernetes_validate

    group, _, api_version = obj["apiVersion"].rpartition("/")
    validator = _crd_validators().get((group, api_version, obj["kind"]))
    if validator is not None:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_against_its_schema(overlay: str, version: str) -> None:
    assert {("keda.sh", "v1alpha1", "ScaledJob"), ("keda.sh", "v1alpha1", "TriggerAuthentication"),
            ("monitoring.coreos.com", "v1", "ServiceMonitor")} <= set(_crd_validators())
    errors = {}
    for obj in k8s_objects(overlay):
        found = _schema_errors(obj, version)
        if obj["kind"] == "ScaledJob":
            # The Job each request gets, against Kubernetes's own (strict) Job schema as well.
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "cdtrain-worker-x"},
                   "spec": obj["spec"]["jobTargetRef"]}
            found += _schema_errors(job, version)
        if found:
            errors[f"{obj['kind']}/{obj['metadata']['name']}"] = found
    assert not errors


def test_schema_validation_catches_a_mistyped_field() -> None:
    worker = k8s_one("ScaledJob", "cdtrain-worker")
    worker["spec"]["maxReplicaCout"] = 4
    assert any("maxReplicaCout" in e for e in _schema_errors(worker, K8S_VERSIONS[0]))
    worker = k8s_one("ScaledJob", "cdtrain-worker")
    worker["spec"]["scalingStrategy"]["strategy"] = "fastest"
    assert _schema_errors(worker, K8S_VERSIONS[0])
    projector = k8s_deployments()["cdtrain-projector"]
    pod_template(projector)["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    assert _schema_errors(projector, K8S_VERSIONS[0])


def test_k8s_cdtrain_variables_are_read_by_the_service() -> None:
    sources = {"configmap.yaml": k8s_configmap(), "secrets.env.example": read_env_file(SECRETS_EXAMPLE)}
    for overlay in OVERLAYS:
        for name, workload in k8s_workloads(overlay).items():
            (container,) = pod_template(workload)["spec"]["containers"]
            sources[f"{overlay}/{name}"] = {item["name"]: item.get("value") for item in container.get("env", [])}
    for source, env in sources.items():
        unknown = {k for k in env if k.startswith("CDTRAIN_")} - KNOWN_CDTRAIN_VARS
        assert not unknown, f"{source} sets variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_settings_build_for_every_role(overlay: str) -> None:
    from cdtrain.cli import build_parser

    workloads = k8s_workloads(overlay)
    assert set(workloads) == set(K8S_COMMANDS)
    for name, workload in workloads.items():
        (container,) = pod_template(workload)["spec"]["containers"]
        assert container["args"] == K8S_COMMANDS[name], name
        env = dockerfile_env(final_stage(dockerfile(image_of_container(container["image"]))))
        env.update(k8s_container_env(workload, overlay))
        settings = ServiceSettings.from_env(env)
        assert settings.ingress.bus.url.startswith("amqp://"), name
        assert settings.ingress.view_store_url.startswith("mongodb://"), name
        assert settings.ingress.local_objects_dir is None, f"{name} would use a local object store"
        assert settings.mlflow_tracking_uri.startswith("http"), name
        if container["args"][:2] == ["cdtrain", "serve"]:
            args = build_parser().parse_args(container["args"][1:])  # the command line parses
            assert args.role in ROLES
    worker = workloads["cdtrain-worker"]
    settings = ServiceSettings.from_env(k8s_container_env(worker, overlay))
    assert settings.worker_idle_exit is not None and settings.worker_idle_exit > worker["spec"]["pollingInterval"]


def test_k8s_pods_run_as_non_root_with_resources_and_a_writable_data_dir() -> None:
    for overlay in OVERLAYS:
        for name, workload in k8s_workloads(overlay).items():
            pod = pod_template(workload)["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            (container,) = pod["containers"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), f"{name}: requests"
            assert "memory" in resources["limits"], f"{name}: memory limit"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            # With a read-only root filesystem the data dir `cdtrain serve` creates must be a volume.
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            image = final_stage(dockerfile(image_of_container(container["image"])))
            env = dockerfile_env(image) | k8s_container_env(workload, overlay)
            data_dir = PurePosixPath(dockerfile_workdir(image)) / env.get("CDTRAIN_DATA_DIR", ".cdtrain")
            mounts = [PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", [])]
            assert any(data_dir == m or m in data_dir.parents for m in mounts), f"{name}: {data_dir} is read-only"


def test_k8s_every_pod_uses_the_service_account_without_a_token() -> None:
    for overlay in OVERLAYS:
        account = k8s_one("ServiceAccount", "cdtrain", overlay)
        assert account["automountServiceAccountToken"] is False
        for name, workload in k8s_workloads(overlay).items():
            pod = pod_template(workload)["spec"]
            assert pod["serviceAccountName"] == "cdtrain", name
            assert pod["automountServiceAccountToken"] is False, name


def test_k8s_ingress_probes_and_service() -> None:
    ingress = k8s_deployments()["cdtrain-ingress"]
    assert ingress["spec"]["replicas"] == 2
    (container,) = ingress["spec"]["template"]["spec"]["containers"]
    port = int(k8s_configmap()["CDTRAIN_PORT"])
    assert k8s_configmap()["CDTRAIN_HOST"] == "0.0.0.0"
    (http_port,) = container["ports"]
    assert (http_port["name"], http_port["containerPort"]) == ("http", port)
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"] == {"path": "/readyz", "port": "http"}
    assert liveness["httpGet"] == {"path": "/healthz", "port": "http"}
    # /readyz waits up to store_timeout_s for each check: the probe must wait longer.
    assert readiness["timeoutSeconds"] > IngressSettings().store_timeout_s
    assert float(container["resources"]["requests"]["cpu"].rstrip("m")) <= 500  # a small CPU pod
    service = k8s_one("Service", "cdtrain-ingress")
    assert service["spec"]["selector"] == ingress["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # dev runs one ingress: its disruption budget must still let a node drain.
    assert k8s_deployments("dev")["cdtrain-ingress"]["spec"]["replicas"] == 1
    assert k8s_one("PodDisruptionBudget", "cdtrain-ingress", "dev")["spec"] == {
        "maxUnavailable": 1, "selector": ingress["spec"]["selector"]}


def test_k8s_projector_is_a_single_ordered_consumer() -> None:
    for overlay in OVERLAYS:
        projector = k8s_deployments(overlay)["cdtrain-projector"]
        assert projector["spec"]["replicas"] == 1
        assert projector["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_worker_is_a_one_job_gpu_pod_with_time_to_stop(overlay: str) -> None:
    workloads = k8s_workloads(overlay)
    worker = workloads["cdtrain-worker"]
    assert worker["kind"] == "ScaledJob" and worker["apiVersion"] == "keda.sh/v1alpha1"
    job = worker["spec"]["jobTargetRef"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-2:] == ["--max-jobs", "1"]
    # A failed pod's request is back in the queue or re-queued by the watchdog: KEDA starts a new
    # Job for it; a retry of the same Job would only compete with that one.
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    assert job.get("activeDeadlineSeconds", float("inf")) > ServiceSettings.model_fields["job_deadline"].default
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["terminationGracePeriodSeconds"] >= worker_stop_timeout_s() + 60
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The dataset cache lives on the data volume, bounded below its size (runs, checkpoints and
    # compile caches share it).
    env = k8s_container_env(worker, overlay)
    data = volumes[mounts[env["CDTRAIN_DATA_DIR"]]]
    size = quantity_bytes(data["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"])
    assert int(env["CDTRAIN_CACHE_MAX_BYTES"]) <= 0.8 * size
    # Updating the ScaledJob never deletes a training Job.
    assert worker["spec"]["rollout"]["strategy"] == "gradual"
    for name, other in workloads.items():
        if name != "cdtrain-worker":
            (c,) = pod_template(other)["spec"]["containers"]
            assert "nvidia.com/gpu" not in str(c["resources"]), f"{name} must not take a GPU"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gpu_count_is_the_overlays_patch_point(overlay: str, tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets.env"))
    directory = tmp_path / "k8s" / "overlays" / overlay
    shutil.copy(SECRETS_EXAMPLE, directory / "secrets.env")
    (patch,) = [p for p in k8s_kustomization(directory)["patches"] if p.get("path") == "gpus.yaml"]
    assert patch["target"]["kind"] == "ScaledJob"
    operations = yaml.safe_load((directory / "gpus.yaml").read_text())
    operations[0]["value"] = 2
    (directory / "gpus.yaml").write_text(yaml.safe_dump(operations))
    (worker,) = [o for o in kustomize_lite.build(directory) if o["kind"] == "ScaledJob"]
    (container,) = pod_template(worker)["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_starts_a_job_per_waiting_request_of_the_topology_queue(overlay: str) -> None:
    objects = k8s_objects(overlay)
    assert not [o for o in objects if o["kind"] == "ScaledObject"], "a scale-down would stop busy workers"
    scaled = k8s_one("ScaledJob", "cdtrain-worker", overlay)["spec"]
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    # Early ack: the queue counts only waiting requests; "accurate" does not subtract the running
    # Jobs from them (the default strategy would, and start no Job while others train).
    assert scaled["scalingStrategy"]["strategy"] == "accurate"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA's CRD: strings
    rabbit = trigger["metadata"]
    topology = Topology(prefix=k8s_configmap(overlay).get("CDTRAIN_TOPOLOGY_PREFIX", Topology().prefix))
    assert rabbit["queueName"] == topology.requests_queue.name == Topology().requests_queue.name
    assert rabbit["mode"] == "QueueLength" and rabbit["value"] == "1" and rabbit["protocol"] == "amqp"
    auths = {o["metadata"]["name"]: o for o in objects if o["kind"] == "TriggerAuthentication"}
    (ref,) = auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("host", secret_name(), "CDTRAIN_BUS_URL")
    assert ref["key"] in k8s_one("Secret", secret_name(), overlay)["data"]


# NetworkPolicy semantics, for the subset the manifests use: pod selectors by labels, peers by
# namespace labels, ports by number or container-port name.

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise AssertionError(f"unsupported selector {selector}")
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _port_matches(rule_port: dict[str, Any], port: int, protocol: str, container_ports: dict[str, int]) -> bool:
    number = rule_port.get("port")
    number = container_ports.get(number, number) if isinstance(number, str) else number
    return rule_port.get("protocol", "TCP") == protocol and (number is None or number == port)


def _peer_matches(peers: list[dict[str, Any]] | None, namespace_labels: dict[str, str]) -> bool:
    if not peers:
        return True  # no `to`/`from`: everywhere
    for peer in peers:
        assert set(peer) <= {"namespaceSelector"}, f"unsupported peer {peer}"
        if _selects(peer["namespaceSelector"], namespace_labels):
            return True
    return False


def _allowed(overlay: str, workload: str, direction: str, namespace: str, port: int, protocol: str = "TCP") -> bool:
    template = pod_template(k8s_workloads(overlay)[workload])
    labels = template["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    policies = [o["spec"] for o in k8s_objects(overlay) if o["kind"] == "NetworkPolicy"]
    selecting = [p for p in policies if _selects(p["podSelector"], labels) and direction in p["policyTypes"]]
    assert selecting, f"no {direction} policy selects {workload}: everything would be allowed"
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    # A named port in an ingress rule is one of the selected pod's own container ports.
    names = container_ports if direction == "Ingress" else {}
    for policy in selecting:
        for rule in policy.get(key, []):
            if (_peer_matches(rule.get(peers), {"kubernetes.io/metadata.name": namespace})
                    and any(_port_matches(p, port, protocol, names) for p in rule.get("ports") or [{}])):
                return True
    return False


def _in_cluster_endpoint(url: str) -> tuple[str, int]:
    """(namespace, port) of a <service>.<namespace>.svc[.cluster.local] URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    assert re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?", host), url
    default = {"amqp": 5672, "amqps": 5671, "mongodb": 27017, "http": 80, "https": 443}[parts.scheme]
    return host.split(".")[1], parts.port or default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_each_role_reach_only_what_it_needs(overlay: str) -> None:
    policies = [o for o in k8s_objects(overlay) if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]} for p in policies), \
        "a default deny for the namespace"
    env = k8s_container_env(k8s_workloads(overlay)["cdtrain-worker"], overlay)
    services = {"RabbitMQ": env["CDTRAIN_BUS_URL"], "MongoDB": env["CDTRAIN_MONGODB_URL"],
                "S3": env["CDTRAIN_S3_ENDPOINT_URL"], "MLflow": env["MLFLOW_TRACKING_URI"]}
    endpoints = {name: _in_cluster_endpoint(url) for name, url in services.items()}
    needs = {"cdtrain-ingress": {"RabbitMQ", "MongoDB", "S3"}, "cdtrain-projector": {"RabbitMQ", "MongoDB", "S3"},
             "cdtrain-worker": {"RabbitMQ", "MongoDB", "S3", "MLflow"}}
    for workload, needed in needs.items():
        for name, (namespace, port) in endpoints.items():
            assert _allowed(overlay, workload, "Egress", namespace, port) == (name in needed), (workload, name)
        assert _allowed(overlay, workload, "Egress", "kube-system", 53, "UDP"), f"{workload}: DNS"
        assert not _allowed(overlay, workload, "Egress", "elsewhere", 443), workload
    # In: the ingress on its HTTP port from anywhere, nothing else; metrics from the monitoring namespace.
    http = int(k8s_configmap(overlay)["CDTRAIN_PORT"])
    assert _allowed(overlay, "cdtrain-ingress", "Ingress", "ingress-nginx", http)
    assert not _allowed(overlay, "cdtrain-ingress", "Ingress", "ingress-nginx", http + 1)
    for workload in ("cdtrain-worker", "cdtrain-projector"):
        assert _allowed(overlay, workload, "Ingress", "monitoring", 9100), workload
        assert not _allowed(overlay, workload, "Ingress", "default", 9100), workload
        assert not _allowed(overlay, workload, "Ingress", "monitoring", http), workload


def test_worker_and_projector_name_their_metrics_port() -> None:
    for overlay in OVERLAYS:
        for name in ("cdtrain-worker", "cdtrain-projector"):
            workload = k8s_workloads(overlay)[name]
            (container,) = pod_template(workload)["spec"]["containers"]
            port = ServiceSettings.from_env(k8s_container_env(workload, overlay)).metrics_port
            assert {"name": "metrics", "containerPort": port} in container["ports"], name


def test_service_monitor_scrapes_the_ingress_metrics() -> None:
    monitor = k8s_one("ServiceMonitor", "cdtrain-ingress", "prod")["spec"]
    service = k8s_one("Service", "cdtrain-ingress", "prod")
    assert _selects(monitor["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # Services of ours that the selector would also pick: none.
    others = [o for o in k8s_objects("prod") if o["kind"] == "Service" and o["metadata"]["name"] != "cdtrain-ingress"
              and _selects(monitor["selector"], o["metadata"].get("labels", {}))]
    assert not others


# --- images ---------------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def test_dockerfiles_pin_torch_as_pyproject() -> None:
    torch_pin, vision_pin = locked_version("torch"), locked_version("torchvision")
    worker = run_text(dockerfile(WORKER_DOCKERFILE))
    assert pinned(worker, "torch") == {torch_pin}
    assert pinned(worker, "torchvision") == {vision_pin}
    for path in DOCKERFILES:
        text = run_text(parse_dockerfile(path))
        assert pinned(text, "torch") <= {torch_pin} and pinned(text, "torchvision") <= {vision_pin}, path.name
    for name in (INGRESS_DOCKERFILE, "deploy/docker/Dockerfile.mlflow"):
        packages = pip_installs(run_text(dockerfile(name)))
        assert packages and not [p for p in packages if p.lower().startswith("torch")], f"{name} installs torch"
    ingress_reqs = (DOCKER / "ingress-requirements.txt").read_text()
    assert not re.search(r"^\s*torch", ingress_reqs, re.M)


def test_worker_base_image_matches_the_torch_cuda_build() -> None:
    args = dockerfile_args(dockerfile(WORKER_DOCKERFILE))
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert match, args["CUDA_IMAGE"]
    pin = locked_version("torch")
    installed = metadata.version("torch").split("+")[0]  # make setup installs the pinned build
    assert installed == pin, f"installed torch {installed} is not the pinned {pin}: run make setup"
    requires = metadata.requires("torch") or []
    toolkit = [re.search(r"cuda-toolkit\S*==(\d+)\.(\d+)", r) for r in requires]
    versions = {m.groups() for m in toolkit if m}
    if not versions:  # older layout: nvidia-*-cuXX wheels give the major version only
        majors = {m.group(1) for r in requires if (m := re.search(r"nvidia-\w+-cu(\d+)", r))}
        assert majors, "the pinned torch names no CUDA wheels (a CPU build?)"
        assert majors == {match.group(1)}
        return
    assert versions == {match.groups()[:2]}, f"torch {pin} is built for CUDA {versions}, base image {match.groups()[:2]}"


def test_images_use_the_python_of_requires_python() -> None:
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for path in DOCKERFILES:
        args = dockerfile_args(parse_dockerfile(path))
        versions = re.findall(r"python:(\d+\.\d+)", args.get("PYTHON_IMAGE", ""))
        versions += re.findall(r"uv python install (\d+\.\d+)", run_text(parse_dockerfile(path)))
        assert versions, f"{path.name}: which Python?"
        assert all(f"{v}.0" in spec for v in versions), f"{path.name}: Python {versions} vs {spec}"


def test_images_run_as_non_root() -> None:
    for path in DOCKERFILES:
        users = [rest for word, rest in final_stage(parse_dockerfile(path)) if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), path.name


def test_dockerfiles_copy_existing_paths_and_every_package() -> None:
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    packages = {p for p in packages if (ROOT / p / "__init__.py").is_file()}
    for path in DOCKERFILES:
        copied = set()
        for word, rest in parse_dockerfile(path):
            if word != "COPY" or rest.startswith("--from"):
                continue
            *sources, _target = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path in the build context"
                copied.add(source)
        if path.name in ("Dockerfile.ingress", "Dockerfile.worker"):
            assert packages <= copied, f"{path.name} misses packages {sorted(packages - copied)}"
            assert "pyproject.toml" in copied


def test_ingress_requirements_match_pyproject() -> None:
    listed = [Requirement(line) for line in (DOCKER / "ingress-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    project = project_requirements()
    for req in listed:
        name = canonicalize_name(req.name)
        assert name in project, f"{req.name} is not a dependency in pyproject.toml"
        assert req.specifier == project[name].specifier, f"{req.name}{req.specifier} vs pyproject {project[name]}"
    names = {canonicalize_name(r.name) for r in listed}
    assert not names & {"torch", "torchvision", "albumentations", "opencv-python-headless", "mlflow"}
    text = run_text(dockerfile(INGRESS_DOCKERFILE))
    assert "pip install -r /tmp/ingress-requirements.txt" in text
    assert re.search(r"pip install --no-deps /tmp/src\b", text)


def _requirement_closure(names: set[str]) -> set[str]:
    env = default_environment()
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(req.name)
    return seen


def _ingress_requirement_closure() -> set[str]:
    listed = {Requirement(line).name for line in (DOCKER / "ingress-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    return _requirement_closure(listed) | {"cdtrain"}


def _third_party_imports_of(packages: tuple[str, ...]) -> set[str]:
    """Top-level third-party modules imported anywhere (function level included) by the modules of
    ``packages`` and the project modules they import, transitively."""
    project = {"cdtrain", "schemas", "infra", "ingress", "consumer", "snunet_cbam"}
    stack = [f"{p}.{f.stem}" if f.stem != "__init__" else p for p in packages for f in (ROOT / p).glob("*.py")]
    seen, third = set(), set()
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        top = module.split(".")[0]
        if top not in project:
            third.add(top)
            continue
        base = ROOT.joinpath(*module.split("."))
        path = base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")
        if not path.is_file():
            continue  # a name imported from a module, not a module
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                stack += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module
                stack.append(target)
                stack += [f"{target}.{a.name}" for a in node.names]
    return {m for m in third if m not in sys.stdlib_module_names and m != "__future__"}


def test_ingress_requirements_cover_every_ingress_import() -> None:
    modules = _third_party_imports_of(("ingress",))
    assert "torch" not in modules and "snunet_cbam" not in modules
    by_module = metadata.packages_distributions()
    allowed = _ingress_requirement_closure()
    missing = {m: by_module.get(m) for m in modules
               if not {canonicalize_name(d) for d in by_module.get(m, [])} & allowed}
    assert not missing, f"the ingress imports {missing}, which deploy/docker/ingress-requirements.txt does not bring in"


def _hidden_from_the_ingress_image() -> list[str]:
    """Importable top-level modules of installed distributions the ingress image does not have."""
    allowed = _ingress_requirement_closure()
    return sorted(m for m, dists in metadata.packages_distributions().items()
                  if m.isidentifier() and not {canonicalize_name(d) for d in dists} & allowed
                  and m not in sys.stdlib_module_names)


def test_ingress_image_build_checks_pass_with_only_its_requirements() -> None:
    """The ingress image in miniature: every installed distribution outside the requirements'
    closure is hidden, then the Dockerfile's own build-time import checks must pass."""
    hidden = _hidden_from_the_ingress_image()
    assert {"torch", "mlflow", "numpy", "PIL"} <= set(hidden)
    checks = re.findall(r'python -c "([^"]+)"', run_text(dockerfile(INGRESS_DOCKERFILE)))
    assert len(checks) >= 2 and any("ingress.main" in c for c in checks)
    for code in checks:
        result = python_blocking(hidden, code)
        assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"


def test_ingress_command_serves_health_with_only_its_requirements(tmp_path: Path) -> None:
    """Start the ingress image's command (`python -m ingress`) with the ingress image's packages
    only, on the embedded bus and view store, and probe it with the image's HEALTHCHECK script."""
    import os
    import signal
    import socket
    import time

    assert INGRESS_COMMAND == ["python", "-m", "ingress"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hidden = _hidden_from_the_ingress_image()
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hidden)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "CDTRAIN_HOST": "127.0.0.1",
           "CDTRAIN_PORT": str(port), "CDTRAIN_BUS_URL": "memory://", "CDTRAIN_MONGODB_URL": "memory://",
           "AWS_DEFAULT_REGION": "us-east-1"}
    process = subprocess.Popen([sys.executable, "-c", prelude + "import runpy; runpy.run_module('ingress', run_name='__main__')"],
                               cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    script = [sys.executable, str(DOCKER / "healthcheck.py")]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*script, "/healthz"], env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the ingress did not answer /healthz within 30 s"
            time.sleep(0.2)
        assert subprocess.run([*script, "/readyz"], env=env, capture_output=True).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, process.stdout.read()[-3000:]


def test_cdtrain_serve_starts_without_the_ml_packages() -> None:
    code = ("from cdtrain.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "import cdtrain.serve\n")
    result = python_blocking(_hidden_from_the_ingress_image(), code)
    assert result.returncode == 0, result.stderr[-2000:]


def test_projector_runs_from_the_ingress_image() -> None:
    """Nothing on the projector's path imports torch, so it runs from the small ingress image."""
    images = {compose_services()["projector"]["build"]["dockerfile"]}
    images |= {image_of_container(pod_template(k8s_deployments(o)["cdtrain-projector"])["spec"]["containers"][0]
                                  ["image"]) for o in OVERLAYS}
    assert images == {INGRESS_DOCKERFILE}
    result = python_blocking(_hidden_from_the_ingress_image(),
                             "import cdtrain.cli, cdtrain.serve, consumer.roles, consumer.watchdog")
    assert result.returncode == 0, result.stderr[-3000:]


async def test_projector_command_projects_with_only_the_ingress_images_packages(
        tmp_path: Path, amqp_url: str, mongodb_url: str, mongo_view_store: Any) -> None:
    """`cdtrain serve --role projector` with every package the ingress image lacks hidden, on the
    real RabbitMQ and MongoDB protocol: it projects a status event into the views and stops on
    SIGTERM with status 0."""
    import asyncio
    import os
    import signal
    import time
    import uuid

    from infra.bus import BusSettings
    from infra.bus.rabbit import RabbitBus
    from schemas import StatusEvent, TrainJob, TrainRequest
    from tests.fixtures.rabbit import TEST_SETTINGS, delete_topology

    topology = Topology(prefix=f"test-{uuid.uuid4().hex[:12]}")
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in _hidden_from_the_ingress_image())
    code = prelude + "from cdtrain.cli import main\nsys.exit(main(['serve', '--role', 'projector']))\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "CDTRAIN_DATA_DIR": str(tmp_path / "data"), "CDTRAIN_BUS_URL": amqp_url,
           "CDTRAIN_TOPOLOGY_PREFIX": topology.prefix, "CDTRAIN_MONGODB_URL": mongodb_url,
           "CDTRAIN_MONGODB_DATABASE": mongo_view_store.collection.database.name, "CDTRAIN_LOG_LEVEL": "INFO"}
    log = tmp_path / "projector.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    bus = RabbitBus(BusSettings(url=amqp_url, **TEST_SETTINGS), topology)
    try:
        deadline = time.monotonic() + 60
        while "projector consuming status events" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.2)
        await bus.connect()
        job = TrainJob(request=TrainRequest(dataset_uri="s3://datasets/d/"))
        queued = StatusEvent.queued(job, source="/test/ingress")
        await bus.publish_status(queued, queued.routing_key)
        while (view := await mongo_view_store.get(job.job_id)) is None:
            assert time.monotonic() < deadline + 30, log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.2)
        assert view.state is JobState.QUEUED
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        await bus.close()
        await delete_topology(amqp_url, topology)


def test_mlflow_server_and_client_versions_match() -> None:
    server = pinned(run_text(dockerfile("deploy/docker/Dockerfile.mlflow")), "mlflow")
    client = pinned(run_text(dockerfile(WORKER_DOCKERFILE)), "mlflow")
    assert len(server) == 1 and server == client
    (version,) = server
    assert project_requirements()["mlflow"].specifier.contains(version)
    boto3 = re.search(r'"(boto3[^"]+)"', run_text(dockerfile("deploy/docker/Dockerfile.mlflow")))
    assert boto3 and Requirement(boto3.group(1)).specifier == project_requirements()["boto3"].specifier


def test_ingress_image_health_and_defaults() -> None:
    image = final_stage(dockerfile(INGRESS_DOCKERFILE))
    (check,) = [rest for word, rest in image if word == "HEALTHCHECK"]
    assert "/usr/local/bin/cdtrain-healthcheck" in check and "/healthz" in check
    assert "COPY deploy/docker/healthcheck.py /usr/local/bin/cdtrain-healthcheck" in [f"COPY {r}" for w, r in image if w == "COPY"]
    env = dockerfile_env(image)
    assert env["CDTRAIN_HOST"] == "0.0.0.0"
    assert IngressSettings().host == "127.0.0.1" or env["CDTRAIN_HOST"] == IngressSettings().host
    cmd = [rest for word, rest in image if word == "CMD"][-1]
    assert yaml.safe_load(cmd) == INGRESS_COMMAND
    worker_cmd = [rest for word, rest in final_stage(dockerfile(WORKER_DOCKERFILE)) if word == "CMD"][-1]
    assert yaml.safe_load(worker_cmd) == ["cdtrain", "serve", "--role", "consumer"]


class _Probe(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_healthcheck_script_exit_codes() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = str(DOCKER / "healthcheck.py")

    def probe(path: str, port: int) -> int:
        env = {"CDTRAIN_PORT": str(port), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, script, path], env=env, capture_output=True, timeout=30).returncode

    try:
        port = server.server_address[1]
        assert probe("/healthz", port) == 0
        assert probe("/readyz", port) == 1  # 503
    finally:
        server.shutdown()
        server.server_close()
    assert probe("/healthz", port) == 1  # nothing listens any more
