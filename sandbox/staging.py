"""The runtime the bwrap sandbox mounts at ``/runtime``: a tree the worker lays out once, so no mount names a host path.

A bind mount shows in ``/proc/self/mountinfo`` where it is mounted and, as its
root, the path of its source within the source's filesystem. Binding the
interpreter's own directories, wherever inside, would tell every run where
Python, the virtual environment and flowpool's checkout live on the host.
So the worker lays out what the sandbox needs as an ordinary Python
installation in a directory of its own (``$TMPDIR/flowpool-runtime-*``)
and bwrap binds only that directory, at ``/runtime``: a run reads
``/runtime`` as the mount point and the staging directory as its root,
nothing of the installation. The interpreter finds its standard library
next to its executable (``/runtime/bin`` and ``/runtime/lib/python3.X``), so
``sys.path``, module files and tracebacks show ``/runtime`` too.

What is staged: the standard library without its test suites, IDLE, Tk and
installers, the compiled files of this interpreter only; the executable and
its shared library; flowpool's sandbox-side packages (``flowpool``'s own
modules, ``flowpool.sandbox``, ``flowpool_workflow``, ``maitai_workflow``).
Of the virtual environment's third-party packages, only the distributions
``FLOWPOOL_SANDBOX_PACKAGES`` lists and those they need
(:mod:`.distributions`), in the stage's site-packages: the sandbox itself
imports none, and a script imports one only if it asks for it. Files are
hard links where the filesystem allows (no copy, no memory), else copies
(about 60 MB, once per worker start, plus the packages). The worker holds a
shared ``flock`` on the directory while it lives, which also keeps
systemd-tmpfiles' age-based clean-up of ``/tmp`` away from it; it is removed
when the worker exits, and one left by a worker that was killed (its lock
gone with it) by the next worker that stages.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import importlib.util
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata

from .distributions import importable_files, resolve, summary

__all__ = ["PACKAGES", "RUNTIME", "Stage", "package_dirs", "stage_runtime"]

RUNTIME = "/runtime"  # where the sandbox sees the staged tree
_PREFIX = "flowpool-runtime-"
# Parts of the standard library no run needs: test suites, IDLE, Tk, installers, build files, other packages.
_SKIPPED = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
            "site-packages", "dist-packages", "__phello__"}
_YOUNG = 60.0  # seconds a new stage is spared by the sweep, before its worker locks it
# flowpool's own packages the sandbox imports: staged under bwrap, bound from the host under the process backend.
PACKAGES = ("flowpool", "flowpool.sandbox", "flowpool_workflow", "maitai_workflow")


@dataclass(frozen=True)
class Stage:
    """A staged runtime: its directory on the host and what the sandbox finds where inside."""

    root: str  # the host directory bwrap binds at RUNTIME
    interpreter: str  # the executable, as the sandbox sees it
    library_path: str | None  # LD_LIBRARY_PATH inside, where the executable links libpython
    hidden: tuple[str, ...]  # flowpool's package directories inside, covered by the zygote once imported
    copied_bytes: int  # what could not be hard-linked and was copied
    packages: str = ""  # the third-party distributions staged, in a short line ("" when none)


def _ignore(directory: str, names: list[str]) -> set[str]:
    """What not to stage of ``directory``: the parts no run needs, compiled files of other interpreters."""
    if os.path.basename(directory) == "__pycache__":
        return {name for name in names if not name.endswith(f".{sys.implementation.cache_tag}.pyc")}
    return {name for name in names if name in _SKIPPED or name.startswith("config-")}


class _Copier:
    """Hard-links files into the stage, copying those it cannot link (another filesystem, protected_hardlinks)."""

    def __init__(self) -> None:
        self.copied_bytes = 0

    def __call__(self, source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)
            self.copied_bytes += os.path.getsize(destination)

    def tree(self, source: str, destination: str, top_level_only: bool = False) -> None:
        def ignore(directory: str, names: list[str]) -> set[str]:
            skipped = _ignore(directory, names)
            if top_level_only and directory == source:  # a package's own modules, not its subpackages
                skipped |= {n for n in names if n != "__pycache__" and os.path.isdir(os.path.join(directory, n))}
            return skipped
        shutil.copytree(source, destination, ignore=ignore, copy_function=self, dirs_exist_ok=True)


def package_dirs(name: str) -> list[str]:
    """Where package ``name`` lives (a source checkout when installed editable), found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed as a package")
    return [os.path.abspath(path) for path in spec.submodule_search_locations]


