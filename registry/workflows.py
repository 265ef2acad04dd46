"""Workflows and their immutable, content-addressed versions.

A workflow (per account, by ref name) holds mutable settings from its latest
upload (description, timeout, cache TTL, application, env, queue) and points at one
active version. A version holds the script exactly as
uploaded, the blobs of its accessories (:mod:`.accessories`), their content
hash and the constants the script declares; it never changes. Uploading
content that matches an existing version activates that version instead of
creating a new one.

Versions written before accessories moved to the blob store keep each
accessory's bytes in field ``accessory:<key>`` of their hash, and no
``accessory_objects`` in their meta; they stay readable as they are.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from flowpool import keys
from flowpool.blobs import BlobStore
from flowpool.errors import ConfigurationError, RequestError, WorkflowNotFound
from flowpool.queues import DEFAULT_QUEUE, is_queue_name
from flowpool.settings import DEFAULT_MAX_SCRIPT_BYTES, Settings

from .accessories import MB, accessory_env, check_accessories, store_accessories
from .names import is_name
from .validation import (MAX_CACHE_TTL_SECONDS, MAX_TIMEOUT_SECONDS, ScriptInfo, valid_cache_ttl, valid_timeout,
                         validate_script)

__all__ = ["Workflows", "ResolvedWorkflow", "Upload", "bump_version"]

RESERVED_REFS = frozenset({"default-script", "upload", "validate"})  # routes under /api/v1/workflows/
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
FIRST_VERSION = "1.0.0"
BUMPS = ("major", "minor", "patch")
# A POSIX environment variable name: anything else ("A=B", "") breaks the run process's environment.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME)


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


def check_ref(ref: str) -> str:
    """A valid workflow ref name, or a 400 naming the rule."""
    if not is_name(ref):
        raise RequestError(
            f"invalid workflow_ref_name {ref!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit",
            param="workflow_ref_name")
    if ref in RESERVED_REFS:
        # /api/v1/workflows/<ref> would answer with the route of that name, not the workflow.
        raise RequestError(f"invalid workflow_ref_name {ref!r}: {', '.join(sorted(RESERVED_REFS))} are reserved",
                           param="workflow_ref_name")
    return ref


def check_upload_fields(upload: Upload) -> None:
    """A 400 naming the first field of an upload whose value would break every run of the workflow."""
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
    version_bump: str = "patch"
    accessories: dict[str, bytes] = field(default_factory=dict)
    queue: str | None = None  # the worker queue its runs go to; wins over the script's QUEUE


@dataclass(frozen=True)
class ResolvedWorkflow:
    """What an invocation needs to know about one version of a workflow."""

    account_id: str
    ref: str
    version: str
    content_hash: str
    config_hash: str
    timeout_seconds: float | None
    cache_ttl_seconds: int | None
    input_schema: dict | None
    output_schema: dict | None
    application: str | None
    env: dict[str, str]
    rev: str = ""  # the workflow's revision when resolved; a later upload or activate changes it
    limits: dict[str, int] | None = None  # the script's LIMITS, as validated at upload
    # The version's accessory_objects: {key: {"object": blob name, "sha256", "size"}}; {} if none are in the
    # blob store (none bundled, or a version from before, whose bytes are in its hash).
    accessories: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE  # the worker queue its runs go to: the upload's queue, else the script's QUEUE


def _content_hash(script: str, accessories: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    digest.update(b"script\0" + script.encode() + b"\0")
    for key in sorted(accessories):
        digest.update(b"accessory\0" + key.encode() + b"\0" + hashlib.sha256(accessories[key]).digest())
    return digest.hexdigest()


def _queue_of(config: dict[str, Any], meta: dict[str, Any]) -> str:
    """The worker queue of a workflow's version: its upload's ``queue`` wins over the script's QUEUE."""
    return config.get("queue") or meta.get("queue") or DEFAULT_QUEUE


def _new_rev() -> str:
    """A fresh revision token: any change to what invocations resolve to gets a new one."""
    return uuid.uuid4().hex


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


_ACCESSORY_MAX_MB = Settings.model_fields["accessory_max_mb"].default
_ACCESSORIES_MAX = Settings.model_fields["accessories_max"].default


