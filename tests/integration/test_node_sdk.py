"""The Node SDK (sdk/node, npm package ``flowpool``) against the session's real stack, run by node's own test runner.

The accounts and workflows its tests need are made here over HTTP; ``node --test sdk/node/test/`` then runs
with the server's URL and the accounts' keys in its environment. Without ``node`` on PATH the tests are
skipped, saying so: never a silent pass. TypeScript's compiler is no dependency of the package: when one is
found (FLOWPOOL_TEST_TSC, sdk/node/node_modules/.bin, or PATH), the type declarations are compiled against
code that uses them; when none is, that one node test is skipped and a warning says so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

import pytest
import redis

from flowpool.devstack import Stack
from flowpool.limits import LimitStore
from flowpool.registry import Accounts
from flowpool.settings import Settings
from tests.helpers import FAILING_WORKFLOW, SLEEPING_WORKFLOW, Client

SDK = Path(__file__).resolve().parents[2] / "sdk" / "node"

# The tests of sdk/node/test/*.test.{mjs,cjs}, counted by hand: a test file that stops loading (a syntax
# error, a wrong import) runs none of its tests, and this count no longer matches.
EXPECTED_TESTS = 42
# The node tests that need TypeScript's compiler (sdk/node/test/types.test.mjs), skipped without one.
TSC_TESTS = 1

ECHO = """
    def execute(ctx):
        said = ctx.messages[-1]["content"] if ctx.messages else None
        return {"input": ctx.input, "said": said, "session_id": ctx.session_id}
"""

EMITS = """
    def execute(ctx):
        for step in ctx.input["steps"]:
            ctx.emit("step", step)
        ctx.emit("progress", {"done": True})
        return {"steps": len(ctx.input["steps"])}
"""

EMITS_THEN_SLEEPS = """
    import time

    def execute(ctx):
        ctx.emit("started", True)
        time.sleep(ctx.input["seconds"])
        return {"slept": ctx.input["seconds"]}
"""

SLOW = """
    import time

    def execute(ctx):
        time.sleep(ctx.input.get("seconds", 0))
        return {"slept": ctx.input.get("seconds", 0)}
"""


def node_env(stack: Stack, db: redis.Redis) -> dict[str, str]:
    """Accounts and workflows for the Node tests on ``stack``; the environment that names them to the tests."""
    assert stack.api_url is not None
    main = Client(stack.api_url, stack.create_account(f"node-{uuid.uuid4().hex[:8]}"))
    for ref, script in (("echo", ECHO), ("emits", EMITS), ("emits-then-sleeps", EMITS_THEN_SLEEPS), ("slow", SLOW),
                        ("fails", FAILING_WORKFLOW), ("sleeps", SLEEPING_WORKFLOW)):
        main.upload(ref, script)
    keys = {}
    for name, limits in (("LIMITED", {"concurrency": 1}), ("RPM", {"rpm": 1})):
        limited = Client(stack.api_url, stack.create_account(f"node-{name.lower()}-{uuid.uuid4().hex[:8]}"))
        limited.upload("slow", SLOW)
        LimitStore(db, Settings()).set(Accounts(db).authenticate(limited.key).id, **limits)
        keys[f"FLOWPOOL_TEST_{name}_KEY"] = limited.key
    return {"FLOWPOOL_BASE_URL": stack.api_url, "FLOWPOOL_API_KEY": main.key, **keys}


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node SDK's tests did not run")
    return node


def _tsc() -> str | None:
    """TypeScript's compiler, found as the node test finds it: FLOWPOOL_TEST_TSC, sdk/node's own, then PATH."""
    for candidate in (os.environ.get("FLOWPOOL_TEST_TSC"), SDK / "node_modules" / ".bin" / "tsc"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return shutil.which("tsc")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FLOWPOOL_*/MAITAI_* of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPOOL_", "MAITAI_"))}
    return {**env, **extra}


def _tap_counts(output: str) -> dict[str, int]:
    """The summary lines of node's TAP report: ``# pass 12`` -> {"pass": 12}."""
    return {name: int(n) for name, n in re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output,
                                                   re.MULTILINE)}


def test_the_node_sdk_passes_its_tests_against_the_real_server(stack: Stack, stack_db: redis.Redis) -> None:
    node = _node()
    tsc = _tsc()
    env = _clean_env(**node_env(stack, stack_db), **({"FLOWPOOL_TEST_TSC": tsc} if tsc else {}))
    try:
        result = subprocess.run([node, "--test", "--test-reporter=tap", "test/"], cwd=SDK, env=env,
                                capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test ran past 300 s:\n{exc.stdout}\n{exc.stderr}")
    output = result.stdout + result.stderr
    counts = _tap_counts(result.stdout)
    assert result.returncode == 0, output
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, output
    # Every test ran against the server; only the compile of the types waits on a tsc.
    skipped = 0 if tsc else TSC_TESTS
    assert counts.get("skipped") == skipped and counts.get("todo") == 0, output
    assert counts.get("pass") == counts.get("tests", 0) - skipped == EXPECTED_TESTS - skipped, output
    if not tsc:
        warnings.warn("no TypeScript compiler (set FLOWPOOL_TEST_TSC or put tsc on PATH): the Node SDK's type "
                      "declarations were not compiled", stacklevel=1)


def test_the_package_loads_as_esm_and_as_cjs_with_the_same_names_and_objects() -> None:
    node = _node()
    # Loaded by its name, as a user's code loads it (a package may require itself by name through "exports").
    script = """
        const cjs = require('flowpool');
        import('flowpool').then((esm) => {
          const names = (o) => Object.keys(o).filter((k) => k !== 'default').sort();
          const same = names(esm).every((k) => esm[k] === cjs[k]) && esm.default === cjs;
          console.log(JSON.stringify({cjs: names(cjs), esm: names(esm), same,
                                      defaults: [typeof cjs, typeof esm.default, cjs.default === cjs]}));
        });
    """
    result = subprocess.run([node, "-e", script], cwd=SDK, env=_clean_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["cjs"] == loaded["esm"] and loaded["same"], loaded
    assert {"Flowpool", "Maitai", "APIError", "RateLimitError", "APIUserAbortError"} <= set(loaded["cjs"])
    assert loaded["defaults"] == ["function", "function", True]  # the Flowpool class, both ways
