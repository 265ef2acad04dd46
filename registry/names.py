"""The one pattern for names a user gives things (workflow ref names, application and agent names), and for
the endpoints they name (``base_url``)."""
from __future__ import annotations

import re

__all__ = ["APPLICATION_NAME", "BASE_URL", "NAME", "NAME_PATTERN", "is_application_name", "is_name"]

# 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit: safe inside a Redis key and a URL path.
NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
NAME_PATTERN = re.compile(NAME)

# An application's name may also hold spaces between words ("My Application", as Maitai's docs name theirs):
# it is a field of the account's applications hash and a quoted URL path segment, never a key of its own.
APPLICATION_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.\- ]{0,62}[A-Za-z0-9_.\-])?"
_APPLICATION_NAME = re.compile(APPLICATION_NAME)

# An http(s) endpoint: no user info ('@' before the path), no backslash, no whitespace or control character.
# Parsers disagree on such URLs ("http://evil\\@api.example/" is api.example to urlsplit, evil to requests),
# and a provider key bound to a host must go where the check saw it going.
BASE_URL = r"^https?://[^\s/\\@?#\x00-\x1f\x7f]+(/[^\s\\\x00-\x1f\x7f]*)?$"


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid name (fullmatch: with match, '$' also accepts a trailing newline)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_application_name(value: object) -> bool:
    """Whether ``value`` is a valid application name: 1-64 of a name's characters or spaces, neither end a space."""
    return isinstance(value, str) and _APPLICATION_NAME.fullmatch(value) is not None
