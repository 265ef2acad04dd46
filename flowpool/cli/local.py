"""The local inner loop: ``init`` writes a starter workflow and its test; ``run`` runs a workflow file once.

``flowpool run FILE`` checks FILE offline with the rules of an upload, then
runs it once through ``POST /api/v1/workflows/preview`` (no upload under a
name): on the ``flowpool dev`` running here or the API of FLOWPOOL_API_URL
(found as the other commands find them, :func:`.common.load_cli_settings`),
else on a temporary stack it starts (its own Redis in a temporary directory,
one worker, the API on a free loopback port, an account of its own) and stops
when the run ends, leaving no process behind. Only the temporary stack needs
the server extra. :func:`run_workflow` is the same run for Python code: the
test ``init`` writes calls it.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import click

from ..errors import ConfigurationError
from ..procs import interrupt_once
from ..sdk.objects import Obj
from .common import CliSettings, api_call, api_client, describe_error, load_cli_settings, server_extra
from .workflows import accessory_option, checked_source, echo_completion, echo_record, json_option, secrets_option

__all__ = ["COMMANDS", "RunResult", "run_workflow"]

# FLOWPOOL_* settings a temporary stack does not take from the caller: they locate another installation (its
# Redis, broker, blob store, API and key, data directory) or guard its operator routes. The others (provider keys,
# egress, sandbox and run limits...) it takes, so a run behaves as it would on the caller's own stack.
_NOT_FOR_A_TEMPORARY_STACK = frozenset({
    "redis_url", "broker_url", "cache_redis_url", "blob_url", "blob_endpoint_url", "cache_dir", "api_url", "api_key",
    "data_dir", "admin_token", "metrics_token", "worker_queues", "autoscaled_queues"})
# The lines of a temporary stack's output shown when it does not start.
_OUTPUT_TAIL_LINES = 20


@dataclass
class RunResult:
    """What one run of a workflow file answered: the chunks it emitted, in order, and its ``chat.completion``."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    completion: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Any:
        """What the workflow's ``execute`` returned."""
        return self.completion.get("output")


def _preview(client: Any, fields: dict[str, Any], stream: bool) -> Callable[[], Any]:
    """``client.workflows.preview(**fields)``: its events with ``stream``, else its completion.

    Streamed either way (the completion is then the last event, answered as
    a plain request answers it: :func:`_plain_completion`), with
    ``on_disconnect: cancel``: an interrupted ``flowpool run`` drops the
    connection, and that cancels the run, which a plain request would leave going.
    """
    def create() -> Any:
        events = client.workflows.preview(**fields, stream=True, on_disconnect="cancel")
        if stream:
            return events
        completion = None
        for completion in events:  # the chunks, then the completion
            pass
        return Obj(_plain_completion(completion.to_dict()))

    return create


