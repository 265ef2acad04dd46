"""Previews: a script run once without an upload, stored as a hidden workflow that expires.

``POST /api/v1/workflows/preview`` (and ``flowpool run FILE``) stores the
script as a workflow of the account under a content-addressed ref,
:data:`PREFIX` followed by part of the hash of its script and accessories,
which no upload may take (:func:`.workflows.check_ref`). It has one version,
``1.0.0``, active; it is checked as an upload is (400s with line numbers) and
resolved and run as any workflow is, by the account's key alone (its keys
are the account's).

Unlike an upload's, it is not in the account's list of workflows, and every
key written for it expires: the workflow, its version, its version index and
content-hash index after :data:`TTL_SECONDS` (longer when its run may last
longer), renewed by each preview of the same content; the index of its runs,
which recording a run writes (``keys.workflow_runs``), once the run is
admitted (:meth:`Previews.expire_runs`). The run itself (record, events,
logs) expires as every run does.

Its accessories go to the blob store as an upload's do: content-addressed per
account and shared with the uploads that bundle the same bytes, so, as for a
deleted workflow, they are kept (:mod:`.accessories`).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

from flowpool import keys
from flowpool.settings import Settings

from .accessories import check_accessories
from .validation import validate_script
from .versions import FIRST_VERSION, Upload, content_hash, version_meta
from .workflows import PREVIEW_PREFIX, Workflows

__all__ = ["PREFIX", "TTL_SECONDS", "Previews", "is_preview_ref"]

PREFIX = PREVIEW_PREFIX  # no upload may take a ref that starts with it (check_ref)
TTL_SECONDS = 3600  # how long a preview stays after it was last stored, at the least
_HASH_CHARS = 40  # of the content hash's 64: 160 bits, and the ref stays within a name's 64 characters


def is_preview_ref(ref: str) -> bool:
    """Whether ``ref`` names a preview (a ref no upload may take)."""
    return ref.startswith(PREFIX)


def preview_ref(digest: str) -> str:
    """The ref of the preview of the content whose hash (:func:`.versions.content_hash`) is ``digest``."""
    return PREFIX + digest[:_HASH_CHARS]


class Previews:
    """Store previews of an account's scripts as hidden, expiring workflows (see the module's docstring)."""

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

    def store(self, account_id: str, script: str, accessories: dict[str, bytes] | None = None) -> str:
        """Check ``script`` and ``accessories`` as an upload does, store them as a preview, and return its ref.

        Storing the same content again renews its keys' lifetime and changes
        nothing else, so previews of one script running at once do not see
        their workflow change under them.
        """
        accessories = accessories or {}
        validation = validate_script(script, self.workflows.max_script_bytes)
        validation.raise_for_problems()
        check_accessories(accessories, self.workflows.accessories_max, self.workflows.accessory_max_bytes)
        digest = content_hash(script, accessories)
        ref = preview_ref(digest)
        objects = self.workflows._store_accessories(account_id, accessories)
        now = time.time()
        upload = Upload(ref=ref, script=script, accessories=accessories)
        meta = version_meta(FIRST_VERSION, digest, validation.info, upload, now, objects)
        config: dict[str, Any] = {"ref": ref, "created_at": now, "updated_at": now, "preview": True}
        keep_ms = self._keep_seconds(meta.get("timeout_seconds")) * 1000
        wf_key, version_key = keys.workflow(account_id, ref), keys.version(account_id, ref, FIRST_VERSION)
        versions_key, hashes_key = keys.versions(account_id, ref), keys.version_hashes(account_id, ref)
        with self.redis.pipeline() as pipe:  # MULTI: a preview's keys are there together, each with its TTL
            pipe.hset(version_key, mapping={"meta": json.dumps(meta), "script": script})
            pipe.zadd(versions_key, {FIRST_VERSION: now})
            pipe.hset(hashes_key, digest, FIRST_VERSION)
            # The revision is the content's: the same content stored again is the same workflow to a run
            # being admitted (RunStore.begin checks it), never a change under it.
            pipe.hset(wf_key, mapping={"config": json.dumps(config), "active": FIRST_VERSION, "latest": FIRST_VERSION,
                                       "active_meta": json.dumps(meta), "rev": digest})
            # Its runs so far too (their index exists once one was admitted).
            for key in (wf_key, version_key, versions_key, hashes_key, keys.workflow_runs(account_id, ref)):
                pipe.pexpire(key, keep_ms)
            pipe.execute()
        return ref

    def expire_runs(self, account_id: str, ref: str) -> None:
        """Give the index of a preview's runs its lifetime, once a run was admitted (recording it wrote the index
        without one): the lifetime left to the preview's own keys."""
        keep_ms = self.redis.pttl(keys.workflow(account_id, ref))
        self.redis.pexpire(keys.workflow_runs(account_id, ref), keep_ms if keep_ms > 0 else self.ttl_seconds * 1000)