def _remove_stale(directory: str) -> None:
    """Remove stages of workers that died without removing theirs: nobody holds their lock any more."""
    for entry in os.scandir(directory):
        if not entry.name.startswith(_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        if time.time() - entry.stat(follow_symlinks=False).st_mtime < _YOUNG:
            continue  # just made: its worker may not hold the lock yet
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live worker's
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)


def _remove(root: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a child that forked and exited normally
        shutil.rmtree(root, ignore_errors=True)


def _lock(root: str) -> None:
    """Hold a shared lock on ``root`` until this process exits (its descriptor is never closed)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)


def _stage_distributions(copy: _Copier, distributions: tuple[metadata.Distribution, ...], site_packages: str) -> None:
    """Put what an import of each distribution reads in ``site_packages``, where the sandbox's interpreter looks."""
    for distribution in distributions:
        for source, relative in importable_files(distribution):
            destination = os.path.join(site_packages, relative)
            if os.path.exists(destination):  # flowpool's own, or a file two distributions share
                continue
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            copy(source, destination)


def _lay_out(root: str, distributions: tuple[metadata.Distribution, ...] = ()) -> Stage:
    """Stage the runtime in ``root``: an installation whose prefix is RUNTIME once bound there."""
    copy = _Copier()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = os.path.join(root, sys.platlibdir, version)  # where the interpreter looks, next to its bin/
    copy.tree(sysconfig.get_paths()["stdlib"], stdlib)
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload) and not os.path.isdir(os.path.join(stdlib, "lib-dynload")):
        copy.tree(dynload, os.path.join(stdlib, "lib-dynload"))
    executable = os.path.realpath(sys.executable)
    os.makedirs(os.path.join(root, "bin"))
    copy(executable, os.path.join(root, "bin", os.path.basename(executable)))
    library = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    library_path = None
    if os.path.isfile(library):
        os.makedirs(os.path.join(root, "lib"), exist_ok=True)
        copy(os.path.realpath(library), os.path.join(root, "lib", os.path.basename(library)))
        library_path = f"{RUNTIME}/lib"
    # The first directory the interpreter's site module adds for the prefix RUNTIME (dist-packages on Debian).
    packages = os.path.relpath(site.getsitepackages([RUNTIME])[0], RUNTIME)
    for name in PACKAGES:
        copy.tree(package_dirs(name)[0], os.path.join(root, packages, *name.split(".")),
                  top_level_only=name == "flowpool")
    _stage_distributions(copy, distributions, os.path.join(root, packages))
    hidden = tuple(os.path.join(RUNTIME, packages, name) for name in PACKAGES if "." not in name)
    return Stage(root, os.path.join(RUNTIME, "bin", os.path.basename(executable)), library_path, hidden,
                 copy.copied_bytes, summary(distributions))


@functools.lru_cache(maxsize=None)
def stage_runtime(packages: tuple[str, ...] = ()) -> Stage:
    """The runtime staged for this worker process with ``packages`` (from :func:`.distributions.listed`).

    Laid out on first use, once per set of packages, and removed when the
    process exits. Raises ConfigurationError when a package is not installed.
    """
    distributions = resolve(packages)  # before anything is made: a wrong name stops the worker at once
    directory = tempfile.gettempdir()
    _remove_stale(directory)
    root = tempfile.mkdtemp(prefix=_PREFIX, dir=directory)
    _lock(root)  # taken before another worker's sweep could see it unlocked
    os.chmod(root, 0o755)  # the runs' uids read it, as /runtime
    atexit.register(_remove, root, os.getpid())
    try:
        return _lay_out(root, distributions)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
