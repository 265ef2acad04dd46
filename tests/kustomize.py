"""A kustomize subset in Python, enough to render deploy/k8s offline: what tests/unit/test_deploy.py checks.

Supported, in kustomize's order within one kustomization: ``resources`` (files, and directories holding a
kustomization, built first), ``patches`` (strategic merge, matched by kind and name or by ``target``, with
``$patch: delete``; or JSON 6902 lists with a ``target``), ``namespace``, ``replicas``, ``images``.
Anything else in a kustomization.yaml is refused, so a manifest never relies on a feature this renderer
ignores; the test compares the result with ``kubectl kustomize`` where kubectl is installed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

Resource = dict[str, Any]

_SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "replicas", "images"}
# Strategic merge keys of the lists our patches touch (Kubernetes' patchMergeKey of each field).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "ports": "containerPort", "envFrom": None}
_POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(Exception):
    """A kustomization this renderer cannot build."""


def load_documents(path: Path) -> list[Resource]:
    """Every non-empty YAML document of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(directory: Path) -> list[Resource]:
    """The resources ``kustomize build directory`` would print, in no particular order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += build(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        resources = _apply_patch(directory, patch, resources)
    if "namespace" in kustomization:
        for resource in resources:
            resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for replica in kustomization.get("replicas", []):
        _set_replicas(resources, replica["name"], replica["count"])
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    return resources


def _apply_patch(directory: Path, patch: dict[str, Any], resources: list[Resource]) -> list[Resource]:
    """``resources`` with one entry of ``patches`` applied."""
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if len(documents) == 1 and isinstance(documents[0], list):
        if "target" not in patch:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        operations = jsonpatch.JsonPatch(documents[0])
        return [operations.apply(r) if _matches(r, patch["target"]) else r for r in resources]
    for document in documents:
        target = patch.get("target") or {"kind": document["kind"], "name": document["metadata"]["name"]}
        matched = [r for r in resources if _matches(r, target)]
        if not matched:
            raise KustomizeError(f"{directory}: patch {target} matches no resource")
        if document.get("$patch") == "delete":
            resources = [r for r in resources if not _matches(r, target)]
            continue
        resources = [_merge(r, document) if _matches(r, target) else r for r in resources]
    return resources


def _matches(resource: Resource, target: dict[str, Any]) -> bool:
    """Whether ``resource`` is what a patch's target (group, version, kind, name, namespace) names."""
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    wanted = {"group": group, "version": version, "kind": resource.get("kind"),
              "name": resource.get("metadata", {}).get("name"),
              "namespace": resource.get("metadata", {}).get("namespace")}
    return all(wanted[key] == value for key, value in target.items() if key in wanted)


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge of ``patch`` into ``base``: maps merge, keyed lists merge by key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    key = _MERGE_KEYS.get(field)
    if isinstance(base, list) and isinstance(patch, list) and key:
        merged_list = copy.deepcopy(base)
        for item in patch:
            found = next((i for i, old in enumerate(merged_list) if old.get(key) == item.get(key)), None)
            if found is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[found] = _merge(merged_list[found], item)
        return merged_list
    return copy.deepcopy(patch)


def _set_replicas(resources: list[Resource], name: str, count: int) -> None:
    """Set ``spec.replicas`` of the workload called ``name``."""
    found = [r for r in resources if r["kind"] in _POD_OWNERS and r["metadata"]["name"] == name]
    if not found:
        raise KustomizeError(f"replicas: no workload named {name}")
    for resource in found:
        resource["spec"]["replicas"] = count


def _set_image(resource: Resource, image: dict[str, str]) -> None:
    """Rewrite the containers' images named ``image['name']`` as kustomize's images transformer does."""
    if resource.get("kind") not in _POD_OWNERS:
        return
    pod = resource["spec"]["template"]["spec"]
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, tag, digest = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            container["image"] = f"{name}:{image['newTag']}"
        else:
            container["image"] = name + (f"@{digest}" if digest else f":{tag}" if tag else "")


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """An image reference as (name, tag, digest)."""
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None
