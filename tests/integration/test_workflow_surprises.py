"""What surprised a user coming from the seed, now as the seed does it or saying why.

An empty INPUT_SCHEMA takes any JSON input; network use in the sandbox fails
with a message naming ``ctx.http`` (on each backend, and through the API);
the 404 for a workflow is the seed's; the starter script and the README's
example say that results are cached for an hour by default.
"""
from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from flowpool.devstack import Stack
from flowpool.registry import validate_script
from flowpool.sandbox import Sandbox, SandboxLimits
from tests.conftest import SESSION_PIDS
from tests.helpers import Client, compiled, error_of, sandbox_backends

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"
NO_NETWORK = "the workflow sandbox has no network"


def _ref(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other(stack: Stack) -> Client:
    """A second account on the same stack."""
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account(f"other-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback port a script tries to reach; nothing may arrive."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    try:
        yield server
    finally:
        server.close()


def assert_nothing_arrived(listener: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        listener.accept()


def assert_says_no_network(text: str) -> None:
    assert NO_NETWORK in text and "ctx.http" in text, text


# INPUT_SCHEMA = {} (or none) takes any JSON input, as the seed's `input` (object, string or array)

RETURNS_INPUT = """
{schema}

def execute(ctx):
    return {{"got": ctx.input}}
"""


@pytest.mark.parametrize("schema", ["INPUT_SCHEMA = {}", "# no INPUT_SCHEMA"], ids=["empty", "none"])
def test_a_workflow_without_input_fields_accepts_any_json_input(client: Client, schema: str) -> None:
    ref = _ref("any-input")
    client.upload(ref, RETURNS_INPUT.format(schema=schema))
    for value in (["a", "b"], "text", 3, 2.5, True, {"an": "object"}):
        response = client.invoke(ref, input=value)
        assert response.status_code == 200, (value, response.text)
        assert response.json()["output"] == {"got": value}


def test_a_schema_naming_fields_still_wants_an_object(client: Client) -> None:
    ref = _ref("object-input")
    client.upload(ref, RETURNS_INPUT.format(schema='INPUT_SCHEMA = {"q": {"type": "string"}}'))
    response = client.invoke(ref, input=["a", "b"])
    assert response.status_code == 400, response.text
    assert error_of(response)["message"] == "input must be a JSON object with fields: q"


# Network use in the sandbox: refused as before, with a message that says why and what to use

URLOPEN = """
import urllib.request

def execute(ctx):
    return urllib.request.urlopen(ctx.input["url"], timeout=5).read().decode()
"""

REQUESTS_GET = """
def execute(ctx):
    import requests
    return requests.get(ctx.input["url"], timeout=5).text
"""


@pytest.mark.parametrize("script", [URLOPEN, REQUESTS_GET], ids=["urlopen", "requests"])
def test_network_use_in_a_workflow_fails_saying_the_sandbox_has_none_and_to_use_ctx_http(
        client: Client, listener: socket.socket, script: str) -> None:
    ref = _ref("reaches-out")
    client.upload(ref, script)
    url = "http://127.0.0.1:%d/" % listener.getsockname()[1]
    response = client.invoke(ref, input={"url": url}, cache=False)
    assert_nothing_arrived(listener)

    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "script_error"
    assert_says_no_network(error["message"])
    traceback = client.run(error["request_id"])["error"]["traceback"]
    assert_says_no_network(traceback.strip().splitlines()[-1])


LIMITS = SandboxLimits(memory_bytes=512 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20,
                       max_result_bytes=64 << 10, max_log_bytes=64 << 10, max_chunks=20, max_chunk_bytes=4 << 10)
UID_BASE = 118000  # away from the other sandbox tests' uids (their sweeps would kill our runs)


@pytest.fixture(scope="module", params=sandbox_backends())
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A real sandbox on each backend this host can run."""
    box = Sandbox(LIMITS, slots=1, uid_base=UID_BASE, hard_grace_seconds=1.0, prestart=0, backend=request.param)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    box.start()
    kept = {p.pid for p in me.children(recursive=True)} - before  # the zygote outlives each test on purpose
    SESSION_PIDS.update(kept)
    try:
        if not (box.isolation.get("seccomp") or box.isolation.get("network") == "none"):
            pytest.skip("runs share the host's network here (no seccomp, no network namespace): nothing to explain")
        yield box
    finally:
        box.stop()
        SESSION_PIDS.difference_update(kept)


# Each attempt's exception type and message. A lookup of an .invalid name never leaves the sandbox:
# the resolver's socket is refused like any other.
SOCKET_ATTEMPTS = """
import socket

def execute(ctx):
    found = {}
    for name, attempt in {
        "create_connection": lambda: socket.create_connection(("127.0.0.1", ctx.input), timeout=2),
        "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "getaddrinfo": lambda: socket.getaddrinfo("flowpool-test.invalid", 80),
        "gethostbyname": lambda: socket.gethostbyname("flowpool-test.invalid"),
        "socketpair": lambda: [s.close() for s in socket.socketpair()],
    }.items():
        try:
            attempt()
            found[name] = "worked"
        except OSError as exc:
            found[name] = [type(exc).__name__, str(exc)]
    return found
"""


def test_sockets_and_lookups_in_the_sandbox_fail_saying_it_has_no_network(sandbox: Sandbox,
                                                                          listener: socket.socket) -> None:
    outcome = sandbox.run(compiled(SOCKET_ATTEMPTS), {"input": listener.getsockname()[1]}, 20)
    assert_nothing_arrived(listener)

    assert outcome.ok, outcome.error
    found = outcome.result
    assert found.pop("socketpair") == "worked"  # a pair of Unix sockets (no network) still works
    assert found["create_connection"][0] == found["udp"][0] == "PermissionError"
    assert found["create_connection"][1].startswith("[Errno 1] Operation not permitted: ")
    assert found["getaddrinfo"][0] == found["gethostbyname"][0] == "gaierror"
    assert "'flowpool-test.invalid'" in found["getaddrinfo"][1]
    for name, (_, message) in found.items():
        assert_says_no_network(message)


HTTP_CLIENTS = """
def execute(ctx):
    found = {}
    try:
        import urllib.request
        urllib.request.urlopen(ctx.input, timeout=2)
        found["urlopen"] = "reached"
    except Exception as exc:
        found["urlopen"] = [type(exc).__name__, str(exc)]
    try:
        import requests
        requests.get(ctx.input, timeout=2)
        found["requests"] = "reached"
    except Exception as exc:
        found["requests"] = [type(exc).__name__, str(exc)]
    return found
"""


def test_http_clients_in_the_sandbox_fail_saying_it_has_no_network(sandbox: Sandbox,
                                                                   listener: socket.socket) -> None:
    if sandbox.isolation.get("unreadable"):
        pytest.skip("the runs' uids cannot read this interpreter (a warned-about setup): urllib.request is not there")
    url = "http://127.0.0.1:%d/" % listener.getsockname()[1]
    outcome = sandbox.run(compiled(HTTP_CLIENTS), {"input": url}, 20)
    assert_nothing_arrived(listener)

    assert outcome.ok, outcome.error
    assert outcome.result["urlopen"][0] == "URLError"
    # requests is there under the process backend (the worker's Python); bwrap stages none by default.
    assert outcome.result["requests"][0] in ("ConnectionError", "ModuleNotFoundError")
    for _, message in outcome.result.values():
        assert_says_no_network(message)


# The 404 of a workflow: the seed's message and type, flowpool's reason and detail beside them


def _assert_workflow_not_found(response: Any, ref: str, reason: str = "workflow_not_found") -> dict[str, Any]:
    assert response.status_code == 404, response.text
    error = error_of(response)
    assert error["message"] == f"Workflow not found: {ref}"
    assert error["type"] == "invalid_request_error"
    assert error["reason"] == reason and error["detail"]
    return error


def test_an_unknown_workflow_is_the_seeds_404_wherever_it_is_named(client: Client) -> None:
    ref = _ref("never-uploaded")
    errors = [
        _assert_workflow_not_found(client.invoke(ref, input={}), ref),
        _assert_workflow_not_found(client.get(f"/api/v1/workflows/{ref}"), ref),
        _assert_workflow_not_found(client.get(f"/api/v1/workflows/{ref}/versions"), ref),
        _assert_workflow_not_found(client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "1.0.0"}), ref),
    ]
    assert all(error == errors[0] for error in errors)


def test_another_accounts_workflow_reads_exactly_like_an_unknown_one(client: Client, other: Client) -> None:
    ref, unknown = _ref("theirs"), _ref("nobodys")
    client.upload(ref, RETURNS_INPUT.format(schema=""))
    for asks in (lambda name: other.invoke(name, input={}),
                 lambda name: other.get(f"/api/v1/workflows/{name}"),
                 lambda name: other.post(f"/api/v1/workflows/{name}/activate", json={"version": "1.0.0"})):
        theirs = _assert_workflow_not_found(asks(ref), ref)
        nobodys = _assert_workflow_not_found(asks(unknown), unknown)
        assert theirs == {**nobodys, "message": f"Workflow not found: {ref}"}


def test_a_missing_version_is_the_seeds_404_naming_ref_at_version(client: Client) -> None:
    ref = _ref("versioned")
    client.upload(ref, RETURNS_INPUT.format(schema=""))
    pinned = _assert_workflow_not_found(client.invoke(ref, model=f"workflow:{ref}@9.9.9", input={}),
                                        f"{ref}@9.9.9", "version_not_found")
    activated = _assert_workflow_not_found(client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "9.9.9"}),
                                           f"{ref}@9.9.9", "version_not_found")
    assert pinned == activated
    assert "'9.9.9'" in pinned["detail"] and f"/api/v1/workflows/{ref}/versions" in pinned["detail"]


def test_the_openai_client_reads_the_seeds_404(client: Client) -> None:
    oa = openai.OpenAI(api_key=client.key, base_url=client.base_url + "/workflow", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        oa.chat.completions.create(model="workflow:my-workflow", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.type == "invalid_request_error"
    assert isinstance(caught.value.body, dict) and caught.value.body["message"] == "Workflow not found: my-workflow"


# Where a user writes a workflow: the starter script and the README's example say the cache default


def test_the_starter_script_says_results_are_cached_for_an_hour_and_how_to_turn_it_off(client: Client) -> None:
    response = client.get("/api/v1/workflows/default-script")
    assert response.status_code == 200, response.text
    script = response.json()["data"]["script"]
    comment = " ".join(line.strip("# ") for line in script.splitlines() if line.startswith("#"))
    assert "cached for an hour by default" in comment
    assert "latest data should set 0" in comment
    assert validate_script(script, 1 << 20).info.cache_ttl_seconds == 3600  # type: ignore[union-attr]


def test_the_readme_example_names_its_application_and_the_cache_default() -> None:
    section = README.read_text().split("## Writing a workflow", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    result = validate_script(example, 1 << 20)
    assert result.ok, [p.to_dict() for p in result.problems]
    assert result.info.application == "default"  # type: ignore[union-attr]
    assert "cached for an hour by default" in example and "latest data should set 0" in example