def _plain_completion(last: dict[str, Any]) -> dict[str, Any]:
    """A stream's last event as the ``chat.completion`` a request without ``stream`` answers: without the
    ``delta`` each choice carries in a stream (its message again, for OpenAI clients that read every event as a
    chunk). A cached run's answer, which comes whole in place of a stream, has none to drop."""
    choices = [{key: value for key, value in choice.items() if key != "delta"} for choice in last.get("choices", [])]
    return {**last, "choices": choices} if "choices" in last else last


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside: a Ctrl-C must not break off a temporary stack's stop half done, leaving
    its processes and their directories behind (after an interrupted ``flowpool run`` they are ignored already:
    :func:`~flowpool.procs.interrupt_once`; this covers a stop after the run ended, and :func:`run_workflow`).
    Python takes signals in the main thread alone: elsewhere (run_workflow called from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def _stack_client(cli: CliSettings, say: Callable[[str], None]) -> Iterator[tuple[Any, bool]]:
    """A client of where a run goes, and whether that is a temporary stack started here (stopped on leaving)."""
    if "api_url" in cli.explicit or "api_url" in cli.from_dev:
        yield api_client(cli.settings), False
        return
    with server_extra("run (with no flowpool dev running here and FLOWPOOL_API_URL unset)"):
        from ..devstack import Stack
    from ..client import Flowpool

    env = {name: value for name, value in os.environ.items()
           if name.startswith("FLOWPOOL_") and name[len("FLOWPOOL_"):].lower() not in _NOT_FOR_A_TEMPORARY_STACK}
    # Stopped, its worker ends a run still going at once (an interrupted `flowpool run`): nobody waits for it, and
    # a worker draining past Stack.stop's patience would be killed, leaving its runs' directories behind.
    env["FLOWPOOL_WORKER_DRAIN_SECONDS"] = "0"
    say(f"no flowpool dev runs on {cli.data_dir} and FLOWPOOL_API_URL is unset: starting a temporary stack "
        "(stopped when the run ends)")
    with tempfile.TemporaryFile() as output:
        # Its own Redis, in a temporary directory it removes. Each process in a session of its own: the SIGINT a
        # terminal sends its whole foreground group on Ctrl-C reaches this command alone, which stops them (a
        # worker given SIGINT too did not stop within Stack.stop's patience and was killed, leaving its directory).
        stack = Stack(env=env, output=output, own_session=True)
        try:
            try:
                stack.start(quiet=False)  # one worker, the API on a free loopback port, ready
                key = stack.create_account("flowpool-run")
            except (RuntimeError, ConfigurationError) as exc:  # a process exited, or was not ready; no redis-server
                raise click.ClickException(f"the temporary stack did not start: {exc}\n{_tail(output)}") from exc
            assert stack.api_url is not None
            client = Flowpool(api_key=key, base_url=stack.api_url)
            with client:  # closed before the stack stops: an idle connection would hold the API's shutdown
                yield client, True
        finally:
            with _signals_ignored():
                stack.stop()


def _tail(output: IO[bytes]) -> str:
    """The last lines a temporary stack wrote."""
    output.seek(0)
    lines = output.read().decode(errors="replace").splitlines()[-_OUTPUT_TAIL_LINES:]
    return "\n".join(lines)


def run_workflow(file: str | Path, input: Any = None, messages: list[dict[str, Any]] | None = None,
                 secrets: dict[str, str] | None = None,
                 accessories: dict[str, bytes | Path] | None = None) -> RunResult:
    """Run workflow ``file`` once as ``flowpool run`` does, on the same stack, and return its chunks and answer.

    A script that breaks an upload's rules raises ValidationFailed (each
    problem with its line), before anything is sent; a run that fails raises
    the client's APIError (``request_id`` names the run).
    """
    from ..registry.validation import validate_script

    script = Path(file).read_text(encoding="utf-8")
    validate_script(script).raise_for_problems()
    fields = {"script": script, "input": input if input is not None or messages else {}, "messages": messages,
              "secrets": secrets, "accessories": accessories}
    result = RunResult()
    with _stack_client(load_cli_settings(), lambda line: print(f"flowpool run: {line}", file=sys.stderr)) as (
            client, _):
        for event in _preview(client, fields, True)():
            data = event.to_dict()
            if data.get("object") == "workflow.chunk":
                result.chunks.append({"type": data.get("type"), "content": data.get("content")})
            else:
                result.completion = _plain_completion(data)
    return result


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "input_json", default=None, metavar="JSON", help="The input as JSON.")
@click.option("--message", "messages", multiple=True, help="A user message (repeatable).")
@click.option("--secret", "secrets", multiple=True, metavar="KEY[=VALUE]",
              help="A request secret, ctx.secrets[KEY] in the script (repeatable), as invoke takes it: KEY alone "
                   "takes the value of the environment variable KEY.")
@click.option("--accessory", multiple=True, metavar="KEY=FILE", help="A JSON accessory bundled with the script.")
@click.option("--stream", is_flag=True, help="Print chunks as they arrive.")
@click.option("--json", "whole", is_flag=True,
              help="Print the whole answer as JSON (the chat.completion; with --stream, each event), one per line.")
