"""Webhook signatures: HMAC-SHA256 over a timestamp and the raw body, with the account's signing secret.

The header, ``X-Flowpool-Signature``, reads ``t=<unix seconds>,v1=<hex>``
where ``<hex>`` is ``HMAC-SHA256(secret, f"{t}.{body}")`` over the body's
exact bytes. A receiver recomputes it from the body as it arrived (before
any JSON parsing), compares in constant time, and refuses a timestamp far
from its clock so a captured delivery cannot be replayed later. More than
one ``v1=`` may come (a secret being rotated); any one matching is enough.

Pure standard library: the SDK imports it (``flowpool.verify_webhook``).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time

__all__ = ["HEADER", "SignatureError", "sign", "verify"]

HEADER = "X-Flowpool-Signature"

# How far from the receiver's clock a signed timestamp may be, by default (seconds).
DEFAULT_TOLERANCE = 300

# A timestamp and a v1 signature as sign() writes them; ASCII only (int() and str.isdigit() take other digits).
_TIMESTAMP = re.compile(r"-?[0-9]{1,20}")
_HEX = re.compile(r"[0-9a-fA-F]{1,128}")


class SignatureError(ValueError):
    """A webhook's signature header is missing, malformed, stale, or does not match its body."""


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Flowpool-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds; None: now)."""
    if timestamp is None:
        timestamp = int(time.time())
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def parse(header: str) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` signatures of a header; SignatureError when it has no timestamp or none."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in (header or "").split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not _TIMESTAMP.fullmatch(value):
                raise SignatureError(f"the signature's timestamp is not an integer: {value[:40]!r}")
            timestamp = int(value)
        elif name == "v1" and value:
            if not _HEX.fullmatch(value):
                raise SignatureError(f"a v1 signature is not hex: {value[:80]!r}")
            signatures.append(value.lower())
    if timestamp is None:
        raise SignatureError("the signature header has no timestamp (t=...)")
    if not signatures:
        raise SignatureError("the signature header has no v1 signature")
    return timestamp, signatures


def verify(body: bytes | str, header: str | None, secret: str, tolerance: float = DEFAULT_TOLERANCE,
           now: float | None = None) -> int:
    """Check a delivery: ``body`` as received, its ``X-Flowpool-Signature`` ``header``, the account's ``secret``.

    Returns the signed timestamp; raises SignatureError when the header is
    missing or malformed, when no signature matches, or when the timestamp is
    more than ``tolerance`` seconds from ``now`` (default: this clock).
    """
    if not header:
        raise SignatureError(f"no {HEADER} header")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp, signatures = parse(header)
    expected = _digest(secret, raw, timestamp).encode()
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in signatures):
        raise SignatureError("no signature matches the body and the secret")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(f"the signature's timestamp is {abs(current - timestamp):.0f}s from now, over the "
                             f"tolerance of {tolerance:g}s")
    return timestamp
