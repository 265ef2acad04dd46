"""Every malformed request is a clear 4xx, at once: never a 5xx, never a hang.

Each test bounds its request's time only to catch a hang; the bounds are generous.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import second_api
from tests.helpers import Client, error_of

QUICK = 5.0  # seconds: an answer slower than this is a hang

SCRIPT = """\
from flowpool_workflow import WorkflowContext


def execute(ctx: WorkflowContext):
    return {"ok": True}
"""


def timed(call, *args, **kwargs) -> tuple[requests.Response, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    response = call(*args, **kwargs)
    return response, time.monotonic() - started


def raw_exchange(api_url: str, data: bytes, read_timeout: float = 15.0,
                 then_closed: bool = False) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``data`` as is on a fresh connection; the status, headers, body and seconds of the answer.

    With ``then_closed``, also check that the server closes the connection after the answer.
    """
    parts = urlsplit(api_url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        if then_closed:
            try:
                assert sock.recv(1) == b"", "the connection was kept open after the answer"
            except ConnectionResetError:
                pass  # closed with the rest of the body unread: a reset, as closed as can be
    return int(lines[0].split()[1]), headers, body, time.monotonic() - started


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def post_raw(client: Client, path: str, text: str) -> requests.Response:
    return client.post(path, data=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"},
                       timeout=QUICK * 4)


# JSON bodies


@pytest.mark.parametrize("field", ["input", "metadata"])
def test_json_nested_past_the_depth_limit_is_a_400_naming_the_limit(client: Client, field: str) -> None:
    client.upload("deep", SCRIPT)
    for depth in (70, 970, 5000):
        inner = nested(depth) if field == "input" else '{"k": ' + nested(depth) + "}"
        response, seconds = timed(post_raw, client, "/workflow/chat/completions",
                                  f'{{"model": "workflow:deep", "{field}": {inner}}}')
        assert response.status_code == 400, (depth, response.text)
        error = error_of(response)
        assert "64" in error["message"] and "nested" in error["message"], error
        assert seconds < QUICK


def test_a_lone_surrogate_is_a_400_at_the_front_door_naming_the_field(client: Client) -> None:
    client.upload("surrogate", SCRIPT)
    response, seconds = timed(post_raw, client, "/workflow/chat/completions",
                              '{"model": "workflow:surrogate", "input": {"q": "\\ud800"}}')
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "input.q" and "surrogate" in error["message"], error
    assert seconds < QUICK


def test_a_paired_surrogate_escape_is_fine(client: Client) -> None:
    client.upload("paired", SCRIPT)
    response = post_raw(client, "/workflow/chat/completions",
                        '{"model": "workflow:paired", "input": {"q": "\\ud83d\\ude00"}}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body", [
    b'{"model": "workflow:x", "input": {"q": "\xed\xa0\x80"}}',  # a surrogate encoded as UTF-8
    b'{"model": "workflow:x", "input": {"q": "\xff"}}',
    b'{"model": "workflow:x", "input": NaN}',
    b'{"model": "workflow:x", "input": {"n": Infinity}}',
    b'{"model": "workflow:x", "input": {"n": 1e999}}',
])
def test_undecodable_or_non_json_input_is_a_400(client: Client, body: bytes) -> None:
    response, seconds = timed(client.post, "/workflow/chat/completions", data=body,
                              headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"
    assert seconds < QUICK


# Pagination


@pytest.mark.parametrize("query", ["offset=9223372036854775808", "offset=99999999999999999999999", "offset=1000000001",
                                   "limit=9223372036854775808", "offset=-1", "offset=" + "9" * 3000])
def test_pagination_out_of_bounds_is_a_400_on_every_list_route(client: Client, query: str) -> None:
    client.upload("paged", SCRIPT)
    for path in ("/api/v1/workflows", "/api/v1/workflows/paged/versions", "/api/v1/workflows/paged/runs",
                 "/api/v1/sessions/s1", "/api/v1/applications", "/api/v1/agents"):
        response = client.get(f"{path}?{query}", timeout=QUICK * 4)
        assert response.status_code == 400, (path, response.text)
        assert error_of(response)["param"] in ("offset", "limit")


def test_the_largest_offset_allowed_answers_an_empty_page(client: Client) -> None:
    response = client.get("/api/v1/workflows?offset=1000000000")
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []


# Scripts


@pytest.mark.parametrize("code", ["x = " + "-" * 200_000 + "1", "x = 1" + " + 1" * 100_000, "x = " + nested(150)])
def test_a_pathological_script_is_a_validation_failure_not_a_500(client: Client, code: str) -> None:
    source = code + "\n\ndef execute(ctx):\n    return 1\n"
    response, seconds = timed(client.post, "/api/v1/workflows/validate", json={"code": source})
    assert response.status_code == 200, response.text
    assert response.json()["data"]["ok"] is False
    assert seconds < QUICK
    response, seconds = timed(client.post, "/api/v1/workflows/upload",
                              json={"workflow_ref_name": "patho", "script": source})
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "script_validation_error"
    assert seconds < QUICK


# Upload fields


@pytest.mark.parametrize(("fields", "param"), [
    ({"env": {"A=B": "x"}}, "env"),
    ({"env": {"": "x"}}, "env"),
    ({"env": {"1A": "x"}}, "env"),
    ({"cache_ttl_seconds": 1e20}, "cache_ttl_seconds"),
    ({"cache_ttl_seconds": 31 * 86400}, "cache_ttl_seconds"),
    ({"timeout_seconds": 1e300}, "timeout_seconds"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
])
def test_upload_fields_that_would_break_runs_are_a_400_naming_the_field(client: Client, fields: dict,
                                                                        param: str) -> None:
    response = client.post("/api/v1/workflows/upload", json={"workflow_ref_name": "fields", "script": SCRIPT, **fields})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].startswith(param)


def test_upload_timeout_of_infinity_is_a_400(client: Client) -> None:
    body = '{"workflow_ref_name": "inf", "script": ' + json.dumps(SCRIPT) + ', "timeout_seconds": Infinity}'
    response = post_raw(client, "/api/v1/workflows/upload", body)
    assert response.status_code == 400, response.text


def test_upload_env_names_in_multipart_are_checked_too(client: Client) -> None:
    response = client.post("/api/v1/workflows/upload", data={"workflow_ref_name": "multi", "env": '{"A=B": "1"}'},
                           files={"script_file": ("w.py", SCRIPT.encode())})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].startswith("env")


