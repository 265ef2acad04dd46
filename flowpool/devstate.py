"""What a running ``flowpool dev`` keeps in its data directory, and how the other commands find it.

The data directory (``FLOWPOOL_DATA_DIR``, default ``.flowpool`` in the
working directory) holds:

- ``redis/``: the data of the Redis dev starts (unless ``FLOWPOOL_REDIS_URL`` names one);
- ``dev-key``: the dev account's API key, kept across restarts;
- ``dev.json``: while dev runs, where it runs: ``{"api_url", "redis_url", "pid"}``.
  Written once the stack answers, removed when dev stops.

The files are written whole (a temporary file renamed over) and readable by
their owner alone (mode 0600).

While it runs, dev holds an exclusive ``flock`` on the directory itself: the
lock goes with the process however it ends, so a record whose directory can
be locked was left by a dev that was killed, and is not believed. The other
commands take the lock *shared* for an instant to find out
(:func:`running_dev`); dev, claiming the directory, waits a moment for such a
probe to let go before it says another dev holds it.

Only the standard library is used here: the client-only install reads it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["REDIS_DIR", "KEY_FILE", "RECORD_FILE", "DevRecord", "resolve", "claim", "running_dev", "record",
           "forget", "write_private", "shown_url"]

REDIS_DIR = "redis"
KEY_FILE = "dev-key"
RECORD_FILE = "dev.json"

# How long dev waits for a command's probe of the lock to end before it takes the directory for another dev's.
_CLAIM_PATIENCE_SECONDS = 1.0


@dataclass(frozen=True)
class DevRecord:
    """Where a running ``flowpool dev`` serves, as it recorded it."""

    api_url: str
    redis_url: str
    key: str | None  # None: its key file is missing or unreadable


def resolve(data_dir: str | os.PathLike[str]) -> Path:
    """The data directory as an absolute path (a relative one is taken from the working directory)."""
    return Path(data_dir).expanduser().resolve()


def claim(data_dir: Path) -> int | None:
    """Create ``data_dir`` and lock it for this process: the descriptor that holds the lock, or None when
    another process holds it. Children do not inherit the descriptor (O_CLOEXEC)."""
    import fcntl

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + _CLAIM_PATIENCE_SECONDS
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(lock)
                return None
            time.sleep(0.05)  # a command probing for a running dev holds it for an instant


def running_dev(data_dir: Path) -> DevRecord | None:
    """The record of the ``flowpool dev`` running on ``data_dir``; None when none runs there (or none can be
    told: no record, one that cannot be read, or a platform without flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    # The lock first, then the record: a record read before the probe could be one a dev that is gone left,
    # believed because another dev claimed the directory in between.
    try:
        lock = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: no dev runs there, whatever record is left
    except BlockingIOError:
        pass
    except OSError:
        return None
    finally:
        os.close(lock)  # also releases a lock just taken
    try:
        text = (data_dir / RECORD_FILE).read_text(encoding="utf-8")
    except OSError:
        return None  # a dev that holds the directory but has not recorded itself yet, or just forgot
    try:
        fields = json.loads(text)
        api_url, redis_url = str(fields["api_url"]), str(fields["redis_url"])
    except (ValueError, KeyError, TypeError):
        return None
    try:
        key = (data_dir / KEY_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        key = None
    return DevRecord(api_url=api_url, redis_url=redis_url, key=key)


def record(data_dir: Path, api_url: str, redis_url: str) -> None:
    """Say where this dev serves, for the other commands run on the same data directory."""
    write_private(data_dir / RECORD_FILE,
                  json.dumps({"api_url": api_url, "redis_url": redis_url, "pid": os.getpid()}) + "\n")


def forget(data_dir: Path) -> None:
    """Remove the record: dev stops, or starts where a dev that was killed left one."""
    try:
        (data_dir / RECORD_FILE).unlink()
    except FileNotFoundError:
        pass


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (a reader sees the old file or the new one), readable by its owner alone."""
    written = path.with_name(path.name + ".new")
    descriptor = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file left from an interrupted write keeps its old mode otherwise
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(written, path)


def shown_url(url: str) -> str:
    """``url`` as it may be printed: its password masked (``redis://:***@host:6379/0``); the rest as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL that can be split: show nothing of what may be in it
        return "(a URL that cannot be parsed)"
    # redis-py also takes the password as a query parameter (``unix:///run/redis.sock?password=...``).
    query = [(name, "***" if name.lower() in ("password", "pass") else value)
             for name, value in parse_qsl(parts.query, keep_blank_values=True)]
    if not password and query == parse_qsl(parts.query, keep_blank_values=True):
        return url
    shown = url
    if password:  # rebuilt by hand: urlunsplit would drop the empty authority of unix:///path
        user, _, host = parts.netloc.rpartition("@")
        shown = shown.replace(parts.netloc, f"{user.partition(':')[0]}:***@{host}", 1)
    if parts.query:
        head, _, rest = shown.partition("?")
        fragment = "#" + rest.partition("#")[2] if "#" in rest else ""
        shown = f"{head}?{urlencode(query, safe='*')}{fragment}"
    return shown
