"""The commands that need only the client: ``push``, ``validate``, ``invoke``, ``runs``, ``logs``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .common import api_call, api_client, echo_json, load_settings

__all__ = ["COMMANDS"]


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", "ref", required=True, help="workflow_ref_name to register it under.")
@click.option("--accessory", multiple=True, help="KEY=FILE, a JSON accessory bundled with the version.")
@click.option("--timeout", "timeout_seconds", type=float, default=None)
@click.option("--bump", "version_bump", type=click.Choice(["major", "minor", "patch"]), default="patch")
def push(file: Path, ref: str, accessory: tuple[str, ...], timeout_seconds: float | None, version_bump: str) -> None:
    """Upload FILE as workflow REF (a new version if it changed)."""
    accessories = {}
    for item in accessory:
        key, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=FILE", param_hint="--accessory")
        accessories[key] = path
    client = api_client(load_settings())
    result = api_call(client.workflows.upload, ref, file, accessories=accessories,
                       timeout_seconds=timeout_seconds, version_bump=version_bump)
    state = "new version" if result.created else "unchanged, active"
    click.echo(f"{ref}@{result.version.version} ({state})")


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check FILE with the rules of an upload, offline; print each problem as FILE:LINE: message."""
    from ..registry.validation import validate_script

    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{file} is not UTF-8 text: {exc}") from exc
    problems = validate_script(source).problems
    for problem in problems:
        click.echo(f"{file}:{problem.line}: {problem.message}")
    if problems:
        sys.exit(1)
    click.echo(f"{file}: ok")


@click.command()
@click.argument("ref")
@click.option("--input", "input_json", default=None, help="The input as JSON.")
@click.option("--message", "messages", multiple=True, help="A user message (repeatable).")
@click.option("--stream", is_flag=True, help="Print chunks as they arrive.")
@click.option("--no-cache", is_flag=True, help="Bypass the result cache.")
def invoke(ref: str, input_json: str | None, messages: tuple[str, ...], stream: bool, no_cache: bool) -> None:
    """Invoke workflow REF and print its output."""
    try:
        value = json.loads(input_json) if input_json is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    client = api_client(load_settings())
    kwargs: dict[str, Any] = {"input": value, "stream": stream, "cache": not no_cache}
    if messages:
        kwargs["messages"] = [{"role": "user", "content": m} for m in messages]
    if value is None and not messages:
        raise click.UsageError("give --input or --message")
    model = ref if ref.startswith("workflow:") else f"workflow:{ref}"
    if stream:
        def follow() -> None:
            for chunk in client.workflow.completions.create(model=model, **kwargs):  # printed as they arrive
                data = chunk.to_dict()
                if data.get("object") == "workflow.chunk":
                    click.echo(json.dumps({"type": data.get("type"), "content": data.get("content")}))
                else:
                    echo_json(data.get("output"))

        api_call(follow)
        return
    echo_json(api_call(client.workflow.completions.create, model=model, **kwargs).output)


@click.command()
@click.argument("ref")
@click.option("--limit", default=25, show_default=True)
def runs(ref: str, limit: int) -> None:
    """List the latest runs of workflow REF."""
    client = api_client(load_settings())
    for run in api_call(client.workflows.runs, ref, limit=limit):
        timing = run.timings.run_ms
        click.echo(f"{run.request_id}  {run.status:<10} {run.version or '-':<8} "
                   f"{'hit ' if run.cache_hit else 'miss'} {'' if timing is None else f'{timing:.1f}ms'}")


@click.command()
@click.argument("request_id")
def logs(request_id: str) -> None:
    """Print the log lines of run REQUEST_ID."""
    client = api_client(load_settings())
    run = api_call(client.runs.get, request_id)
    for entry in run.to_dict().get("logs") or []:
        fields = " ".join(f"{k}={json.dumps(v)}" for k, v in (entry.get("fields") or {}).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(entry.get("time", 0)))
        click.echo(f"{stamp} {entry.get('level', 'info').upper():<7} {entry.get('msg', '')} {fields}".rstrip())
    if run.error:
        click.echo(f"error: {run.error.get('message')}", err=True)



COMMANDS = [push, validate, invoke, runs, logs]
