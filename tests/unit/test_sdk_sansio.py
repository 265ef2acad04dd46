"""What both SDK clients decide without I/O: when to send a call again, how an answer reads, what options become."""
from __future__ import annotations

import calendar
import email.utils
import re
import socket
import threading
import time

import pytest
import flowpool
from flowpool.cli.common import describe_transport_error
from flowpool.sdk import sansio
from flowpool.sse import EventReader, sse_data


@pytest.mark.parametrize("attempt, status, headers, wait", [
    (0, None, {}, 0.5),  # nothing came back: 0.5 s, doubling
    (1, None, {}, 1.0),
    (0, 429, {"x-should-retry": "true", "Retry-After": "3"}, 3.0),  # the server's own wait
    (0, 503, {"x-should-retry": "true"}, 0.5),
    (0, 429, {"x-should-retry": "true", "Retry-After": "11"}, None),  # too long to wait here: raised at once
    (0, 503, {"x-should-retry": "true", "Retry-After": "soon"}, 0.5),  # neither seconds nor a date
    (0, 500, {"x-should-retry": "false"}, None),  # a run's error is never sent again
    (0, 429, {}, None),  # the server did not say it is safe
    (0, 200, {}, None),
    (2, None, {}, None),  # out of tries
], ids=["dropped", "dropped-again", "retry-after", "no-retry-after", "too-long", "not-a-wait", "run-failed",
        "unmarked", "ok", "spent"])
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


def test_retry_after_as_an_http_date_waits_until_that_date() -> None:
    now = calendar.timegm((2027, 1, 15, 8, 0, 0))
    # RFC 9110's preferred form, and the two obsolete ones it says a recipient must read (no zone: GMT).
    for date in ("Fri, 15 Jan 2027 08:00:05 GMT", "Friday, 15-Jan-27 08:00:05 GMT", "Fri Jan 15 08:00:05 2027"):
        assert sansio.backoff(0, date, now=now) == 5.0, date
    assert sansio.backoff(0, "Fri, 15 Jan 2027 07:59:00 GMT", now=now) == 0.0  # past: at once
    assert sansio.backoff(0, "Fri, 15 Jan 2027 08:01:00 GMT", now=now) is None  # too long: raised at once
    asked = email.utils.formatdate(time.time() + 3600, usegmt=True)  # read against the clock when no now is given
    assert sansio.retry_wait(0, 2, 429, {"x-should-retry": "true", "Retry-After": asked}) is None


