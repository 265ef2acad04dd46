"""The management API as the seed's (Maitai's) docs call it: its header, bodies and answer shapes, over HTTP
against the real stack (docs.trymaitai.com/api-reference/workflows/*)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.helpers import Client, error_of

UPLOAD = "/api/v1/workflows/upload"
CREATE = "/api/v1/workflows"
VALIDATE = "/api/v1/workflows/validate"

# The script of the seed's upload example, verbatim.
SEED_SCRIPT = "def execute(ctx):\n    return {'ok': True}"

SAYS = """
    CACHE_TTL_SECONDS = 0

    def execute(ctx):
        return {"says": "%s", "mode": ctx.env.get("MODE")}
"""
# The same with its answers cached (an hour), for what the cache keeps apart.
CACHED = SAYS.replace("CACHE_TTL_SECONDS = 0", "CACHE_TTL_SECONDS = 3600")


def _ref(name: str) -> str:
    """A workflow ref unique to this test run, so reruns on a shared Redis never collide."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _seed(client: Client) -> dict[str, str]:
    """The headers of the seed's cURL examples, with this account's key."""
    return {"Content-Type": "application/json", "X-Maitai-Api-Key": client.key}


def _post(client: Client, path: str, body: dict[str, Any]) -> requests.Response:
    """A POST sent as the seed sends it: X-Maitai-Api-Key, no x-api-key."""
    return requests.post(client.base_url + path, data=json.dumps(body), headers=_seed(client), timeout=30)


def _data(response: requests.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


def _says(script: str) -> str:
    return textwrap.dedent(SAYS % script)


def _invoke(client: Client, model: str) -> requests.Response:
    return client.post("/workflow/chat/completions", json={"model": model, "input": {}})


# 1. The header


def test_x_maitai_api_key_authenticates_management_and_invoke_routes(client: Client) -> None:
    ref = _ref("hdr")
    assert _post(client, UPLOAD, {"workflow_ref_name": ref, "script": SEED_SCRIPT}).status_code == 201
    listed = requests.get(client.base_url + "/api/v1/workflows", headers=_seed(client), timeout=30)
    assert listed.status_code == 200 and ref in [w["workflow_ref_name"] for w in listed.json()["data"]]
    invoked = _post(client, "/workflow/chat/completions", {"model": f"workflow:{ref}", "input": {}})
    assert invoked.status_code == 200 and invoked.json()["output"] == {"ok": True}


def test_a_wrong_x_maitai_api_key_is_a_401_as_for_x_api_key(client: Client) -> None:
    for header in ("X-Maitai-Api-Key", "x-api-key"):
        response = requests.get(client.base_url + "/api/v1/workflows", headers={header: "fp-not-a-key"}, timeout=30)
        assert response.status_code == 401, (header, response.text)
        assert error_of(response)["message"] == "unknown API key"  # read and refused, not taken as missing


def test_the_openapi_document_names_x_maitai_api_key_as_a_security_scheme(client: Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["maitaiApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-Maitai-Api-Key",
        "description": document["components"]["securitySchemes"]["maitaiApiKey"]["description"]}
    upload = document["paths"]["/api/v1/workflows/upload"]["post"]
    assert {"maitaiApiKey": []} in upload["security"]
    assert "publish_version" in document["components"]["schemas"]["UploadRequest"]["properties"]
    assert "post" in document["paths"]["/api/v1/workflows"]


# 2. The upload answer


def test_the_seed_upload_example_answers_with_the_documented_fields_beside_flowpools(client: Client) -> None:
    ref = _ref("hs_classification")
    body = {"workflow_ref_name": ref, "script": SEED_SCRIPT, "application_name": "HS Classification Workflow",
            "publish_version": True, "version_bump": "patch", "version_notes": "Initial release"}
    data = _data(_post(client, UPLOAD, body), 201)
    assert isinstance(data["id"], int) and not isinstance(data["id"], bool)
    assert data["workflow_ref_name"] == ref
    assert data["published_version"]["version_number"] == "1.0.0"
    assert data["published_version"]["notes"] == "Initial release"
    assert data["version_created"] is True
    assert data["created"] is True and data["version"]["version"] == "1.0.0"  # flowpool's own keys stay
    assert data["workflow"]["id"] == data["id"] and data["workflow"]["active_version"] == "1.0.0"


def test_the_workflow_id_is_allocated_once_and_kept_by_later_uploads(client: Client) -> None:
    first, second = _ref("ids-a"), _ref("ids-b")
    a1 = _data(_post(client, UPLOAD, {"workflow_ref_name": first, "script": _says("one")}), 201)
    b1 = _data(_post(client, UPLOAD, {"workflow_ref_name": second, "script": _says("one")}), 201)
    a2 = _data(_post(client, UPLOAD, {"workflow_ref_name": first, "script": _says("two")}), 201)
    a3 = _data(_post(client, UPLOAD, {"workflow_ref_name": first, "script": _says("two")}), 200)
    assert a1["id"] == a2["id"] == a3["id"] != b1["id"]
    assert a3["version_created"] is False and a3["published_version"]["version_number"] == "1.1.0"
    assert _data(client.get(f"/api/v1/workflows/{first}"))["id"] == a1["id"]
    listed = {w["workflow_ref_name"]: w["id"] for w in _data(client.get("/api/v1/workflows?limit=100"))}
    assert listed[first] == a1["id"] and listed[second] == b1["id"]


def test_a_workflow_stored_before_ids_gets_one_when_first_read_and_keeps_it(client: Client, stack_db: Any) -> None:
    ref = _ref("old")
    before = client.upload(ref, _says("one"))["id"]
    [key] = [k for k in stack_db.scan_iter(f"fp:a:*:wf:{ref}") if not k.endswith(b":versions")]
    stack_db.hdel(key, "id")  # as a workflow written before ids were
    listed = {w["workflow_ref_name"]: w["id"] for w in _data(client.get("/api/v1/workflows?limit=100"))}
    given = listed[ref]
    assert isinstance(given, int) and not isinstance(given, bool) and given != before
    assert _data(client.get(f"/api/v1/workflows/{ref}"))["id"] == given
    again = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("one")}), 200)
    assert again["id"] == given


