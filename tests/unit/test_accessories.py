"""Accessories at run time: the worker's cache (real Redis, real disk) and the file a run gets by descriptor.

The cache tests write blobs and version meta the way an upload does; the
sandbox tests hand a real run process an open file through each sandbox
backend and read it with ``ctx.load_accessory``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import redis

from flowpool import keys
from flowpool.blobs import CHUNK_BYTES, RedisBlobs
from flowpool.redis_server import RedisServer
from flowpool.run import RunJob
from flowpool.sandbox import CallErrorKind, CallFailed, RunOutcome, Sandbox, SandboxLimits, WithFile
from flowpool.sandbox.channel import Channel
from flowpool.sandbox.session import RunSession
from flowpool.settings import Settings
from flowpool.tasks.accessories import AccessoryAllowance, AccessoryCache
from flowpool.tasks.sealed import SealedCopies
from tests.helpers import compiled, sandbox_backends

ACCOUNT, REF, VERSION, CONTENT_HASH = "acct-1", "tariffs", "1.0.0", "c" * 64


def later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def store_version(client: redis.Redis, accessories: dict[str, bytes], *, account: str = ACCOUNT,
                  version: str = VERSION, content_hash: str = CONTENT_HASH, legacy: bool = False) -> dict[str, Any]:
    """A version as an upload writes it: blobs then meta (or, ``legacy``, the bytes in the version's hash)."""
    vkey = keys.version(account, REF, version)
    meta: dict[str, Any] = {"version": version, "content_hash": content_hash, "accessories": sorted(accessories)}
    if legacy:
        client.hset(vkey, mapping={f"accessory:{k}": v for k, v in accessories.items()})
    else:
        objects = {}
        for key, data in accessories.items():
            sha = hashlib.sha256(data).hexdigest()
            RedisBlobs(client).put(f"accessories/{account}/{sha}", data)
            objects[key] = {"object": f"accessories/{account}/{sha}", "sha256": sha, "size": len(data)}
        meta["accessory_objects"] = objects
    client.hset(vkey, "meta", json.dumps(meta))
    return meta


def job(account: str = ACCOUNT, version: str = VERSION, content_hash: str = CONTENT_HASH) -> RunJob:
    return RunJob(request_id="req-1", account=account, workflow=REF, version=version, content_hash=content_hash,
                  soft_seconds=30)


def read(answer: WithFile) -> bytes:
    with os.fdopen(answer.fd, "rb") as file:
        return file.read()


def fetches(client: redis.Redis) -> int:
    return int(client.hget(keys.METRICS, "accessory_fetches") or 0)


@pytest.fixture
def cache(redis_server: RedisServer, redis_db: redis.Redis, tmp_path: Path) -> AccessoryCache:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", cache_dir=str(tmp_path / "cache"))
    return AccessoryCache(redis_db, settings)


# The cache


def test_an_accessory_is_fetched_once_then_served_from_disk(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = json.dumps({"codes": list(range(1000))}).encode()
    store_version(redis_db, {"hts-codes": data})

    answers = [cache.open(job(), "hts-codes", later()) for _ in range(3)]

    assert [read(a) for a in answers] == [data] * 3
    assert answers[0].value == {"key": "hts-codes", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert fetches(redis_db) == 1
    path = Path(cache.directory) / hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(Path(cache.directory).stat().st_mode) == 0o700
    assert [p.name for p in Path(cache.directory).iterdir() if p.name.endswith(".part")] == []


def test_another_process_on_the_host_finds_the_file_on_disk(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = b'{"a": 1}'
    store_version(redis_db, {"a": data})
    read(cache.open(job(), "a", later()))
    other = AccessoryCache(redis_db, cache.settings)  # a second worker process: nothing in its memory

    assert read(other.open(job(), "a", later())) == data
    assert fetches(redis_db) == 1


def test_threads_asking_at_once_fetch_once(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = json.dumps(["x" * 1000] * 3000).encode()  # a few MB: several chunks in the Redis blob store
    store_version(redis_db, {"big": data})
    caches = [cache, AccessoryCache(redis_db, cache.settings)]  # two processes' caches, four threads each

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda n: read(caches[n % 2].open(job(), "big", later())), range(8)))

    assert got == [data] * 8
    assert fetches(redis_db) == 1


def test_a_file_corrupted_on_disk_is_never_served(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = b'{"rates": [1, 2, 3]}'
    store_version(redis_db, {"rates": data})
    path = Path(cache.directory) / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"rates": [1, 2, 9]}')  # a bad disk, or a hand in the cache

    assert read(cache.open(job(), "rates", later())) == data
    assert path.read_bytes() == data
    assert fetches(redis_db) == 1


def test_a_blob_whose_bytes_do_not_match_its_hash_is_refused(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    meta = store_version(redis_db, {"rates": b'{"rates": 1}'})
    RedisBlobs(redis_db).put(meta["accessory_objects"]["rates"]["object"], b'{"rates": 2}')

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "rates", later())

    assert failed.value.kind is CallErrorKind.UNAVAILABLE
    assert "corrupted" in failed.value.message
    assert list(Path(cache.directory).iterdir()) == [Path(cache.directory) / f".{meta['accessory_objects']['rates']['sha256']}.lock"]


def test_a_blob_missing_from_the_store_is_unavailable(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    meta = store_version(redis_db, {"rates": b"[1]"})
    RedisBlobs(redis_db).delete(meta["accessory_objects"]["rates"]["object"])

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "rates", later())

    assert failed.value.kind is CallErrorKind.UNAVAILABLE
    assert "missing from the blob store" in failed.value.message


def test_an_unknown_key_names_the_keys_the_version_has(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"b-list": b"[]", "a-map": b"{}"})

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "c-map", later())

    assert failed.value.kind is CallErrorKind.NOT_FOUND
    assert failed.value.message == "workflow tariffs@1.0.0 has no accessory 'c-map'; its accessories: a-map, b-list"


def test_a_version_without_accessories_says_it_has_none(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {})

    with pytest.raises(CallFailed, match="its accessories: none") as failed:
        cache.open(job(), "anything", later())
    assert failed.value.kind is CallErrorKind.NOT_FOUND


def test_a_version_from_before_the_blob_store_is_read_from_its_hash(cache: AccessoryCache,
                                                                     redis_db: redis.Redis) -> None:
    store_version(redis_db, {"old": b'{"legacy": true}'}, legacy=True)

    assert read(cache.open(job(), "old", later())) == b'{"legacy": true}'
    assert read(cache.open(job(), "old", later())) == b'{"legacy": true}'
    assert fetches(redis_db) == 0  # no blob store read
    with pytest.raises(CallFailed, match="its accessories: old"):
        cache.open(job(), "new", later())


def test_another_accounts_version_is_not_read(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"secret": b'"theirs"'}, account="acct-2")

    with pytest.raises(CallFailed) as failed:
        cache.open(job(account=ACCOUNT), "secret", later())
    assert failed.value.kind is CallErrorKind.NOT_FOUND


