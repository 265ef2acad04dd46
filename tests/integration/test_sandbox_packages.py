"""FLOWPOOL_SANDBOX_PACKAGES: the distributions a bwrap run may import, staged under /runtime, and nothing else.

Real sandboxes on the bwrap backend (where it works), started and stopped by each test, and one real worker.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowpool.devstack import Stack
from flowpool.errors import ConfigurationError
from flowpool.sandbox import RunOutcome, Sandbox, SandboxLimits
from flowpool.sandbox.backends import bwrap_binary, probe_bwrap
from tests.conftest import TEST_ENV
from tests.helpers import compiled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
needs_bwrap = pytest.mark.skipif(probe_bwrap(bwrap_binary()) is not None, reason="the bwrap backend does not work here")

LIMITS = SandboxLimits(memory_bytes=512 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20)
UID_BASE = 117000  # away from the other sandbox tests' uids (their sweeps would kill our runs)
REPO = str(Path(__file__).resolve().parents[2])
# Where the worker is installed on this host: no run may read any of it.
INSTALLATION_PATHS = (REPO, sys.prefix, os.path.realpath(sys.executable), sys.base_prefix, "/work", "/root")

USES_PYDANTIC = """
import importlib.metadata
import sys

import pydantic
import pydantic_core

class Point(pydantic.BaseModel):
    x: int
    y: int = 0

def execute(ctx):
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    return {"point": Point(x="3").model_dump(), "pydantic": pydantic.__file__, "core": pydantic_core.__file__,
            "version": importlib.metadata.version("pydantic"), "mountinfo": mountinfo, "sys_path": sys.path}
"""

IMPORTS_PYDANTIC = """
def execute(ctx):
    try:
        import pydantic
    except ImportError as exc:
        return [type(exc).__name__, exc.name]
    return ["imported", pydantic.__file__]
"""


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A bwrap sandbox staged with the packages the test's parameter names."""
    box = Sandbox(LIMITS, slots=1, uid_base=UID_BASE, hard_grace_seconds=1.0, prestart=0, backend="bwrap",
                  packages=request.param)
    box.start()
    try:
        yield box
    finally:
        box.stop()


def run(sandbox: Sandbox, source: str) -> RunOutcome:
    outcome = sandbox.run(compiled(source), {}, 30)
    assert outcome.ok, outcome.error
    return outcome


@needs_bwrap
@pytest.mark.parametrize("sandbox", ["pydantic"], indirect=True)
def test_a_listed_package_and_its_compiled_dependency_import_from_runtime_and_show_no_host_path(
        sandbox: Sandbox) -> None:
    seen = run(sandbox, USES_PYDANTIC).result

    assert seen["point"] == {"x": 3, "y": 0}  # validated by pydantic_core's compiled module
    assert seen["pydantic"].startswith("/runtime/lib/python3.") and "/site-packages/pydantic/" in seen["pydantic"]
    assert seen["core"].startswith("/runtime/")
    assert seen["version"] == __import__("pydantic").VERSION
    assert " /runtime " in seen["mountinfo"]
    for text in (seen["mountinfo"], repr(seen["sys_path"]), seen["pydantic"], seen["core"]):
        for host_path in INSTALLATION_PATHS:
            assert host_path not in text, (host_path, text)
    assert "packages: pydantic 2." in sandbox.describe() and "pydantic_core 2." in sandbox.describe()


@needs_bwrap
@pytest.mark.parametrize("sandbox", [""], indirect=True)
def test_without_the_setting_a_script_cannot_import_a_package_the_worker_has(sandbox: Sandbox) -> None:
    assert run(sandbox, IMPORTS_PYDANTIC).result == ["ModuleNotFoundError", "pydantic"]
    assert "packages:" not in sandbox.describe()


def test_a_listed_distribution_not_installed_stops_the_sandbox_with_its_name() -> None:
    with pytest.raises(ConfigurationError, match="FLOWPOOL_SANDBOX_PACKAGES: no-such-dist-for-flowpool is not "
                                                 "installed in the worker's Python"):
        Sandbox(LIMITS, slots=1, uid_base=UID_BASE, prestart=0, packages="pydantic, no-such-dist-for-flowpool")


def test_a_worker_listing_a_distribution_not_installed_refuses_to_start_and_names_it(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        stack = Stack(env={**TEST_ENV, "FLOWPOOL_SANDBOX_PACKAGES": "pydantic,no-such-dist-for-flowpool"},
                      output=output)
        try:
            worker = stack.start_worker()
            code = worker.wait(60)  # bounds a hang: a worker that started would never end by itself
        finally:
            stack.stop()
    assert code == 1  # a supervisor or an orchestrator sees it fail
    assert "FLOWPOOL_SANDBOX_PACKAGES: no-such-dist-for-flowpool is not installed in the worker's Python" in \
        log.read_text()
