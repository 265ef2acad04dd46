"""What both SDK clients decide without I/O: when to send a call again, how an answer reads, what options become."""
from __future__ import annotations

import pytest

import flowpool
from flowpool.sdk import sansio


@pytest.mark.parametrize("attempt, status, headers, wait", [
    (0, None, {}, 0.5),  # nothing came back: 0.5 s, doubling
    (1, None, {}, 1.0),
    (0, 429, {"x-should-retry": "true", "Retry-After": "3"}, 3.0),  # the server's own wait
    (0, 503, {"x-should-retry": "true"}, 0.5),
    (0, 429, {"x-should-retry": "true", "Retry-After": "11"}, None),  # too long to wait here: raised at once
    (0, 500, {"x-should-retry": "false"}, None),  # a run's error is never sent again
    (0, 429, {}, None),  # the server did not say it is safe
    (0, 200, {}, None),
    (2, None, {}, None),  # out of tries
], ids=["dropped", "dropped-again", "retry-after", "no-retry-after", "too-long", "run-failed", "unmarked", "ok",
        "spent"])
def test_retry_wait_sends_again_only_what_is_safe_after_what_the_server_asked(
        attempt: int, status: int | None, headers: dict[str, str], wait: float | None) -> None:
    assert sansio.retry_wait(attempt, 2, status, headers) == wait


def test_decode_raises_each_status_as_its_class_and_a_body_not_an_object_as_an_api_error() -> None:
    assert sansio.decode(200, {}, b'{"data": 1}', "u") == {"data": 1}
    with pytest.raises(flowpool.RateLimitError) as limited:
        sansio.decode(429, {"X-Request-Id": "req_1"}, b'{"error": {"type": "rate_limit_exceeded", "message": "m"}}',
                      "u")
    assert (limited.value.type, limited.value.message, limited.value.request_id) == ("rate_limit_exceeded", "m",
                                                                                     "req_1")
    with pytest.raises(flowpool.APIError, match="text/html"):
        sansio.decode(200, {"Content-Type": "text/html"}, b"<html>", "u")


def test_with_options_changes_only_what_it_names_and_refuses_other_names() -> None:
    options = sansio.Options(api_key="k", base_url="http://a", timeout=5.0, default_headers={"X": "1"})
    changed = options.changed(base_url="http://b/", timeout=(1.0, 2.0), api_key=None)
    assert (changed.api_key, changed.base_url, changed.timeout, changed.max_retries) == ("k", "http://b", (1.0, 2.0),
                                                                                         2)
    assert changed.headers() == {"x-api-key": "k", "X": "1"}
    with pytest.raises(TypeError, match="not proxies"):
        options.changed(proxies={})


def test_a_streams_error_event_is_raised_as_the_error_of_its_code() -> None:
    assert sansio.event({"object": "workflow.chunk"}, {}).object == "workflow.chunk"
    with pytest.raises(flowpool.WorkflowTimeoutError):
        sansio.event({"error": {"code": 408, "type": "timeout", "message": "late"}}, {})