def test_a_workflow_uploaded_again_under_the_same_version_gets_its_new_accessories(
        cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"a": b"1"}, content_hash="1" * 64)
    assert read(cache.open(job(content_hash="1" * 64), "a", later())) == b"1"
    store_version(redis_db, {"a": b"2"}, content_hash="2" * 64)  # deleted, then uploaded again: 1.0.0 anew

    assert read(cache.open(job(content_hash="2" * 64), "a", later())) == b"2"


def test_a_fetch_held_by_another_ends_at_the_runs_deadline(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    import fcntl

    meta = store_version(redis_db, {"a": b"1"})
    Path(cache.directory).mkdir(parents=True)
    with open(Path(cache.directory) / f".{meta['accessory_objects']['a']['sha256']}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CallFailed) as failed:
            cache.open(job(), "a", later(0.1))
    assert failed.value.kind is CallErrorKind.TIMEOUT


# The descriptor on the channel


def test_a_descriptor_travels_with_its_frame_and_a_plain_recv_drops_it(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b'{"x": 1}')
    ours, theirs = socket.socketpair()
    sender, receiver = Channel(ours), Channel(theirs)
    fd = os.open(path, os.O_RDONLY)
    try:
        big = {"op": "reply", "id": 1, "value": "v" * (4 << 20), "fds": 1}  # longer than one sendmsg takes
        writer = threading.Thread(target=lambda: (sender.send(big, fds=[fd]), sender.send(big, fds=[fd]),
                                                  sender.send({"op": "reply", "id": 2})))
        writer.start()
        message, fds = receiver.recv_with_fds()
        assert message == big and len(fds) == 1
        with os.fdopen(fds[0], "rb") as file:
            assert file.read() == b'{"x": 1}'
        open_before = len(os.listdir("/proc/self/fd"))
        assert receiver.recv() == big  # read whole, its descriptor dropped by the kernel
        assert len(os.listdir("/proc/self/fd")) == open_before
        assert receiver.recv_with_fds() == ({"op": "reply", "id": 2}, [])
        writer.join(10)
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


def test_the_session_sends_the_file_with_the_reply_and_closes_its_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b'[1, 2, 3]')
    fd = os.open(path, os.O_RDONLY)
    worker_end, run_end = socket.socketpair()
    session = RunSession(SimpleNamespace(pid=1, sock=worker_end), zygote=None, limits=SandboxLimits(),  # type: ignore[arg-type]
                         soft_seconds=30, hard_grace_seconds=5, outcome=RunOutcome(),
                         on_call=lambda method, params, deadline: WithFile({"key": params["key"]}, fd))
    run = Channel(run_end)
    try:
        run.send({"op": "call", "id": 7, "method": "accessory", "params": {"key": "k"}})
        run.send({"op": "result", "value": None})
        session.follow()
        message, fds = run.recv_with_fds()
    finally:
        worker_end.close()
        run_end.close()
    assert message == {"op": "reply", "id": 7, "value": {"key": "k"}, "fds": 1}
    with os.fdopen(fds[0], "rb") as file:
        assert file.read() == b"[1, 2, 3]"
    with pytest.raises(OSError):
        os.fstat(fd)  # the session closed its own copy


def test_a_call_failing_with_an_os_error_is_answered_not_left_waiting() -> None:
    """An OSError from serving a call is the worker's, not the run's going away: the run gets an error reply."""
    def serve(method: str, params: dict[str, Any], deadline: float) -> Any:
        raise OSError(24, "Too many open files")

    worker_end, run_end = socket.socketpair()
    session = RunSession(SimpleNamespace(pid=1, sock=worker_end), zygote=None, limits=SandboxLimits(),  # type: ignore[arg-type]
                         soft_seconds=30, hard_grace_seconds=5, outcome=RunOutcome(), on_call=serve)
    run = Channel(run_end)
    try:
        run.send({"op": "call", "id": 3, "method": "accessory", "params": {"key": "k"}})
        run.send({"op": "result", "value": None})
        session.follow()
        run_end.settimeout(5)
        message = run.recv()
    finally:
        worker_end.close()
        run_end.close()
    assert message["id"] == 3 and message["error"]["kind"] == CallErrorKind.UNAVAILABLE.value


# Through a real run process, on each sandbox backend

LOADS = """
    import os

    def execute(ctx):
        out = {}
        before = len(os.listdir("/proc/self/fd"))
        for key, fallback in ctx.input:
            if fallback:
                with open(fallback, "w") as f:
                    f.write('{"from": "fallback"}')
            try:
                out[key] = ctx.load_accessory(key, fallback_path=fallback)
            except Exception as exc:
                out[key] = [type(exc).__name__, str(exc)]
        out["again"] = ctx.load_accessory("rates") is ctx.load_accessory("rates")
        out["left_open"] = len(os.listdir("/proc/self/fd")) - before
        return out
"""


@contextmanager
def _started(backend: str, slots: int, uid_base: int | None) -> Iterator[Sandbox]:
    box = Sandbox(SandboxLimits(memory_bytes=256 << 20, open_files=64), slots=slots, uid_base=uid_base,
                  hard_grace_seconds=1.0, prestart=0, backend=backend)
    box.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(params=sandbox_backends())
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with _started(request.param, slots=2, uid_base=114000) as box:
        yield box


def test_a_run_reads_its_accessory_from_the_descriptor(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_bytes(json.dumps({"rates": [1.5, 2.5], "name": "tarifs é"}).encode())
    path.chmod(0o400)
    tmp_path.chmod(0o700)  # the run's uid can reach the file by its descriptor only
    calls: list[str] = []

    def serve(method: str, params: dict[str, Any], deadline: float) -> Any:
        assert method == "accessory"
        calls.append(params["key"])
        if params["key"] != "rates":
            raise CallFailed(CallErrorKind.NOT_FOUND, f"no accessory {params['key']!r}; its accessories: rates")
        return WithFile({"key": "rates"}, os.open(path, os.O_RDONLY))

    outcome = sandbox.run(compiled(LOADS), {"input": [["rates", None], ["missing", None],
                                                      ["local", "local.json"], ["rates", "local.json"]]},
                          20, on_call=serve)

    assert outcome.ok, outcome.error
    result = outcome.result
    assert result["rates"] == {"rates": [1.5, 2.5], "name": "tarifs é"}
    assert result["missing"] == ["NotFoundError", "no accessory 'missing'; its accessories: rates"]
    assert result["local"] == {"from": "fallback"}  # no such key: the local file
    assert result["again"] is True
    assert calls == ["rates", "missing", "local"]  # once per key per run; the stored key ignores its fallback
    assert result["left_open"] == 0  # each descriptor read and closed


def test_a_run_cannot_read_the_file_by_its_path(sandbox: Sandbox, tmp_path: Path) -> None:
    """With a uid of its own (uid_base), the descriptor is the only way in: the cache's directory is 0700."""
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    path = directory / "rates.json"
    path.write_bytes(b'{"secret": 1}')
    path.chmod(0o400)
    script = compiled("""
        def execute(ctx):
            try:
                with open(ctx.input, "rb") as f:
                    return f.read().decode()
            except OSError as exc:
                return type(exc).__name__
    """)

    outcome = sandbox.run(script, {"input": str(path)}, 20, on_call=lambda *a: None)

    assert outcome.ok, outcome.error
    assert outcome.result in ("PermissionError", "FileNotFoundError")  # bwrap: not even in its filesystem


# What a run may do to the accessory it holds: the descriptor is of a sealed copy in the worker's memory.

TAMPERS = """
    import os

    def execute(ctx):
        _, fd = ctx._transport.call_with_file("accessory", {"key": "rates"})
        tried = {"where": os.readlink(f"/proc/self/fd/{fd}")}

        def reopened(flags, then):
            again = os.open(f"/proc/self/fd/{fd}", flags)
            try:
                then(again)
            finally:
                os.close(again)

        for name, attempt in [
            ("fchmod", lambda: os.fchmod(fd, 0o600)),  # its owner may: the worker's uid, shared
            ("write", lambda: reopened(os.O_WRONLY, lambda w: os.write(w, b"[6, 6, 6]"))),
            ("pwrite", lambda: reopened(os.O_RDWR, lambda w: os.pwrite(w, b"9", 11))),
            ("truncate", lambda: reopened(os.O_WRONLY | os.O_TRUNC, lambda w: None)),
            ("grow", lambda: reopened(os.O_RDWR, lambda w: os.ftruncate(w, 1 << 20))),
        ]:
            try:
                attempt()
                tried[name] = "done"
            except OSError as exc:
                tried[name] = type(exc).__name__
        tried["bytes"] = os.pread(fd, 1 << 16, 0).decode()
        os.close(fd)
        return tried
"""


@pytest.fixture(params=sandbox_backends())
def shared_uid_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """Runs with the worker's uid (no uid_base): a non-root worker, or bwrap's user namespace without one."""
    with _started(request.param, slots=1, uid_base=None) as box:
        yield box


def _tamper(box: Sandbox, cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = b'{"rates": [1, 2, 3]}'
    store_version(redis_db, {"rates": data})

    outcome = box.run(compiled(TAMPERS), {"input": None}, 20,
                      on_call=lambda method, params, deadline: cache.open(job(), params["key"], deadline))

    assert outcome.ok, outcome.error
    tried = outcome.result
    assert tried.pop("fchmod") in ("done", "PermissionError")  # allowed to the file's owner; harmless: sealed
    assert tried.pop("where").startswith("/memfd:")  # no host path shown, not the disk cache's file
    assert tried == {"write": "PermissionError", "pwrite": "PermissionError", "truncate": "PermissionError",
                     "grow": "PermissionError", "bytes": data.decode()}
    assert read(cache.open(job(), "rates", later())) == data  # the next run, of any account with these bytes
    assert read(AccessoryCache(redis_db, cache.settings).open(job(), "rates", later())) == data  # the disk's
    assert fetches(redis_db) == 1


def test_a_run_sharing_the_workers_uid_cannot_change_its_accessory(
        shared_uid_sandbox: Sandbox, cache: AccessoryCache, redis_db: redis.Redis) -> None:
    """The run owns the copy (the worker's uid), may chmod it, and still cannot write, shrink or grow it."""
    _tamper(shared_uid_sandbox, cache, redis_db)


def test_a_run_with_its_own_uid_cannot_change_its_accessory(
        sandbox: Sandbox, cache: AccessoryCache, redis_db: redis.Redis) -> None:
    """Seals bind root too: the process backend as root keeps capabilities that ignore modes."""
    _tamper(sandbox, cache, redis_db)


COPIES = """
    import os
    import shutil

    def execute(ctx):
        with open("made.json", "w") as f:
            f.write("{}")
        os.chmod("made.json", 0o640)
        shutil.copy("made.json", "copy.json")  # copies the mode too (chmod)
        shutil.copy2("made.json", "copy2.json")
        return [oct(os.stat(name).st_mode & 0o777) for name in ("copy.json", "copy2.json")]
"""


def test_a_run_may_copy_files_with_their_mode(shared_uid_sandbox: Sandbox) -> None:
    """The seccomp filter leaves chmod alone: ordinary scripts (shutil.copy) work."""
    outcome = shared_uid_sandbox.run(compiled(COPIES), {"input": None}, 20, on_call=lambda *a: None)

    assert outcome.ok, outcome.error
    assert outcome.result == ["0o640", "0o640"]


# The sealed copies in a worker process


def memfds() -> int:
    """How many of this process's descriptors are accessory copies in memory."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:flowpool-accessory-")
        except OSError:
            pass  # the listing's own descriptor
    return count


def test_each_run_gets_its_own_description_of_one_sealed_copy(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    data = json.dumps({"codes": list(range(2000))}).encode()
    store_version(redis_db, {"codes": data})
    before = memfds()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: cache.open(job(), "codes", later()), range(16)))

    assert len({os.fstat(a.fd).st_ino for a in answers}) == 1  # one copy, however many threads asked at once
    assert fetches(redis_db) == 1
    os.read(answers[0].fd, 100)  # a run that has read part of it moves its own offset only
    assert os.read(answers[1].fd, len(data) + 1) == data
    with pytest.raises(OSError):
        os.write(answers[2].fd, b"x")  # read-only description
    os.fchmod(answers[2].fd, 0o666)  # even by its owner, made writable and opened for writing: sealed
    writable = os.open(f"/proc/self/fd/{answers[2].fd}", os.O_RDWR)
    try:
        for change in (lambda: os.write(writable, b"x"), lambda: os.ftruncate(writable, 1),
                       lambda: mmap.mmap(writable, 0, mmap.MAP_SHARED, mmap.PROT_WRITE)):
            with pytest.raises(PermissionError):
                change()
    finally:
        os.close(writable)
    assert os.pread(answers[2].fd, len(data) + 1, 0) == data
    for answer in answers:
        os.close(answer.fd)
    assert memfds() == before + 1


def test_a_file_changed_on_disk_is_not_served(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    """Whatever changes or replaces the disk cache's file (a run with the worker's uid can reach it by path
    under the process backend): a process serving its sealed copy goes on serving the bytes it hashed, and a
    process making a new copy hashes the file, finds it changed and fetches it again."""
    data, bad = b'{"rates": [1, 2, 3]}', b'{"rates": [6, 6, 6]}'
    store_version(redis_db, {"rates": data})
    assert read(cache.open(job(), "rates", later())) == data
    path = Path(cache.directory) / hashlib.sha256(data).hexdigest()
    path.chmod(0o600)
    with open(path, "r+b") as file:  # same inode, same size, mode set back
        file.write(bad)
    path.chmod(0o400)

    assert read(cache.open(job(), "rates", later())) == data
    assert fetches(redis_db) == 1
    assert read(AccessoryCache(redis_db, cache.settings).open(job(), "rates", later())) == data
    assert path.read_bytes() == data
    assert fetches(redis_db) == 2

    other = path.with_name("elsewhere")  # replaced under the same name
    other.write_bytes(bad)
    other.chmod(0o400)
    os.replace(other, path)
    assert read(AccessoryCache(redis_db, cache.settings).open(job(), "rates", later())) == data
    assert fetches(redis_db) == 3


def test_copies_past_the_memory_budget_are_let_go_oldest_first(redis_server: RedisServer, redis_db: redis.Redis,
                                                               tmp_path: Path) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", cache_dir=str(tmp_path / "cache"),
                        accessory_memory_mb=1.5 / 1024)  # 1.5 KiB: one of these at a time
    cache = AccessoryCache(redis_db, settings)
    first, second = b'["' + b"a" * 1000 + b'"]', b'["' + b"b" * 1000 + b'"]'
    store_version(redis_db, {"first": first, "second": second})
    before = memfds()

    held = cache.open(job(), "first", later())
    assert read(cache.open(job(), "second", later())) == second
    assert memfds() == before + 2  # the second copy, and the first's description a run still holds
    assert read(held) == first  # a copy let go of stays readable where it was handed out
    assert memfds() == before + 1

    assert read(cache.open(job(), "first", later())) == first  # copied again from the host's disk
    assert memfds() == before + 1
    assert fetches(redis_db) == 2


def test_a_disk_error_is_an_unavailable_answer_not_a_silent_one(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"a": b"1"})
    Path(cache.settings.cache_path).mkdir(parents=True)
    Path(cache.directory).write_bytes(b"")  # a file where the cache's directory should be

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "a", later())
    assert failed.value.kind is CallErrorKind.UNAVAILABLE
    assert cache.directory not in failed.value.message  # host paths stay in the worker's log


def test_a_cache_directory_others_may_write_in_is_refused(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"a": b"1"})
    root = Path(cache.settings.cache_path)
    root.mkdir(parents=True)
    root.chmod(0o777)  # made first by another local user, say, under /tmp

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "a", later())
    assert failed.value.kind is CallErrorKind.UNAVAILABLE
    assert not Path(cache.directory).exists() or not any(Path(cache.directory).iterdir())


class _SlowBlobs(RedisBlobs):
    """The session's Redis blobs, but the first piece of a read takes until ``until`` (monotonic) has passed."""

    until = 0.0
    pieces = 0

    def _pieces(self, name: str) -> Iterator[bytes]:
        for piece in super()._pieces(name):
            self.pieces += 1
            yield piece
            if self.pieces == 1:
                time.sleep(max(0.0, self.until - time.monotonic()) + 0.01)


def test_a_fetch_past_the_runs_deadline_gives_up_and_leaves_no_file(redis_server: RedisServer,
                                                                    redis_db: redis.Redis, tmp_path: Path) -> None:
    data = json.dumps(["x" * 1000] * 3000).encode()  # several chunks: the deadline is looked at between them
    store_version(redis_db, {"big": data})
    blobs = _SlowBlobs(redis_db)
    cache = AccessoryCache(redis_db, Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
                                              cache_dir=str(tmp_path / "cache")), blobs)

    blobs.until = time.monotonic() + 0.2  # runs out after the first piece has been written
    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "big", blobs.until)
    assert failed.value.kind is CallErrorKind.TIMEOUT
    assert blobs.pieces == 2 < len(data) / CHUNK_BYTES  # the second piece was read, then refused: time was up
    blobs.until = 0.0
    assert [p for p in Path(cache.directory).iterdir() if not p.name.endswith(".lock")] == []
    assert read(cache.open(job(), "big", later())) == data  # the next run fetches it


