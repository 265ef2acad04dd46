"""Uploading accessories: into the blob store before the version, named by the version, limits that store nothing.

Over HTTP against the session's stack (its blobs in the session's Redis), the
limits' edges against the registry on a real Redis, and one API whose blob
store is S3 on the loopback moto server.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from flowpool import keys
from flowpool.blobs import RedisBlobs
from flowpool.devstack import Stack
from flowpool.errors import PayloadTooLarge, RequestError
from flowpool.redis_server import RedisServer
from flowpool.registry import Upload, Workflows
from flowpool.settings import Settings
from tests.conftest import second_api
from tests.helpers import REPO, Client, account_id, error_of

UPLOAD = "/api/v1/workflows/upload"
MB = 1 << 20
LIMIT = 50 * MB  # FLOWPOOL_ACCESSORY_MAX_MB's default: the stack runs with it
# A JSON document of exactly the largest size an accessory may have: one long string.
LARGEST = b'["' + b"a" * (LIMIT - 4) + b'"]'

# Returns the env entries the accessories set, so a test sees which version's accessories a run gets.
ENV_SCRIPT = """
CACHE_TTL_SECONDS = 0

def execute(ctx):
    return {"env": {k: v for k, v in ctx.env.items() if k.endswith("_S3_KEY")}, "note": "%s"}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json_upload(client: Client, ref: str, accessories: dict[str, bytes], note: str = "one") -> Any:
    return client.post(UPLOAD, json={"workflow_ref_name": ref, "script": ENV_SCRIPT % note, "accessories": [
        {"key": key, "content_base64": _b64(content)} for key, content in accessories.items()]})


def _blob_keys(db: redis.Redis, account_id: str) -> set[bytes]:
    return set(db.scan_iter(match=keys.blob(f"accessories/{account_id}/") + "*"))


def test_upload_puts_each_accessory_in_the_blob_store_and_names_it_in_the_version(
        client: Client, stack_db: redis.Redis) -> None:
    ref = _ref("acc")
    codes, rates = b'{"0101": "horses"}', b"[1, 2, 3]"
    response = _json_upload(client, ref, {"hts-codes": codes, "rates.v2": rates, "same": codes})
    assert response.status_code == 201, response.text
    version = response.json()["data"]["version"]
    account = account_id(stack_db, client)

    objects = version["accessory_objects"]
    assert version["accessories"] == ["hts-codes", "rates.v2", "same"]
    for key, content in (("hts-codes", codes), ("rates.v2", rates), ("same", codes)):
        digest = hashlib.sha256(content).hexdigest()
        assert objects[key] == {"object": f"accessories/{account}/{digest}", "sha256": digest, "size": len(content)}
        assert RedisBlobs(stack_db).get(objects[key]["object"]) == content
    assert len(_blob_keys(stack_db, account)) == 2  # the same bytes under two keys: one blob
    listed = client.get(f"/api/v1/workflows/{ref}/versions").json()["data"]
    assert listed[0]["accessory_objects"] == objects
    # The version's hash holds the script and its meta, no accessory bytes.
    assert {k.decode() for k in stack_db.hkeys(keys.version(account, ref, "1.0.0"))} == {"meta", "script"}


def test_env_names_each_accessory_and_a_rollback_brings_back_its_own(client: Client) -> None:
    ref = _ref("acc-env")
    first = _json_upload(client, ref, {"hts-codes": b'{"v": 1}'}, note="one").json()["data"]["version"]
    second = _json_upload(client, ref, {"hts-codes": b'{"v": 2}', "rates.v2": b"[]"},
                          note="two").json()["data"]["version"]

    def env_of_a_run() -> dict[str, str]:
        invoked = client.invoke(ref)
        assert invoked.status_code == 200, invoked.text
        return invoked.json()["output"]["env"]

    assert env_of_a_run() == {"HTS_CODES_S3_KEY": second["accessory_objects"]["hts-codes"]["object"],
                              "RATES_V2_S3_KEY": second["accessory_objects"]["rates.v2"]["object"]}
    activated = client.post(f"/api/v1/workflows/{ref}/activate", json={"version": "1.0.0"})
    assert activated.status_code == 200, activated.text
    assert env_of_a_run() == {"HTS_CODES_S3_KEY": first["accessory_objects"]["hts-codes"]["object"]}


