"""The error kinds: ctx calls' and runs', one enum each that both ends import, and what each becomes, end to end."""
from __future__ import annotations

import base64
import json
import marshal
import socket
import subprocess
import sys
import textwrap
from typing import Any, Iterator

import pytest

from flowpool.sandbox import CallErrorKind, CallFailed, RunErrorKind, Sandbox, SandboxLimits
from flowpool.sandbox.channel import Channel
from flowpool_workflow import CALL_ERRORS, SoftTimeLimitExceeded


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A small sandbox on the process backend, which works on any host and as any user."""
    box = Sandbox(SandboxLimits(), slots=2, hard_grace_seconds=1.0, prestart=0, backend="process")
    box.start()
    try:
        yield box
    finally:
        box.stop()


def test_every_kind_maps_to_an_exception_in_the_script() -> None:
    assert set(CALL_ERRORS) == set(CallErrorKind)
    for kind, exception in CALL_ERRORS.items():
        assert issubclass(exception, Exception), kind


def test_a_timeout_becomes_the_soft_time_limit_in_the_script() -> None:
    assert CALL_ERRORS[CallErrorKind.TIMEOUT] is SoftTimeLimitExceeded


def test_call_failed_takes_a_kind_by_its_value_and_refuses_an_unknown_one() -> None:
    assert CallFailed("model", "no route").kind is CallErrorKind.MODEL
    assert CallFailed(CallErrorKind.HTTP, "refused").kind is CallErrorKind.HTTP
    with pytest.raises(ValueError, match="'modle' is not a valid CallErrorKind"):
        CallFailed("modle", "a typo")


def test_a_kind_travels_as_its_plain_string() -> None:
    assert json.loads(json.dumps({"kind": CallErrorKind.EGRESS})) == {"kind": "egress"}


def test_importing_flowpool_workflow_loads_the_protocol_and_the_stdlib_only() -> None:
    done = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent("""
        import json, sys
        before = set(sys.modules)
        import flowpool_workflow
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)

    assert sorted(m for m in loaded if m.startswith("flowpool")) == [
        "flowpool", "flowpool.sandbox", "flowpool.sandbox.protocol", "flowpool_workflow"]
    assert [m for m in loaded if not m.startswith("flowpool")
            and m.split(".")[0] not in sys.stdlib_module_names] == []


def test_each_kind_a_handler_raises_reaches_the_script_as_its_exception(sandbox: Sandbox) -> None:
    def refuse(method: str, params: dict[str, Any], deadline: float) -> Any:
        raise CallFailed(params["url"].rpartition("/")[2], "refused by the test")

    code = marshal.dumps(compile(textwrap.dedent("""
        def execute(ctx):
            seen = {}
            for kind in ctx.input:
                try:
                    ctx.http.get("http://example.invalid/" + kind)
                except BaseException as exc:
                    seen[kind] = [type(exc).__module__, type(exc).__name__, str(exc)]
            return seen
    """), "workflow.py", "exec"))

    outcome = sandbox.run(code, {"input": [kind.value for kind in CallErrorKind]}, 10, on_call=refuse)

    assert outcome.ok, outcome.error
    assert outcome.result == {
        kind.value: ["flowpool_workflow", CALL_ERRORS[kind].__name__,
                     "the run reached its soft time limit: refused by the test" if kind is CallErrorKind.TIMEOUT
                     else "refused by the test"]
        for kind in CallErrorKind}


# A script that ends in each way a run reports as an error.
FAILING_SCRIPTS = {
    RunErrorKind.SCRIPT: "def execute(ctx):\n    raise ValueError('boom')\n",
    RunErrorKind.TIMEOUT: "import time\n\ndef execute(ctx):\n    time.sleep(30)\n",
    RunErrorKind.RESULT: "def execute(ctx):\n    return object()\n",
}


@pytest.mark.parametrize("kind", list(RunErrorKind), ids=lambda kind: kind.value)
def test_the_runtime_ends_each_kind_of_failed_run_with_that_kind(kind: RunErrorKind) -> None:
    ours, theirs = socket.socketpair()
    # The runtime takes over its process (environment, stdout, signals): it gets one of its own.
    runtime = subprocess.Popen([sys.executable, "-I", "-c", "import sys; from flowpool.sandbox import runtime; "
                                "runtime.serve(int(sys.argv[1]))", str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        channel = Channel(ours)
        code = marshal.dumps(compile(FAILING_SCRIPTS[kind], "workflow.py", "exec"))
        channel.send({"op": "run", "code": base64.b64encode(code).decode(), "source": None, "job": {},
                      "soft_seconds": 0.5, "cpu_seconds": 10})
        ours.settimeout(30)
        message = channel.recv()

        assert message["op"] == "error"
        assert RunErrorKind(message["kind"]) is kind
        assert runtime.wait(30) == 0
    finally:
        runtime.kill()
        runtime.wait()
        ours.close()