# 3. The version_bump default


def test_version_bump_defaults_to_minor_and_the_first_version_stays_1_0_0(client: Client) -> None:
    ref = _ref("bump")
    first = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("one")}), 201)
    second = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("two")}), 201)
    patched = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("three"),
                                           "version_bump": "patch"}), 201)
    assert [d["published_version"]["version_number"] for d in (first, second, patched)] == ["1.0.0", "1.1.0", "1.1.1"]


def test_push_without_bump_leaves_it_to_the_server_and_push_draft_stores_a_draft(client: Client,
                                                                                  tmp_path: Path) -> None:
    ref, script = _ref("cli"), tmp_path / "wf.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPOOL_", "MAITAI_"))}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)

    def push(word: str, *args: str) -> str:
        script.write_text(_says(word))
        done = subprocess.run([sys.executable, "-m", "flowpool.cli", "push", str(script), "--name", ref, *args],
                              env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert push("one") == f"{ref}@1.0.0 (new version)"
    assert push("two") == f"{ref}@1.1.0 (new version)"
    assert push("three", "--draft") == f"{ref}@1.2.0 (new draft: publish it with: flowpool activate {ref} 1.2.0)"
    assert _data(client.get(f"/api/v1/workflows/{ref}"))["active_version"] == "1.1.0"


# 4. Drafts


def test_publish_version_false_stores_a_draft_that_is_not_active(client: Client) -> None:
    ref = _ref("draft")
    client.upload(ref, _says("live"), timeout_seconds=30, env={"MODE": "live"})
    data = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("draft"), "publish_version": False,
                                        "timeout_seconds": 5, "env": {"MODE": "draft"}, "description": "next"}), 201)
    assert data["version_created"] is True and data["version"]["version"] == "1.1.0"
    assert data["version"]["draft"] is True and data["version"]["active"] is False
    assert data["published_version"]["version_number"] == "1.0.0"
    workflow = _data(client.get(f"/api/v1/workflows/{ref}"))
    assert workflow["active_version"] == "1.0.0" and workflow["timeout_seconds"] == 30
    assert workflow["description"] is None  # the draft's settings wait for its activation
    versions = _data(client.get(f"/api/v1/workflows/{ref}/versions"))
    assert [(v["version"], v["active"], v["draft"]) for v in versions] == [("1.0.0", True, False),
                                                                            ("1.1.0", False, True)]
    live = _invoke(client, f"workflow:{ref}")
    assert live.status_code == 200 and live.json()["output"] == {"says": "live", "mode": "live"}
    # Pinned, the draft runs with its own settings, as it will once published.
    pinned = _invoke(client, f"workflow:{ref}@1.1.0")
    assert pinned.status_code == 200 and pinned.json()["output"] == {"says": "draft", "mode": "draft"}


