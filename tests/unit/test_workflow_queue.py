"""A workflow's worker queue: the script's QUEUE checked at upload, the upload's ``queue`` winning, what is stored."""
from __future__ import annotations

import pytest
import redis

from flowpool.blobs import RedisBlobs
from flowpool.errors import RequestError, ValidationFailed
from flowpool.registry import Upload, Workflows
from flowpool.registry.validation import Problem, validate_script

ACCOUNT = "acct-1"
BODY = "\ndef execute(ctx):\n    return 1\n"


@pytest.mark.parametrize("name", ["heavy", "gpu-a100", "q_2", "a" * 32])
def test_a_valid_queue_constant_is_read_into_script_info(name: str) -> None:
    result = validate_script(f"QUEUE = {name!r}\n{BODY}")
    assert result.ok and result.info is not None and result.info.queue == name


def test_a_script_without_queue_names_none() -> None:
    result = validate_script(BODY)
    assert result.ok and result.info is not None and result.info.queue is None


@pytest.mark.parametrize("value", ["'Heavy'", "''", "'9lives'", "'a b'", "'" + "a" * 33 + "'", "1", "None",
                                   "['heavy']", "'heavy\\n'"])
def test_an_invalid_queue_constant_is_a_problem_at_its_line(value: str) -> None:
    problems = validate_script(f"import json\n\nQUEUE = {value}\n{BODY}").problems
    assert [p.line for p in problems] == [3]
    assert problems[0].message.startswith("QUEUE must be a queue name: 1 to 32 lower-case letters")


def test_a_computed_queue_is_a_problem_at_its_line() -> None:
    problems = validate_script(f"NAME = 'heavy'\nQUEUE = NAME\n{BODY}").problems
    assert problems == [Problem(2, "QUEUE must be a literal constant, not an expression")]


@pytest.fixture
def workflows(redis_db: redis.Redis) -> Workflows:
    return Workflows(redis_db, blobs=RedisBlobs(redis_db))


def test_a_workflow_naming_no_queue_runs_on_default(workflows: Workflows) -> None:
    workflow, _, _ = workflows.upload(ACCOUNT, Upload(ref="w", script=BODY))
    assert workflow["queue"] == "default"
    assert workflows.resolve(ACCOUNT, "w").queue == "default"


def test_the_script_queue_is_stored_with_the_version_and_listed(workflows: Workflows, redis_db: redis.Redis) -> None:
    workflow, version, _ = workflows.upload(ACCOUNT, Upload(ref="w", script=f"QUEUE = 'heavy'\n{BODY}"))
    assert workflow["queue"] == "heavy" and version["queue"] == "heavy"
    assert workflows.get(ACCOUNT, "w")["queue"] == "heavy"
    assert workflows.versions(ACCOUNT, "w", 0, 10)[0][0]["queue"] == "heavy"
    assert workflows.resolve(ACCOUNT, "w").queue == "heavy"


def test_the_upload_queue_wins_over_the_script_and_makes_no_new_version(workflows: Workflows,
                                                                        redis_db: redis.Redis) -> None:
    script = f"QUEUE = 'heavy'\n{BODY}"
    _, first, _ = workflows.upload(ACCOUNT, Upload(ref="w", script=script))
    workflow, again, created = workflows.upload(ACCOUNT, Upload(ref="w", script=script, queue="light"))
    # Like timeout_seconds: a workflow setting, not part of the version's content.
    assert not created and again["version"] == first["version"]
    assert workflow["queue"] == "light"
    assert workflows.resolve(ACCOUNT, "w").queue == "light"


@pytest.mark.parametrize("name", ["Heavy", "", "a b", "x" * 33, "9"])
def test_an_invalid_upload_queue_is_a_request_error_and_writes_nothing(workflows: Workflows, redis_db: redis.Redis,
                                                                       name: str) -> None:
    with pytest.raises(RequestError) as caught:
        workflows.upload(ACCOUNT, Upload(ref="w", script=BODY, queue=name))
    assert caught.value.status == 400 and caught.value.details["param"] == "queue"
    assert redis_db.dbsize() == 0


def test_an_invalid_script_queue_refuses_the_upload_and_writes_nothing(workflows: Workflows,
                                                                       redis_db: redis.Redis) -> None:
    with pytest.raises(ValidationFailed) as caught:
        workflows.upload(ACCOUNT, Upload(ref="w", script=f"QUEUE = 'Heavy'\n{BODY}", queue="heavy"))
    assert [e["line"] for e in caught.value.details["errors"]] == [1]
    assert redis_db.dbsize() == 0
