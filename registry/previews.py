"""Previews: a script run once without an upload, stored as a hidden workflow that expires.

``POST /api/v1/workflows/preview`` (and ``flowpool run FILE``) stores the
script as a workflow of the account under a content-addressed ref,
:data:`PREFIX` followed by part of the hash of its script and accessories,
which no upload may take (:func:`.workflows.check_ref`). It has one version,
``1.0.0``, active; it is checked as an upload is (400s with line numbers) and
resolved and run as any workflow is, by the account's key alone (its keys
are the account's).

A preview is checked first (:meth:`Previews.prepare`, which writes nothing),
and stored (:meth:`Previews.store`) only once admission has queued its run:
a request that is refused (a quota, a size, an Idempotency-Key sent with
another request) writes nothing. Admission takes what an invocation of it
resolves to from the prepared preview, not from Redis: the preview's hash
has no revision, so it is the same workflow to a run being admitted whether
or not it is stored yet, and storing the same content again changes nothing
under a run.

Unlike an upload's, it is not in the account's list of workflows, and every
key written for it expires: the workflow, its version, its version index and
content-hash index after :data:`TTL_SECONDS` (longer when its run may last
longer), renewed by each preview of the same content, and the index of its
runs with them. The run itself (record, events, logs) expires as every run
does. Its accessories are its own blobs, named after the preview
(:func:`blob_name`, under ``previews/``), not shared with uploads, and given
the same lifetime: the Redis blob store expires them; S3 cannot expire one
object, so there an operator's lifecycle rule on the prefix ``previews/``
removes them (docs/operations.md).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from flowpool import keys
from flowpool.settings import Settings

from .accessories import accessory_objects
from .versions import FIRST_VERSION, Upload, version_meta, write_version
from .workflows import PREVIEW_PREFIX, ResolvedWorkflow, Workflows

__all__ = ["BLOB_PREFIX", "PREFIX", "TTL_SECONDS", "Preview", "Previews", "blob_name"]

PREFIX = PREVIEW_PREFIX  # no upload may take a ref that starts with it (check_ref)
TTL_SECONDS = 3600  # how long a preview stays after it was last stored, at the least
_HASH_CHARS = 40  # of the content hash's 64: 160 bits, and the ref stays within a name's 64 characters
BLOB_PREFIX = "previews/"  # the names of previews' blobs, apart from uploads' so a lifecycle rule can expire them


def preview_ref(digest: str) -> str:
    """The ref of the preview of the content whose hash (:func:`.versions.content_hash`) is ``digest``."""
    return PREFIX + digest[:_HASH_CHARS]


def blob_name(account_id: str, ref: str, sha256: str) -> str:
    """Where the accessory of these bytes of preview ``ref`` lives in the blob store: its own, expiring with it."""
    return f"{BLOB_PREFIX}{account_id}/{ref}/{sha256}"


@dataclass(frozen=True)
class Preview:
    """A checked preview, not stored yet: its ref, what an invocation of it resolves to, and what storing writes."""

    account_id: str
    ref: str
    script: str
    accessories: dict[str, bytes]
    meta: dict[str, Any]  # its version's, as an upload's (accessory_objects naming its own blobs)
    workflow: ResolvedWorkflow  # what admission runs: the stored preview resolves to the same
    keep_seconds: int  # the lifetime of every key and blob storing it writes


class Previews:
    """Check and store previews of an account's scripts as hidden, expiring workflows (see the module's docstring)."""

    def __init__(self, workflows: Workflows, settings: Settings, ttl_seconds: int = TTL_SECONDS) -> None:
        self.workflows = workflows
        self.redis = workflows.redis
        self.settings = settings
        self.ttl_seconds = ttl_seconds

    def _keep_seconds(self, timeout_seconds: float | None) -> int:
        """How long the keys of a preview live: TTL_SECONDS, or past the latest its run can end.

        The worker reads the version when it starts the run, which may be
        queued for FLOWPOOL_QUEUE_WAIT_SECONDS first, and the run's record
        names the workflow while it goes.
        """
        settings = self.settings
        deadline = (settings.queue_wait_seconds + settings.clamp_timeout(timeout_seconds)
                    + settings.run_deadline_slack)
        return max(self.ttl_seconds, math.ceil(deadline) + 60)

    def prepare(self, account_id: str, script: str, accessories: dict[str, bytes] | None = None) -> Preview:
        """Check ``script`` and ``accessories`` as an upload does (the same 400s and 413s), writing nothing: the
        preview to admit a run of, and to :meth:`store` once it is queued."""
        accessories = accessories or {}
        digest, info = self.workflows.check_content(script, accessories)
        ref = preview_ref(digest)
        if accessories:
            self.workflows.require_blobs()
        objects = accessory_objects(accessories, lambda sha256: blob_name(account_id, ref, sha256))
        meta = version_meta(FIRST_VERSION, digest, info, Upload(ref=ref, script=script, accessories=accessories),
                            time.time(), objects)
        # No settings but the script's, and no revision (see the module's docstring).
        workflow = ResolvedWorkflow.of(account_id, ref, {}, meta, rev="")
        return Preview(account_id, ref, script, accessories, meta, workflow,
                       self._keep_seconds(meta.get("timeout_seconds")))

    def store(self, preview: Preview) -> None:
        """Store a prepared preview, or renew the lifetime of every key and blob of one stored already.

        Its blobs first, so the version that names them is never there
        without them. Storing the same content again changes nothing else, so
        previews of one script running at once do not see their workflow
        change under them.
        """
        account_id, ref, meta = preview.account_id, preview.ref, preview.meta
        blobs = self.workflows.blobs
        for key, obj in meta["accessory_objects"].items():
            assert blobs is not None, "prepare refuses accessories without a blob store"
            if not blobs.expire(obj["object"], preview.keep_seconds):  # not stored, or lapsed: store it
                blobs.put_expiring(obj["object"], preview.accessories[key], preview.keep_seconds)
        now = time.time()
        config: dict[str, Any] = {"ref": ref, "created_at": now, "updated_at": now, "preview": True}
        wf_key = keys.workflow(account_id, ref)
        with self.redis.pipeline() as pipe:  # MULTI: a preview's keys are there together, each with its TTL
            write_version(pipe, account_id, ref, meta, preview.script, now)
            pipe.hset(wf_key, mapping={"config": json.dumps(config), "active": FIRST_VERSION, "latest": FIRST_VERSION,
                                       "active_meta": json.dumps(meta)})
            # Its runs too: admitting this one wrote their index.
            for key in (wf_key, keys.version(account_id, ref, FIRST_VERSION), keys.versions(account_id, ref),
                        keys.version_hashes(account_id, ref), keys.workflow_runs(account_id, ref)):
                pipe.expire(key, preview.keep_seconds)
            pipe.execute()

    def expire_runs(self, account_id: str, ref: str) -> None:
        """Give the index of a preview's runs its lifetime where admitting a run wrote it and the preview was not
        stored after (storing failed): the lifetime left to the preview's own keys, else :data:`TTL_SECONDS`."""
        keep_ms = self.redis.pttl(keys.workflow(account_id, ref))
        self.redis.pexpire(keys.workflow_runs(account_id, ref), keep_ms if keep_ms > 0 else self.ttl_seconds * 1000)
