"""Warm run processes through a real worker: which runs share a process, and which never do.

The script says which process served it: a module global counting the runs
its module served (1 in a fresh process) and the process's start time. A
worker keeps a process for the next run of the same workflow version of the
same account (FLOWPOOL_SANDBOX_REUSE); a run carrying secrets gets a fresh
process that ends with it.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from flowpool.devstack import Stack
from tests.conftest import TEST_ENV
from tests.helpers import Client

SAYS_WHICH_PROCESS = """
    import gc
    RUNS = 0
    STASH = []

    def execute(ctx):
        global RUNS
        RUNS += 1
        seen = {"runs": RUNS, "start": open("/proc/self/stat").read().split()[21], "stash": list(STASH),
                "in_memory": any(isinstance(o, dict) and "token" in o for o in gc.get_objects())}
        if ctx.secrets:
            STASH.append(dict(ctx.secrets))
        return seen
"""


def _run(client: Client, **body: Any) -> dict[str, Any]:
    response = client.invoke("which", cache=False, **body)
    assert response.status_code == 200, response.text
    return json.loads(response.json()["choices"][0]["message"]["content"])


def test_a_version_reuses_its_process_but_never_after_secrets_nor_across_accounts(stack: Stack) -> None:
    assert stack.api_url is not None
    mine = Client(stack.api_url, stack.create_account(f"reuse-{uuid.uuid4().hex[:8]}"))
    mine.upload("which", SAYS_WHICH_PROCESS)
    first, second = _run(mine), _run(mine)
    assert (first["runs"], second["runs"]) == (1, 2) and first["start"] == second["start"]

    secret = f"sk-{uuid.uuid4().hex}"
    with_secret = _run(mine, secrets={"token": secret})
    assert with_secret["runs"] == 1  # a fresh process, which ends with the run
    after = _run(mine)
    assert after["runs"] == 3 and after["stash"] == [] and not after["in_memory"]
    assert secret not in json.dumps(after)

    # Another account's upload of the very same script (the same content hash) never gets that process.
    theirs = Client(stack.api_url, stack.create_account(f"reuse-{uuid.uuid4().hex[:8]}"))
    theirs.upload("which", SAYS_WHICH_PROCESS)
    assert _run(theirs)["runs"] == 1
    assert _run(mine)["runs"] == 4


def test_reuse_off_gives_every_run_a_fresh_process(client: Client) -> None:
    client.upload("which", SAYS_WHICH_PROCESS)
    assert [_run(client)["runs"] for _ in range(2)] == [1, 2]  # the shared stack's worker: reuse on, the default
    stack = Stack(env={**TEST_ENV, "FLOWPOOL_SANDBOX_REUSE": "0"})  # a Redis of its own: no other worker serves it
    try:
        stack.start_worker(quiet=True)
        stack.start_api(quiet=True)
        stack.wait_ready()
        assert stack.api_url is not None
        client = Client(stack.api_url, stack.create_account("reuse-off"))
        client.upload("which", SAYS_WHICH_PROCESS)
        assert [_run(client)["runs"] for _ in range(3)] == [1, 1, 1]
    finally:
        stack.stop()


READS_ENV_AT_LOAD = """
    import os
    RUNS = 0
    MODE = os.environ.get("MODE")  # read once, as the module loads

    def execute(ctx):
        global RUNS
        RUNS += 1
        return {"runs": RUNS, "mode": MODE}
"""


def test_a_new_env_for_the_same_script_gets_a_fresh_process(client: Client) -> None:
    ref = f"env-{uuid.uuid4().hex[:8]}"

    def run() -> dict[str, Any]:
        response = client.invoke(ref, cache=False)
        assert response.status_code == 200, response.text
        return json.loads(response.json()["choices"][0]["message"]["content"])

    client.upload(ref, READS_ENV_AT_LOAD, env={"MODE": "first"})
    assert [run() for _ in range(2)] == [{"runs": 1, "mode": "first"}, {"runs": 2, "mode": "first"}]
    client.upload(ref, READS_ENV_AT_LOAD, env={"MODE": "second"})  # the same script: the same version and hash
    assert run() == {"runs": 1, "mode": "second"}