def test_parts_left_by_a_dead_fetch_are_swept_at_start(cache: AccessoryCache, redis_db: redis.Redis) -> None:
    store_version(redis_db, {"a": b"1"})
    directory = Path(cache.directory)
    directory.mkdir(parents=True, mode=0o700)
    stale = directory / f".{'d' * 64}.{'0' * 32}.part"
    stale.write_bytes(b"half")

    read(cache.open(job(), "a", later()))
    assert not stale.exists()


def test_a_run_is_handed_at_most_its_memory_limit_in_accessories(cache: AccessoryCache,
                                                                  redis_db: redis.Redis) -> None:
    """Copies a run holds outlive the worker's budget, so what one run may be handed is capped; a load that
    fails is not counted, a key loaded again is."""
    data = b'["' + b"a" * 996 + b'"]'  # 1000 bytes
    store_version(redis_db, {"a": data, "gone": data + b" "})
    redis_db.delete(keys.blob(f"accessories/{ACCOUNT}/{hashlib.sha256(data + b' ').hexdigest()}"))
    allowance = AccessoryAllowance(1500)

    with pytest.raises(CallFailed) as failed:
        cache.open(job(), "gone", later(), allowance)
    assert failed.value.kind is CallErrorKind.UNAVAILABLE and "missing" in failed.value.message
    assert read(cache.open(job(), "a", later(), allowance)) == data
    with pytest.raises(CallFailed) as refused:
        cache.open(job(), "a", later(), allowance)
    assert refused.value.kind is CallErrorKind.UNAVAILABLE
    assert "'a'" in refused.value.message and "over its memory limit" in refused.value.message
    assert read(cache.open(job(), "a", later(), AccessoryAllowance(0))) == data  # 0: no memory limit


