"""Static validation of a workflow script: its rules are checked on the syntax tree, never by running it."""
from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flowpool.errors import ValidationFailed
from flowpool.queues import is_queue_name
from flowpool.settings import DEFAULT_MAX_SCRIPT_BYTES, WORKFLOW_LIMITS

from .schema import JSON_TYPES

__all__ = ["MAX_CACHE_TTL_SECONDS", "MAX_TIMEOUT_SECONDS", "Problem", "ScriptInfo", "Validation", "valid_cache_ttl",
           "valid_timeout", "validate_script"]

# Sane bounds on what a workflow may declare (script constants and upload fields alike): past
# them a value only breaks things later (Redis refuses the TTL, a timer overflows).
MAX_CACHE_TTL_SECONDS = 30 * 86400
MAX_TIMEOUT_SECONDS = 86400
_MAX_LIMIT = 2**31 - 1  # a LIMITS value becomes an rlimit or a byte count
# Statements and expressions nested deeper than this are no script anyone writes, and the
# compiler and the checks below recurse over them.
MAX_AST_DEPTH = 100

_CONTEXT_MODULES = ("flowpool_workflow", "maitai_workflow")
_SCHEMA_KEYS = ("type", "description", "required")
_TYPE_NAMES = ", ".join(JSON_TYPES)
_NESTED_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


@dataclass(frozen=True)
class Problem:
    """One rule the script breaks, at a 1-based line."""

    line: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        """The problem as the API renders it."""
        return {"line": self.line, "message": self.message}


@dataclass(frozen=True)
class ScriptInfo:
    """What the script declares in its module-level literal constants; None when absent or invalid."""

    application: str | None
    input_schema: dict | None
    output_schema: dict | None
    timeout_seconds: float | None
    cache_ttl_seconds: int | None
    limits: dict[str, int] | None = None
    queue: str | None = None  # the worker queue its runs go to (QUEUE); None: the upload's, else "default"


@dataclass(frozen=True)
class Validation:
    """The outcome of validating one script."""

    problems: list[Problem]
    info: ScriptInfo | None

    @property
    def ok(self) -> bool:
        """True when the script breaks no rule."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise ValidationFailed listing every problem, unless the script is ok."""
        if self.ok:
            return
        count = len(self.problems)
        listing = "; ".join(f"line {p.line}: {p.message}" for p in self.problems)
        raise ValidationFailed(
            f"the script breaks {count} rule{'' if count == 1 else 's'}: {listing}",
            errors=[p.to_dict() for p in self.problems],
        )


def validate_script(source: str, max_bytes: int = DEFAULT_MAX_SCRIPT_BYTES) -> Validation:
    """Check a workflow script against every rule, collecting all problems in line order.

    ``max_bytes`` is FLOWPOOL_MAX_SCRIPT_BYTES; the default is that setting's default.
    """
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return Validation([Problem(1, f"the script is {size} bytes; the limit is {max_bytes}")], None)
    try:
        # dont_inherit: this module's own __future__ imports must not change how the script compiles.
        compile(source, "workflow.py", "exec", dont_inherit=True)
        tree = ast.parse(source)
    except SyntaxError as exc:
        return Validation([Problem(exc.lineno or 1, exc.msg)], None)
    except (ValueError, RecursionError, MemoryError) as exc:
        # Null bytes (ValueError before 3.12), too many digits, or nesting past the parser's or
        # compiler's stack (a long chain of unary minus signs raises MemoryError).
        return Validation([Problem(1, f"the script cannot be compiled: {_reason(exc)}")], None)
    deep = _too_deep(tree)
    if deep is not None:
        return Validation([Problem(deep, f"the code is nested more than {MAX_AST_DEPTH} levels deep")], None)
    values, problems = _read_constants(tree)
    problems += _check_execute(tree) + _check_context_import(tree)
    timeout = values.get("TIMEOUT_SECONDS")
    info = ScriptInfo(
        application=values.get("APPLICATION"),
        input_schema=values.get("INPUT_SCHEMA"),
        output_schema=values.get("OUTPUT_SCHEMA"),
        timeout_seconds=None if timeout is None else float(timeout),
        cache_ttl_seconds=values.get("CACHE_TTL_SECONDS"),
        limits=values.get("LIMITS"),
        queue=values.get("QUEUE"),
    )
    return Validation(sorted(problems, key=lambda p: p.line), info)


