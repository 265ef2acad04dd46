"""Property tier: the script validator answers every source, however hostile, without crashing or hanging."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowpool.registry.validation import Validation, validate_script

pytestmark = pytest.mark.property

# A deadline per example only catches a hang; a validation takes milliseconds.
def bounded(examples: int) -> settings:
    """``examples`` examples, none allowed to hang, and no example database left in the tree."""
    return settings(max_examples=examples, deadline=5000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_EXECUTE = "\n\ndef execute(ctx):\n    return 1\n"


@st.composite
def nasty_sources(draw: st.DrawFn) -> str:
    """Sources built to stress the parser, the compiler and the checks: long chains, deep nesting, huge literals."""
    count = draw(st.sampled_from([1, 10, 99, 100, 101, 199, 200, 201, 999, 1000, 5000, 50_000, 200_000]))
    unit = draw(st.sampled_from(["-", "+", "~", "not ", "(", "[", "{'a': ", "lambda: ", "await ", "*", "1 + ",
                                 "x.", "f(", "if x:\n" + " ", "\t", "\\\n", "'", '"""', "\x00", "\ud800", "é"]))
    closer = {"(": ")", "[": "]", "{'a': ": "}", "f(": ")"}.get(unit, "")
    body = unit * count + "1" + closer * count
    target = draw(st.sampled_from(["x = ", "CACHE_TTL_SECONDS = ", "TIMEOUT_SECONDS = ", "LIMITS = ",
                                   "INPUT_SCHEMA = ", "", "def execute(ctx):\n    return "]))
    literal = draw(st.sampled_from(["", "\nBIG = " + "9" * 5000, "\nS = '" + "a" * 100_000 + "'",
                                    "\nCACHE_TTL_SECONDS = 10**400", "\nTIMEOUT_SECONDS = 1e999"]))
    return target + body + literal + draw(st.sampled_from(["", _EXECUTE]))


def _answers(source: str) -> None:
    result = validate_script(source)
    assert isinstance(result, Validation)
    assert result.ok or all(problem.line >= 1 and problem.message for problem in result.problems)


@bounded(300)
@given(st.text())
def test_any_text_gets_an_answer(source: str) -> None:
    _answers(source)


@bounded(150)
@given(nasty_sources())
def test_hostile_sources_get_an_answer(source: str) -> None:
    _answers(source)


@bounded(100)
@given(st.lists(st.sampled_from(["def execute(ctx):", "    return 1", "  ", "async ", "return", "TIMEOUT_SECONDS = 5",
                                 "CACHE_TTL_SECONDS = -1", "LIMITS = {'memory_mb': 2**40}", "from flowpool_workflow "
                                 "import *", "WorkflowContext", "class C:", "    def execute(self): pass", "(", ")"]),
                max_size=30).map("\n".join))
def test_scripts_made_of_plausible_lines_get_an_answer(source: str) -> None:
    _answers(source)


@bounded(60)
@given(declaration=st.sampled_from(["CACHE_TTL_SECONDS = 10**400", "CACHE_TTL_SECONDS = 1e20", "TIMEOUT_SECONDS = 1e999",
                                    "TIMEOUT_SECONDS = float('inf')", "TIMEOUT_SECONDS = 10**12",
                                    "LIMITS = {'memory_mb': 2**70}", "X = " + "(" * 300 + "1" + ")" * 300,
                                    "X = " + "-" * 200_000 + "1"]),
       padding=st.integers(min_value=0, max_value=20))
def test_a_working_script_with_one_absurd_part_is_refused(declaration: str, padding: int) -> None:
    result = validate_script("\n" * padding + declaration + _EXECUTE)
    assert not result.ok and result.problems, declaration[:40]
