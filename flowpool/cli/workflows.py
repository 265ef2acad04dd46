"""The commands that need only the client: ``push``, ``activate``, ``validate``, ``invoke``, ``runs``, ``logs``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from .common import api_call, api_client, echo_json, load_settings

__all__ = ["COMMANDS"]


def accessory_option(items: tuple[str, ...]) -> dict[str, Path]:
    """``--accessory KEY=FILE`` options: each file's path, by key."""
    accessories = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=FILE", param_hint="--accessory")
        if not Path(path).is_file():
            raise click.BadParameter(f"{path!r} is not a file", param_hint="--accessory")
        accessories[key] = Path(path)
    return accessories


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", "ref", required=True, help="workflow_ref_name to register it under.")
@click.option("--accessory", multiple=True, help="KEY=FILE, a JSON accessory bundled with the version.")
@click.option("--timeout", "timeout_seconds", type=float, default=None)
@click.option("--bump", "version_bump", type=click.Choice(["major", "minor", "patch"]), default=None,
              help="Semver bump of a new version (default: the server's, minor).")
@click.option("--draft", is_flag=True, help="Store the new version as a draft, not activated: invoke it pinned "
              "(workflow:REF@VERSION), publish it with flowpool activate REF VERSION.")
@click.option("--queue", default=None, metavar="NAME",
              help="Worker queue its runs go to (wins over the script's QUEUE; default: the script's, else default).")
def push(file: Path, ref: str, accessory: tuple[str, ...], timeout_seconds: float | None, version_bump: str | None,
         draft: bool, queue: str | None) -> None:
    """Upload FILE as workflow REF (a new version if it changed)."""
    accessories = accessory_option(accessory)
    client = api_client(load_settings())
    progress = _UploadProgress()
    try:
        result = api_call(client.workflows.upload, ref, file, accessories=accessories, progress=progress,
                          timeout_seconds=timeout_seconds, version_bump=version_bump, queue=queue,
                          draft=draft)
    finally:
        progress.close()
    if draft and not result.version.active:
        state = "new draft" if result.created else "unchanged, a draft" if result.version.draft else "unchanged"
        click.echo(f"{ref}@{result.version.version} ({state}: publish it with: flowpool activate {ref} "
                   f"{result.version.version})")
        return
    state = "new version" if result.created else "unchanged, active"
    click.echo(f"{ref}@{result.version.version} ({state})")


