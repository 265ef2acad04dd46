"""Reading request bodies and query strings into validated models, with errors that name the problem."""
from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from flowpool.errors import MalformedJSON, RequestError
from flowpool.jsonsafe import find_problem_in

from .services import services

__all__ = ["json_body", "loads", "model_from", "page_args", "describe_validation_error",
           "request_idempotency_key"]

M = TypeVar("M", bound=BaseModel)

MAX_PAGE = 100
# Far past any real list, and small enough that offset + limit fits Redis's 64-bit indexes.
MAX_OFFSET = 1_000_000_000


# Printable ASCII, as the IETF Idempotency-Key draft and the clients that send one (UUIDs, ULIDs) use.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")


def request_idempotency_key() -> str | None:
    """The request's ``Idempotency-Key`` header, checked; None without one."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise RequestError("the Idempotency-Key header must be 1 to 255 printable ASCII characters",
                           param="Idempotency-Key")
    return key


def json_body() -> Any:
    """The request body parsed as JSON; a 400 that says what is wrong otherwise."""
    data = request.get_data(cache=True)
    if not data:
        raise MalformedJSON("the request body is empty; send a JSON object")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"the request body is not UTF-8: {exc}") from exc
    return loads(text, "body")


def loads(text: str, what: str) -> Any:
    """``text`` parsed as JSON that flowpool can carry; a 400 naming ``what`` (and the field) otherwise.

    Refused: nesting past FLOWPOOL_MAX_JSON_DEPTH, NaN, Infinity and numbers
    that overflow to it, and lone surrogates. Each would parse here and fail
    later (a RecursionError, invalid JSON out, a string Redis cannot store).
    """
    max_depth = services().settings.max_json_depth
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise MalformedJSON(f"{what} is nested deeper than {max_depth} levels of arrays and objects",
                            param=what) from None
    except ValueError as exc:
        raise MalformedJSON(f"malformed JSON {what}: {exc}", param=what) from exc
    problem = find_problem_in(value, text, max_depth)
    if problem is not None:
        path, message = problem
        field = path or what
        raise MalformedJSON(f"{field} {message}", param=field)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """A message naming each bad field, and the first field's dotted path."""
    parts, first = [], ""
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "body"
        first = first or path
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        parts.append(f"{path}: {message}")
    return "; ".join(parts), first


def model_from(model: type[M], data: Any) -> M:
    """``data`` validated into ``model``; a 400 naming each bad field otherwise."""
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = describe_validation_error(exc)
        raise RequestError(message, param=field) from exc


def page_args() -> tuple[int, int]:
    """``offset`` and ``limit`` from the query string (limit at most 100, offset at most a billion)."""
    values = []
    for name, default, low, high in (("offset", 0, 0, MAX_OFFSET), ("limit", 25, 1, MAX_PAGE)):
        raw = request.args.get(name, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be an integer, got {str(raw)[:40]!r}", param=name) from None
        if not low <= value <= high:
            raise RequestError(f"{name} must be between {low} and {high}, got {str(value)[:40]}", param=name)
        values.append(value)
    return values[0], values[1]


def paginated(items: list[Any], total: int, offset: int, limit: int) -> dict[str, Any]:
    return {"data": items, "pagination": {"total": total, "offset": offset, "limit": limit}}
