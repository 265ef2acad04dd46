"""Tests of the static workflow-script validation in flowpool.registry.validation."""
from __future__ import annotations

from textwrap import dedent

import pytest

from flowpool.errors import ValidationFailed
from flowpool.registry.validation import Problem, ScriptInfo, validate_script

GOOD_SCRIPT = dedent(
    '''\
    from flowpool_workflow import WorkflowContext

    APPLICATION = "search"
    TIMEOUT_SECONDS = 30
    CACHE_TTL_SECONDS = 600
    INPUT_SCHEMA = {
        "query": {"type": "string", "description": "what to look for", "required": True},
        "limit": {"type": "integer"},
    }
    OUTPUT_SCHEMA: dict = {"answer": {"type": "string", "required": True}}


    def execute(ctx: WorkflowContext):
        def helper():
            return
        return {"answer": ctx.input["query"]}
    '''
)


def src(text: str) -> str:
    """Dedent a script written inline in a test."""
    return dedent(text).lstrip("\n")


def messages(source: str) -> list[str]:
    """The problem messages of a script."""
    return [p.message for p in validate_script(source).problems]


def lines(source: str) -> list[int]:
    """The problem lines of a script."""
    return [p.line for p in validate_script(source).problems]


def test_good_script_is_ok_and_its_script_info_is_filled() -> None:
    result = validate_script(GOOD_SCRIPT)
    assert result.ok
    assert result.problems == []
    assert result.info == ScriptInfo(
        application="search",
        input_schema={
            "query": {"type": "string", "description": "what to look for", "required": True},
            "limit": {"type": "integer"},
        },
        output_schema={"answer": {"type": "string", "required": True}},
        timeout_seconds=30.0,
        cache_ttl_seconds=600,
    )
    assert isinstance(result.info.timeout_seconds, float)
    result.raise_for_problems()


def test_script_without_constants_is_ok_with_an_empty_script_info() -> None:
    result = validate_script("def execute(ctx):\n    return 1\n")
    assert result.ok
    assert result.info == ScriptInfo(None, None, None, None, None)


def test_syntax_error_gives_its_line_and_message_and_stops_there() -> None:
    result = validate_script("x = 1\ndef execute(ctx)\n    return 1\n")
    assert not result.ok
    assert result.info is None
    assert result.problems == [Problem(2, "expected ':'")]


def test_compile_only_errors_such_as_return_outside_function_are_reported() -> None:
    result = validate_script("def execute(ctx):\n    return 1\nreturn 2\n")
    assert result.problems == [Problem(3, "'return' outside function")]
    assert result.info is None


def test_null_bytes_are_a_problem_at_line_one() -> None:
    result = validate_script("def execute(ctx):\n    return 1\x00\n")
    assert result.info is None
    assert [p.line for p in result.problems] == [1]


def test_missing_execute_is_a_problem_at_line_one() -> None:
    assert validate_script("x = 1\n\n\ndef run(ctx):\n    return 1\n").problems == [
        Problem(1, "no module-level def execute(ctx)")
    ]


def test_execute_nested_in_a_class_does_not_count_as_module_level() -> None:
    source = src(
        """
        class Flow:
            def execute(self, ctx):
                return 1
        """
    )
    assert messages(source) == ["no module-level def execute(ctx)"]


def test_second_definition_of_execute_is_a_problem_at_the_second() -> None:
    source = src(
        """
        def execute(ctx):
            return 1


        def execute(ctx):
            return 2
        """
    )
    assert validate_script(source).problems == [Problem(5, "execute is defined more than once (first at line 1)")]


def test_async_execute_is_rejected_with_its_line() -> None:
    source = src(
        """
        import asyncio

        async def execute(ctx):
            return 1
        """
    )
    assert validate_script(source).problems == [Problem(3, "execute must be synchronous, not async def")]


@pytest.mark.parametrize(
    "signature",
    ["execute()", "execute(ctx, extra)", "execute(*args)", "execute(ctx, *args)", "execute(ctx, **kwargs)",
     "execute(*, ctx)", "execute(ctx, *, flag)", "execute(ctx=None)"],
)
def test_execute_without_exactly_one_plain_parameter_is_rejected(signature: str) -> None:
    source = f"x = 0\ndef {signature}:\n    return 1\n"
    problems = validate_script(source).problems
    assert [p.line for p in problems] == [2]
    assert problems[0].message.startswith("execute must take exactly one parameter")