class _UploadProgress:
    """How far an upload got, on stderr, for bodies over PROGRESS_MIN_BYTES: a bar on a terminal, else a line
    per tenth (a log or a CI job gets a few lines, not a redrawn bar)."""

    PROGRESS_MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self._bar: Any = None
        self._tenths_shown = -1

    def __call__(self, sent: int, total: int) -> None:
        if total < self.PROGRESS_MIN_BYTES:
            return
        if sys.stderr.isatty():
            if self._bar is None:
                self._bar = click.progressbar(length=total, label="uploading", file=sys.stderr,
                                              show_pos=False, show_percent=True)
                self._bar.__enter__()
            self._bar.update(sent - self._bar.pos)
            return
        tenths = sent * 10 // total
        if tenths > self._tenths_shown:
            self._tenths_shown = tenths
            click.echo(f"uploading: {sent / (1 << 20):.1f} of {total / (1 << 20):.1f} MB ({tenths * 10}%)", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check FILE with the rules of an upload, offline; print each problem as FILE:LINE: message."""
    checked_source(file)
    click.echo(f"{file}: ok")


def checked_source(file: Path) -> str:
    """The text of workflow FILE, checked offline with the rules of an upload; if it breaks one, each problem
    printed as FILE:LINE: message and exit 1."""
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
    return source


def secrets_option(items: tuple[str, ...]) -> dict[str, str] | None:
    """``--secret KEY=VALUE`` and ``--secret KEY`` options as a dict; a bad one is named by its position, never shown.

    ``--secret KEY`` takes the value of the environment variable KEY of the invoking shell: unlike
    KEY=VALUE, which every local user can read in ``ps`` while the command runs, and which stays in the
    shell's history, it puts the value on no command line.
    """
    import os
    import re

    secrets = {}
    for position, item in enumerate(items, 1):
        key, sep, value = item.partition("=")
        if not sep:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
                # Perhaps a value given without its KEY=: not shown.
                raise click.BadParameter(f"the {_ordinal(position)} --secret is neither KEY=VALUE nor the name of "
                                         "an environment variable (it is not shown: it may hold a secret)",
                                         param_hint="--secret")
            if item not in os.environ:  # the user's own shell passes the value: the one read of it here
                # Not named either: a value typed without its KEY= can look like a variable's name.
                raise click.BadParameter(f"the {_ordinal(position)} --secret, without '=', names an environment "
                                         "variable to take the value from, and none of that name is set (the "
                                         "name is not shown: it may be a value typed without its KEY=)",
                                         param_hint="--secret")
            value = os.environ[item]
        elif not key:
            raise click.BadParameter(f"the {_ordinal(position)} --secret is not KEY=VALUE: its KEY is empty (it is "
                                     "not shown: it may hold a secret)", param_hint="--secret")
        secrets[key] = value
    return secrets or None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def json_option(text: str | None, option: str) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from exc


@click.command()
@click.argument("ref")
@click.option("--input", "input_json", default=None, metavar="JSON", help="The input as JSON.")
@click.option("--message", "messages", multiple=True, help="A user message (repeatable).")
@click.option("--secret", "secrets", multiple=True, metavar="KEY[=VALUE]",
              help="A request secret, ctx.secrets[KEY] in the script (repeatable); never printed or stored. "
                   "KEY alone takes the value of the environment variable KEY; KEY=VALUE puts the value on the "
                   "command line, where other local users can read it (ps) while it runs, and in shell history.")
@click.option("--metadata", "metadata_json", default=None, metavar="JSON",
              help="A JSON object kept on the run record; ctx.metadata in the script.")
@click.option("--session-id", default=None, help="Run it in this session (GET /api/v1/sessions/ID lists its runs).")
@click.option("--stream", is_flag=True, help="Print chunks as they arrive.")
@click.option("--no-cache", is_flag=True, help="Bypass the result cache.")
def invoke(ref: str, input_json: str | None, messages: tuple[str, ...], secrets: tuple[str, ...],
           metadata_json: str | None, session_id: str | None, stream: bool, no_cache: bool) -> None:
    """Invoke workflow REF and print its output as JSON.

    A failure ends with one ``Error:`` line naming the run's request_id,
    whose logs and traceback ``flowpool logs REQUEST_ID`` prints, and exit 1.
    """
    value = json_option(input_json, "--input")
    metadata = json_option(metadata_json, "--metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--metadata")
    if value is None and not messages:
        raise click.UsageError("give --input or --message")
    client = api_client(load_settings())
    kwargs: dict[str, Any] = {"input": value, "stream": stream, "cache": not no_cache,
                              "secrets": secrets_option(secrets), "metadata": metadata, "session_id": session_id}
    if messages:
        kwargs["messages"] = [{"role": "user", "content": m} for m in messages]
    model = ref if ref.startswith("workflow:") else f"workflow:{ref}"
    api_call(echo_completion, lambda: client.workflow.completions.create(model=model, **kwargs), stream)


def echo_completion(create: Callable[[], Any], stream: bool, whole: bool = False) -> None:
    """Print what ``create()`` answers (an invocation's completion, or with ``stream`` its events): each chunk as a
    JSON line as it arrives, then the output as JSON. With ``whole``, each event or the completion whole, as one
    JSON line each. An API error is raised as it is (api_call ends the command with it)."""
    if not stream:
        completion = create()
        if whole:
            click.echo(json.dumps(completion.to_dict()))
        else:
            echo_json(completion.output)
        return
    for event in create():  # printed as they arrive
        data = event.to_dict()
        if whole:
            click.echo(json.dumps(data))
        elif data.get("object") == "workflow.chunk":
            click.echo(json.dumps({"type": data.get("type"), "content": data.get("content")}))
        else:
            echo_json(data.get("output"))


_STATUS_COLOURS = {"succeeded": "green", "failed": "red", "timed_out": "red", "lost": "red", "expired": "yellow",
                   "cancelled": "yellow", "queued": "cyan", "running": "cyan"}
_RUN_COLUMNS = ("TIME", "REQUEST_ID", "STATUS", "DURATION", "CACHE", "VERSION")


def _clock(stamp: float | None, date: bool = False) -> str:
    """A Unix time in the local time zone: ``14:03:22``, or ``2026-05-01 14:03:22`` with ``date``."""
    if stamp is None:
        return "-" if date else "--:--:--"
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(stamp))


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    seconds = ms / 1000
    return f"{seconds:.2f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], colour: dict[str, str]) -> None:
    """Columns padded to their widest cell; on a terminal a bold header and ``colour`` per cell text.

    click.echo drops the styles when stdout is not a terminal, so piped output is plain text.
    """
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: tuple[str, ...], style: Any) -> str:
        return "  ".join(style(cell, cell.ljust(width)) for cell, width in zip(cells, widths)).rstrip()

    click.echo(line(header, lambda _, padded: click.style(padded, bold=True)))
    for row in rows:
        click.echo(line(row, lambda cell, padded: click.style(padded, fg=colour[cell]) if cell in colour else padded))


@click.command()
@click.argument("ref")
@click.option("--limit", default=25, show_default=True, type=click.IntRange(1, 100), help="How many runs to show.")
def runs(ref: str, limit: int) -> None:
    """List the latest runs of workflow REF, newest first, their times in the local time zone."""
    client = api_client(load_settings())
    found = api_call(client.workflows.runs, ref, limit=limit)
    if not found:
        click.echo(f"no runs of {ref} yet; invoke it with: flowpool invoke {ref} --input '{{...}}'", err=True)
        return
    rows = [(_clock(run.queued_at, date=True), run.request_id, run.status, _duration(run.timings.run_ms),
             "hit" if run.cache_hit else "miss", run.version or "-") for run in found]
    _table(_RUN_COLUMNS, rows, _STATUS_COLOURS)


_LEVEL_COLOURS = {"DEBUG": "bright_black", "WARNING": "yellow", "ERROR": "red"}


def _echo_line(stamp: str, label: str, text: str) -> None:
    """One line of ``flowpool logs``: ``14:03:22 INFO    text``."""
    click.echo(f"{stamp} {click.style(f'{label:<7}', fg=_LEVEL_COLOURS.get(label))} {text}".rstrip())


def _echo_chunk(stamp: str, chunk: Any) -> None:
    _echo_line(stamp, "CHUNK", f"{chunk.get('type')} {json.dumps(chunk.get('content'), ensure_ascii=False)}")


def _echo_log(entry: dict[str, Any]) -> None:
    """One log line at the time the run logged it: ``14:03:22 INFO    msg key=value``."""
    fields = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in (entry.get("fields") or {}).items())
    _echo_line(_clock(entry.get("time")), str(entry.get("level", "info")).upper(), f"{entry.get('msg', '')} {fields}")


def echo_record(run: Any, shown: int = 0, script_file: str | None = None) -> None:
    """The run's log lines (past the first ``shown``, printed already), then its error with the script's traceback.

    With ``script_file``, the traceback names that file where the worker named the script (``workflow:<ref>``),
    so an editor or terminal opens the right file at the line.
    """
    for entry in (run.to_dict().get("logs") or [])[shown:]:
        _echo_log(entry)
    error = run.to_dict().get("error")
    if error:
        _echo_line(_clock(run.finished_at), "ERROR", f"run {run.status}: {error.get('message')}")
        if error.get("traceback"):
            traceback = str(error["traceback"]).rstrip("\n")
            if script_file is not None and run.get("workflow"):
                traceback = traceback.replace(f'File "workflow:{run.workflow}"', f'File "{script_file}"')
            click.echo(traceback)


def _follow(client: Any, request_id: str) -> int:
    """Print the chunks and log lines of a queued or running run as they come, in order, until it ends (however it
    ends); how many log lines it printed."""
    from ..sdk.errors import APIError

    shown = 0
    try:
        for event in client.runs.stream(request_id, logs=True):
            kind = event.get("object")
            if kind == "workflow.chunk":
                _echo_chunk(_clock(time.time()), event)
            elif kind == "workflow.log":
                _echo_log(event.to_dict())
                shown += 1
    except APIError as exc:
        if exc.request_id != request_id:  # not the run's own error: the stream itself failed
            raise
    return shown


_UNFINISHED = ("queued", "running")


@click.command()
@click.argument("request_id")
@click.option("--follow", "-f", is_flag=True,
              help="Print the chunks and log lines of a running run as they come, then its error when it ends.")
def logs(request_id: str, follow: bool) -> None:
    """Print the log lines of run REQUEST_ID, and its error with the script's traceback if it failed.

    A running run's log lines are those so far. With --follow, a running
    run's chunks (at the time they arrive) and log lines (at the time they
    were logged) as they come, in the order the run sent them, then its
    error; a run that has ended, its chunks (times unknown, --:--:--), log
    lines and error at once.
    """
    client = api_client(load_settings())
    run = api_call(client.runs.get, request_id)
    shown = 0
    if follow and run.status in _UNFINISHED:
        click.echo(f"following run {request_id} of {run.workflow} ({run.status})", err=True)
        shown = api_call(_follow, client, request_id)
        run = api_call(client.runs.get, request_id)
    elif follow:
        for chunk in run.to_dict().get("chunks") or []:
            _echo_chunk(_clock(None), chunk)
    echo_record(run, shown)
    if run.status in _UNFINISHED:
        click.echo(f"run {request_id} is {run.status}: these are its log lines so far; "
                   f"follow it with: flowpool logs --follow {request_id}", err=True)
    elif follow:
        click.echo(f"run {request_id} {run.status} in {_duration(run.timings.run_ms)}", err=True)


@click.command()
@click.argument("ref")
@click.argument("version")
def activate(ref: str, version: str) -> None:
    """Make VERSION (1.2.0) the active version of workflow REF: publish a draft, roll back or forward."""
    workflow = api_call(api_client(load_settings()).workflows.activate, ref, version)
    click.echo(f"{ref}@{workflow.active_version} (active)")


COMMANDS = [push, activate, validate, invoke, runs, logs]
