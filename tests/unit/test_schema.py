"""Tests of the runtime input/output checks in flowpool.registry.schema."""
from __future__ import annotations

import pytest

from flowpool.errors import InputSchemaError, OutputSchemaError
from flowpool.registry.schema import check_input, check_invocation_input, check_output

SCHEMA = {
    "query": {"type": "string", "description": "what to look for", "required": True},
    "n": {"type": "integer"},
    "score": {"type": "number"},
    "verbose": {"type": "boolean"},
    "options": {"type": "object"},
    "tags": {"type": "array"},
}


def test_none_schema_accepts_anything() -> None:
    for value in (None, 1, "text", [1], {"any": object()}):
        check_input(None, value)
        check_output(None, value)


def test_value_matching_every_type_is_accepted() -> None:
    value = {"query": "q", "n": 3, "score": 0.5, "verbose": False, "options": {"a": 1}, "tags": ["x"]}
    check_input(SCHEMA, value)
    check_output(SCHEMA, value)


def test_optional_fields_may_be_missing_or_none_and_unknown_fields_are_allowed() -> None:
    check_input(SCHEMA, {"query": "q"})
    check_input(SCHEMA, {"query": "q", "n": None, "tags": None, "extra": object()})


def test_integer_is_accepted_as_number() -> None:
    check_input(SCHEMA, {"query": "q", "score": 2})


@pytest.mark.parametrize("value", [None, [], "query", 3])
def test_input_that_is_not_an_object_names_the_fields(value: object) -> None:
    with pytest.raises(InputSchemaError) as caught:
        check_input(SCHEMA, value)
    assert caught.value.message == "input must be a JSON object with fields: query, n, score, verbose, options, tags"


@pytest.mark.parametrize("value", [["a", "b"], "text", 3, 2.5, True, None, {"any": "thing"}])
def test_an_empty_input_schema_accepts_any_json_input(value: object) -> None:
    check_input({}, value)
    check_invocation_input({}, value)


def test_missing_required_input_field_is_named() -> None:
    with pytest.raises(InputSchemaError) as caught:
        check_input(SCHEMA, {"n": 1})
    assert caught.value.message == "input field 'query' is required"
    assert caught.value.details == {"field": "query"}
    assert caught.value.to_body()["error"]["field"] == "query"
    assert caught.value.status == 400


def test_required_field_set_to_none_is_rejected_as_null() -> None:
    with pytest.raises(InputSchemaError, match="^input field 'query' must be string, got null$"):
        check_input(SCHEMA, {"query": None})


@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [
        ("query", 5, "string", "integer"),
        ("n", "5", "integer", "string"),
        ("n", 5.0, "integer", "number"),
        ("n", True, "integer", "boolean"),
        ("score", False, "number", "boolean"),
        ("score", "1.5", "number", "string"),
        ("verbose", 1, "boolean", "integer"),
        ("options", ["a"], "object", "array"),
        ("tags", {"a": 1}, "array", "object"),
        ("tags", ("a",), "array", "tuple"),
    ],
)
def test_input_field_of_the_wrong_type_names_field_expected_and_actual_type(
    field: str, value: object, expected: str, got: str
) -> None:
    with pytest.raises(InputSchemaError) as caught:
        check_input(SCHEMA, {"query": "q", field: value})
    assert caught.value.message == f"input field {field!r} must be {expected}, got {got}"
    assert caught.value.details == {"field": field}


def test_output_that_is_not_an_object_raises_output_schema_error() -> None:
    with pytest.raises(OutputSchemaError) as caught:
        check_output({"answer": {"type": "string"}}, "plain text")
    assert caught.value.message == "output must be a JSON object with fields: answer"


def test_missing_required_output_field_raises_output_schema_error_with_field() -> None:
    with pytest.raises(OutputSchemaError) as caught:
        check_output({"answer": {"type": "string", "required": True}}, {})
    assert caught.value.message == "output field 'answer' is required"
    assert caught.value.details == {"field": "answer"}
    assert caught.value.to_dict() == {
        "kind": "OutputSchemaError",
        "message": "output field 'answer' is required",
        "field": "answer",
    }


def test_output_field_of_the_wrong_type_raises_output_schema_error() -> None:
    with pytest.raises(OutputSchemaError, match="^output field 'count' must be integer, got number$"):
        check_output({"count": {"type": "integer"}}, {"count": 1.0})


def test_first_broken_field_in_schema_order_is_reported() -> None:
    with pytest.raises(InputSchemaError) as caught:
        check_input(SCHEMA, {"tags": "x", "n": "y"})
    assert caught.value.details == {"field": "query"}


def test_an_invocation_without_input_is_fine_until_the_schema_requires_a_field() -> None:
    optional = {"q": {"type": "string"}}
    required = {"q": {"type": "string", "required": True}}

    check_invocation_input(None, None)
    check_invocation_input(optional, None)  # only messages came
    with pytest.raises(InputSchemaError, match="'q' is required"):
        check_invocation_input(required, None)
    with pytest.raises(InputSchemaError):
        check_invocation_input(optional, {"q": 1})  # input that does come is checked
