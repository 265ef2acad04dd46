"""The playground's example input, worked out from a workflow's INPUT_SCHEMA."""
from __future__ import annotations

import json

from flowpool.api.console.playground import example_input, example_text


def test_each_field_gets_an_empty_value_of_its_type() -> None:
    schema = {"s": {"type": "string"}, "n": {"type": "number"}, "i": {"type": "integer"}, "b": {"type": "boolean"},
              "a": {"type": "array"}, "o": {"type": "object"}, "x": {"description": "no type"}}
    assert example_input(schema) == {"s": "", "n": 0, "i": 0, "b": False, "a": [], "o": {}, "x": None}


def test_a_default_wins_over_an_example_which_wins_over_the_first_enum_value() -> None:
    schema = {"d": {"type": "integer", "default": 3, "example": 4, "enum": [5]},
              "e": {"type": "string", "example": "tides", "enum": ["x"]},
              "m": {"type": "string", "enum": ["fast", "slow"]}, "f": {"type": "boolean", "default": False}}
    assert example_input(schema) == {"d": 3, "e": "tides", "m": "fast", "f": False}


def test_no_schema_gives_an_empty_object_and_the_values_are_not_shared() -> None:
    assert example_input(None) == {} == example_input({})
    first = example_input({"a": {"type": "array"}})
    first["a"].append(1)
    assert example_input({"a": {"type": "array"}}) == {"a": []}


def test_the_textarea_text_is_indented_json() -> None:
    text = example_text({"q": {"type": "string"}})
    assert json.loads(text) == {"q": ""} and "\n  " in text
