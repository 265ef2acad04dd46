"""Workflows and their immutable, content-addressed versions.

A workflow (per account, by ref name) holds mutable settings from its latest
published upload (description, timeout, cache TTL, application, env, queue, display name, execution mode) and
points at one active version. A version holds the script exactly as
uploaded, the blobs of its accessories (:mod:`.accessories`), their content
hash and the constants the script declares; its content never changes. A
published upload of content that matches an existing version activates that
version (the upload's settings merged into the workflow's) instead of creating
a new one.

An upload with ``publish_version`` false stores a draft: a version numbered like any other that is not
activated. Its hash carries ``draft`` (``"1"``) and its settings (``settings``), which are merged into the
workflow's when it is activated, and both fields go then. A draft upload of content that matches a draft merges
its settings into that draft's (a 200); one whose content matches a published version is a 409, since only a
published upload changes a published version's settings. A workflow whose versions are all drafts has no
``active`` version, and only a pinned invocation runs it.

Each workflow gets an integer ``id`` from a counter of its account when it is first written; one written before
ids gets one when it is first read (or written), so every view shows one.

Every write to a workflow's versions, its hashes index or a version's draft fields also writes the workflow's
hash, in one transaction: watching that hash alone makes an upload or activation see them consistent.

Versions written before accessories moved to the blob store keep each
accessory's bytes in field ``accessory:<key>`` of their hash, and no
``accessory_objects`` in their meta; they stay readable as they are.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from flowpool import keys
from flowpool.blobs import BlobStore
from flowpool.errors import ConfigurationError, Conflict, NotFound, RequestError, WorkflowNotFound
from flowpool.queues import DEFAULT_QUEUE
from flowpool.settings import DEFAULT_MAX_SCRIPT_BYTES, Settings

from .accessories import MB, accessory_env, store_accessories
from .applications import EMPTY_APPLICATION
from .names import is_name
from .validation import ScriptInfo
from .versions import (BUMPS, DEFAULT_EXECUTION_MODE, ENV_NAME, FIRST_VERSION, Upload, bump_version,
                       check_content, check_upload_fields, merge_settings, settings_of, version_meta,
                       write_version)

__all__ = ["BUMPS", "ENV_NAME", "FIRST_VERSION", "Workflows", "ResolvedWorkflow", "Stored", "Upload",
           "bump_version", "check_ref"]

RESERVED_REFS = frozenset({"default-script", "preview", "upload", "validate"})  # routes under /api/v1/workflows/
PREVIEW_PREFIX = "fp-preview-"  # the refs of previews (registry/previews.py), which no upload may take


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
    if ref.startswith(PREVIEW_PREFIX):
        raise RequestError(f"invalid workflow_ref_name {ref!r}: names starting with {PREVIEW_PREFIX!r} are reserved "
                           "for previews (POST /api/v1/workflows/preview)", param="workflow_ref_name")
    return ref


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

    @classmethod
    def of(cls, account_id: str, ref: str, config: dict[str, Any], info: dict[str, Any], rev: str) -> ResolvedWorkflow:
        """What an invocation runs, from the workflow's ``config`` (a pinned draft's settings merged in) and the
        version's meta ``info``."""
        objects = info.get("accessory_objects") or {}
        # The version's accessories name their blobs over any env entry of the same name: the script reads them.
        env = {**{str(k): str(v) for k, v in (config.get("env") or {}).items()}, **accessory_env(objects)}
        return cls(
            account_id=account_id,
            ref=ref,
            version=info["version"],
            content_hash=info["content_hash"],
            config_hash=hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest(),
            timeout_seconds=config.get("timeout_seconds") or info.get("timeout_seconds"),
            cache_ttl_seconds=config["cache_ttl_seconds"] if config.get("cache_ttl_seconds") is not None
            else info.get("cache_ttl_seconds"),
            input_schema=info.get("input_schema"),
            output_schema=info.get("output_schema"),
            application=config.get("application_name") or info.get("application"),
            env=env,
            rev=rev,
            limits=info.get("limits"),
            accessories=objects,
            queue=_queue_of(config, info),
        )