def test_a_copy_whose_mode_a_run_took_away_is_mended_not_made_again() -> None:
    """A run sharing a non-root worker's uid owns the copy and may fchmod it to 000: the worker, its owner too,
    puts the mode back (the bytes are sealed), instead of copying and hashing it again at every load."""
    pid = os.fork()
    if pid == 0:  # the worker, as a user without root's way past file modes
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            copies = SealedCopies(1 << 20)
            memfd = os.memfd_create("flowpool-accessory-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.write(memfd, b'"sealed"')
            os.fchmod(memfd, 0o444)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            handed = copies.keep("a" * 64, memfd)
            os.fchmod(handed, 0)  # what the run did with the descriptor it was handed
            again = copies.reopen("a" * 64)
            code = 0 if again is not None and os.fstat(again).st_ino == os.fstat(handed).st_ino \
                and os.pread(again, 100, 0) == b'"sealed"' else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("missing", ["proc", "memfd"])
def test_a_host_without_proc_or_memfd_says_so(cache: AccessoryCache, redis_db: redis.Redis,
                                              monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    """Checked once per process (and logged when the worker starts): each load then names what is missing."""
    from flowpool.tasks import sealed

    store_version(redis_db, {"a": b"1"})
    monkeypatch.setattr(sealed, "_host_missing", [])
    if missing == "proc":
        monkeypatch.setattr(sealed, "_PROC_FD", "/no-proc/self/fd")
    else:
        def refused(*args: Any) -> int:
            raise OSError(errno.ENOSYS, "Function not implemented")
        monkeypatch.setattr(os, "memfd_create", refused)

    for _ in range(2):
        with pytest.raises(CallFailed) as failed:
            cache.open(job(), "a", later())
        assert failed.value.kind is CallErrorKind.UNAVAILABLE
        assert ("/proc is not mounted" if missing == "proc" else "memfd_create") in failed.value.message
    assert sealed._host_missing != [] and fetches(redis_db) == 0
