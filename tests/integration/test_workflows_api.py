"""The workflow management API (``/api/v1/workflows``) over HTTP against the real stack."""
from __future__ import annotations

import base64
import json
import textwrap
import uuid
from typing import Any

import pytest
import requests

from flowpool.devstack import Stack
from tests.helpers import Client, error_of

UPLOAD = "/api/v1/workflows/upload"
VALIDATE = "/api/v1/workflows/validate"

GREETER = """
    from flowpool_workflow import WorkflowContext

    INPUT_SCHEMA = {
        "name": {"type": "string", "description": "Who to greet", "required": True},
        "excited": {"type": "boolean"},
    }
    OUTPUT_SCHEMA = {"greeting": {"type": "string", "required": True}}
    TIMEOUT_SECONDS = 20
    CACHE_TTL_SECONDS = 0

    def execute(ctx: WorkflowContext):
        mark = "!" if ctx.input.get("excited") else "."
        return {"greeting": "hello " + ctx.input["name"] + mark}
"""

SAYS = """
    CACHE_TTL_SECONDS = 0

    def execute(ctx):
        return {"says": "%s"}
"""


def _ref(name: str) -> str:
    """A workflow ref unique to this test run, so reruns on a shared Redis never collide."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _data(response: requests.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _says(client: Client, ref: str, **body: Any) -> str:
    response = client.invoke(ref, input={}, **body)
    assert response.status_code == 200, response.text
    return response.json()["output"]["says"]


@pytest.fixture
def other(stack: Stack) -> Client:
    """A second account on the same stack."""
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))


# Upload


def test_json_upload_creates_version_1_0_0_with_201(client: Client) -> None:
    ref = _ref("greeter")
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": textwrap.dedent(GREETER),
                                         "description": "says hello", "version_notes": "first"})
    data = _data(response, 201)
    assert data["created"] is True
    assert data["version"]["version"] == "1.0.0"
    assert data["version"]["notes"] == "first"
    assert data["workflow"]["workflow_ref_name"] == ref
    assert data["workflow"]["active_version"] == "1.0.0"
    assert data["workflow"]["description"] == "says hello"
    invoked = client.invoke(ref, input={"name": "ada", "excited": True})
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["output"] == {"greeting": "hello ada!"}


def test_identical_reupload_is_200_with_created_false_and_the_same_version(client: Client) -> None:
    ref = _ref("same")
    body = {"workflow_ref_name": ref, "script": textwrap.dedent(GREETER)}
    first = _data(client.post(UPLOAD, json=body), 201)
    again = _data(client.post(UPLOAD, json=body), 200)
    assert again["created"] is False
    assert again["version"]["version"] == first["version"]["version"] == "1.0.0"
    assert again["version"]["content_hash"] == first["version"]["content_hash"]
    versions = client.get(f"/api/v1/workflows/{ref}/versions").json()
    assert versions["pagination"]["total"] == 1


def test_reupload_changing_only_settings_keeps_the_version_and_updates_the_settings(client: Client) -> None:
    ref = _ref("settings-only")
    client.upload(ref, GREETER, description="before", timeout_seconds=5)
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": textwrap.dedent(GREETER),
                                         "description": "after", "timeout_seconds": 9})
    data = _data(response, 200)
    assert data["created"] is False and data["version"]["version"] == "1.0.0"
    assert data["workflow"]["description"] == "after"
    assert _data(client.get(f"/api/v1/workflows/{ref}"))["timeout_seconds"] == 9


def test_changed_script_creates_the_next_minor_version(client: Client) -> None:
    ref = _ref("changes")
    assert client.upload(ref, SAYS % "one")["version"]["version"] == "1.0.0"
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": textwrap.dedent(SAYS % "two")})
    data = _data(response, 201)
    assert data["created"] is True
    assert data["version"]["version"] == "1.1.0"
    assert data["workflow"]["active_version"] == "1.1.0"
    assert _says(client, ref) == "two"


def test_version_bump_major_minor_and_patch(client: Client) -> None:
    ref = _ref("bumps")
    seen = [client.upload(ref, SAYS % "v0")["version"]["version"]]
    for i, bump in enumerate(["minor", "patch", "major", "patch", "minor"], start=1):
        seen.append(client.upload(ref, SAYS % f"v{i}", version_bump=bump)["version"]["version"])
    assert seen == ["1.0.0", "1.1.0", "1.1.1", "2.0.0", "2.0.1", "2.1.0"]


def test_unknown_version_bump_is_400(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("bad-bump"), "script": textwrap.dedent(SAYS % "x"),
                                         "version_bump": "huge"})
    assert response.status_code == 400
    assert "version_bump" in error_of(response)["message"]


def test_multipart_upload_with_script_file_and_accessory_files(client: Client) -> None:
    ref = _ref("multipart")
    prompts = json.dumps({"system": "be brief"}).encode()
    response = client.post(UPLOAD, data={"workflow_ref_name": ref, "description": "from a form",
                                         "timeout_seconds": "7", "env": json.dumps({"MODE": "fast"})},
                           files={"script_file": ("greeter.py", textwrap.dedent(GREETER).encode(), "text/x-python"),
                                  "accessory_prompts": ("prompts.json", prompts, "application/json"),
                                  "accessory_labels": ("labels.json", b'["a", "b"]', "application/json")})
    data = _data(response, 201)
    assert data["created"] is True
    assert data["version"]["version"] == "1.0.0"
    assert data["version"]["accessories"] == ["labels", "prompts"]
    workflow = data["workflow"]
    assert workflow["description"] == "from a form"
    assert workflow["timeout_seconds"] == 7
    assert workflow["env_keys"] == ["MODE"]
    invoked = client.invoke(ref, input={"name": "form"})
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["output"] == {"greeting": "hello form."}


def test_multipart_reupload_is_new_only_when_an_accessory_changes(client: Client) -> None:
    ref = _ref("multipart-acc")
    script = textwrap.dedent(GREETER).encode()

    def upload(labels: bytes) -> requests.Response:
        return client.post(UPLOAD, data={"workflow_ref_name": ref},
                           files={"script_file": ("wf.py", script), "accessory_labels": ("labels.json", labels)})

    assert _data(upload(b'["a"]'), 201)["version"]["version"] == "1.0.0"
    same = _data(upload(b'["a"]'), 200)
    assert same["created"] is False and same["version"]["version"] == "1.0.0"
    changed = _data(upload(b'["a", "b"]'), 201)
    assert changed["created"] is True and changed["version"]["version"] == "1.1.0"


def test_multipart_upload_without_script_file_is_400(client: Client) -> None:
    response = client.post(UPLOAD, data={"workflow_ref_name": _ref("no-file")},
                           files={"accessory_labels": ("labels.json", b"[]")})
    assert response.status_code == 400, response.text
    assert "script" in error_of(response)["message"]


def test_json_upload_with_accessories(client: Client) -> None:
    ref = _ref("json-acc")
    data = client.upload(ref, GREETER, accessories=[{"key": "config", "content_base64": _b64(b'{"k": 1}')}])
    assert data["version"]["accessories"] == ["config"]


@pytest.mark.parametrize("content", [b"not json at all", b'{"unclosed": ', b"\xff\xfe"],
                         ids=["text", "truncated", "binary"])
def test_accessory_that_is_not_json_is_400(client: Client, content: bytes) -> None:
    ref = _ref("bad-acc")
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": textwrap.dedent(GREETER),
                                         "accessories": [{"key": "data", "content_base64": _b64(content)}]})
    assert response.status_code == 400, response.text
    assert "'data'" in error_of(response)["message"]
    assert client.get(f"/api/v1/workflows/{ref}").status_code == 404


def test_multipart_accessory_that_is_not_json_is_400(client: Client) -> None:
    ref = _ref("bad-acc-form")
    response = client.post(UPLOAD, data={"workflow_ref_name": ref},
                           files={"script_file": ("wf.py", textwrap.dedent(GREETER).encode()),
                                  "accessory_notes": ("notes.txt", b"plain words")})
    assert response.status_code == 400, response.text
    assert "'notes'" in error_of(response)["message"]
    assert client.get(f"/api/v1/workflows/{ref}").status_code == 404


def test_accessory_that_is_not_base64_is_400(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("not-b64"), "script": textwrap.dedent(GREETER),
                                         "accessories": [{"key": "data", "content_base64": "%%% not base64 %%%"}]})
    assert response.status_code == 400
    assert "base64" in error_of(response)["message"]


def test_accessory_with_a_bad_key_is_400(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("bad-key"), "script": textwrap.dedent(GREETER),
                                         "accessories": [{"key": "../etc/passwd", "content_base64": _b64(b"{}")}]})
    assert response.status_code == 400
    error_of(response)


@pytest.mark.parametrize("ref", ["", "-leading-dash", ".hidden", "has space", "slash/name", "a" * 65, "ünïcode",
                                 "semi;colon", "colon:name", "trailing-newline\n", "default-script", "upload",
                                 "validate"])
def test_invalid_ref_name_is_400(client: Client, ref: str) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": textwrap.dedent(GREETER)})
    assert response.status_code == 400, response.text
    assert "workflow_ref_name" in error_of(response)["message"]


def test_longest_valid_ref_name_is_accepted(client: Client) -> None:
    ref = "a" + uuid.uuid4().hex[:6] + "_.-" + "z" * 54
    assert len(ref) == 64
    assert client.upload(ref, SAYS % "long")["workflow"]["workflow_ref_name"] == ref
    assert _says(client, ref) == "long"


@pytest.mark.parametrize("body, field", [
    ({"script": "def execute(ctx):\n    return 1\n"}, "workflow_ref_name"),
    ({"workflow_ref_name": "no-script"}, "script"),
    ({"workflow_ref_name": "empty-script", "script": ""}, "script"),
    ({"workflow_ref_name": "neg-timeout", "script": "def execute(ctx):\n    return 1\n", "timeout_seconds": -1},
     "timeout_seconds"),
    ({"workflow_ref_name": "bad-env", "script": "def execute(ctx):\n    return 1\n", "env": {"A": 1}}, "env"),
], ids=["no-ref", "no-script", "empty-script", "negative-timeout", "env-not-strings"])
def test_upload_with_a_bad_field_is_400_naming_it(client: Client, body: dict[str, Any], field: str) -> None:
    response = client.post(UPLOAD, json=body)
    assert response.status_code == 400, response.text
    assert field in error_of(response)["message"]


def test_upload_of_malformed_json_is_400(client: Client) -> None:
    response = client.post(UPLOAD, data=b'{"workflow_ref_name": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error_of(response)


def test_upload_ignores_unknown_fields(client: Client) -> None:
    ref = _ref("extra-fields")
    data = client.upload(ref, SAYS % "x", colour="blue", tags=["a"])
    assert data["created"] is True


def test_upload_breaking_the_rules_is_400_listing_each_problem_with_its_line(client: Client) -> None:
    script = textwrap.dedent("""\
        from flowpool_workflow import WorkflowContext

        OUTPUT_SCHEMA = {"answer": {"type": "text"}}

        async def execute(ctx: WorkflowContext):
            return
    """)
    ref = _ref("breaks-rules")
    response = client.post(UPLOAD, json={"workflow_ref_name": ref, "script": script})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "script_validation_error"
    lines = [problem["line"] for problem in error["errors"]]
    assert lines == sorted(lines)
    assert set(lines) == {3, 5, 6}
    assert all(isinstance(problem["message"], str) and problem["message"] for problem in error["errors"])
    assert client.get(f"/api/v1/workflows/{ref}").status_code == 404


def test_upload_of_a_script_that_does_not_compile_is_400(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("syntax"),
                                         "script": "def execute(ctx):\n    return (1,\n"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "script_validation_error"
    assert error["errors"][0]["line"] == 2


# Validate


GOOD = """\
from flowpool_workflow import WorkflowContext