def _reason(exc: BaseException) -> str:
    """What a compile error says, with the type of those that say nothing."""
    if isinstance(exc, MemoryError):
        return "it is nested too deeply or too complex to parse"
    return str(exc) or type(exc).__name__


def _too_deep(tree: ast.Module) -> int | None:
    """The line of the first node nested past MAX_AST_DEPTH, or None (walked without recursing)."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_AST_DEPTH:
            return getattr(node, "lineno", 1)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return None


def _check_execute(tree: ast.Module) -> list[Problem]:
    """Problems with the module-level def execute(ctx): missing, duplicated, async, its parameters, its returns."""
    defs = [
        node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "execute"
    ]
    if not defs:
        return [Problem(1, "no module-level def execute(ctx)")]
    problems = [
        Problem(fn.lineno, f"execute is defined more than once (first at line {defs[0].lineno})")
        for fn in defs[1:]
    ]
    for fn in defs:
        if isinstance(fn, ast.AsyncFunctionDef):
            problems.append(Problem(fn.lineno, "execute must be synchronous, not async def"))
        args = fn.args
        extras = args.vararg or args.kwonlyargs or args.kwarg or args.defaults
        if len(args.posonlyargs) + len(args.args) != 1 or extras:
            message = "execute must take exactly one parameter, without a default: def execute(ctx)"
            problems.append(Problem(fn.lineno, message))
        problems += _check_returns(fn)
    return problems


def _check_returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Problem]:
    """Problems with the return statements of execute's own body."""
    returns = [node for node in _own_nodes(fn) if isinstance(node, ast.Return)]
    if not returns and not isinstance(fn.body[-1], ast.Raise):
        # Falling off the end returns None; a body that ends by raising never does.
        return [Problem(fn.lineno, "execute must return a value; it has no return statement")]
    return [
        Problem(node.lineno, f"execute must return a value; {what} at line {node.lineno}")
        for node in returns
        if (what := _none_return(node))
    ]


def _none_return(node: ast.Return) -> str:
    """'bare return' or 'return None' when the statement returns None, else ''."""
    if node.value is None:
        return "bare return"
    if isinstance(node.value, ast.Constant) and node.value.value is None:
        return "return None"
    return ""


def _own_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.AST]:
    """Every node of a function's body, without entering nested functions, lambdas or classes."""
    stack: list[ast.AST] = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _NESTED_SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _check_context_import(tree: ast.Module) -> list[Problem]:
    """A problem at the first use of the name WorkflowContext when no import binds it."""
    imported = False
    uses: list[ast.Name] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in _CONTEXT_MODULES:
            imported = imported or any(
                alias.name == "*" or (alias.name == "WorkflowContext" and alias.asname in (None, "WorkflowContext"))
                for alias in node.names
            )
        elif isinstance(node, ast.Name) and node.id == "WorkflowContext" and isinstance(node.ctx, ast.Load):
            uses.append(node)
    if imported or not uses:
        return []
    first = min(uses, key=lambda name: (name.lineno, name.col_offset))
    message = "WorkflowContext is used but not imported; add `from flowpool_workflow import WorkflowContext`"
    return [Problem(first.lineno, message)]


def _is_number(value: Any) -> bool:
    """True for a finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_timeout(value: Any) -> bool:
    """A soft time limit a run can have: seconds, finite, over 0, at most a day (TIMEOUT_SECONDS, timeout_seconds)."""
    return _is_number(value) and 0 < value <= MAX_TIMEOUT_SECONDS


def valid_cache_ttl(value: Any) -> bool:
    """A cache TTL: whole seconds, 0 (off) to 30 days (CACHE_TTL_SECONDS, cache_ttl_seconds)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CACHE_TTL_SECONDS


