"""The SDK's workflow methods on both clients against the real stack: upload's fields, drafts, versions,
activate, validate and delete; and ``flowpool push --draft`` then ``flowpool activate``."""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

import flowpool
from tests.helpers import ECHO_WORKFLOW, Client, ok, run_flowpool

SECOND = ECHO_WORKFLOW + "\n# the second version\n"


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def test_upload_sends_booleans_lists_and_drafts_as_the_api_reads_them_and_answers_what_it_stored(
        client: Client) -> None:
    ref = _ref("fields")
    with flowpool.Flowpool(api_key=client.key, base_url=client.base_url, max_retries=0) as fp:
        first = fp.workflows.upload(ref, ECHO_WORKFLOW, allow_inproc_nesting=True, inproc_nested_refs=["a", "b"],
                                    version_bump=None)
        assert (first.id, first.workflow_ref_name, first.version_created) == (first.workflow.id, ref, True)
        assert first.published_version.version_number == first.version.version == "1.0.0"
        assert (first.workflow.allow_inproc_nesting, first.workflow.inproc_nested_refs) == (True, ["a", "b"])
        draft = fp.workflows.upload(ref, SECOND, draft=True)
        assert (draft.version.version, draft.version.draft, draft.version.active) == ("1.1.0", True, False)
        assert draft.published_version.version_number == "1.0.0"  # the live one is unchanged
        unpublished = fp.workflows.upload(ref, SECOND + "#\n", publish_version=False, version_bump="patch")
        assert (unpublished.version.version, unpublished.version.draft) == ("1.1.1", True)
        with pytest.raises(TypeError):
            fp.workflows.upload(ref, SECOND, draft=True, publish_version=True)


def test_versions_activate_validate_and_delete_work_on_both_clients(client: Client, tmp_path: Path) -> None:
    sync_ref, async_ref = _ref("sync"), _ref("async")
    (tmp_path / "bad.py").write_text("def execute(ctx):\n    return (\n")
    with flowpool.Flowpool(api_key=client.key, base_url=client.base_url, max_retries=0) as fp:
        fp.workflows.upload(sync_ref, ECHO_WORKFLOW)
        fp.workflows.upload(sync_ref, SECOND, draft=True)
        assert [(v.version, v.active) for v in fp.workflows.versions(sync_ref)] == [("1.0.0", True),
                                                                                  ("1.1.0", False)]
        assert fp.workflows.activate(sync_ref, "1.1.0").active_version == "1.1.0"
        assert fp.workflows.get(sync_ref).active_version == "1.1.0"
        assert fp.workflows.validate(ECHO_WORKFLOW).ok is True
        checked = fp.workflows.validate(tmp_path / "bad.py")
        assert checked.ok is False and checked.errors[0].line
        assert fp.workflows.delete(sync_ref).deleted is True
        with pytest.raises(flowpool.NotFoundError):
            fp.workflows.get(sync_ref)

    async def main() -> list[Any]:
        async with flowpool.AsyncFlowpool(api_key=client.key, base_url=client.base_url, max_retries=0) as afp:
            await afp.workflows.upload(async_ref, ECHO_WORKFLOW)
            await afp.workflows.upload(async_ref, SECOND, draft=True)
            versions = [v.version for v in await afp.workflows.versions(async_ref)]
            active = (await afp.workflows.activate(async_ref, "1.1.0")).active_version
            valid = (await afp.workflows.validate(ECHO_WORKFLOW)).ok
            deleted = (await afp.workflows.delete(async_ref)).deleted
            return [versions, active, valid, deleted]

    assert asyncio.run(main()) == [["1.0.0", "1.1.0"], "1.1.0", True, True]


def test_push_draft_says_to_run_flowpool_activate_which_publishes_the_draft(client: Client, tmp_path: Path) -> None:
    ref = _ref("cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    script = tmp_path / "workflow.py"
    script.write_text(ECHO_WORKFLOW)
    ok(run_flowpool("push", str(script), "--name", ref, env=env))
    script.write_text(SECOND)
    pushed = ok(run_flowpool("push", str(script), "--name", ref, "--draft", env=env))
    assert f"publish it with: flowpool activate {ref} 1.1.0" in pushed
    assert client.get(f"/api/v1/workflows/{ref}").json()["data"]["active_version"] == "1.0.0"
    assert ok(run_flowpool("activate", ref, "1.1.0", env=env)).strip() == f"{ref}@1.1.0 (active)"
    assert client.get(f"/api/v1/workflows/{ref}").json()["data"]["active_version"] == "1.1.0"
    missing = run_flowpool("activate", ref, "9.9.9", env=env)
    assert missing.returncode == 1 and "Error:" in missing.stderr
