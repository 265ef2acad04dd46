"""``flowpool usage``: what the account used, per day or per workflow, from GET /api/v1/usage (the client alone)."""
from __future__ import annotations

from typing import Any

import click

from .common import api_call, api_client, echo_json, load_settings

__all__ = ["COMMANDS"]

_COLUMNS = ("runs", "by_status", "compute_s", "tokens", "prompt", "completion", "cache_hits")


def _cells(usage: dict[str, Any]) -> list[str]:
    tokens = usage["tokens"]
    by_status = ",".join(f"{status}={n}" for status, n in usage["runs"].items() if n) or "-"
    return [str(usage["runs_total"]), by_status, f"{usage['compute_seconds']:.3f}", str(tokens["total"]),
            str(tokens["prompt"]), str(tokens["completion"]), str(usage["cache_hits"])]


def _used(usage: dict[str, Any]) -> bool:
    return bool(usage["runs_total"] or usage["cache_hits"] or usage["tokens"]["total"] or usage["compute_seconds"])


def _limit(value: int) -> str:
    return "no limit" if not value else f"limit {value}"


def render(data: dict[str, Any]) -> str:
    """The usage as text: a table of the groups that used anything and the total, tokens by model, then today's
    use against the account's limits."""
    key = data["group_by"]
    rows = [[str(group[key]), *_cells(group)] for group in data["groups"] if _used(group)]
    rows.append(["total", *_cells(data["totals"])])
    header = [key, *_COLUMNS]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [f"usage from {data['from']} to {data['to']} (UTC)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    by_model = data["totals"]["tokens"]["by_model"]
    if by_model:
        lines.append("tokens by model: " + ", ".join(f"{model}={n}" for model, n in by_model.items()))
    today, limits = data["today"], data["limits"]
    lines.append(f"today: {today['compute_seconds']:.3f} compute seconds "
                 f"({_limit(limits['compute_seconds_per_day'])}), {today['tokens']} tokens "
                 f"({_limit(limits['tokens_per_day'])}), {today['in_flight']} runs in flight "
                 f"({_limit(limits['concurrency'])}); requests per minute: {_limit(limits['rpm'])}")
    return "\n".join(lines)


@click.command()
@click.option("--from", "from_", metavar="YYYY-MM-DD", default=None,
              help="First day (UTC; default 29 days before --to).")
@click.option("--to", metavar="YYYY-MM-DD", default=None, help="Last day (UTC; default today).")
@click.option("--group-by", type=click.Choice(["day", "workflow"]), default="day", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the answer's data (GET /api/v1/usage) as JSON.")
def usage(from_: str | None, to: str | None, group_by: str, as_json: bool) -> None:
    """Show what the account used: runs by status, compute seconds, tokens and cache hits, per day or per workflow,
    with today's use against its limits."""
    client = api_client(load_settings())
    data = api_call(client.usage.get, from_=from_, to=to, group_by=group_by).to_dict()
    if as_json:
        echo_json(data)
    else:
        click.echo(render(data))


COMMANDS = [usage]
