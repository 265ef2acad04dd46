"""Webhook signatures (flowpool.signing): what a receiver checks, and what it must refuse."""
from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys

import pytest

import flowpool
from flowpool.signing import SignatureError, parse, sign, verify

SECRET = "whsec_test-secret"
BODY = b'{"type":"run.completed","request_id":"req_1","status":"succeeded","output":{"x":1}}'
NOW = 1_800_000_000


def test_a_signed_body_verifies_and_gives_back_its_timestamp() -> None:
    header = sign(SECRET, BODY, NOW)

    assert verify(BODY, header, SECRET, now=NOW + 10) == NOW
    assert verify(BODY.decode(), header, SECRET, now=NOW) == NOW  # the body as text, as a web framework hands it


def test_the_signature_is_hmac_sha256_over_the_timestamp_a_dot_and_the_raw_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()

    assert sign(SECRET, BODY, NOW) == f"t={NOW},v1={expected}"


@pytest.mark.parametrize("tampered", [
    BODY.replace(b"succeeded", b"failed"),
    BODY + b" ",  # even whitespace: the receiver must check the bytes as they came, before parsing
    b"",
])
def test_a_body_changed_in_transit_is_refused(tampered: bytes) -> None:
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(tampered, sign(SECRET, BODY, NOW), SECRET, now=NOW)


def test_a_body_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(BODY, sign("whsec_someone-else", BODY, NOW), SECRET, now=NOW)


def test_a_timestamp_moved_to_look_fresh_breaks_the_signature() -> None:
    digest = sign(SECRET, BODY, NOW).split("v1=")[1]

    with pytest.raises(SignatureError, match="no signature matches"):
        verify(BODY, f"t={NOW + 3600},v1={digest}", SECRET, now=NOW + 3600)


@pytest.mark.parametrize("offset", [301, -301, 86400])
def test_a_stale_or_future_timestamp_is_refused_even_with_a_valid_signature(offset: int) -> None:
    with pytest.raises(SignatureError, match="tolerance of 300s"):
        verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW + offset)

    assert verify(BODY, sign(SECRET, BODY, NOW), SECRET, tolerance=86401, now=NOW + offset) == NOW


def test_any_one_of_several_signatures_may_match_as_while_a_secret_is_rotated() -> None:
    ours = sign(SECRET, BODY, NOW).split("v1=")[1]
    header = f"t={NOW},v1={'0' * 64},v1={ours}"

    assert verify(BODY, header, SECRET, now=NOW) == NOW


def test_the_header_is_parsed_with_spaces_and_unknown_parts_passed_over() -> None:
    assert parse(f" t={NOW} , v0=old, v1=abc ,v1=def, junk") == (NOW, ["abc", "def"])


@pytest.mark.parametrize("header, message", [
    (None, "no X-Flowpool-Signature header"),
    ("", "no X-Flowpool-Signature header"),
    ("v1=abc", "no timestamp"),
    (f"t={NOW}", "no v1 signature"),
    (f"t={NOW},v1=", "no v1 signature"),
    ("t=yesterday,v1=abc", "not an integer"),
    (f"t=\u0661\u0662,v1={'0' * 64}", "not an integer"),  # digits int() takes, but not ASCII
])
def test_a_missing_or_malformed_header_is_refused_saying_why(header: str | None, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify(BODY, header, SECRET, now=NOW)


@pytest.mark.parametrize("value", ["\u00e9" * 64, "\u0661" * 64, "z" * 64, "ab cd"])
def test_a_signature_that_is_not_hex_is_refused_as_a_bad_signature_not_a_crash(value: str) -> None:
    """A receiver hands over whatever header came; hmac.compare_digest raises TypeError on non-ASCII text."""
    with pytest.raises(SignatureError, match="not hex"):
        verify(BODY, f"t={NOW},v1={value}", SECRET, now=NOW)


def test_the_sdk_exports_the_check_and_loads_nothing_of_the_server_for_it() -> None:
    assert flowpool.verify_webhook is verify and flowpool.WebhookSignatureError is SignatureError
    assert issubclass(SignatureError, ValueError)
    code = ("import sys\nfrom flowpool import verify_webhook\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'flask', 'celery', 'requests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == "[]\n"