@pytest.mark.parametrize("signature", ["execute(ctx)", "execute(ctx: WorkflowContext)", "execute(context, /)"])
def test_execute_with_one_plain_parameter_is_accepted(signature: str) -> None:
    source = f"from flowpool_workflow import WorkflowContext\ndef {signature}:\n    return 1\n"
    assert validate_script(source).ok


def test_decorated_execute_is_reported_at_its_def_line() -> None:
    source = src(
        """
        import functools

        @functools.cache
        async def execute(ctx):
            return 1
        """
    )
    assert lines(source) == [4]


def test_bare_return_and_return_none_are_rejected_each_at_its_line() -> None:
    source = src(
        """
        def execute(ctx):
            if ctx.input.get("skip"):
                return
            if ctx.input.get("nothing"):
                return None
            return {"ok": True}
        """
    )
    assert validate_script(source).problems == [
        Problem(3, "execute must return a value; bare return at line 3"),
        Problem(5, "execute must return a value; return None at line 5"),
    ]


def test_returns_inside_nested_functions_lambdas_and_classes_are_not_executes_own() -> None:
    source = src(
        """
        def execute(ctx):
            def helper():
                return
            class Local:
                def method(self):
                    return None
            callback = lambda: None
            return helper() or 1
        """
    )
    assert validate_script(source).ok


def test_returns_inside_loops_try_and_with_blocks_are_checked() -> None:
    source = src(
        """
        def execute(ctx):
            for item in ctx.input["items"]:
                try:
                    with open(item) as fh:
                        return
                except OSError:
                    return None
            return 0
        """
    )
    assert lines(source) == [5, 7]


def test_execute_without_any_return_is_rejected_at_its_def_line() -> None:
    source = src(
        """
        x = 1

        def execute(ctx):
            def helper():
                return 1
            print(helper())
        """
    )
    assert validate_script(source).problems == [Problem(3, "execute must return a value; it has no return statement")]


def test_returning_a_falsy_value_other_than_none_is_accepted() -> None:
    assert validate_script("def execute(ctx):\n    return 0\n").ok
    assert validate_script("def execute(ctx):\n    return {}\n").ok


def test_workflow_context_used_without_import_is_a_problem_at_first_use() -> None:
    source = src(
        """
        import os


        def helper(ctx: WorkflowContext) -> None:
            pass


        def execute(ctx: WorkflowContext):
            return 1
        """
    )
    problems = validate_script(source).problems
    assert [p.line for p in problems] == [4]
    assert problems[0].message.startswith("WorkflowContext is used but not imported")


@pytest.mark.parametrize(
    "imports",
    [
        "from flowpool_workflow import WorkflowContext",
        "from maitai_workflow import WorkflowContext",
        "from flowpool_workflow import WorkflowContext as WorkflowContext",
        "from maitai_workflow import Other, WorkflowContext",
        "from flowpool_workflow import *",
    ],
)
def test_workflow_context_imported_from_either_package_is_accepted(imports: str) -> None:
    source = f"{imports}\n\ndef execute(ctx: WorkflowContext):\n    return 1\n"
    assert validate_script(source).ok


def test_alias_import_binds_the_alias_name_only() -> None:
    aliased = "from maitai_workflow import WorkflowContext as Ctx\n\ndef execute(ctx: Ctx):\n    return 1\n"
    assert validate_script(aliased).ok
    original_name = "from maitai_workflow import WorkflowContext as Ctx\n\ndef execute(ctx: WorkflowContext):\n    return 1\n"
    assert lines(original_name) == [3]


def test_workflow_context_as_an_attribute_of_the_imported_module_is_accepted() -> None:
    source = "import flowpool_workflow\n\ndef execute(ctx: flowpool_workflow.WorkflowContext):\n    return 1\n"
    assert validate_script(source).ok


def test_workflow_context_imported_from_another_module_is_a_problem() -> None:
    source = "from somewhere import WorkflowContext\n\ndef execute(ctx: WorkflowContext):\n    return 1\n"
    assert lines(source) == [3]


