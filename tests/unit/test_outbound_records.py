"""What a run's record keeps of its ctx.http calls: bounded entries, bounded in number and in bytes."""
from __future__ import annotations

import json

from flowpool.run import dumps
from flowpool.tasks.outbound import (MAX_RECORDED_HTTP_BYTES, MAX_RECORDED_HTTP_CALLS, MAX_TARGET_CHARS, HttpCalls,
                                     _target)


def test_a_long_host_and_path_are_cut_and_marked_and_params_query_and_userinfo_dropped() -> None:
    host = "h" * 1000 + ".example"
    target = _target("get", f"https://user:pw@{host}:8443/a/" + "b" * 1000 + ";sid=s3cret?q=1#frag")

    assert target["method"] == "GET" and target["port"] == 8443
    assert target["host"] == "h" * (MAX_TARGET_CHARS - 1) + "…"
    assert target["path"] == "/a/" + "b" * (MAX_TARGET_CHARS - 4) + "…"
    assert "s3cret" not in json.dumps(target) and "pw" not in json.dumps(target)


def test_a_method_ctx_http_refuses_is_kept_as_a_question_mark() -> None:
    assert _target("X" * 10_000, "http://127.0.0.1/x")["method"] == "?"
    assert _target(None, "http://127.0.0.1/x")["method"] == "?"
    assert _target("patch", "http://127.0.0.1/x")["method"] == "PATCH"


def test_the_entries_kept_stop_at_their_size_in_bytes_and_the_rest_are_counted() -> None:
    calls = HttpCalls()
    entry = {**_target("GET", "http://127.0.0.1/" + "p" * 5000), "status": "error", "error": "e" * 300}
    for _ in range(MAX_RECORDED_HTTP_CALLS):
        calls.add(entry, "a-workflow")

    records = calls.records()
    kept, last = records[:-1], records[-1]
    assert 0 < len(kept) < MAX_RECORDED_HTTP_CALLS
    assert len(dumps(kept).encode()) <= MAX_RECORDED_HTTP_BYTES
    assert last["kind"] == "omitted" and last["count"] == MAX_RECORDED_HTTP_CALLS - len(kept)


def test_after_one_call_is_left_out_no_later_one_is_kept() -> None:
    calls = HttpCalls()
    big = {**_target("GET", "http://127.0.0.1/x"), "error": "e" * (MAX_RECORDED_HTTP_BYTES + 1)}
    calls.add({**_target("GET", "http://127.0.0.1/first")}, "w")
    calls.add(big, "w")
    calls.add({**_target("GET", "http://127.0.0.1/small")}, "w")

    first, omitted = calls.records()
    assert first["path"] == "/first"
    assert omitted["count"] == 2