def run(file: Path, input_json: str | None, messages: tuple[str, ...], secrets: tuple[str, ...],
        accessory: tuple[str, ...], stream: bool, whole: bool) -> None:
    """Run workflow FILE once, without uploading it, and print its chunks and output as invoke does.

    FILE is checked offline first (each problem as FILE:LINE: message). It
    runs on the flowpool dev running here, or FLOWPOOL_API_URL's API; with
    neither, on a temporary stack started for it and stopped after (this
    needs the server extra). A failed run prints its log lines, its error
    with the script's traceback, and exits 1. Ctrl-C (or SIGTERM) cancels
    the run, and stops the temporary stack.
    """
    value = json_option(input_json, "--input")
    if value is None and not messages:
        raise click.UsageError("give --input or --message")
    script = checked_source(file)
    fields = {"script": script, "input": value, "messages": [{"role": "user", "content": m} for m in messages] or None,
              "secrets": secrets_option(secrets), "accessories": accessory_option(accessory)}
    cli = load_cli_settings()
    # Ctrl-C or SIGTERM ends the command (and cancels the run) through the code that stops its temporary stack,
    # as it ends `flowpool dev`: later ones are ignored from the first on, so that they cannot break off that stop
    # while the first one's KeyboardInterrupt unwinds to it.
    previous = {sig: signal.signal(sig, interrupt_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _stack_client(cli, lambda line: click.echo(f"flowpool run: {line}", err=True)) as (client, temporary):
            api_call(_run_once, client, fields, stream, whole, temporary, str(file))
    except KeyboardInterrupt:
        raise click.Abort() from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _run_once(client: Any, fields: dict[str, Any], stream: bool, whole: bool, temporary: bool, file: str) -> None:
    """Run the preview and print it; a failed run's log lines and traceback (naming ``file``) printed before its
    error is raised."""
    from ..client import APIError

    try:
        echo_completion(_preview(client, fields, stream), stream, whole)
    except APIError as exc:
        if not exc.request_id:
            raise
        echo_record(client.runs.get(exc.request_id), script_file=file)
        # A temporary stack goes with this command: `flowpool logs` could not find the run afterwards.
        raise click.ClickException(str(exc) if temporary else describe_error(exc)) from exc


_STARTER = '''\
"""{name}: a starter workflow. It needs no model: edit execute() and run it with
    flowpool run {name}/workflow.py --input '{{"text": "hello flowpool"}}'
"""
from flowpool_workflow import WorkflowContext

INPUT_SCHEMA = {{"text": {{"type": "string", "description": "The text to work on", "required": True}}}}
OUTPUT_SCHEMA = {{"shout": {{"type": "string"}}, "words": {{"type": "integer"}}}}
TIMEOUT_SECONDS = 30


def execute(ctx: WorkflowContext):
    text = ctx.input["text"]
    ctx.log.info("received", characters=len(text))
    words = text.split()
    ctx.emit("progress", f"counted {{len(words)}} words")
    # To call a model: configure an application's intents (PUT /api/v1/applications/<name>), set
    # APPLICATION = "<name>" above, and call ctx.chat.completions.create(messages=[...]).
    return {{"shout": text.upper(), "words": len(words)}}
'''

_STARTER_TEST = '''\
"""Tests of workflow.py: run them with `pytest {name}/`.

Each test runs the workflow once, as `flowpool run {name}/workflow.py` does
(flowpool.cli.local.run_workflow): on the flowpool dev running in the
directory pytest runs in, or the API of FLOWPOOL_API_URL and FLOWPOOL_API_KEY;
with neither, on a temporary local stack it starts and stops (this needs
flowpool's server extra: pip install 'flowpool[server]'). Nothing is uploaded.
"""
from pathlib import Path

from flowpool.cli.local import run_workflow

WORKFLOW = Path(__file__).with_name("workflow.py")


def test_it_shouts_the_text_counts_its_words_and_says_how_far_it_got():
    result = run_workflow(WORKFLOW, input={{"text": "hello flowpool"}})

    assert result.output == {{"shout": "HELLO FLOWPOOL", "words": 2}}
    assert result.chunks == [{{"type": "progress", "content": "counted 2 words"}}]
'''


@click.command()
@click.argument("name")
def init(name: str) -> None:
    """Write NAME/workflow.py, a starter workflow that needs no model, and NAME/test_workflow.py, its test."""
    from ..registry.names import is_name

    if not is_name(name):
        raise click.BadParameter(f"{name!r} is not a workflow ref name: use 1-64 letters, digits, '_', '-' or '.', "
                                 "starting with a letter or digit", param_hint="NAME")
    directory = Path(name)
    files = {directory / "workflow.py": _STARTER.format(name=name),
             directory / "test_workflow.py": _STARTER_TEST.format(name=name)}
    there = [str(path) for path in files if path.exists()]
    if there:
        raise click.ClickException(f"{' and '.join(there)} already exist{'s' if len(there) == 1 else ''}; "
                                   "nothing was written (pick another NAME, or move them away)")
    directory.mkdir(exist_ok=True)
    for path, text in files.items():
        with open(path, "x", encoding="utf-8") as out:  # "x": never over a file made since the check
            out.write(text)
    click.echo(f"wrote {' and '.join(str(path) for path in files)}; next:")
    click.echo(f"  flowpool run {name}/workflow.py --input '{{\"text\": \"hello flowpool\"}}'   # run it once")
    click.echo(f"  pytest {name}/                                  # run its test")
    click.echo(f"  flowpool push {name}/workflow.py --name {name}   # upload it, then: flowpool invoke {name} ...")


COMMANDS = [init, run]