class Workflows:
    """Upload, list, resolve and roll back workflows of an account.

    ``blobs`` is where uploads put accessories: the API passes the store the
    settings name (:meth:`for_settings`). Only :meth:`upload` writes to it,
    and an upload with accessories needs it given: a default could put them
    in Redis while the workers read S3. Readers (workers resolving a
    version) need none.
    """

    def __init__(self, client: redis.Redis, max_script_bytes: int = DEFAULT_MAX_SCRIPT_BYTES, *,
                 blobs: BlobStore | None = None, accessory_max_bytes: int = int(_ACCESSORY_MAX_MB * MB),
                 accessories_max: int = _ACCESSORIES_MAX) -> None:
        self.redis = client
        self.max_script_bytes = max_script_bytes
        self.blobs = blobs
        self.accessory_max_bytes = accessory_max_bytes
        self.accessories_max = accessories_max

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings, blobs: BlobStore) -> Workflows:
        """The store with the operator's limits (script size, accessory size and count) and blob store."""
        return cls(client, settings.max_script_bytes, blobs=blobs,
                   accessory_max_bytes=int(settings.accessory_max_mb * MB), accessories_max=settings.accessories_max)

    # Writing

    def _store_accessories(self, account_id: str, accessories: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        if not accessories:
            return {}
        if self.blobs is None:
            raise ConfigurationError("this Workflows store was made without a blob store, so it cannot store "
                                     "accessories: make it with Workflows.for_settings")
        return store_accessories(self.blobs, account_id, accessories)

    def upload(self, account_id: str, upload: Upload) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Validate and store an upload; returns the workflow, the active version and whether it is new.

        Everything is checked before anything is stored, so a refused upload
        changes nothing; a new version's accessories are in the blob store
        before the version that names them is written.
        """
        check_ref(upload.ref)
        if upload.version_bump not in BUMPS:
            raise RequestError(f"version_bump must be one of {', '.join(BUMPS)}", param="version_bump")
        check_upload_fields(upload)
        validation = validate_script(upload.script, self.max_script_bytes)
        validation.raise_for_problems()
        check_accessories(upload.accessories, self.accessories_max, self.accessory_max_bytes)
        content_hash = _content_hash(upload.script, upload.accessories)
        wf_key = keys.workflow(account_id, upload.ref)
        now = time.time()
        # The blobs first, outside the transaction below: storing them (on S3, up to 100 x 50 MB) under its WATCH
        # would only widen the window for a retry. They are content-addressed: for an upload that repeats a
        # version this costs a lookup each, not a copy.
        objects = self._store_accessories(account_id, upload.accessories)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(wf_key)
                    current = _decode(pipe.hgetall(wf_key))
                    existing = pipe.hget(keys.version_hashes(account_id, upload.ref), content_hash)
                    config = json.loads(current["config"]) if current else {"ref": upload.ref, "created_at": now}
                    config = self._merge_config(config, upload, now)
                    if existing is not None:
                        number, created = existing.decode(), False
                        meta = json.loads(pipe.hget(keys.version(account_id, upload.ref, number), "meta"))
                    else:
                        number, created = bump_version(current.get("latest"), upload.version_bump), True
                        meta = self._version_meta(number, content_hash, validation.info, upload, now, objects)
                    pipe.multi()
                    if created:
                        vkey = keys.version(account_id, upload.ref, number)
                        pipe.hset(vkey, mapping={"meta": json.dumps(meta), "script": upload.script})
                        pipe.zadd(keys.versions(account_id, upload.ref), {number: now})
                        pipe.hset(keys.version_hashes(account_id, upload.ref), content_hash, number)
                        pipe.hset(wf_key, "latest", number)
                    pipe.hset(wf_key, mapping={"config": json.dumps(config), "active": number,
                                               "active_meta": json.dumps(meta), "rev": _new_rev()})
                    pipe.zadd(keys.workflows(account_id), {upload.ref: config["created_at"]}, nx=True)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self._workflow_view(config, number, meta), meta, created

    @staticmethod
    def _merge_config(config: dict[str, Any], upload: Upload, now: float) -> dict[str, Any]:
        """The workflow's settings after an upload: fields the upload gives replace the old ones."""
        config = dict(config)
        for name in ("description", "timeout_seconds", "cache_ttl_seconds", "application_name", "env", "queue"):
            value = getattr(upload, name)
            if value is not None:
                config[name] = value
        config["updated_at"] = now
        return config

    @staticmethod
    def _version_meta(number: str, content_hash: str, info: ScriptInfo | None, upload: Upload,
                      now: float, objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "version": number,
            "content_hash": content_hash,
            "created_at": now,
            "notes": upload.version_notes,
            "accessories": sorted(upload.accessories),
            "accessory_objects": objects,
            **(asdict(info) if info is not None else {}),
        }

    def activate(self, account_id: str, ref: str, number: str) -> dict[str, Any]:
        """Make an existing version the active one (a rollback or roll forward)."""
        self._require(account_id, ref)
        raw = self.redis.hget(keys.version(account_id, ref, number), "meta")
        if raw is None:
            raise WorkflowNotFound(ref, number)
        self.redis.hset(keys.workflow(account_id, ref), mapping={"active": number, "active_meta": raw,
                                                                 "rev": _new_rev()})
        return self.get(account_id, ref)

    def delete(self, account_id: str, ref: str) -> None:
        """Delete a workflow with all its versions."""
        self._require(account_id, ref)
        numbers = [n.decode() for n in self.redis.zrange(keys.versions(account_id, ref), 0, -1)]
        self.redis.delete(
            keys.workflow(account_id, ref), keys.versions(account_id, ref), keys.version_hashes(account_id, ref),
            keys.workflow_runs(account_id, ref), *(keys.version(account_id, ref, n) for n in numbers))
        self.redis.zrem(keys.workflows(account_id), ref)

    # Reading

    def _require(self, account_id: str, ref: str) -> dict[str, str]:
        # A name no upload accepts could address another key of a workflow
        # ("x:v:1.0.0" is the key of x's version 1.0.0): there is no such workflow.
        if not is_name(ref):
            raise WorkflowNotFound(ref)
        raw = _decode(self.redis.hgetall(keys.workflow(account_id, ref)))
        if not raw:
            raise WorkflowNotFound(ref)
        return raw

    @staticmethod
    def _workflow_view(config: dict[str, Any], active: str, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "workflow_ref_name": config["ref"],
            "description": config.get("description"),
            "active_version": active,
            "timeout_seconds": config.get("timeout_seconds", meta.get("timeout_seconds")),
            "cache_ttl_seconds": config.get("cache_ttl_seconds", meta.get("cache_ttl_seconds")),
            "application_name": config.get("application_name", meta.get("application")),
            "env_keys": sorted((config.get("env") or {}).keys()),
            "queue": _queue_of(config, meta),
            "input_schema": meta.get("input_schema"),
            "output_schema": meta.get("output_schema"),
            "created_at": config.get("created_at"),
            "updated_at": config.get("updated_at"),
        }

    def get(self, account_id: str, ref: str) -> dict[str, Any]:
        """The workflow as the API shows it."""
        raw = self._require(account_id, ref)
        return self._workflow_view(json.loads(raw["config"]), raw["active"], json.loads(raw["active_meta"]))

    def list(self, account_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the account's workflows, oldest first, and the total."""
        total = self.redis.zcard(keys.workflows(account_id))
        refs = [r.decode() for r in self.redis.zrange(keys.workflows(account_id), offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.hmget(keys.workflow(account_id, ref), "config", "active", "active_meta")
        items = [self._workflow_view(json.loads(c), a.decode(), json.loads(m))
                 for c, a, m in pipe.execute() if c is not None]
        return items, total

    def versions(self, account_id: str, ref: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the workflow's versions, oldest first, and the total."""
        raw = self._require(account_id, ref)
        key = keys.versions(account_id, ref)
        total = self.redis.zcard(key)
        numbers = [n.decode() for n in self.redis.zrange(key, offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for number in numbers:
            pipe.hget(keys.version(account_id, ref, number), "meta")
        metas = [json.loads(m) for m in pipe.execute() if m is not None]
        for meta in metas:
            meta["active"] = meta["version"] == raw["active"]
        return metas, total

    def resolve(self, account_id: str, ref: str, number: str | None = None) -> ResolvedWorkflow:
        """The version an invocation runs: the pinned one, or the active one (one Redis round trip)."""
        if not is_name(ref):
            raise WorkflowNotFound(ref)
        wf_key = keys.workflow(account_id, ref)
        if number is None:
            config, active, meta, rev = self.redis.hmget(wf_key, "config", "active", "active_meta", "rev")
            if config is None or active is None:
                raise WorkflowNotFound(ref)
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(wf_key, "config", "rev")
            pipe.hget(keys.version(account_id, ref, number), "meta")
            (config, rev), meta = pipe.execute()
            if config is None:
                raise WorkflowNotFound(ref)
            if meta is None:
                raise WorkflowNotFound(ref, number)
        cfg, info = json.loads(config), json.loads(meta)
        objects = info.get("accessory_objects") or {}
        # The version's accessories name their blobs over any env entry of the same name: the script reads them.
        env = {**{str(k): str(v) for k, v in (cfg.get("env") or {}).items()}, **accessory_env(objects)}
        return ResolvedWorkflow(
            account_id=account_id,
            ref=ref,
            version=info["version"],
            content_hash=info["content_hash"],
            config_hash=hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest(),
            timeout_seconds=cfg.get("timeout_seconds") or info.get("timeout_seconds"),
            cache_ttl_seconds=cfg["cache_ttl_seconds"] if cfg.get("cache_ttl_seconds") is not None
            else info.get("cache_ttl_seconds"),
            input_schema=info.get("input_schema"),
            output_schema=info.get("output_schema"),
            application=cfg.get("application_name") or info.get("application"),
            env=env,
            rev=rev.decode() if rev else "",
            limits=info.get("limits"),
            accessories=objects,
            queue=_queue_of(cfg, info),
        )

    def load_script(self, account_id: str, ref: str, number: str) -> str:
        """The script source of one version."""
        raw = self.redis.hget(keys.version(account_id, ref, number), "script")
        if raw is None:
            raise WorkflowNotFound(ref, number)
        return raw.decode()