def test_a_script_declaring_an_absurd_cache_ttl_is_refused(client: Client) -> None:
    response = client.post("/api/v1/workflows/upload",
                           json={"workflow_ref_name": "ttl", "script": "CACHE_TTL_SECONDS = 10**20\n" + SCRIPT})
    assert response.status_code == 400, response.text
    assert "CACHE_TTL_SECONDS" in error_of(response)["message"]


# Results


@pytest.mark.parametrize("expression", ["deep", "float('nan')", "{'x': [float('inf')]}"])
def test_a_result_that_is_not_showable_fails_the_run_with_invalid_result(client: Client, expression: str) -> None:
    client.upload("badresult", f"""\
        def execute(ctx):
            deep = []
            for _ in range(960):
                deep = [deep]
            return {expression}
    """)
    response, seconds = timed(client.invoke, "badresult")
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "invalid_result" and error["request_id"], error
    assert seconds < 30
    run = client.get(f"/api/v1/runs/{error['request_id']}")
    assert run.status_code == 200, run.text
    assert run.json()["data"]["status"] != "succeeded"
    assert run.json()["data"]["error"]["kind"] == "InvalidResult"


def test_a_chunk_too_deep_to_show_fails_the_run_and_its_stream_stays_readable(client: Client) -> None:
    client.upload("deepchunk", """\
        def execute(ctx):
            ctx.emit("progress", "before")
            deep = []
            for _ in range(960):
                deep = [deep]
            ctx.emit("progress", deep)
            return "never"
    """)
    response = client.invoke("deepchunk")
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "invalid_result" and "emitted chunk" in error["message"], error
    assert client.get(f"/api/v1/runs/{error['request_id']}").status_code == 200
    stream = client.get(f"/api/v1/runs/{error['request_id']}/stream", timeout=10)
    assert stream.status_code == 200 and '"before"' in stream.text and "[DONE]" in stream.text


