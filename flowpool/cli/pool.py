"""``flowpool pool``: the demand signal of each worker queue and the live workers, from GET /api/v1/pool."""
from __future__ import annotations

from typing import Any

import click

from .common import echo_json, load_settings

__all__ = ["COMMANDS"]

_QUEUE_COLUMNS = ("queued", "reserved", "running", "slots_per_worker", "workers", "desired_workers")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows of text in left-aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def _counts(value: dict[str, int]) -> str:
    return ",".join(f"{queue}={n}" for queue, n in sorted(value.items()) if n) or "-"


def render(pool: dict[str, Any]) -> str:
    """The pool as two tables: each queue's demand, then each live worker."""
    lines = _table(["queue", *_QUEUE_COLUMNS],
                   [[name, *(str(demand[field]) for field in _QUEUE_COLUMNS)] for name, demand in pool["queues"].items()])
    workers = pool["workers"]
    lines.append("")
    if workers:
        lines += _table(["worker", "queues", "slots", "running", "reserved", "beat_age_s"],
                        [[w["name"], ",".join(w["queues"]), str(w["slots"]), _counts(w["running"]),
                          _counts(w["reserved"]), f"{w['last_beat_age']:.1f}"] for w in workers])
    else:
        lines.append("no live worker")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as it is.")
def pool(as_json: bool) -> None:
    """Show each worker queue's queued, reserved and running runs, its workers, and the workers it needs.

    An operator route: it sends FLOWPOOL_ADMIN_TOKEN when set; without one the
    API answers only from loopback (as `flowpool dev` runs).
    """
    import requests

    settings = load_settings()
    headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
    url = settings.api_url.rstrip("/") + "/api/v1/pool"
    try:
        response = requests.get(url, headers=headers, timeout=30)
    except requests.RequestException as exc:
        raise click.ClickException(f"cannot reach the API: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        raise click.ClickException(f"{url} answered {response.status_code}: {message or response.text[:200]}")
    if as_json:
        echo_json(body)
    else:
        click.echo(render(body))


COMMANDS = [pool]