# Constant name → (what its value must satisfy, how to say it); the schemas get field-by-field checks on top.
_SCHEMA_SHAPE = "a dict of field name to {'type': ..., 'description': ..., 'required': ...}"
_CONSTANTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "APPLICATION": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "TIMEOUT_SECONDS": (valid_timeout, f"a number of seconds greater than 0, at most {MAX_TIMEOUT_SECONDS}"),
    "CACHE_TTL_SECONDS": (valid_cache_ttl, f"a whole number of seconds, 0 or more, at most {MAX_CACHE_TTL_SECONDS}"),
    "QUEUE": (is_queue_name, "a queue name: 1 to 32 lower-case letters, digits, '_' or '-', starting with a letter"),
    "LIMITS": (
        lambda v: isinstance(v, dict) and all(k in WORKFLOW_LIMITS and isinstance(n, int) and not isinstance(n, bool)
                                               and 0 < n <= _MAX_LIMIT for k, n in v.items()),
        f"a dict of limit name to a whole number greater than 0, names from {', '.join(WORKFLOW_LIMITS)}, "
        f"each at most {_MAX_LIMIT}",
    ),
    "INPUT_SCHEMA": (lambda v: isinstance(v, dict), _SCHEMA_SHAPE),
    "OUTPUT_SCHEMA": (lambda v: isinstance(v, dict), _SCHEMA_SHAPE),
}


def _read_constants(tree: ast.Module) -> tuple[dict[str, Any], list[Problem]]:
    """The valid values of the module-level constants, and the problems of the invalid ones."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for name, node, line in _constant_assignments(tree):
        try:
            value = ast.literal_eval(node)
        except (ValueError, TypeError, RecursionError):
            values[name] = None
            problems.append(Problem(line, f"{name} must be a literal constant, not an expression"))
            continue
        accepts, expected = _CONSTANTS[name]
        found = [] if accepts(value) else [Problem(line, f"{name} must be {expected}, got {_short(value)}")]
        if not found and name.endswith("_SCHEMA"):
            found = _check_schema(name, value, node, line)
        values[name] = None if found else value
        problems += found
    return values, problems


def _constant_assignments(tree: ast.Module) -> Iterator[tuple[str, ast.expr, int]]:
    """(name, value node, line) of each module-level simple assignment to one of the known constants."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _CONSTANTS:
                yield target.id, value, node.lineno


def _check_schema(name: str, schema: dict, node: ast.expr, line: int) -> list[Problem]:
    """Problems of each field of a schema, at the line of the field's key when it is a plain constant."""
    key_lines = {
        key.value: key.lineno
        for key in (node.keys if isinstance(node, ast.Dict) else [])
        if isinstance(key, ast.Constant)
    }
    return [
        Problem(key_lines.get(field, line), f"{name} field {field!r}: {message}")
        for field, spec in schema.items()
        for message in _field_problems(field, spec)
    ]


def _field_problems(field: Any, spec: Any) -> list[str]:
    """What is wrong with one schema field, each as a phrase."""
    if not isinstance(field, str) or not field:
        return ["the field name must be a non-empty string"]
    if not isinstance(spec, dict):
        return [f"must be a dict like {{'type': 'string'}}, got {_short(spec)}"]
    found = [
        f"unknown key {key!r}; allowed keys are type, description, required" for key in spec if key not in _SCHEMA_KEYS
    ]
    kind = spec.get("type")
    if "type" not in spec:
        found.append(f"type is missing; it must be one of {_TYPE_NAMES}")
    elif not isinstance(kind, str) or kind not in JSON_TYPES:
        found.append(f"type {_short(kind)} is not one of {_TYPE_NAMES}")
    if "description" in spec and not isinstance(spec["description"], str):
        found.append(f"description must be a string, got {_short(spec['description'])}")
    if "required" in spec and not isinstance(spec["required"], bool):
        found.append(f"required must be True or False, got {_short(spec['required'])}")
    return found


def _short(value: Any) -> str:
    """The repr of value, cut to a length fit for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