@pytest.mark.parametrize("given", ["http://h:1", "http://h:1/", "http://h:1/api/v1", "http://h:1/api/v1/"])
def test_clients_take_a_base_url_ending_in_api_v1_as_the_root_of_flowpools_routes(
        given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert flowpool.Maitai(api_key="k", base_url=given).base_url == "http://h:1"
    assert flowpool.AsyncMaitai(api_key="k", base_url=given).base_url == "http://h:1"
    monkeypatch.setenv("MAITAI_BASE_URL", given)
    assert flowpool.Maitai(api_key="k").base_url == "http://h:1"
    assert flowpool.Maitai(api_key="k").with_options(base_url=given).base_url == "http://h:1"
    # flowpool's own clients too, as the Node SDK's do: flowpool's routes carry /api/v1 themselves.
    assert flowpool.Flowpool(api_key="k", base_url=given).base_url == "http://h:1"
    assert flowpool.AsyncFlowpool(api_key="k", base_url=given).base_url == "http://h:1"


# The event stream reader (flowpool.sse).

def test_the_event_reader_ends_lines_only_at_cr_lf_and_crlf_and_joins_an_events_data_lines() -> None:
    stream = ('data: {"c": "a\u2028b\u2029c\x85d"}\r\n\r\n'  # JSON holding str.splitlines' other ends
              ": keep-alive\n\n"
              "event: log\nid: 7\ndata: [1,\ndata:2]\r\r"  # two data lines make one event; CR alone ends a line
              "data: [DONE]\n\n"
              'data: "after the end"\n\n').encode()
    expected = [{"c": "a\u2028b\u2029c\x85d"}, [1, 2]]
    whole = EventReader()
    assert (whole.feed(stream), whole.done) == (expected, True)
    one_byte_at_a_time = EventReader()  # CRLF split between two reads, UTF-8 characters split between reads
    values = [v for i in range(len(stream)) for v in one_byte_at_a_time.feed(stream[i:i + 1])]
    assert (values, one_byte_at_a_time.done, one_byte_at_a_time.end()) == (expected, True, [])


def test_the_event_reader_ends_a_stream_without_done_with_what_its_whole_lines_made() -> None:
    reader = EventReader()
    assert reader.feed(b"data: 1\n\ndata: 2\r") == [1]
    assert (reader.end(), reader.done) == ([2], False)  # the last event's blank line never came: taken anyway
    cut = EventReader()
    assert (cut.feed(b'data: 1\n\ndata: {"a": '), cut.end(), cut.done) == ([1], [], False)  # a line cut off
    assert list(sse_data([b"data: 1\n", b"\ndata: [DONE]\n\n", b"data: 3\n\n"])) == [1]
    with pytest.raises(ValueError):
        EventReader().feed(b"data: {not json}\n\n")


def test_the_event_reader_drops_one_byte_order_mark_at_the_start_of_the_stream() -> None:
    stream = "\ufeffdata: 1\n\ndata: 2\n\n".encode()
    assert EventReader().feed(stream) == [1, 2]
    one_byte_at_a_time = EventReader()  # the mark split between reads
    assert [v for i in range(len(stream)) for v in one_byte_at_a_time.feed(stream[i:i + 1])] == [1, 2]
    # Only one, and only first: a second mark is part of the field's name ("\ufeffdata" is not "data").
    assert EventReader().feed("\ufeff\ufeffdata: 1\n\ndata: 2\n\n".encode()) == [2]
    assert EventReader().feed("data: 1\n\n\ufeffdata: 2\n\n".encode()) == [1]


def test_an_event_whose_data_lines_are_each_json_but_not_joined_is_read_as_one_value_per_line() -> None:
    # A provider writing its chunks as data lines with no blank line between them.
    assert EventReader().feed(b'data: {"a": 1}\ndata: {"b": 2}\n\n') == [{"a": 1}, {"b": 2}]
    reader = EventReader()
    assert (reader.feed(b"data: 1\ndata: 2\ndata: [DONE]\n\ndata: 3\n\n"), reader.done) == ([1, 2], True)
    assert list(sse_data([b"data: 1\ndata: 2\n"])) == [1, 2]  # nor a blank line at the end
    assert EventReader().feed(b"data: [1,\ndata: 2]\n\n") == [[1, 2]]  # data lines that join into JSON: one value
    with pytest.raises(ValueError, match="Extra data"):  # a line that is not JSON: the joined data's error
        EventReader().feed(b'data: {"a": 1}\ndata: {not json}\n\n')


def test_a_read_past_the_timeout_is_never_said_to_be_an_unreachable_api() -> None:
    # A loopback server that sends an event stream's head, then nothing: the read of its body passes the timeout,
    # which requests raises as a ConnectionError, as it does a refused connection.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def stall() -> None:
            connection, _ = listener.accept()
            with connection:
                # The whole request first (its head and body may come in separate reads): a close with bytes left
                # unread resets the connection, which the client would see instead of its read's timeout.
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
                while len(body) < length:
                    body += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n")
                while connection.recv(65536):  # until the client closes the connection
                    pass

        server = threading.Thread(target=stall)
        server.start()
        with flowpool.Flowpool(api_key="k", base_url=url, timeout=(10, 0.2), max_retries=0) as fp:
            stream = fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
            with pytest.raises(flowpool.APITimeoutError) as late:
                list(stream)
        server.join(10)
    said = describe_transport_error(late.value)
    assert "cannot reach" not in said and "in time" in said
    # A refused connection: a loopback port nothing listens on (bound, then closed).
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with flowpool.Flowpool(api_key="k", base_url=url, timeout=10, max_retries=0) as fp:
        with pytest.raises(flowpool.APIConnectionError) as refused:
            fp.workflow.completions.create(model="workflow:x", input={})
    assert not isinstance(refused.value, flowpool.APITimeoutError)
    assert describe_transport_error(refused.value).startswith("cannot reach the API")