"""Whether a decoded JSON value can travel through flowpool and be shown again, and its one canonical encoding.

A value coming from outside (a request body, a workflow's result) can parse
and still break what comes later: nested past Python's recursion limit, it
makes every later ``json.dumps``/``json.loads`` raise RecursionError; a NaN or
Infinity makes the API emit text that is not JSON; a lone surrogate (``"\\ud800"``
as an escape) cannot be encoded as UTF-8 for Redis or the wire. The check walks
the value with its own stack, so a value of any depth is measured without
recursing.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["canonical_json", "find_problem", "find_problem_in"]

# In a value's JSON text, what may betray a problem: an escaped or a raw lone-surrogate code unit, NaN, Infinity.
_HINT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]|NaN|Infinity")

# A path as a linked list of (parent path, key), built into text only when a problem is found.
_Path = tuple[Any, Any] | None


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value, whatever the key order: what is hashed, keyed or sealed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def find_problem(value: Any, max_depth: int) -> tuple[str, str] | None:
    """``(path, what is wrong)`` of the first part of ``value`` that cannot travel; None when it all can.

    The path is dotted (``input.items[3].name``), empty for the value itself.
    Depth counts containers: ``[]`` is 1 deep, ``[[1]]`` 2.
    """
    stack: list[tuple[Any, int, _Path]] = [(value, 0, None)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, (dict, list)):
            if depth + 1 > max_depth:
                return _text(path), f"is nested deeper than {max_depth} levels of arrays and objects"
            for key, child in item.items() if isinstance(item, dict) else enumerate(item):
                if isinstance(key, str) and not _utf8(key):
                    return _text((path, key)), "has a key with a lone surrogate, which is not valid Unicode"
                stack.append((child, depth + 1, (path, key)))
        elif isinstance(item, str):
            if not _utf8(item):
                return _text(path), "holds a lone surrogate (\\ud800-\\udfff unpaired), which is not valid Unicode"
        elif isinstance(item, float) and not math.isfinite(item):
            return _text(path), f"is {item!r}, which JSON cannot carry"
    return None


def find_problem_in(value: Any, text: str, max_depth: int) -> tuple[str, str] | None:
    """:func:`find_problem` of ``value``, whose JSON is ``text``, skipping the walk when the text shows none can be.

    A text with no more brackets than ``max_depth`` and no surrogate, NaN or
    Infinity in it cannot hold a problem: the common case costs two counts and
    one search, not a second pass over the value.
    """
    if text.count("[") + text.count("{") <= max_depth and not _HINT.search(text):
        return None
    return find_problem(value, max_depth)


def _utf8(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (it holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(path: _Path) -> str:
    """A linked path as ``a.b[2].c``."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    parts = []
    for key in reversed(keys):
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            parts.append(("." if parts else "") + str(key))
    return "".join(parts)
