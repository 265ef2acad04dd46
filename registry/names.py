"""The one pattern for names a user gives things: workflow ref names, application and agent names."""
from __future__ import annotations

import re

__all__ = ["NAME", "NAME_PATTERN", "is_name"]

# 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit: safe inside a Redis key and a URL path.
NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
NAME_PATTERN = re.compile(NAME)


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid name (fullmatch: with match, '$' also accepts a trailing newline)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None