def test_uploading_the_same_content_again_creates_no_version_and_no_blob(
        client: Client, stack_db: redis.Redis) -> None:
    ref = _ref("acc-same")
    accessories = {"labels": b'["a", "b"]', "prompts": b'{"system": "be brief"}'}
    first = _json_upload(client, ref, accessories)
    account = account_id(stack_db, client)
    blobs = _blob_keys(stack_db, account)
    again = _json_upload(client, ref, accessories)

    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.json()["data"]["created"] is False
    assert again.json()["data"]["version"] == first.json()["data"]["version"]
    assert client.get(f"/api/v1/workflows/{ref}/versions").json()["pagination"]["total"] == 1
    assert _blob_keys(stack_db, account) == blobs


def _state(db: redis.Redis, client: Client, ref: str) -> tuple[Any, ...]:
    """What a refused upload must leave as it was: the workflow, its versions and the account's blobs."""
    account = account_id(db, client)
    return (client.get(f"/api/v1/workflows/{ref}").json(), client.get(f"/api/v1/workflows/{ref}/versions").json(),
            db.hgetall(keys.workflow(account, ref)), _blob_keys(db, account))


@pytest.mark.parametrize("accessories, status, words", [
    ({"good": b"{}", "bad": b"{not json"}, 400, ["'bad'", "not valid JSON"]),
    ({"good": b"{}", "1-starts-with-a-digit": b"{}"}, 400, ["'1-starts-with-a-digit'", "starting with a letter"]),
    ({"good": b"{}", "../etc/passwd": b"{}"}, 400, ["'../etc/passwd'"]),
    ({"a-b": b"{}", "a.b": b"[]"}, 400, ["A_B_S3_KEY"]),
    ({f"k{i}": b"{}" for i in range(101)}, 400, ["101 accessories", "limit of 100", "FLOWPOOL_ACCESSORIES_MAX"]),
], ids=["not-json", "bad-key", "path-key", "same-env-name", "too-many"])
def test_a_refused_accessory_stores_nothing(client: Client, stack_db: redis.Redis, accessories: dict[str, bytes],
                                            status: int, words: list[str]) -> None:
    ref = _ref("acc-refused")
    assert _json_upload(client, ref, {"kept": b'{"v": 1}'}).status_code == 201
    before = _state(stack_db, client, ref)

    response = _json_upload(client, ref, accessories, note="changed")

    assert response.status_code == status, response.text
    message = error_of(response)["message"]
    assert all(word in message for word in words), message
    assert _state(stack_db, client, ref) == before


def test_the_same_key_twice_is_400(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("acc-twice"), "script": ENV_SCRIPT % "x",
                                         "accessories": [{"key": "k", "content_base64": _b64(b"{}")},
                                                         {"key": "k", "content_base64": _b64(b"[]")}]})
    assert response.status_code == 400, response.text
    assert "'k' is given more than once" in error_of(response)["message"]


@pytest.fixture(scope="module")
def largest_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accessories") / "largest.json"
    path.write_bytes(LARGEST)
    return path


def test_an_accessory_over_the_limit_is_413_naming_its_key_and_stores_nothing(
        client: Client, stack_db: redis.Redis) -> None:
    ref = _ref("acc-big")
    response = client.post(UPLOAD, data={"workflow_ref_name": ref},
                           files={"script_file": ("wf.py", (ENV_SCRIPT % "x").encode()),
                                  "accessory_small": ("small.json", b"{}"),
                                  "accessory_huge": ("huge.json", LARGEST[:-1] + b" ]")})
    assert response.status_code == 413, response.text
    error = error_of(response)
    assert error["type"] == "payload_too_large"
    assert f"accessory 'huge' is {LIMIT + 1} bytes, over the limit of 50 MB" in error["message"]
    assert client.get(f"/api/v1/workflows/{ref}").status_code == 404
    assert _blob_keys(stack_db, account_id(stack_db, client)) == set()