@pytest.mark.parametrize(
    "assignment",
    [
        'APPLICATION = "app-" + NAME',
        "TIMEOUT_SECONDS = 10 * 60",
        "CACHE_TTL_SECONDS = int('5')",
        "INPUT_SCHEMA = dict(query={'type': 'string'})",
        "OUTPUT_SCHEMA = {**BASE}",
    ],
)
def test_non_literal_constant_is_a_problem_at_its_assignment(assignment: str) -> None:
    name = assignment.split()[0]
    source = f"NAME = BASE = 1\n{assignment}\n\ndef execute(ctx):\n    return 1\n"
    assert validate_script(source).problems == [Problem(2, f"{name} must be a literal constant, not an expression")]


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("APPLICATION = ''", "APPLICATION must be a non-empty string"),
        ("APPLICATION = '   '", "APPLICATION must be a non-empty string"),
        ("APPLICATION = 3", "APPLICATION must be a non-empty string"),
        ("TIMEOUT_SECONDS = 0", "TIMEOUT_SECONDS must be a number of seconds greater than 0"),
        ("TIMEOUT_SECONDS = -1.5", "TIMEOUT_SECONDS must be a number of seconds greater than 0"),
        ("TIMEOUT_SECONDS = True", "TIMEOUT_SECONDS must be a number of seconds greater than 0"),
        ("TIMEOUT_SECONDS = '30'", "TIMEOUT_SECONDS must be a number of seconds greater than 0"),
        ("TIMEOUT_SECONDS = 1e999", "TIMEOUT_SECONDS must be a number of seconds greater than 0"),
        ("CACHE_TTL_SECONDS = -1", "CACHE_TTL_SECONDS must be a whole number of seconds, 0 or more"),
        ("CACHE_TTL_SECONDS = 1.5", "CACHE_TTL_SECONDS must be a whole number of seconds, 0 or more"),
        ("CACHE_TTL_SECONDS = False", "CACHE_TTL_SECONDS must be a whole number of seconds, 0 or more"),
        ("INPUT_SCHEMA = ['query']", "INPUT_SCHEMA must be a dict"),
        ("OUTPUT_SCHEMA = None", "OUTPUT_SCHEMA must be a dict"),
        ("LIMITS = {'gpus': 1}", "LIMITS must be a dict of limit name to a whole number greater than 0, names "
                                 "from memory_mb, cpu_seconds"),
        ("LIMITS = {'memory_mb': 0}", "LIMITS must be a dict of limit name to a whole number greater than 0"),
        ("LIMITS = {'memory_mb': 1.5}", "LIMITS must be a dict of limit name to a whole number greater than 0"),
        ("LIMITS = {'tmp_mb': True}", "LIMITS must be a dict of limit name to a whole number greater than 0"),
        ("LIMITS = [('memory_mb', 64)]", "LIMITS must be a dict of limit name to a whole number greater than 0"),
    ],
)
def test_constant_of_the_wrong_type_or_range_is_a_problem(assignment: str, expected: str) -> None:
    result = validate_script(f"# header\n{assignment}\ndef execute(ctx):\n    return 1\n")
    assert [p.line for p in result.problems] == [2]
    assert result.problems[0].message.startswith(expected)
    assert result.info == ScriptInfo(None, None, None, None, None)


@pytest.mark.parametrize(
    ("assignment", "field", "value"),
    [
        ("TIMEOUT_SECONDS = 0.5", "timeout_seconds", 0.5),
        ("CACHE_TTL_SECONDS = 0", "cache_ttl_seconds", 0),
        ("APPLICATION: str = 'typed'", "application", "typed"),
        ("INPUT_SCHEMA = {}", "input_schema", {}),
        ("LIMITS = {'memory_mb': 1024, 'tmp_mb': 8}", "limits", {"memory_mb": 1024, "tmp_mb": 8}),
    ],
)
def test_valid_constant_is_read_into_script_info(assignment: str, field: str, value: object) -> None:
    result = validate_script(f"{assignment}\ndef execute(ctx):\n    return 1\n")
    assert result.ok
    assert getattr(result.info, field) == value


def test_constants_inside_functions_are_not_checked() -> None:
    source = "def execute(ctx):\n    TIMEOUT_SECONDS = compute()\n    return TIMEOUT_SECONDS\n"
    result = validate_script(source)
    assert result.ok
    assert result.info.timeout_seconds is None


