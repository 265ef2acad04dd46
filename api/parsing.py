"""Reading request bodies and query strings into validated models, with errors that name the problem."""
from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from flowpool.errors import MalformedJSON, RequestError

__all__ = ["json_body", "model_from", "page_args", "describe_validation_error"]

M = TypeVar("M", bound=BaseModel)

MAX_PAGE = 100


def json_body() -> Any:
    """The request body parsed as JSON; a 400 that says what is wrong otherwise."""
    data = request.get_data(cache=True)
    if not data:
        raise MalformedJSON("the request body is empty; send a JSON object")
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"the request body is not UTF-8: {exc}") from exc
    except ValueError as exc:
        raise MalformedJSON(f"malformed JSON body: {exc}") from exc


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
    """``offset`` and ``limit`` from the query string (limit at most 100)."""
    values = []
    for name, default, low, high in (("offset", 0, 0, None), ("limit", 25, 1, MAX_PAGE)):
        raw = request.args.get(name, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be an integer, got {raw!r}", param=name) from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise RequestError(f"{name} must be {bound}, got {value}", param=name)
        values.append(value)
    return values[0], values[1]


def paginated(items: list[Any], total: int, offset: int, limit: int) -> dict[str, Any]:
    return {"data": items, "pagination": {"total": total, "offset": offset, "limit": limit}}