def test_a_pinned_draft_run_is_cached_apart_from_the_live_version(client: Client) -> None:
    ref = _ref("draft-cache")
    client.upload(ref, CACHED % "live", env={"MODE": "same"})  # the same env: only the content tells them apart
    _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": textwrap.dedent(CACHED % "draft"),
                                 "publish_version": False}), 201)
    first, again = (_invoke(client, f"workflow:{ref}@1.1.0") for _ in range(2))
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("MISS", "HIT")  # the cache is on
    live = _invoke(client, f"workflow:{ref}")
    assert live.headers["X-Cache"] == "MISS"  # the same request, live: not the draft's entry
    assert live.json()["output"] == {"says": "live", "mode": "same"} != again.json()["output"]


def test_activate_publishes_a_draft_with_its_settings(client: Client) -> None:
    ref = _ref("publish")
    client.upload(ref, _says("live"), timeout_seconds=30)
    _post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("draft"), "publish_version": False,
                           "timeout_seconds": 5, "description": "next", "env": {"MODE": "draft"}})
    activated = _data(_post(client, f"/api/v1/workflows/{ref}/activate", {"version": "1.1.0"}))
    assert activated["active_version"] == "1.1.0" and activated["timeout_seconds"] == 5
    assert activated["description"] == "next"
    versions = _data(client.get(f"/api/v1/workflows/{ref}/versions"))
    assert [(v["version"], v["active"], v["draft"]) for v in versions] == [("1.0.0", False, False),
                                                                            ("1.1.0", True, False)]
    assert _invoke(client, f"workflow:{ref}").json()["output"] == {"says": "draft", "mode": "draft"}


def test_a_workflow_first_uploaded_as_a_draft_has_no_active_version_and_says_how_to_publish(client: Client) -> None:
    ref = _ref("only-draft")
    data = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("draft"),
                                        "publish_version": False}), 201)
    assert data["published_version"] is None and isinstance(data["id"], int)
    assert _data(client.get(f"/api/v1/workflows/{ref}"))["active_version"] is None
    response = _invoke(client, f"workflow:{ref}")
    assert response.status_code == 404
    assert error_of(response)["message"] == (f"workflow {ref} has no published version: activate one with "
                                             f"POST /api/v1/workflows/{ref}/activate")
    assert _invoke(client, f"workflow:{ref}@1.0.0").json()["output"]["says"] == "draft"
    _data(_post(client, f"/api/v1/workflows/{ref}/activate", {"version": "1.0.0"}))
    assert _invoke(client, f"workflow:{ref}").json()["output"]["says"] == "draft"


def test_a_draft_upload_of_a_published_versions_content_is_a_409_that_changes_nothing(client: Client) -> None:
    ref = _ref("same")
    client.upload(ref, _says("one"), timeout_seconds=30)
    client.upload(ref, _says("two"))
    response = _post(client, UPLOAD, {"workflow_ref_name": ref, "script": _says("one"), "publish_version": False,
                                      "timeout_seconds": 5})
    assert response.status_code == 409, response.text
    error = error_of(response)
    assert error["type"] == "conflict" and error["version"] == "1.0.0"
    assert "version 1.0.0" in error["message"] and "publish_version true" in error["message"]
    workflow = _data(client.get(f"/api/v1/workflows/{ref}"))
    assert workflow["active_version"] == "1.1.0" and workflow["timeout_seconds"] == 30


