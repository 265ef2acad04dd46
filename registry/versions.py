"""What one upload of a workflow carries, and the records it writes: version numbers, the checks of its fields, a
version's meta, and the workflow's settings after it.

A workflow's settings (description, timeout, cache TTL, application, env, queue, display name, execution mode,
nesting) are mutable and live with the workflow (:mod:`.workflows`); a published upload merges the fields it gives
into them. A draft (``publish_version`` false) keeps the fields it gives with its version instead (the same draft
uploaded again merges the fields it gives into them), and they are merged into the workflow's when it is
activated, so a draft never changes what live invocations run with.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from flowpool import keys
from flowpool.errors import RequestError
from flowpool.queues import is_queue_name

from .accessories import check_accessories
from .names import is_application_name, is_name
from .validation import (MAX_CACHE_TTL_SECONDS, MAX_TIMEOUT_SECONDS, ScriptInfo, valid_cache_ttl, valid_timeout,
                         validate_script)

__all__ = ["BUMPS", "DEFAULT_BUMP", "ENV_NAME", "EXECUTION_MODES", "FIRST_VERSION", "SETTINGS", "Upload",
           "bump_version", "check_content", "check_upload_fields", "content_hash", "merge_settings", "settings_of",
           "version_meta", "write_version"]

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
FIRST_VERSION = "1.0.0"
BUMPS = ("major", "minor", "patch")
# What the seed documents ("Semver bump when publishing. Defaults to minor."); it was patch before (CHANGELOG.md).
DEFAULT_BUMP = "minor"
# How callers of the seed say a workflow is meant to be invoked. flowpool stores and shows it: every caller
# chooses per request (JSON, ``stream``, or ``POST /api/v1/runs``) whatever it says.
EXECUTION_MODES = ("sync", "async", "stream")
DEFAULT_EXECUTION_MODE = "sync"
# A POSIX environment variable name: anything else ("A=B", "") breaks the run process's environment.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME)
# The upload fields that are the workflow's settings (kept in its config), in the order they are merged.
SETTINGS = ("description", "timeout_seconds", "cache_ttl_seconds", "application_name", "env", "queue",
            "workflow_name", "execution_mode", "allow_inproc_nesting", "inproc_nested_refs")


def bump_version(current: str | None, bump: str) -> str:
    """The version after ``current`` for a major, minor or patch bump."""
    if current is None:
        return FIRST_VERSION
    major, minor, patch = (int(x) for x in _VERSION.match(current).groups())  # type: ignore[union-attr]
    if bump == "major":
        return f"{major + 1}.0.0"
    if bump == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


@dataclass(frozen=True)
class Upload:
    """One upload, already decoded from JSON or multipart."""

    ref: str
    script: str
    description: str | None = None
    timeout_seconds: float | None = None
    cache_ttl_seconds: int | None = None
    application_name: str | None = None
    env: dict[str, str] | None = None
    version_notes: str | None = None
    version_bump: str = DEFAULT_BUMP
    accessories: dict[str, bytes] = field(default_factory=dict)
    queue: str | None = None  # the worker queue its runs go to; wins over the script's QUEUE
    publish_version: bool = True  # False: a draft, stored and numbered but not active (see the module docstring)
    workflow_name: str | None = None  # the display name; shown as the ref when never given
    execution_mode: str | None = None  # one of EXECUTION_MODES; shown as sync when never given
    allow_inproc_nesting: bool | None = None  # stored and shown: ctx.workflows.call always runs in the caller
    inproc_nested_refs: list[str] | None = None


def check_upload_fields(upload: Upload) -> None:
    """A 400 naming the first field of an upload whose value would break every run of the workflow."""
    if upload.version_bump not in BUMPS:
        raise RequestError(f"version_bump must be one of {', '.join(BUMPS)}", param="version_bump")
    timeout, ttl = upload.timeout_seconds, upload.cache_ttl_seconds
    if timeout is not None and not valid_timeout(timeout):
        raise RequestError(f"timeout_seconds must be a number of seconds greater than 0 and at most "
                           f"{MAX_TIMEOUT_SECONDS}, got {timeout!r}", param="timeout_seconds")
    if ttl is not None and not valid_cache_ttl(ttl):
        raise RequestError(f"cache_ttl_seconds must be a whole number of seconds from 0 to {MAX_CACHE_TTL_SECONDS}, "
                           f"got {ttl!r}", param="cache_ttl_seconds")
    if upload.queue is not None and not is_queue_name(upload.queue):
        raise RequestError(f"queue must be 1 to 32 lower-case letters, digits, '_' or '-', starting with a letter, "
                           f"got {upload.queue[:64]!r}", param="queue")
    for name in upload.env or {}:
        if not _ENV_NAME.fullmatch(name):
            raise RequestError(f"env name {name[:64]!r} is not a valid variable name: use letters, digits and '_', "
                               "not starting with a digit", param="env")
    if upload.application_name is not None and not is_application_name(upload.application_name):
        # The upload creates it when missing (PUT /api/v1/applications/<name> configures it): a name that route
        # refuses could never be given intents.
        raise RequestError(f"invalid application_name {upload.application_name[:80]!r}: use 1-64 letters, digits, "
                           "spaces, '_', '-' or '.', starting with a letter or digit and not ending with a space",
                           param="application_name")
    if upload.execution_mode is not None and upload.execution_mode not in EXECUTION_MODES:
        raise RequestError(f"execution_mode must be one of {', '.join(EXECUTION_MODES)}, got "
                           f"{upload.execution_mode[:40]!r}", param="execution_mode")
    for ref in upload.inproc_nested_refs or []:
        if not is_name(ref):
            raise RequestError(f"inproc_nested_refs: {str(ref)[:80]!r} is not a workflow ref name",
                               param="inproc_nested_refs")


def content_hash(script: str, accessories: dict[str, bytes]) -> str:
    """The hash that identifies a version's content: its script and its accessories' bytes, by key."""
    digest = hashlib.sha256()
    digest.update(b"script\0" + script.encode() + b"\0")
    for key in sorted(accessories):
        digest.update(b"accessory\0" + key.encode() + b"\0" + hashlib.sha256(accessories[key]).digest())
    return digest.hexdigest()


def check_content(script: str, accessories: dict[str, bytes], max_script_bytes: int, accessories_max: int,
                  accessory_max_bytes: int) -> tuple[str, ScriptInfo | None]:
    """Check a version's content as every upload (and preview) is checked, writing nothing: a 400 listing the
    script's problems with their lines, or naming the first bad accessory (413 for size); its content hash and
    what the script declares."""
    validation = validate_script(script, max_script_bytes)
    validation.raise_for_problems()
    check_accessories(accessories, accessories_max, accessory_max_bytes)
    return content_hash(script, accessories), validation.info


def write_version(pipe: Any, account_id: str, ref: str, meta: dict[str, Any], script: str, now: float,
                  **fields: str) -> None:
    """Queue on ``pipe`` the writes of a new version (``meta`` from :func:`version_meta`): its hash (meta, script
    and ``fields``), its place among the workflow's versions, and its entry in the content-hash index."""
    number = meta["version"]
    pipe.hset(keys.version(account_id, ref, number), mapping={"meta": json.dumps(meta), "script": script, **fields})
    pipe.zadd(keys.versions(account_id, ref), {number: now})
    pipe.hset(keys.version_hashes(account_id, ref), meta["content_hash"], number)


def version_meta(number: str, digest: str, info: ScriptInfo | None, upload: Upload, now: float,
                 objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The immutable record of a new version, as the API shows it."""
    return {
        "version": number,
        "content_hash": digest,
        "created_at": now,
        "notes": upload.version_notes,
        "accessories": sorted(upload.accessories),
        "accessory_objects": objects,
        **(asdict(info) if info is not None else {}),
    }


def settings_of(upload: Upload) -> dict[str, Any]:
    """The settings an upload gives (those left out are None and keep the workflow's)."""
    return {name: getattr(upload, name) for name in SETTINGS if getattr(upload, name) is not None}


def merge_settings(config: dict[str, Any], settings: dict[str, Any], now: float) -> dict[str, Any]:
    """The workflow's config after ``settings`` (an upload's, or a draft's on activation): given fields win."""
    return {**config, **{k: v for k, v in settings.items() if v is not None}, "updated_at": now}