def test_a_50_mb_accessory_uploads_as_json_base64_past_the_body_limit_of_other_routes(client: Client) -> None:
    response = client.post(UPLOAD, json={"workflow_ref_name": _ref("acc-json-50"), "script": ENV_SCRIPT % "x",
                                         "accessories": [{"key": "big", "content_base64": _b64(LARGEST)}]})
    assert response.status_code == 201, response.text
    assert response.json()["data"]["version"]["accessory_objects"]["big"]["size"] == LIMIT
    # Every other route keeps FLOWPOOL_MAX_BODY_BYTES (1 MB on the test stack).
    other = client.post("/api/v1/workflows/validate", json={"code": "#" * (2 * MB)})
    assert other.status_code == 413, other.text
    assert "over the limit of 1048576 bytes" in error_of(other)["message"]


def _push(client: Client, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    return subprocess.run([sys.executable, "-m", "flowpool.cli", "push", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_push_streams_a_50_mb_accessory_and_shows_its_progress(client: Client, largest_file: Path,
                                                               tmp_path: Path) -> None:
    script = tmp_path / "wf.py"
    script.write_text(ENV_SCRIPT % "pushed")
    ref = _ref("acc-push")

    done = _push(client, str(script), "--name", ref, "--accessory", f"big={largest_file}")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{ref}@1.0.0 (new version)"
    lines = [line for line in done.stderr.splitlines() if line.startswith("uploading: ")]
    assert lines[0].startswith("uploading: ") and lines[-1].endswith("MB (100%)"), done.stderr
    assert len(lines) >= 5  # a line per tenth, not one at the end
    objects = client.get(f"/api/v1/workflows/{ref}/versions").json()["data"][0]["accessory_objects"]
    assert objects["big"]["size"] == LIMIT
    assert objects["big"]["sha256"] == hashlib.sha256(LARGEST).hexdigest()


def test_push_of_a_small_accessory_shows_no_progress(client: Client, tmp_path: Path) -> None:
    script, labels = tmp_path / "wf.py", tmp_path / "labels.json"
    script.write_text(ENV_SCRIPT % "small")
    labels.write_bytes(b'["a"]')

    done = _push(client, str(script), "--name", _ref("acc-push-small"), "--accessory", f"labels={labels}")

    assert done.returncode == 0, done.stderr
    assert "uploading" not in done.stderr


def test_push_of_an_accessory_that_is_no_file_says_so(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "wf.py"
    script.write_text(ENV_SCRIPT % "x")

    done = _push(client, str(script), "--name", _ref("acc-push-none"), "--accessory", f"k={tmp_path / 'none.json'}")

    assert done.returncode == 2
    assert "none.json' is not a file" in done.stderr and "Traceback" not in done.stderr


# The limits' edges, against the registry on a real Redis with small limits.

@pytest.fixture
def small_limits(redis_db: redis.Redis) -> Workflows:
    settings = Settings(accessory_max_mb=1 / 1024, accessories_max=2)  # 1 KiB, two accessories
    return Workflows.for_settings(redis_db, settings, RedisBlobs(redis_db))


def _upload(workflows: Workflows, accessories: dict[str, bytes]) -> Any:
    return workflows.upload("acct", Upload(ref="w", script="def execute(ctx):\n    return 1\n",
                                           accessories=accessories))


def _string_of(size: int) -> bytes:
    return b'"' + b"x" * (size - 2) + b'"'


def test_the_registry_takes_an_accessory_of_exactly_the_limit_and_refuses_one_byte_more(
        small_limits: Workflows, redis_db: redis.Redis) -> None:
    with pytest.raises(PayloadTooLarge, match=r"accessory 'b' is 1025 bytes, over the limit of 0.0009765\d* MB "
                                              r"\(1024 bytes; FLOWPOOL_ACCESSORY_MAX_MB\)"):
        _upload(small_limits, {"a": _string_of(1024), "b": _string_of(1025)})
    assert redis_db.keys() == []  # checked whole before anything is stored

    _, version, created = _upload(small_limits, {"a": _string_of(1024), "b": _string_of(10)})
    assert created and version["accessory_objects"]["a"]["size"] == 1024


def test_the_registry_takes_as_many_accessories_as_the_limit_and_refuses_one_more(
        small_limits: Workflows, redis_db: redis.Redis) -> None:
    with pytest.raises(RequestError, match="3 accessories, over the limit of 2"):
        _upload(small_limits, {"a": b"1", "b": b"2", "c": b"3"})
    assert redis_db.keys() == []
    assert _upload(small_limits, {"a": b"1", "b": b"2"})[2]


def test_a_version_from_before_blobs_stays_readable(redis_db: redis.Redis) -> None:
    """Versions written with accessory bytes in their hash (no accessory_objects) resolve, without env entries."""
    workflows = Workflows(redis_db)
    workflows.upload("acct", Upload(ref="w", script="def execute(ctx):\n    return 1\n"))
    meta_key = keys.version("acct", "w", "1.0.0")
    meta = json.loads(redis_db.hget(meta_key, "meta"))
    meta.pop("accessory_objects")
    meta["accessories"] = ["old"]
    redis_db.hset(meta_key, mapping={"meta": json.dumps(meta), "accessory:old": b"{}"})
    redis_db.hset(keys.workflow("acct", "w"), "active_meta", json.dumps(meta))

    resolved = workflows.resolve("acct", "w")
    assert resolved.accessories == {} and resolved.env == {}
    assert workflows.versions("acct", "w", 0, 25)[0][0]["accessories"] == ["old"]


# The S3 backend, end to end: an API whose FLOWPOOL_BLOB_URL is s3:// on the loopback moto server.

def test_an_upload_puts_its_accessory_in_the_s3_bucket(redis_server: RedisServer, s3_server: dict[str, Any],
                                                       stack: Stack) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    with second_api(redis_server, FLOWPOOL_BLOB_URL=f"s3://{s3_server['bucket']}/{prefix}",
                    FLOWPOOL_BLOB_ENDPOINT_URL=s3_server["endpoint_url"], **s3_server["env"]) as api:
        assert api.api_url is not None
        client = Client(api.api_url, stack.create_account(f"test-{uuid.uuid4().hex[:8]}"))
        content = json.dumps({"codes": list(range(1000))}).encode()
        response = _json_upload(client, _ref("acc-s3"), {"hts-codes": content})
        assert response.status_code == 201, response.text
        name = response.json()["data"]["version"]["accessory_objects"]["hts-codes"]["object"]

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"],
                      aws_access_key_id=s3_server["env"]["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=s3_server["env"]["AWS_SECRET_ACCESS_KEY"],
                      region_name=s3_server["env"]["AWS_DEFAULT_REGION"])
    listed = s3.list_objects_v2(Bucket=s3_server["bucket"], Prefix=f"{prefix}/")
    assert [item["Key"] for item in listed["Contents"]] == [f"{prefix}/{name}"]
    assert s3.get_object(Bucket=s3_server["bucket"], Key=f"{prefix}/{name}")["Body"].read() == content
    db = redis.Redis.from_url(stack.redis_url)
    try:
        assert not db.exists(keys.blob(name))  # in the bucket, not in Redis
    finally:
        db.close()


@pytest.mark.parametrize("path", [UPLOAD, "/api/v1/datastores/any/records"])
def test_a_large_body_route_checks_the_key_before_reading_the_body(stack: Stack, path: str) -> None:
    """A caller without a valid key gets its 401 before the server reads (and holds) up to 256 MB: here no
    byte of the announced body is ever sent, so a server reading it first would answer 408 instead."""
    import socket
    from urllib.parse import urlsplit

    assert stack.api_url is not None
    where = urlsplit(stack.api_url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {200 * MB}\r\nx-api-key: fp-not-a-key\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = conn.recv(4096)
            if not piece:
                break
            answer += piece
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"401", answer[:300]


def test_a_registry_without_a_blob_store_refuses_accessories_and_stores_nothing(redis_db: redis.Redis) -> None:
    """No silent default: an uploader writing accessories to Redis while workers read S3 would lose them."""
    from flowpool.errors import ConfigurationError

    workflows = Workflows(redis_db)
    with pytest.raises(ConfigurationError, match="without a blob store"):
        _upload(workflows, {"a": b"{}"})
    assert redis_db.keys() == []
    assert _upload(workflows, {})[2]  # a workflow without accessories needs none