def test_a_draft_uploaded_again_with_new_settings_runs_pinned_with_them(client: Client) -> None:
    ref = _ref("redraft")
    client.upload(ref, _says("live"))
    body = {"workflow_ref_name": ref, "script": _says("draft"), "publish_version": False}
    assert _data(_post(client, UPLOAD, {**body, "env": {"MODE": "v1"}, "description": "next"}), 201)
    again = _data(_post(client, UPLOAD, {**body, "env": {"MODE": "v2-fixed"}, "timeout_seconds": 7}), 200)
    assert again["version_created"] is False and again["version"]["draft"] is True
    assert _invoke(client, f"workflow:{ref}@1.1.0").json()["output"] == {"says": "draft", "mode": "v2-fixed"}
    activated = _data(_post(client, f"/api/v1/workflows/{ref}/activate", {"version": "1.1.0"}))
    assert (activated["timeout_seconds"], activated["description"]) == (7, "next")  # both uploads' fields


def test_multipart_publish_version_false_stores_a_draft(client: Client) -> None:
    ref = _ref("mp-draft")
    client.upload(ref, _says("live"))
    response = requests.post(client.base_url + UPLOAD, headers={"X-Maitai-Api-Key": client.key}, timeout=30,
                             data={"workflow_ref_name": ref, "publish_version": "false"},
                             files={"file": ("w.py", _says("draft").encode())})
    assert _data(response, 201)["version"]["draft"] is True
    assert _data(client.get(f"/api/v1/workflows/{ref}"))["active_version"] == "1.0.0"


# 5. Multipart script fields


def test_multipart_takes_the_script_as_script_file_workflow_file_or_file(client: Client) -> None:
    ref = _ref("mp")
    for number, name in enumerate(("script_file", "workflow_file", "file")):
        response = requests.post(client.base_url + UPLOAD, headers={"X-Maitai-Api-Key": client.key}, timeout=30,
                                 data={"workflow_ref_name": ref}, files={name: ("w.py", _says(name).encode())})
        assert _data(response, 201)["version"]["version"] == f"1.{number}.0", name
        assert _invoke(client, f"workflow:{ref}").json()["output"]["says"] == name


def test_multipart_with_two_script_fields_is_a_400_naming_both(client: Client) -> None:
    response = requests.post(client.base_url + UPLOAD, headers={"X-Maitai-Api-Key": client.key}, timeout=30,
                             data={"workflow_ref_name": _ref("two")},
                             files={"workflow_file": ("a.py", _says("a").encode()),
                                    "file": ("b.py", _says("b").encode())})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "(workflow_file and file)" in message


# 6. application_name


def test_application_name_the_account_lacks_creates_an_empty_application(client: Client) -> None:
    ref, app = _ref("binds"), f"Support {uuid.uuid4().hex[:6]}"
    client.upload(ref, """
        def execute(ctx):
            return ctx.chat.completions.create(intent="answer", messages=[{"role": "user", "content": "hi"}])
    """, application_name=app)
    got = client.get("/api/v1/applications/" + requests.utils.quote(app))
    assert got.status_code == 200 and got.json()["data"]["intents"] == {}
    response = _invoke(client, f"workflow:{ref}")
    assert response.status_code == 500
    assert "PUT /api/v1/applications/" in error_of(response)["message"]


def test_delete_removes_an_application_an_upload_created_and_a_missing_one_is_a_404(client: Client) -> None:
    app = f"Suport {uuid.uuid4().hex[:6]}"  # misspelt, as a name in an upload may be
    client.upload(_ref("typo"), SEED_SCRIPT, application_name=app)
    path = "/api/v1/applications/" + requests.utils.quote(app)
    assert client.get(path).status_code == 200
    deleted = client.request("DELETE", path)
    assert deleted.status_code == 200 and deleted.json()["data"] == {"name": app, "deleted": True}
    assert client.get(path).status_code == 404
    assert client.request("DELETE", path).status_code == 404