def test_log_fields_too_deep_are_kept_as_a_note_and_count_against_the_log_limit(client: Client) -> None:
    client.upload("deeplog", """\
        def execute(ctx):
            deep = []
            for _ in range(960):
                deep = [deep]
            ctx.log.info("deep", value=deep)
            for _ in range(100):
                ctx.log.info("big", value="x" * 10_000)
            return "done"
    """)
    response = client.invoke("deeplog")
    assert response.status_code == 200, response.text
    record = client.run(response.json()["request_id"])
    assert "nested deeper than" in record["logs"][0]["fields"]["unreadable"]
    # 100 lines of 10 kB fields are over the 256 KiB log limit: the fields count, not only the messages.
    assert record["logs_truncated"] is True and len(record["logs"]) < 100


# Bodies on the wire


@pytest.fixture(scope="module", params=["gevent", "gthread"])
def quick_api(request: pytest.FixtureRequest, redis_server: RedisServer, stack: Stack) -> Iterator[tuple[str, str]]:
    """A second API (each worker class): bodies time out after 1 s, scripts up to 64 KiB; the stack's worker answers."""
    with second_api(redis_server, FLOWPOOL_BODY_TIMEOUT_SECONDS="1", FLOWPOOL_API_WORKER_CLASS=request.param,
                    FLOWPOOL_MAX_SCRIPT_BYTES=str(64 << 10)) as api:
        assert api.api_url is not None
        yield api.api_url, api.create_account(f"quick-{uuid.uuid4().hex[:8]}")


def test_a_body_shorter_than_its_content_length_is_a_408_quickly(quick_api: tuple[str, str]) -> None:
    url, key = quick_api
    head = (f"POST /api/v1/workflows/validate HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    status, _, body, seconds = raw_exchange(url, head.encode() + b'{"code": "x', then_closed=True)
    assert status == 408, body
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert seconds < QUICK


def test_a_stalled_body_does_not_hold_up_other_requests(quick_api: tuple[str, str]) -> None:
    url, key = quick_api
    parts = urlsplit(url)
    stalled = [socket.create_connection((parts.hostname, parts.port), timeout=10) for _ in range(40)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /api/v1/workflows/validate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        response, seconds = timed(requests.get, url + "/healthz", timeout=QUICK * 2)
        assert response.status_code == 200
        assert seconds < QUICK
    finally:
        for sock in stalled:
            sock.close()


def test_a_chunked_body_over_the_limit_is_a_413(quick_api: tuple[str, str]) -> None:
    url, key = quick_api
    piece = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(20)) + b"0\r\n\r\n"  # 1.25 MiB > 1 MiB
    head = (f"POST /api/v1/workflows/validate HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, _, body, seconds = raw_exchange(url, head.encode() + chunks, then_closed=True)
    assert status == 413, body
    assert json.loads(body)["error"]["type"] == "payload_too_large"
    assert seconds < QUICK


def test_a_chunked_body_under_the_limit_is_read_whole(quick_api: tuple[str, str]) -> None:
    url, key = quick_api
    payload = json.dumps({"code": SCRIPT}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 50]), payload[i:i + 50])
                      for i in range(0, len(payload), 50)) + b"0\r\n\r\n"
    head = (f"POST /api/v1/workflows/validate HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    status, _, body, _ = raw_exchange(url, head.encode() + chunks)
    assert status == 200, body
    assert json.loads(body)["data"]["ok"] is True


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"NOT A REQUEST LINE\r\n\r\n", 400),
])
def test_gunicorns_own_errors_come_back_as_json(quick_api: tuple[str, str], request_bytes: bytes,
                                                status: int) -> None:
    url, _ = quick_api
    got, headers, body, seconds = raw_exchange(url, request_bytes)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert seconds < QUICK


def test_a_script_over_the_size_limit_is_refused(quick_api: tuple[str, str]) -> None:
    url, key = quick_api
    source = SCRIPT + "#" * (64 << 10)
    response = requests.post(url + "/api/v1/workflows/validate", json={"code": source}, headers={"x-api-key": key},
                             timeout=QUICK * 4)
    assert response.status_code == 200, response.text
    assert "the limit is 65536" in response.json()["data"]["errors"][0]["message"]
    response = requests.post(url + "/api/v1/workflows/upload", json={"workflow_ref_name": "big", "script": source},
                             headers={"x-api-key": key}, timeout=QUICK * 4)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "script_validation_error"
