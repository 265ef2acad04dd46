"""Which installed distributions the bwrap sandbox stages for scripts to import, and which of their files.

``FLOWPOOL_SANDBOX_PACKAGES`` lists distribution names (``pydantic,PyYAML``;
extras allowed, ``pydantic[email]``). Each is looked up where the worker's
Python finds it, with every distribution it needs at run time, transitively:
a requirement counts when its environment marker holds on this host, for no
extra or for an extra it was asked with; its version bounds are not checked
again (the worker's environment is what its installer resolved). A name that
is not installed, here or as a dependency, stops the worker: a script would
otherwise fail on its import, run after run. ``flowpool`` itself may not be
listed: the sandbox stages the part of it runs use, never its worker and API
side.

Of each distribution, what an import reads is staged: its packages, modules
and extension modules (with the libraries a wheel vendors beside them) and
its ``METADATA``, so ``importlib.metadata.version()`` answers inside. Not its
scripts, data files installed outside site-packages, ``.pth`` files (the
sandbox's ``site`` would run them) or the rest of its ``.dist-info``
(``direct_url.json`` may name a host path).
"""
from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator
from importlib import metadata

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flowpool.errors import ConfigurationError
from flowpool.settings import split_list

__all__ = ["importable_files", "listed", "resolve", "summary"]

_SETTING = "FLOWPOOL_SANDBOX_PACKAGES"
_REFUSED = "flowpool"
_METADATA = ("METADATA", "PKG-INFO")  # a .dist-info's and an .egg-info's
_SHOWN = 6  # distributions a summary names before it counts the rest


def listed(setting: str) -> tuple[str, ...]:
    """The requirements a comma-separated ``setting`` lists, normalised and sorted (the same set, the same tuple)."""
    wanted = []
    for entry in split_list(setting):
        try:
            requirement = Requirement(entry)
        except InvalidRequirement as exc:
            raise ConfigurationError(f"{_SETTING}: {entry!r} is not a distribution name ({exc})") from None
        if requirement.specifier or requirement.url or requirement.marker:
            raise ConfigurationError(f"{_SETTING}: {entry!r} is more than a name; list names only "
                                     "(the version installed for the worker is the one staged)")
        if canonicalize_name(requirement.name) == _REFUSED:
            raise ConfigurationError(f"{_SETTING} may not list flowpool: the sandbox stages the part of it runs "
                                     "use, and never its worker and API side")
        requirement.name = canonicalize_name(requirement.name)
        wanted.append(str(requirement))
    return tuple(sorted(set(wanted)))


def _installed(name: str, needed_by: str | None) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        why = f", which {needed_by} needs," if needed_by else ""
        raise ConfigurationError(f"{_SETTING}: {name}{why} is not installed in the worker's Python "
                                 "(install it, or remove it from the list)") from None


def _needs(distribution: metadata.Distribution, extras: set[str]) -> Iterator[Requirement]:
    """What ``distribution`` requires at run time here with ``extras``: requirements whose marker fails are skipped."""
    for text in distribution.requires or ():
        try:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in ("", *sorted(extras))):
                yield requirement
        except (InvalidRequirement, InvalidMarker, UndefinedComparison, UndefinedEnvironmentName) as exc:
            raise ConfigurationError(f"{_SETTING}: {distribution.name} declares a requirement this worker "
                                     f"cannot read ({text!r}: {exc})") from None


def resolve(wanted: tuple[str, ...]) -> tuple[metadata.Distribution, ...]:
    """The distributions ``wanted`` (from :func:`listed`) and all they need at run time, each once, listed first."""
    found: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    pending: deque[tuple[Requirement, str | None]] = deque((Requirement(text), None) for text in wanted)
    while pending:
        requirement, needed_by = pending.popleft()
        key = canonicalize_name(requirement.name)
        if key == _REFUSED:
            continue  # a dependency on flowpool: the sandbox has its own part of it
        asked = extras.setdefault(key, set())
        if key in found and requirement.extras <= asked:
            continue
        asked |= requirement.extras
        if key not in found:
            found[key] = _installed(requirement.name, needed_by)
        distribution = found[key]
        if distribution.files is None:
            raise ConfigurationError(f"{_SETTING}: {distribution.name} was installed without a record of its "
                                     "files (RECORD), so it cannot be staged; reinstall it with pip")
        pending.extend((need, distribution.name) for need in _needs(distribution, asked))
    return tuple(found.values())


def importable_files(distribution: metadata.Distribution) -> Iterator[tuple[str, str]]:
    """Each file of ``distribution`` an import may read: its path on the host, and relative to site-packages."""
    for path in distribution.files or ():
        parts = path.parts
        if not parts or ".." in parts or os.path.isabs(str(path)):
            continue  # scripts in bin/, data files installed elsewhere
        if parts[0].endswith((".dist-info", ".egg-info")) and parts[-1] not in _METADATA:
            continue
        if len(parts) == 1 and parts[0].endswith(".pth"):
            continue
        if parts[-2:-1] == ("__pycache__",) and not parts[-1].endswith(f".{sys.implementation.cache_tag}.pyc"):
            continue
        source = str(distribution.locate_file(path))
        if os.path.isfile(source):  # a record may list a file since removed, or a .pyc never written
            yield source, os.path.join(*parts)


def summary(distributions: tuple[metadata.Distribution, ...]) -> str:
    """The staged distributions in a short line for people: ``pydantic 2.9.2, pydantic_core 2.23.4, ...``."""
    named = [f"{distribution.name} {distribution.version}" for distribution in distributions]
    rest = len(named) - _SHOWN
    return ", ".join(named[:_SHOWN]) + (f" and {rest} more" if rest > 0 else "")