INPUT_SCHEMA = {"query": {"type": "string", "required": True}}


def helper(text):
    return text.upper()


def execute(ctx: WorkflowContext):
    return {"answer": helper(ctx.input["query"])}
"""

BAD_SCRIPTS = {
    "async-def": ("from flowpool_workflow import WorkflowContext\n\n\n"
                  "async def execute(ctx: WorkflowContext):\n    return {'a': 1}\n", 4, "async"),
    "bare-return": ("def execute(ctx):\n    if ctx.input:\n        return {'a': 1}\n    return\n", 4, "return"),
    "return-none": ("def execute(ctx):\n    x = 1\n    return None\n", 3, "return None"),
    "missing-execute": ("def run(ctx):\n    return 1\n", 1, "execute"),
    "two-parameters": ("def execute(ctx, extra):\n    return 1\n", 1, "one parameter"),
    "context-not-imported": ("import json\n\n\ndef execute(ctx: WorkflowContext):\n    return json.dumps({})\n", 4,
                             "WorkflowContext"),
    "syntax-error": ("import json\n\ndef execute(ctx):\n    return {'a': 1\n", 4, ""),
    "bad-schema-type": ('INPUT_SCHEMA = {\n    "query": {"type": "string"},\n    "count": {"type": "int"},\n}\n\n'
                        "def execute(ctx):\n    return 1\n", 3, "'count'"),
}


def test_validate_accepts_a_good_script(client: Client) -> None:
    data = _data(client.post(VALIDATE, json={"code": GOOD}))
    assert data == {"ok": True, "errors": []}


@pytest.mark.parametrize("name", sorted(BAD_SCRIPTS))
def test_validate_reports_a_broken_rule_with_its_line(client: Client, name: str) -> None:
    code, line, says = BAD_SCRIPTS[name]
    data = _data(client.post(VALIDATE, json={"code": code}))
    assert data["ok"] is False
    assert [set(problem) for problem in data["errors"]] == [{"line", "message"}] * len(data["errors"])
    assert line in [problem["line"] for problem in data["errors"]], data
    assert any(says in problem["message"] for problem in data["errors"]), data


def test_validate_reports_every_problem_in_line_order(client: Client) -> None:
    code = ('OUTPUT_SCHEMA = {"a": {"type": "float"}}\n\n'
            "async def execute(ctx: WorkflowContext):\n    return\n")
    data = _data(client.post(VALIDATE, json={"code": code}))
    lines = [problem["line"] for problem in data["errors"]]
    assert lines == sorted(lines)
    assert {1, 3, 4} <= set(lines)


def test_validate_without_code_is_400(client: Client) -> None:
    response = client.post(VALIDATE, json={"script": GOOD})
    assert response.status_code == 400
    assert "code" in error_of(response)["message"]


# Default script


def test_default_script_validates_and_runs(client: Client) -> None:
    script = _data(client.get("/api/v1/workflows/default-script"))["script"]
    assert _data(client.post(VALIDATE, json={"code": script})) == {"ok": True, "errors": []}
    ref = _ref("starter")
    uploaded = client.upload(ref, script)
    schema = uploaded["workflow"]["input_schema"]
    required = [name for name, spec in schema.items() if spec.get("required")]
    assert all(schema[name]["type"] == "string" for name in required)
    response = client.invoke(ref, input={name: "hello flowpool" for name in required})
    assert response.status_code == 200, response.text
    assert response.json()["output"]


# List, get, versions


def test_list_paginates_the_accounts_workflows(client: Client) -> None:
    refs = [_ref(f"listed-{i}") for i in range(3)]
    for ref in refs:
        client.upload(ref, SAYS % ref)
    page = client.get("/api/v1/workflows", params={"limit": 2})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["pagination"] == {"total": 3, "offset": 0, "limit": 2}
    assert [w["workflow_ref_name"] for w in body["data"]] == refs[:2]
    rest = client.get("/api/v1/workflows", params={"offset": 2, "limit": 2}).json()
    assert rest["pagination"] == {"total": 3, "offset": 2, "limit": 2}
    assert [w["workflow_ref_name"] for w in rest["data"]] == refs[2:]
    everything = client.get("/api/v1/workflows").json()
    assert everything["pagination"] == {"total": 3, "offset": 0, "limit": 25}
    assert [w["workflow_ref_name"] for w in everything["data"]] == refs
    past_the_end = client.get("/api/v1/workflows", params={"offset": 10}).json()
    assert past_the_end["data"] == [] and past_the_end["pagination"]["total"] == 3
    assert client.get("/api/v1/workflows", params={"limit": 100}).status_code == 200


@pytest.mark.parametrize("params", [{"limit": 101}, {"offset": -1}, {"limit": 0}, {"limit": -5}, {"offset": "x"}],
                         ids=["limit-over-100", "negative-offset", "zero-limit", "negative-limit", "offset-not-int"])
def test_list_with_bad_page_arguments_is_400(client: Client, params: dict[str, Any]) -> None:
    response = client.get("/api/v1/workflows", params=params)
    assert response.status_code == 400
    assert next(iter(params)) in error_of(response)["message"]


def test_get_shows_the_schemas_and_settings(client: Client) -> None:
    ref = _ref("shown")
    client.upload(ref, GREETER, description="greets", timeout_seconds=5, env={"TONE": "warm"})
    workflow = _data(client.get(f"/api/v1/workflows/{ref}"))
    assert workflow["workflow_ref_name"] == ref
    assert workflow["active_version"] == "1.0.0"
    assert workflow["description"] == "greets"
    assert workflow["input_schema"] == {
        "name": {"type": "string", "description": "Who to greet", "required": True},
        "excited": {"type": "boolean"},
    }
    assert workflow["output_schema"] == {"greeting": {"type": "string", "required": True}}
    assert workflow["timeout_seconds"] == 5  # the upload field wins over TIMEOUT_SECONDS
    assert workflow["cache_ttl_seconds"] == 0
    assert workflow["env_keys"] == ["TONE"]
    assert "warm" not in json.dumps(workflow)


def test_get_of_an_unknown_workflow_is_404(client: Client) -> None:
    response = client.get("/api/v1/workflows/never-uploaded")
    assert response.status_code == 404
    assert error_of(response)["type"] == "invalid_request_error"


def test_versions_lists_every_version_with_the_active_flag(client: Client) -> None:
    ref = _ref("versions")
    for word in ("one", "two", "three"):
        client.upload(ref, SAYS % word, version_notes=f"says {word}")
    body = client.get(f"/api/v1/workflows/{ref}/versions").json()
    assert body["pagination"] == {"total": 3, "offset": 0, "limit": 25}
    assert [(v["version"], v["active"], v["notes"]) for v in body["data"]] == [
        ("1.0.0", False, "says one"), ("1.1.0", False, "says two"), ("1.2.0", True, "says three")]
    assert len({v["content_hash"] for v in body["data"]}) == 3
    page = client.get(f"/api/v1/workflows/{ref}/versions", params={"offset": 1, "limit": 1}).json()
    assert [v["version"] for v in page["data"]] == ["1.1.0"]


# Activate (rollback)


def test_activate_rolls_back_to_an_older_version(client: Client) -> None:
    ref = _ref("rollback")
    client.upload(ref, SAYS % "old")
    client.upload(ref, SAYS % "new")
    assert _says(client, ref) == "new"
    workflow = _data(client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "1.0.0"}))
    assert workflow["active_version"] == "1.0.0"
    assert _says(client, ref) == "old"
    versions = client.get(f"/api/v1/workflows/{ref}/versions").json()["data"]
    assert [(v["version"], v["active"]) for v in versions] == [("1.0.0", True), ("1.1.0", False)]
    # rolling forward again
    _data(client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "1.1.0"}))
    assert _says(client, ref) == "new"


def test_upload_after_a_rollback_continues_from_the_latest_version(client: Client) -> None:
    ref = _ref("after-rollback")
    client.upload(ref, SAYS % "a")
    client.upload(ref, SAYS % "b")
    _data(client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "1.0.0"}))
    data = client.upload(ref, SAYS % "c")
    assert data["version"]["version"] == "1.2.0"
    assert _says(client, ref) == "c"


def test_activate_an_unknown_version_is_404(client: Client) -> None:
    ref = _ref("activate-unknown")
    client.upload(ref, SAYS % "only")
    response = client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "3.1.4"})
    assert response.status_code == 404
    assert "3.1.4" in error_of(response)["message"]
    assert _says(client, ref) == "only"


def test_activate_with_a_bad_version_string_is_400(client: Client) -> None:
    ref = _ref("activate-bad")
    client.upload(ref, SAYS % "only")
    response = client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "latest"})
    assert response.status_code == 400
    assert "version" in error_of(response)["message"]


def test_activate_on_an_unknown_workflow_is_404(client: Client) -> None:
    response = client.post("/api/v1/workflows/never-uploaded/activate", json={"version": "1.0.0"})
    assert response.status_code == 404
    error_of(response)


# Delete


def test_delete_then_get_and_invoke_are_404(client: Client) -> None:
    ref = _ref("doomed")
    client.upload(ref, SAYS % "here")
    assert _says(client, ref) == "here"
    deleted = _data(client.request("DELETE", f"/api/v1/workflows/{ref}"))
    assert deleted == {"workflow_ref_name": ref, "deleted": True}
    assert client.get(f"/api/v1/workflows/{ref}").status_code == 404
    invoked = client.invoke(ref, input={})
    assert invoked.status_code == 404
    assert error_of(invoked)["type"] == "invalid_request_error"
    pinned = client.invoke(ref, model=f"workflow:{ref}@1.0.0", input={})
    assert pinned.status_code == 404
    assert client.get(f"/api/v1/workflows/{ref}/versions").status_code == 404
    assert client.get(f"/api/v1/workflows/{ref}/runs").status_code == 404
    assert ref not in [w["workflow_ref_name"] for w in client.get("/api/v1/workflows").json()["data"]]
    again = client.request("DELETE", f"/api/v1/workflows/{ref}")
    assert again.status_code == 404


def test_upload_after_delete_starts_over_at_1_0_0(client: Client) -> None:
    ref = _ref("reborn")
    client.upload(ref, SAYS % "first life")
    client.upload(ref, SAYS % "first life, v2")
    assert client.request("DELETE", f"/api/v1/workflows/{ref}").status_code == 200
    data = client.upload(ref, SAYS % "second life")
    assert data["created"] is True and data["version"]["version"] == "1.0.0"
    assert _says(client, ref) == "second life"


# Accounts


def test_each_account_sees_only_its_own_workflows(client: Client, other: Client) -> None:
    ref = _ref("mine")
    client.upload(ref, SAYS % "mine")
    listing = other.get("/api/v1/workflows").json()
    assert listing["data"] == [] and listing["pagination"]["total"] == 0
    for method, path, body in [
        ("GET", f"/api/v1/workflows/{ref}", None),
        ("GET", f"/api/v1/workflows/{ref}/versions", None),
        ("GET", f"/api/v1/workflows/{ref}/runs", None),
        ("POST", f"/api/v1/workflows/{ref}/activate", {"version": "1.0.0"}),
        ("DELETE", f"/api/v1/workflows/{ref}", None),
    ]:
        response = other.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert error_of(response)["type"] == "invalid_request_error"
    assert other.invoke(ref, input={}).status_code == 404
    # the same name is free for the other account, and the two never mix
    assert other.upload(ref, SAYS % "theirs")["version"]["version"] == "1.0.0"
    assert _says(client, ref) == "mine"
    assert _says(other, ref) == "theirs"
    assert [w["workflow_ref_name"] for w in client.get("/api/v1/workflows").json()["data"]] == [ref]


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/workflows"),
    ("POST", UPLOAD),
    ("POST", VALIDATE),
    ("GET", "/api/v1/workflows/default-script"),
    ("GET", "/api/v1/workflows/anything"),
    ("DELETE", "/api/v1/workflows/anything"),
    ("GET", "/api/v1/workflows/anything/versions"),
    ("POST", "/api/v1/workflows/anything/activate"),
])
def test_management_api_without_a_key_is_401(stack: Stack, method: str, path: str) -> None:
    response = requests.request(method, stack.api_url + path, json={}, timeout=30)
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"
