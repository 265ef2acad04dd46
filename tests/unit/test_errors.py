"""Run errors cross the process boundary whole: every subclass of RunError, found by walking the tree."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Iterator

import pytest

from flowpool import errors
from flowpool.errors import RunError, SandboxError, run_error_from_dict

# Details of every JSON shape a run error carries (a limit, a signal, a traceback, a list of problems).
DETAILS = {"limit": "hard", "seconds": 1.5, "signal": 9, "retried": False, "exception": None,
           "errors": [{"line": 3, "message": "no execute(ctx)"}]}

# Builds each run error named on argv ("module:qualname") and prints its dict, one per line.
SERIALIZE = """
import importlib, json, sys
details = json.loads(sys.argv[1])
for name in sys.argv[2:]:
    module, _, qualname = name.partition(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    print(json.dumps(cls(f"{qualname} happened", **details).to_dict()))
"""


def _subclasses(cls: type[RunError]) -> Iterator[type[RunError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


RUN_ERRORS = sorted(set(_subclasses(RunError)), key=lambda cls: cls.__qualname__)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, as the worker's processes start (-I: not from this checkout's path)."""
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def serialized() -> dict[str, dict]:
    """Every run error as another process serializes it, by class name."""
    done = _python(SERIALIZE, json.dumps(DETAILS), *(f"{cls.__module__}:{cls.__qualname__}" for cls in RUN_ERRORS))
    assert done.returncode == 0, done.stderr
    parsed = [json.loads(line) for line in done.stdout.splitlines()]
    return {data["kind"]: data for data in parsed}


def test_the_walk_finds_every_run_error_of_the_tree() -> None:
    assert {errors.TimeLimitExceeded, errors.ScriptError, errors.OutputSchemaError, errors.ResultTooLarge,
            errors.SandboxError, errors.WorkerLost, errors.Cancelled, errors.RunNotStarted} <= set(RUN_ERRORS)


@pytest.mark.parametrize("cls", RUN_ERRORS, ids=lambda cls: cls.__qualname__)
def test_every_run_error_round_trips_across_processes(cls: type[RunError], serialized: dict[str, dict]) -> None:
    expected = cls(f"{cls.__qualname__} happened", **DETAILS)

    rebuilt = run_error_from_dict(serialized[cls.__name__])

    assert type(rebuilt) is cls
    assert rebuilt.message == expected.message
    assert rebuilt.details == expected.details == DETAILS
    assert (rebuilt.status, rebuilt.type) == (expected.status, expected.type)
    assert rebuilt.to_body() == expected.to_body()


def test_a_run_error_of_an_unknown_kind_comes_back_as_a_sandbox_error() -> None:
    rebuilt = run_error_from_dict({"kind": "NoSuchError", "message": "from a newer worker", "code": 3})

    assert type(rebuilt) is SandboxError
    assert (rebuilt.message, rebuilt.details) == ("from a newer worker", {"code": 3})


def test_a_second_run_error_of_a_taken_name_is_refused() -> None:
    # In a process of its own: a class that failed to register would still show in this one's walk.
    done = _python("from flowpool.errors import RunError\nclass ScriptError(RunError): pass\n")

    assert done.returncode != 0
    assert "TypeError: a run error named ScriptError exists already (flowpool.errors)" in done.stderr
