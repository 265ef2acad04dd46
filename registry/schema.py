"""Runtime checks of a run's input and output against the workflow's INPUT_SCHEMA and OUTPUT_SCHEMA."""
from __future__ import annotations

from collections.abc import Callable

from flowpool.errors import InputSchemaError, InvalidResult, OutputSchemaError, RequestError, RunError
from flowpool.jsonsafe import find_problem, find_problem_in
from flowpool.settings import DEFAULT_MAX_JSON_DEPTH

__all__ = ["JSON_TYPES", "check_input", "check_invocation_input", "check_output"]


def _is_number(value: object) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A schema `type` → whether a decoded JSON value has that type; bool is an int subclass, hence the exclusions.
JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda value: isinstance(value, str),
    "number": _is_number,
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
}


def check_input(schema: dict | None, value: object) -> None:
    """Raise InputSchemaError when a run's input breaks the workflow's INPUT_SCHEMA.

    A schema that names no field (``INPUT_SCHEMA = {}``, or none at all) takes
    any JSON input, as the seed does: an object, a string, an array, a
    number... One that names fields takes an object holding them.
    """
    if not schema:
        return
    _check(schema, value, "input", InputSchemaError)


def check_invocation_input(schema: dict | None, value: object) -> None:
    """Check the input of an invocation: none at all is fine while the schema requires no field (only messages came)."""
    if value is None and not any(spec.get("required") for spec in (schema or {}).values()):
        return
    check_input(schema, value if value is not None else {})


def check_output(schema: dict | None, value: object, max_depth: int = DEFAULT_MAX_JSON_DEPTH,
                 text: str | None = None) -> None:
    """Raise InvalidResult when a run's result cannot be shown as JSON, OutputSchemaError when it breaks OUTPUT_SCHEMA.

    A result nested deeper than ``max_depth`` or holding NaN, Infinity or a
    lone surrogate would be recorded as a success and then break every reader
    of the record, so the run fails here instead. Workers pass
    ``settings.max_json_depth`` and the result's JSON ``text``, which spares
    the walk over a plain result.
    """
    problem = find_problem(value, max_depth) if text is None else find_problem_in(value, text, max_depth)
    if problem is not None:
        path, what = problem
        where = f"result field {path}" if path else "the result"
        raise InvalidResult(f"{where} {what}; return plain JSON nested at most {max_depth} levels",
                            **({"field": path} if path else {}))
    _check(schema, value, "output", OutputSchemaError)


def _check(
    schema: dict | None, value: object, side: str, error: type[RequestError] | type[RunError]
) -> None:
    """Raise error for the first field of value that breaks schema."""
    if schema is None:
        return
    if not isinstance(value, dict):
        fields = ", ".join(str(field) for field in schema)
        raise error(f"{side} must be a JSON object" + (f" with fields: {fields}" if fields else ""))
    for field, spec in schema.items():
        required = spec.get("required", False)
        if field not in value:
            if required:
                raise error(f"{side} field {field!r} is required", field=field)
            continue
        item = value[field]
        if item is None and not required:
            continue
        accepts = JSON_TYPES.get(spec.get("type", ""))
        if accepts is not None and not accepts(item):
            raise error(f"{side} field {field!r} must be {spec['type']}, got {_json_type(item)}", field=field)


def _json_type(value: object) -> str:
    """The JSON type name of value, or its Python type name when it has none."""
    if value is None:
        return "null"
    # integer before number so that 3 reads as integer and 3.0 as number.
    for name in ("boolean", "integer", "number", "string", "object", "array"):
        if JSON_TYPES[name](value):
            return name
    return type(value).__name__