def _queue_of(config: dict[str, Any], meta: dict[str, Any]) -> str:
    """The worker queue of a workflow's version: its upload's ``queue`` wins over the script's QUEUE."""
    return config.get("queue") or meta.get("queue") or DEFAULT_QUEUE


def _new_rev() -> str:
    """A fresh revision token: any change to what invocations resolve to gets a new one."""
    return uuid.uuid4().hex


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


@dataclass(frozen=True)
class Stored:
    """What an upload stored: the workflow after it, the version its content is (with ``active`` and ``draft``),
    whether that version is new, and the workflow's active version after it (None while it has none)."""

    workflow: dict[str, Any]
    version: dict[str, Any]
    created: bool
    published: dict[str, Any] | None


# Gives a workflow written before ids its id, once; nothing for a workflow deleted meanwhile (an id alone would make
# a hash of a workflow with no config).
_ALLOCATE_ID = """
local workflow, counter = KEYS[1], KEYS[2]
if redis.call('exists', workflow) == 0 then return false end
local id = redis.call('hget', workflow, 'id')
if id then return id end
id = redis.call('incr', counter)
redis.call('hset', workflow, 'id', id)
return id
"""


def _published_already(ref: str, number: str) -> Conflict:
    return Conflict(f"this content is version {number} of workflow {ref}, which is published: a draft cannot change "
                    f"a published version's settings. Upload it with publish_version true to change them (that "
                    f"also activates {number}), or change the script to store a new draft",
                    reason="version_published", version=number)


def _no_published_version(ref: str) -> NotFound:
    return NotFound(f"workflow {ref} has no published version: activate one with "
                    f"POST /api/v1/workflows/{ref}/activate", reason="no_published_version")


_ACCESSORY_MAX_MB = Settings.model_fields["accessory_max_mb"].default
_ACCESSORIES_MAX = Settings.model_fields["accessories_max"].default


def _check_name(ref: str) -> None:
    """A 404 for a ref no workflow route answers for.

    A name no upload accepts could address another key of a workflow ("x:v:1.0.0" is the key of x's version
    1.0.0): there is no such workflow. Nor is a preview one: it is never shown, activated or given an id
    (registry/previews.py).
    """
    if not is_name(ref) or ref.startswith(PREVIEW_PREFIX):
        raise WorkflowNotFound(ref)


