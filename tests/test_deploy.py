"""Static checks of deploy/: the container images, the compose stack and the Kubernetes manifests.

There is no Docker engine or cluster on the development machines, so nothing here builds or starts a
container. Instead the files are parsed and checked against the code's own contracts: the settings
each role reads, the queue names of the topology, the versions pinned in pyproject.toml, the imports
of the ingress. A rename in the code or a typo in a manifest fails here, not in production.
"""

from __future__ import annotations

import argparse
import ast
import http.server
import re
import shlex
import shutil
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SECRETS_EXAMPLE = K8S / "secrets.env.example"
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
K8S_COMMANDS = {
    "cdtrain-ingress": INGRESS_COMMAND,
    "cdtrain-projector": COMPOSE_COMMANDS["projector"],
    "cdtrain-worker": COMPOSE_COMMANDS["worker"],
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


def k8s_kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for name in k8s_kustomization()["resources"]:
        objects += load_docs(K8S / name)
    return objects


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def k8s_deployments() -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Deployment"}


def k8s_configmap() -> dict[str, str]:
    return {k: str(v) for k, v in k8s_one("ConfigMap", "cdtrain-config")["data"].items()}


def k8s_container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """What the container's environment holds: ConfigMap and Secret (envFrom), then env."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "cdtrain-config"
            env.update(k8s_configmap())
        if "secretRef" in source:
            assert source["secretRef"]["name"] == secret_name()
            env.update(read_env_file(SECRETS_EXAMPLE))
    env.update({item["name"]: str(item.get("value", "")) for item in container.get("env", [])})
    return env


def secret_name() -> str:
    (generator,) = k8s_kustomization()["secretGenerator"]
    return generator["name"]


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
        "rabbitmq/20-cdtrain.conf", "minio/init.sh", "k8s/kustomization.yaml", "k8s/secrets.env.example",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing
    assert len(YAML_FILES) >= 7


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"


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

def test_kustomization_lists_every_manifest() -> None:
    listed = set(k8s_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    (generator,) = k8s_kustomization()["secretGenerator"]
    assert generator["envs"] == ["secrets.env"] and SECRETS_EXAMPLE.is_file()
    assert k8s_kustomization()["generatorOptions"]["disableNameSuffixHash"] is True  # KEDA refers to it by name
    namespaces = [o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Namespace"]
    assert namespaces == [k8s_kustomization()["namespace"]]


def test_k8s_cdtrain_variables_are_read_by_the_service() -> None:
    sources = {"configmap.yaml": k8s_configmap(), "secrets.env.example": read_env_file(SECRETS_EXAMPLE)}
    for name, deployment in k8s_deployments().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        sources[name] = {item["name"]: item.get("value") for item in container.get("env", [])}
    for source, env in sources.items():
        unknown = {k for k in env if k.startswith("CDTRAIN_")} - KNOWN_CDTRAIN_VARS
        assert not unknown, f"{source} sets variables nothing reads: {sorted(unknown)}"


def test_k8s_settings_build_for_every_role() -> None:
    for name, deployment in k8s_deployments().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = dockerfile_env(final_stage(dockerfile(image_of_container(container["image"]))))
        env.update(k8s_container_env(deployment))
        settings = ServiceSettings.from_env(env)
        assert settings.ingress.bus.url.startswith("amqp://"), name
        assert settings.ingress.view_store_url.startswith("mongodb://"), name
        assert settings.ingress.local_objects_dir is None, f"{name} would use a local object store"
        assert settings.mlflow_tracking_uri.startswith("http"), name
        assert container["args"] == K8S_COMMANDS[name], name


def test_k8s_deployments_have_probes_resources_and_run_as_non_root() -> None:
    deployments = k8s_deployments()
    assert set(deployments) == set(K8S_COMMANDS)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (container,) = pod["containers"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), f"{name}: requests"
        assert "memory" in resources["limits"], f"{name}: memory limit"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        # With a read-only root filesystem the data dir `cdtrain serve` creates must be a volume.
        if container["securityContext"].get("readOnlyRootFilesystem"):
            image = final_stage(dockerfile(image_of_container(container["image"])))
            env = dockerfile_env(image) | k8s_container_env(deployment)
            data_dir = PurePosixPath(dockerfile_workdir(image)) / env.get("CDTRAIN_DATA_DIR", ".cdtrain")
            mounts = [PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", [])]
            assert any(data_dir == m or m in data_dir.parents for m in mounts), f"{name}: {data_dir} is read-only"


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


def test_k8s_projector_is_a_single_ordered_consumer() -> None:
    projector = k8s_deployments()["cdtrain-projector"]
    assert projector["spec"]["replicas"] == 1
    assert projector["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_worker_requests_a_gpu_and_time_to_stop() -> None:
    deployments = k8s_deployments()
    worker = deployments["cdtrain-worker"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["terminationGracePeriodSeconds"] >= worker_stop_timeout_s() + 60
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert k8s_container_env(worker)["CDTRAIN_DATA_DIR"] in mounts
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # a surge pod needs a spare GPU
    for name, other in deployments.items():
        if name != "cdtrain-worker":
            (c,) = other["spec"]["template"]["spec"]["containers"]
            assert "nvidia.com/gpu" not in str(c["resources"]), f"{name} must not take a GPU"


def test_keda_scales_the_worker_on_the_topology_queue_and_active_jobs() -> None:
    scaled = k8s_one("ScaledObject", "cdtrain-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "cdtrain-worker" and scaled["scaleTargetRef"]["kind"] == "Deployment"
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    triggers = {t["type"]: t for t in scaled["triggers"]}
    assert set(triggers) == {"rabbitmq", "mongodb"}
    for trigger in triggers.values():  # KEDA's CRD: metadata values are strings
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["type"]

    configmap = k8s_configmap()
    rabbit = triggers["rabbitmq"]["metadata"]
    topology = Topology(prefix=configmap.get("CDTRAIN_TOPOLOGY_PREFIX", Topology().prefix))
    assert rabbit["queueName"] == topology.requests_queue.name == Topology().requests_queue.name
    assert rabbit["mode"] == "QueueLength" and rabbit["value"] == "1"

    # Running jobs have been acked (early ack): only the job views know a worker is still needed.
    mongo = triggers["mongodb"]["metadata"]
    from infra.views.mongo import DEFAULT_COLLECTION

    assert mongo["dbName"] == configmap["CDTRAIN_MONGODB_DATABASE"]
    assert mongo["collection"] == DEFAULT_COLLECTION
    query = yaml.safe_load(mongo["query"])
    assert set(query["state"]["$in"]) == {s.value for s in JobState if not s.is_terminal}

    auths = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "TriggerAuthentication"}
    secrets = read_env_file(SECRETS_EXAMPLE)
    expected = {"rabbitmq": ("host", "CDTRAIN_BUS_URL"), "mongodb": ("connectionString", "CDTRAIN_MONGODB_URL")}
    for kind, (parameter, key) in expected.items():
        auth = auths[triggers[kind]["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["name"], ref["key"]) == (parameter, secret_name(), key)
        assert key in secrets


# --- images ---------------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def test_dockerfiles_pin_torch_as_pyproject() -> None:
    reqs = project_requirements()
    torch_pin = str(reqs["torch"].specifier).removeprefix("==")
    vision_pin = str(reqs["torchvision"].specifier).removeprefix("==")
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
    pin = str(project_requirements()["torch"].specifier).removeprefix("==")
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


def test_projector_image_has_what_the_projector_imports() -> None:
    """The projector runs from the worker image because its watchdog imports consumer.worker (torch).
    If that import goes away, it may move to the small ingress image; until then it must not."""
    result = python_blocking(["torch", "torchvision"], "import consumer.roles, consumer.watchdog")
    needs_torch = result.returncode != 0
    images = {compose_services()["projector"]["build"]["dockerfile"],
              image_of_container(k8s_deployments()["cdtrain-projector"]["spec"]["template"]["spec"]
                                 ["containers"][0]["image"])}
    if needs_torch:
        assert images == {WORKER_DOCKERFILE}


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