def test_schema_field_with_unknown_type_names_schema_field_and_type_at_the_field_line() -> None:
    source = src(
        """
        INPUT_SCHEMA = {
            "topic": {"type": "string"},
            "query": {"type": "str"},
        }
        def execute(ctx):
            return 1
        """
    )
    assert validate_script(source).problems == [
        Problem(
            3,
            "INPUT_SCHEMA field 'query': type 'str' is not one of string, number, integer, boolean, object, array",
        )
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{}", "OUTPUT_SCHEMA field 'answer': type is missing"),
        ("{'description': 'text'}", "OUTPUT_SCHEMA field 'answer': type is missing"),
        ("{'type': 5}", "OUTPUT_SCHEMA field 'answer': type 5 is not one of"),
        ("{'type': 'string', 'default': 'x'}", "OUTPUT_SCHEMA field 'answer': unknown key 'default'"),
        ("{'type': 'string', 'description': 3}", "OUTPUT_SCHEMA field 'answer': description must be a string, got 3"),
        ("{'type': 'string', 'required': 'yes'}", "OUTPUT_SCHEMA field 'answer': required must be True or False, got 'yes'"),
        ("{'type': 'string', 'required': 1}", "OUTPUT_SCHEMA field 'answer': required must be True or False, got 1"),
        ("'string'", "OUTPUT_SCHEMA field 'answer': must be a dict"),
    ],
)
def test_schema_field_problem_names_schema_field_and_what_is_wrong(spec: str, expected: str) -> None:
    source = f"OUTPUT_SCHEMA = {{\n    'answer': {spec},\n}}\ndef execute(ctx):\n    return 1\n"
    result = validate_script(source)
    assert [p.line for p in result.problems] == [2]
    assert result.problems[0].message.startswith(expected)
    assert result.info.output_schema is None


@pytest.mark.parametrize("key", ["''", "3", "('a', 'b')"])
def test_schema_field_name_must_be_a_non_empty_string(key: str) -> None:
    source = f"INPUT_SCHEMA = {{{key}: {{'type': 'string'}}}}\ndef execute(ctx):\n    return 1\n"
    problems = validate_script(source).problems
    assert [p.line for p in problems] == [1]
    assert problems[0].message.startswith("INPUT_SCHEMA field ")
    assert problems[0].message.endswith("the field name must be a non-empty string")


def test_schema_field_with_several_faults_gives_one_problem_each() -> None:
    source = "INPUT_SCHEMA = {'q': {'kind': 'string', 'required': 'no'}}\ndef execute(ctx):\n    return 1\n"
    assert len(validate_script(source).problems) == 3


def test_all_problems_are_collected_in_line_order() -> None:
    source = src(
        """
        async def execute(ctx: WorkflowContext, extra):
            if ctx:
                return
            return None
        APPLICATION = ""
        INPUT_SCHEMA = {
            "n": {"type": "int"},
        }
        def execute(ctx):
            return 1
        """
    )
    result = validate_script(source)
    assert not result.ok
    assert [p.line for p in result.problems] == [1, 1, 1, 3, 4, 5, 7, 9]
    assert result.problems[0].message == "execute must be synchronous, not async def"
    assert result.problems[-1].message == "execute is defined more than once (first at line 1)"
    assert result.info is not None


def test_raise_for_problems_raises_validation_failed_listing_every_problem() -> None:
    source = src(
        """
        APPLICATION = ""
        def execute(ctx):
            return
        """
    )
    with pytest.raises(ValidationFailed) as caught:
        validate_script(source).raise_for_problems()
    error = caught.value
    assert error.message == (
        "the script breaks 2 rules: line 1: APPLICATION must be a non-empty string, got ''; "
        "line 3: execute must return a value; bare return at line 3"
    )
    assert error.details == {
        "errors": [
            {"line": 1, "message": "APPLICATION must be a non-empty string, got ''"},
            {"line": 3, "message": "execute must return a value; bare return at line 3"},
        ]
    }
    assert error.to_body()["error"]["errors"] == error.details["errors"]


def test_raise_for_problems_says_rule_in_the_singular_for_one_problem() -> None:
    with pytest.raises(ValidationFailed, match=r"^the script breaks 1 rule: line 1: no module-level def execute\(ctx\)$"):
        validate_script("x = 1\n").raise_for_problems()


def test_problem_to_dict_has_line_and_message() -> None:
    assert Problem(4, "bad").to_dict() == {"line": 4, "message": "bad"}


def test_script_is_never_executed() -> None:
    source = "raise SystemExit('ran')\ndef execute(ctx):\n    return 1\n"
    assert validate_script(source).ok


def test_an_execute_that_only_raises_needs_no_return() -> None:
    assert validate_script("def execute(ctx):\n    raise ValueError('always')\n").ok