def test_application_name_of_an_existing_application_leaves_it_as_it_is(client: Client) -> None:
    app = f"kept-{uuid.uuid4().hex[:6]}"
    intents = {"answer": {"model": "m", "base_url": "http://127.0.0.1:9/v1"}}
    assert client.request("PUT", f"/api/v1/applications/{app}", json={"intents": intents}).status_code == 201
    client.upload(_ref("binds"), SEED_SCRIPT, application_name=app)
    assert client.get(f"/api/v1/applications/{app}").json()["data"]["intents"]["answer"]["model"] == "m"


# 7. workflow_name, execution_mode, nesting, application_id


def test_workflow_name_execution_mode_and_nesting_fields_are_stored_and_shown(client: Client) -> None:
    ref = _ref("named")
    plain = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": SEED_SCRIPT}), 201)
    assert plain["workflow"]["workflow_name"] == ref and plain["workflow"]["execution_mode"] == "sync"
    data = _data(_post(client, UPLOAD, {"workflow_ref_name": ref, "script": SEED_SCRIPT, "workflow_name": "HS Class",
                                        "execution_mode": "stream", "allow_inproc_nesting": True,
                                        "inproc_nested_refs": ["child-a"]}), 200)
    assert data["workflow_name"] == "HS Class"
    shown = _data(client.get(f"/api/v1/workflows/{ref}"))
    assert (shown["workflow_name"], shown["execution_mode"]) == ("HS Class", "stream")
    assert shown["allow_inproc_nesting"] is True and shown["inproc_nested_refs"] == ["child-a"]


def test_an_unknown_execution_mode_is_a_400_naming_the_allowed_ones(client: Client) -> None:
    response = _post(client, UPLOAD, {"workflow_ref_name": _ref("mode"), "script": SEED_SCRIPT,
                                      "execution_mode": "batch"})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "execution_mode" in message and all(mode in message for mode in ("sync", "async", "stream"))


def test_application_id_is_a_400_saying_to_send_application_name(client: Client) -> None:
    response = _post(client, UPLOAD, {"workflow_ref_name": _ref("appid"), "script": SEED_SCRIPT,
                                      "application_id": 42})
    assert response.status_code == 400
    assert "application_id" in error_of(response)["message"] and "application_name" in error_of(response)["message"]


# 8. validate's kind


def test_validate_takes_the_seeds_kind_execute_and_bundle_and_refuses_transform_and_schema(client: Client) -> None:
    for kind in ("execute", "bundle"):
        data = _data(_post(client, VALIDATE, {"code": SEED_SCRIPT, "kind": kind}))
        assert data == {"ok": True, "errors": []}, kind
    for kind in ("transform", "schema"):
        response = _post(client, VALIDATE, {"code": "def transform_session(session): return session", "kind": kind})
        assert response.status_code == 400, kind
        assert "flowpool does not have" in error_of(response)["message"]


# 9. POST /api/v1/workflows


def test_post_workflows_creates_a_workflow_as_an_upload_does(client: Client) -> None:
    ref = _ref("created")
    data = _data(_post(client, CREATE, {"workflow_ref_name": ref, "script": SEED_SCRIPT, "workflow_name": "Made",
                                        "execution_mode": "sync"}), 201)
    assert data["workflow_ref_name"] == ref and data["published_version"]["version_number"] == "1.0.0"
    assert _invoke(client, f"workflow:{ref}").json()["output"] == {"ok": True}


def test_post_workflows_with_the_seeds_transform_fields_is_a_400_naming_them(client: Client) -> None:
    # The seed's "Create workflow" example, verbatim but for its ref and a script flowpool runs.
    response = _post(client, CREATE, {
        "workflow_ref_name": _ref("hs_classification"), "script": SEED_SCRIPT, "workflow_name": "HS Classification",
        "execution_mode": "sync", "transform_enabled": True,
        "transform_session": "def transform_session(session): return session"})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert "transform_enabled" in message and "transform_session" in message
