"""``kustomize build`` for the subset of kustomize that deploy/k8s uses, so the manifests can be
rendered and checked on a machine without kubectl or kustomize.

Supported, as kustomize v5 does them: ``resources`` (files, and directories holding a
kustomization), ``namespace``, ``labels`` (``pairs`` with ``includeSelectors: false``: metadata
labels only), ``images`` (``newName``/``newTag`` on every ``containers``/``initContainers`` list),
``secretGenerator`` (``envs`` files) with ``generatorOptions.disableNameSuffixHash: true``, and
``patches`` of JSON 6902 operations (``add``, ``replace``, ``remove``, ``test``) from ``path`` or
inline ``patch``, selected by ``target`` group, kind and name. Anything else raises
:class:`Unsupported`, so the renderer never silently differs from kustomize;
tests/test_deploy.py compares both outputs where kubectl is installed.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "secretGenerator",
        "generatorOptions", "patches"}
# Kinds without a namespace among those deploy/k8s uses (kustomize knows the full list).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume", "ClusterTriggerAuthentication"}


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not implement."""


def build(directory: Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KEYS
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise Unsupported(f"{directory}: kind {kustomization['kind']}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    objects += [_secret(directory, g, kustomization.get("generatorOptions", {}))
                for g in kustomization.get("secretGenerator", [])]
    for patch in kustomization.get("patches", []):
        _patch(directory, objects, patch)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = kustomization["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        if set(label) - {"pairs", "includeSelectors"} or label.get("includeSelectors", False):
            raise Unsupported(f"{directory}: labels {label}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise Unsupported(f"{directory}: images {image}")
        for obj in objects:
            _set_images(obj, image)
    _check_unique(objects)
    return objects


def _secret(directory: Path, generator: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    if set(generator) - {"name", "envs"} or options != {"disableNameSuffixHash": True}:
        raise Unsupported(f"{directory}: secretGenerator {generator} with {options}")
    data: dict[str, str] = {}
    for name in generator["envs"]:
        for line in (directory / name).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise Unsupported(f"{directory / name}: {line!r} is not KEY=VALUE")
            data[key] = base64.b64encode(value.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "type": "Opaque",
            "data": data}


def _patch(directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    if set(patch) - {"path", "patch", "target"} or ("path" in patch) == ("patch" in patch):
        raise Unsupported(f"{directory}: patch {patch}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise Unsupported(f"{directory}: only JSON 6902 patches (a list of operations): {patch}")
    target = patch["target"]
    if set(target) - {"group", "kind", "name"}:
        raise Unsupported(f"{directory}: target {target}")
    matched = [o for o in objects if _matches(o, target)]
    if not matched:
        raise ValueError(f"{directory}: patch target {target} matches nothing")
    for obj in matched:
        for operation in operations:
            _apply(obj, operation)


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return (target.get("kind", obj["kind"]) == obj["kind"] and target.get("name", obj["metadata"]["name"])
            == obj["metadata"]["name"] and target.get("group", group) == group)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"not a JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply(obj: dict[str, Any], operation: dict[str, Any]) -> None:
    op, parts = operation["op"], _pointer(operation["path"])
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        elif op == "test":
            if parent[index] != operation["value"]:
                raise ValueError(f"test failed at {operation['path']}: {parent[index]!r}")
        else:
            raise Unsupported(f"op {op}")
        return
    if op == "add":
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "replace":
        if last not in parent:
            raise ValueError(f"replace: nothing at {operation['path']}")
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[last]
    elif op == "test":
        if parent.get(last) != operation["value"]:
            raise ValueError(f"test failed at {operation['path']}: {parent.get(last)!r}")
    else:
        raise Unsupported(f"op {op}")


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if _image_name(container.get("image", "")) == image["name"]:
                        name = image.get("newName", image["name"])
                        tag = image.get("newTag") or _image_tag(container["image"])
                        container["image"] = f"{name}:{tag}" if tag else name
            else:
                _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def _image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    return name.rpartition(":")[2] if _image_name(image) != name else None


def _check_unique(objects: list[dict[str, Any]]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["apiVersion"].rpartition("/")[0], obj["kind"], obj["metadata"]["name"])
        if key in seen:
            raise ValueError(f"two objects {key}")  # kustomize refuses this too
        seen.add(key)
