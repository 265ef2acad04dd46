"""Keeping request secrets out of every place a run leaves data at rest.

A request's ``secrets`` reach the worker through the broker, and a run's
output may carry one. Neither may sit anywhere in clear, so:

- The job's secrets cross the broker sealed (:meth:`Sealer.seal`) under a key
  derived from the installation's :class:`ServerKey`. A queued message, or
  one left ``unacked`` by a dead worker, holds only ciphertext.
- An output that carries a secret is stored for its callers, and in the
  cache, sealed in a :class:`SecretBox`: a key derived from the server key,
  the account and the request's secrets together. Only a request of the
  same account holding the same secrets opens it, which is exactly who may
  read that output: callers that joined the run, and later cache hits (the
  cache key already holds the account and a keyed hash of the secrets, so
  no other request finds the entry).

Both use Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``), so a
tampered or foreign token fails to open instead of opening to garbage.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as _secrets
from typing import Any, Callable

import redis
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import keys
from .jsonsafe import canonical_json

__all__ = ["InvalidToken", "SecretBox", "Sealer", "ServerKey"]


def _fernet(material: bytes, purpose: bytes) -> Fernet:
    """A Fernet keyed by HKDF of ``material`` for one ``purpose``: no key is used for two things."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"flowpool:" + purpose).derive(material)
    return Fernet(base64.urlsafe_b64encode(key))


class ServerKey:
    """The installation's secret key: ``FLOWPOOL_SECRET_KEY``, or one generated once and kept in Redis.

    Every API process and worker of one installation derives the same keys
    from it. A key kept in Redis sits beside what it protects, so production
    sets ``FLOWPOOL_SECRET_KEY`` (``flowpool doctor`` says which is in force).
    """

    def __init__(self, client: redis.Redis, configured: str | None) -> None:
        self.redis = client
        self.configured = bool(configured)
        self._key = configured.encode() if configured else None

    def get(self) -> bytes:
        """The key's bytes, generated in Redis on first use when none is configured."""
        if self._key is None:
            self.redis.set(keys.SECRET, _secrets.token_hex(32), nx=True)
            self._key = self.redis.get(keys.SECRET)
        return self._key

    def mac(self, value: Any) -> str:
        """A keyed hash of a JSON value: names it (a cache key's secrets) without revealing it."""
        return hmac.new(self.get(), canonical_json(value), hashlib.sha256).hexdigest()


class SecretBox:
    """Seals JSON values under one derived key and opens only what it sealed; the key is derived on first use."""

    def __init__(self, material: Callable[[], bytes], purpose: bytes) -> None:
        self._material, self._purpose = material, purpose
        self._key: Fernet | None = None

    def _fernet(self) -> Fernet:
        if self._key is None:
            self._key = _fernet(self._material(), self._purpose)
        return self._key

    def seal(self, value: Any) -> str:
        """``value`` (JSON) as a token only this box opens."""
        return self._fernet().encrypt(canonical_json(value)).decode()

    def open(self, token: str) -> Any:
        """The sealed value; raises ``InvalidToken`` for a token sealed under another key, or altered."""
        return json.loads(self._fernet().decrypt(token.encode()))


class Sealer(SecretBox):
    """The installation's box (e.g. for a job's secrets on their way through the broker), and the boxes of requests."""

    def __init__(self, server_key: ServerKey) -> None:
        super().__init__(server_key.get, b"sealed")
        self.server_key = server_key

    def box(self, account: str, secrets: dict[str, str] | None) -> SecretBox | None:
        """The box of a request of ``account`` holding ``secrets``; None for a request with none.

        The account is part of the key: another account sending the same
        secrets never opens what was sealed for this one's runs. Nothing is
        derived until the box is used, which most requests never do.
        """
        if not secrets:
            return None
        key = self.server_key
        return SecretBox(lambda: key.get() + b"\0" + key.mac({"account": account, "secrets": secrets}).encode(),
                         b"secret-output")