class Workflows:
    """Upload, list, resolve and roll back workflows of an account.

    ``blobs`` is where uploads put accessories: the API passes the store the
    settings name (:meth:`for_settings`). Only uploads (:meth:`store`) and previews write to it,
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
        self._allocate_id = client.register_script(_ALLOCATE_ID)

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings, blobs: BlobStore) -> Workflows:
        """The store with the operator's limits (script size, accessory size and count) and blob store."""
        return cls(client, settings.max_script_bytes, blobs=blobs,
                   accessory_max_bytes=int(settings.accessory_max_mb * MB), accessories_max=settings.accessories_max)

    # Writing

    def check_content(self, script: str, accessories: dict[str, bytes]) -> tuple[str, ScriptInfo | None]:
        """Check a version's content against this store's limits, writing nothing (:func:`.versions.check_content`):
        its content hash and what the script declares."""
        return check_content(script, accessories, self.max_script_bytes, self.accessories_max,
                             self.accessory_max_bytes)

    def store_accessories(self, account_id: str, accessories: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Put an upload's accessories in the blob store, content-addressed (:mod:`.accessories`); the version's
        ``accessory_objects``."""
        if not accessories:
            return {}
        return store_accessories(self.require_blobs(), account_id, accessories)

    def require_blobs(self) -> BlobStore:
        """The blob store accessories go to; a ConfigurationError for a store made without one."""
        if self.blobs is None:
            raise ConfigurationError("this Workflows store was made without a blob store, so it cannot store "
                                     "accessories: make it with Workflows.for_settings")
        return self.blobs

    def _workflow_id(self, pipe: Any, account_id: str, current: dict[str, str], allocated: int | None) -> int:
        """The workflow's id: its own, else the one this write allocated already (a retry keeps it), else a new
        one from the account's counter (run at once: ``pipe`` is watching, not queued)."""
        if current.get("id"):
            return int(current["id"])
        return allocated if allocated is not None else int(pipe.incr(keys.workflow_ids(account_id)))

    def upload(self, account_id: str, upload: Upload) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Validate and store an upload (:meth:`store`); returns the workflow, the version the upload's content is
        (with its ``active`` and ``draft`` flags) and whether that version is new."""
        stored = self.store(account_id, upload)
        return stored.workflow, stored.version, stored.created

    def store(self, account_id: str, upload: Upload) -> Stored:
        """Validate and store an upload, and create the application it names when the account lacks it.

        Everything is checked before anything is stored, so a refused upload
        changes nothing; a new version's accessories are in the blob store
        before the version that names them is written. A draft
        (``publish_version`` false) changes nothing live invocations see.
        """
        check_ref(upload.ref)
        check_upload_fields(upload)
        digest, info = self.check_content(upload.script, upload.accessories)
        wf_key = keys.workflow(account_id, upload.ref)
        now = time.time()
        # The blobs first, outside the transaction below: storing them (on S3, up to 100 x 50 MB) under its WATCH
        # would only widen the window for a retry. They are content-addressed: for an upload that repeats a
        # version this costs a lookup each, not a copy.
        objects = self.store_accessories(account_id, upload.accessories)
        workflow_id: int | None = None
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(wf_key)
                    current = _decode(pipe.hgetall(wf_key))
                    existing = pipe.hget(keys.version_hashes(account_id, upload.ref), digest)
                    config = json.loads(current["config"]) if current else {"ref": upload.ref, "created_at": now}
                    draft_settings: dict[str, Any] | None = None  # the matching version's, while it is a draft
                    if existing is not None:
                        number, created = existing.decode(), False
                        raw_meta, draft_flag, raw_settings = pipe.hmget(
                            keys.version(account_id, upload.ref, number), "meta", "draft", "settings")
                        meta = json.loads(raw_meta)
                        if draft_flag:
                            draft_settings = json.loads(raw_settings) if raw_settings else {}
                        elif not upload.publish_version:
                            raise _published_already(upload.ref, number)
                    else:
                        number, created = bump_version(current.get("latest"), upload.version_bump), True
                        meta = version_meta(number, digest, info, upload, now, objects)
                    workflow_id = self._workflow_id(pipe, account_id, current, workflow_id)
                    state: dict[str, Any] = {"id": workflow_id}
                    version_fields: dict[str, str] = {}
                    if upload.publish_version:
                        # A draft of the same content published now brings its own settings; the upload's win.
                        config = merge_settings(merge_settings(config, draft_settings or {}, now),
                                                settings_of(upload), now)
                        active, active_meta, draft = number, meta, False
                        state.update(config=json.dumps(config), active=number, active_meta=json.dumps(meta),
                                     rev=_new_rev())
                    else:
                        active = current.get("active")
                        active_meta = json.loads(current["active_meta"]) if current.get("active_meta") else {}
                        draft = True
                        # A draft uploaded again takes the fields given now over those it had, as a published
                        # upload does the workflow's.
                        settings = {**(draft_settings or {}), **settings_of(upload)}
                        if created:
                            version_fields.update(draft="1", settings=json.dumps(settings))
                        elif settings != draft_settings:
                            version_fields["settings"] = json.dumps(settings)
                            state["rev"] = _new_rev()  # a pinned invocation resolved before reads them again
                        if not current:  # a workflow first uploaded as a draft exists, with no active version
                            state["config"] = json.dumps(config)
                    version_key = keys.version(account_id, upload.ref, number)
                    pipe.multi()
                    if created:
                        write_version(pipe, account_id, upload.ref, meta, upload.script, now, **version_fields)
                        pipe.hset(wf_key, "latest", number)
                    elif version_fields:
                        pipe.hset(version_key, mapping=version_fields)
                    if upload.publish_version and draft_settings is not None:
                        pipe.hdel(version_key, "draft", "settings")  # published: its settings are the workflow's
                    if upload.application_name is not None:
                        # "Bind to application by name; creates if missing": empty, its intents are PUT later.
                        pipe.hsetnx(keys.applications(account_id), upload.application_name, EMPTY_APPLICATION)
                    pipe.hset(wf_key, mapping=state)
                    pipe.zadd(keys.workflows(account_id), {upload.ref: config["created_at"]}, nx=True)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        version = {**meta, "active": number == active, "draft": draft}
        published = version if number == active else (active_meta if active is not None else None)
        return Stored(self._workflow_view(config, active, active_meta, workflow_id), version, created, published)

    def activate(self, account_id: str, ref: str, number: str) -> dict[str, Any]:
        """Make an existing version the active one: a rollback or roll forward, or the publication of a draft
        (whose settings then become the workflow's)."""
        _check_name(ref)
        wf_key = keys.workflow(account_id, ref)
        workflow_id: int | None = None
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(wf_key)
                    current = _decode(pipe.hgetall(wf_key))
                    if not current:
                        raise WorkflowNotFound(ref)
                    version_key = keys.version(account_id, ref, number)
                    raw, draft_flag, settings = pipe.hmget(version_key, "meta", "draft", "settings")
                    if raw is None:
                        raise WorkflowNotFound(ref, number)
                    workflow_id = self._workflow_id(pipe, account_id, current, workflow_id)
                    state: dict[str, Any] = {"active": number, "active_meta": raw, "rev": _new_rev(),
                                             "id": workflow_id}
                    config = json.loads(current["config"])
                    if draft_flag:
                        config = merge_settings(config, json.loads(settings) if settings else {}, time.time())
                        state["config"] = json.dumps(config)
                    pipe.multi()
                    if draft_flag:
                        pipe.hdel(version_key, "draft", "settings")  # published: its settings are the workflow's
                    pipe.hset(wf_key, mapping=state)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self._workflow_view(config, number, json.loads(raw), workflow_id)

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
        _check_name(ref)
        raw = _decode(self.redis.hgetall(keys.workflow(account_id, ref)))
        if not raw:
            raise WorkflowNotFound(ref)
        return raw

    @staticmethod
    def _workflow_view(config: dict[str, Any], active: str | None, meta: dict[str, Any],
                       workflow_id: int) -> dict[str, Any]:
        return {
            "id": workflow_id,
            "workflow_ref_name": config["ref"],
            "workflow_name": config.get("workflow_name") or config["ref"],
            "description": config.get("description"),
            "active_version": active,  # None while every version is a draft
            "timeout_seconds": config.get("timeout_seconds", meta.get("timeout_seconds")),
            "cache_ttl_seconds": config.get("cache_ttl_seconds", meta.get("cache_ttl_seconds")),
            "application_name": config.get("application_name", meta.get("application")),
            "env_keys": sorted((config.get("env") or {}).keys()),
            "queue": _queue_of(config, meta),
            "execution_mode": config.get("execution_mode", DEFAULT_EXECUTION_MODE),
            "allow_inproc_nesting": config.get("allow_inproc_nesting", False),
            "inproc_nested_refs": config.get("inproc_nested_refs", []),
            "input_schema": meta.get("input_schema"),
            "output_schema": meta.get("output_schema"),
            "created_at": config.get("created_at"),
            "updated_at": config.get("updated_at"),
        }

    def _view_of(self, account_id: str, ref: str, config: str | bytes, active: str | bytes | None,
                 meta: str | bytes | None, workflow_id: str | bytes | None) -> dict[str, Any] | None:
        """The workflow as the API shows it, from the fields of its hash; None when it was deleted meanwhile."""
        if isinstance(active, bytes):
            active = active.decode()
        if not workflow_id:
            # Written before ids: it gets one now, once (of two readers at once, both show the one stored).
            workflow_id = self._allocate_id(keys=[keys.workflow(account_id, ref), keys.workflow_ids(account_id)])
            if not workflow_id:
                return None
        return self._workflow_view(json.loads(config), active, json.loads(meta) if meta else {}, int(workflow_id))

    def get(self, account_id: str, ref: str) -> dict[str, Any]:
        """The workflow as the API shows it."""
        raw = self._require(account_id, ref)
        view = self._view_of(account_id, ref, raw["config"], raw.get("active"), raw.get("active_meta"), raw.get("id"))
        if view is None:
            raise WorkflowNotFound(ref)
        return view

    def list(self, account_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the account's workflows, oldest first, and the total."""
        total = self.redis.zcard(keys.workflows(account_id))
        refs = [r.decode() for r in self.redis.zrange(keys.workflows(account_id), offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.hmget(keys.workflow(account_id, ref), "config", "active", "active_meta", "id")
        views = [self._view_of(account_id, ref, c, a, m, i) if c is not None else None
                 for ref, (c, a, m, i) in zip(refs, pipe.execute())]
        items = [view for view in views if view is not None]
        return items, total

    def versions(self, account_id: str, ref: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A page of the workflow's versions, oldest first, and the total."""
        raw = self._require(account_id, ref)
        key = keys.versions(account_id, ref)
        total = self.redis.zcard(key)
        numbers = [n.decode() for n in self.redis.zrange(key, offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for number in numbers:
            pipe.hmget(keys.version(account_id, ref, number), "meta", "draft")
        metas = []
        for raw_meta, draft_flag in pipe.execute():
            if raw_meta is not None:
                meta = json.loads(raw_meta)
                metas.append({**meta, "active": meta["version"] == raw.get("active"), "draft": bool(draft_flag)})
        return metas, total

    def resolve(self, account_id: str, ref: str, number: str | None = None) -> ResolvedWorkflow:
        """The version an invocation runs: the pinned one, or the active one (one Redis round trip). A pinned
        draft runs with its own settings over the workflow's, as it will once activated."""
        if not is_name(ref):
            raise WorkflowNotFound(ref)
        wf_key = keys.workflow(account_id, ref)
        if number is None:
            config, active, meta, rev = self.redis.hmget(wf_key, "config", "active", "active_meta", "rev")
            if config is None:
                raise WorkflowNotFound(ref)
            if active is None or meta is None:  # its versions are all drafts
                raise _no_published_version(ref)
            cfg = json.loads(config)
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(wf_key, "config", "rev")
            pipe.hmget(keys.version(account_id, ref, number), "meta", "draft", "settings")
            (config, rev), (meta, draft_flag, settings) = pipe.execute()
            if config is None:
                raise WorkflowNotFound(ref)
            if meta is None:
                raise WorkflowNotFound(ref, number)
            cfg = json.loads(config)
            if draft_flag and settings:
                cfg = merge_settings(cfg, json.loads(settings), cfg.get("updated_at", 0.0))
        return ResolvedWorkflow.of(account_id, ref, cfg, json.loads(meta), rev.decode() if rev else "")

    def load_script(self, account_id: str, ref: str, number: str) -> str:
        """The script source of one version."""
        raw = self.redis.hget(keys.version(account_id, ref, number), "script")
        if raw is None:
            raise WorkflowNotFound(ref, number)
        return raw.decode()
