"""Accessories: read-only JSON files bundled with a workflow version under a short key.

An upload's accessories are checked whole before anything is stored (count,
key, size, JSON), then each is put in the blob store under
``accessories/<account>/<sha256 of its bytes>``: content-addressed, so the
same bytes are stored once per account however many versions bundle them,
and a blob already there is not sent again. Only then is the version written;
its meta names each accessory's blob (``accessory_objects``), and the run's
env gets ``<KEY>_S3_KEY`` = that blob name, from the version, so a rollback
brings back its own accessories.

Blobs are never deleted with a workflow: another workflow or version of the
account may name the same one. A preview's are the exception: they are its
own, under ``previews/``, and expire with it (:mod:`.previews`).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, Callable

from flowpool.errors import PayloadTooLarge, RequestError

if TYPE_CHECKING:
    from flowpool.blobs import BlobStore

__all__ = ["ACCESSORY_KEY", "MB", "accessory_env", "accessory_objects", "blob_name", "check_accessories", "env_name",
           "store_accessories"]

MB = 1 << 20
# 1-64 letters, digits, '_', '-' or '.', starting with a letter: its env name (below) is then a valid variable name.
ACCESSORY_KEY = r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$"
_ACCESSORY_KEY = re.compile(ACCESSORY_KEY)


def env_name(key: str) -> str:
    """The env variable naming an accessory's blob: ``hts-codes`` -> ``HTS_CODES_S3_KEY``."""
    return key.upper().replace("-", "_").replace(".", "_") + "_S3_KEY"


def blob_name(account_id: str, sha256: str) -> str:
    """Where the accessory of these bytes lives in the blob store, per account."""
    return f"accessories/{account_id}/{sha256}"


def check_accessories(accessories: dict[str, bytes], max_count: int, max_bytes: int) -> None:
    """A 400 (count, key, JSON) or 413 (size, naming the key and the limit) for the first bad accessory."""
    if len(accessories) > max_count:
        raise RequestError(f"{len(accessories)} accessories, over the limit of {max_count} per workflow version "
                           "(FLOWPOOL_ACCESSORIES_MAX)", param="accessories")
    names: dict[str, str] = {}
    for key, content in accessories.items():
        if not isinstance(key, str) or not _ACCESSORY_KEY.fullmatch(key):
            raise RequestError(f"accessory key {str(key)[:80]!r} is not a valid key: use 1-64 letters, digits, '_', "
                               "'-' or '.', starting with a letter", param="accessories")
        other = names.setdefault(env_name(key), key)
        if other != key:
            raise RequestError(f"accessory keys {other!r} and {key!r} both set {env_name(key)} in the env: "
                               "rename one", param="accessories")
        if len(content) > max_bytes:
            raise PayloadTooLarge(f"accessory {key!r} is {len(content)} bytes, over the limit of "
                                  f"{max_bytes / MB:g} MB ({max_bytes} bytes; FLOWPOOL_ACCESSORY_MAX_MB)",
                                  param="accessories")
    for key, content in accessories.items():  # the costly check last, once every cheap one passed
        _check_json(key, content)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _nothing(_: Any) -> None:
    return None


def _check_json(key: str, content: bytes) -> None:
    """A 400 unless ``content`` is one JSON document (strict: no NaN or Infinity).

    Objects and numbers are dropped as they are parsed, but strings and
    arrays are built: a file of many short strings takes several times its
    size while it is checked (a 16 MB array of short strings peaked about
    141 MB above the upload). ``FLOWPOOL_ACCESSORY_MAX_MB`` and the upload
    body limit bound it; size API processes for it.
    """
    try:
        json.loads(content, parse_constant=_refuse, parse_int=_nothing, parse_float=_nothing,
                   object_pairs_hook=_nothing)
    except RecursionError:
        raise RequestError(f"accessory {key!r} is nested too deeply to be read", param="accessories") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise RequestError(f"accessory {key!r} is not valid JSON: {exc}", param="accessories") from exc


def accessory_objects(accessories: dict[str, bytes], name_of: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """A version's ``accessory_objects``: ``{key: {"object": blob name, "sha256": hex, "size": bytes}}``, each
    blob named by ``name_of(sha256)``."""
    objects: dict[str, dict[str, Any]] = {}
    for key in sorted(accessories):
        content = accessories[key]
        digest = hashlib.sha256(content).hexdigest()
        objects[key] = {"object": name_of(digest), "sha256": digest, "size": len(content)}
    return objects


def store_accessories(blobs: BlobStore, account_id: str, accessories: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Put each accessory in the blob store (unless its bytes are there already); the version's
    ``accessory_objects`` (:func:`accessory_objects`)."""
    objects = accessory_objects(accessories, lambda digest: blob_name(account_id, digest))
    for key, obj in objects.items():
        if not blobs.exists(obj["object"]):
            blobs.put(obj["object"], accessories[key])
    return objects


def accessory_env(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The env entries of a version's accessories: ``<KEY>_S3_KEY`` -> the blob name (every stored key was
    checked against :data:`ACCESSORY_KEY`, so each name is a valid variable name).

    Versions written before accessories moved to the blob store have no
    ``accessory_objects``, so no entry: their bytes are in no blob to name.
    """
    return {env_name(key): str(obj["object"]) for key, obj in objects.items()}
