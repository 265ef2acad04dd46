"""Every Python snippet of the seed's Workflows docs (tests/seed/), run against the real stack.

Workflow scripts are uploaded as the seed's API reference shows (its body, the
``X-Maitai-Api-Key`` header), unchanged: ``from maitai_workflow import
WorkflowContext`` included. Client snippets run as a subprocess with only
their import line changed (``from maitai import Maitai`` to ``from flowpool
import Maitai``); the key and the base URL come from MAITAI_API_KEY and
MAITAI_BASE_URL, as the seed's users set them. The seed's snippets of its other
products (chat proxy, agents, evaluate, indexing, reasoning) are listed in
tests/seed/README.md with why they are not run.
"""
from __future__ import annotations

import base64
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from flowpool.devstack import Stack
from tests.helpers import Client
from tests.provider import StandInProvider

SEED = Path(__file__).resolve().parents[1] / "seed"
SEED_IMPORT = "from maitai import Maitai\n"
OUR_IMPORT = "from flowpool import Maitai\n"

# The applications the seed's scripts name, with the intents they call, routed to the stand-in vendor.
APPLICATIONS = {"Support": "answer", "My Application": "answer_query"}
# The accessories a5_data_accessory_files.py loads, bundled with it.
HTS_CODES = {"6109.10": "T-shirts, singlets and other vests, of cotton, knitted or crocheted"}
HTS_NOTES = ["Chapter 61 covers knitted or crocheted articles only."]

# Each workflow script, the application it names, the input it is invoked with, and the output it answers.
WORKFLOWS: dict[str, tuple[str | None, dict[str, Any], Any]] = {
    "a1_overview_what_a_workflow_is.py": ("Support", {"query": "where is my parcel"},
                                          {"answer": "echo: where is my parcel"}),
    "a2_structure_minimal_workflow.py": ("My Application", {"query": "where is my parcel"},
                                         {"answer": "echo: where is my parcel", "confidence": 0.85}),
    "a3_context_top.py": ("Support", {"query": "where is my parcel"}, {"answer": "echo: where is my parcel"}),
    "a4_context_call_a_model.py": ("Support", {}, {"answer": "echo: Summarize Q3 earnings."}),
    "a5_data_accessory_files.py": (None, {}, {"hts_codes": HTS_CODES, "notes": HTS_NOTES}),
    "a6_upload_workflow_bundle.py": (None, {}, {"ok": True}),
}

# Each client snippet and a check of what it printed. Each invokes the seed's example workflow, hs_classification
# (a6_upload_workflow_bundle.py, uploaded with the body of the seed's cURL example), which answers {'ok': True}.
CLIENT_SNIPPETS = {
    "b1_overview_invoke_with_messages.py": lambda out: json.loads(out) == {"ok": True},
    "b2_overview_invoke_with_input.py": lambda out: out.strip().endswith("(ok=True)"),
    "b2_overview_invoke_with_session_id.py": lambda out: json.loads(out) == {"ok": True},
    "b2_overview_streaming_responses.py": lambda out: "'{\"ok\":true}'" in out.replace(" ", ""),
    "b2_overview_passing_secrets.py": lambda out: json.loads(out) == {"ok": True},
}


def _seed(name: str) -> str:
    return (SEED / name).read_text()


def _ref(name: str) -> str:
    """The ref a workflow script is uploaded under: its file's stem, as the seed's refs are written."""
    return name.removesuffix(".py")


def _maitai_post(client: Client, path: str, body: dict[str, Any]) -> requests.Response:
    """POST to the management API as the seed's cURL examples do: the key in X-Maitai-Api-Key, nothing else."""
    return requests.post(client.base_url + path, json=body, headers={"X-Maitai-Api-Key": client.key}, timeout=60)


def _upload(client: Client, ref: str, script: str, application: str | None, **extra: Any) -> dict[str, Any]:
    """Upload as the seed's "Upload workflow bundle" example does (its body's fields), and answer its ``data``."""
    body = {"workflow_ref_name": ref, "script": script, "publish_version": True, "version_bump": "patch",
            "version_notes": "Initial release", **extra}
    if application is not None:
        body["application_name"] = application
    response = _maitai_post(client, "/api/v1/workflows/upload", body)
    assert response.status_code in (200, 201), response.text
    return response.json()["data"]


def _configure_applications(client: Client, provider: StandInProvider) -> None:
    for name, intent in APPLICATIONS.items():
        put = client.request("PUT", "/api/v1/applications/" + quote(name),
                             json={"intents": {intent: {"model": "echo", "base_url": provider.base_url}}})
        assert put.status_code == 201, put.text


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_each_seed_workflow_script_uploads_unchanged_and_answers(client: Client, provider: StandInProvider,
                                                                 name: str) -> None:
    application, given, expected = WORKFLOWS[name]
    _configure_applications(client, provider)
    script = _seed(name)
    extra: dict[str, Any] = {}
    if name == "a5_data_accessory_files.py":
        extra["accessories"] = [{"key": "hts_codes", "content_base64": _b64(HTS_CODES)},
                                {"key": "hts_notes", "content_base64": _b64(HTS_NOTES)}]
    data = _upload(client, _ref(name), script, application, **extra)
    assert data["workflow_ref_name"] == _ref(name)
    response = client.invoke(_ref(name), input=given)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == expected


def test_the_seeds_create_workflow_script_is_refused_for_having_no_execute(client: Client) -> None:
    response = _maitai_post(client, "/api/v1/workflows/upload",
                            {"workflow_ref_name": "hs_classification", "script": _seed("a6_create_workflow.py")})
    assert response.status_code == 400, response.text
    assert "execute" in response.json()["error"]["message"]


def test_the_seeds_validate_example_answers_as_the_seed_shows(client: Client) -> None:
    response = _maitai_post(client, "/api/v1/workflows/validate",
                            {"code": _seed("a6_validate_workflow_script.py"), "kind": "execute"})
    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"ok": True, "errors": []}}


def _as_run(source: str) -> str:
    """A client snippet as it runs against flowpool: its import line changed, nothing else."""
    assert source.count(SEED_IMPORT) == 1, "a client snippet imports Maitai from maitai once"
    return source.replace(SEED_IMPORT, OUR_IMPORT)


def _changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


@pytest.mark.parametrize("name", sorted(CLIENT_SNIPPETS))
def test_each_seed_client_snippet_runs_with_only_its_import_changed(
        client: Client, stack: Stack, tmp_path: Path, name: str) -> None:
    _upload(client, "hs_classification", _seed("a6_upload_workflow_bundle.py"), "HS Classification Workflow")
    source = _seed(name)
    ran = _as_run(source)
    assert _changed_lines(source, ran) == ["-" + SEED_IMPORT.strip(), "+" + OUR_IMPORT.strip()]
    assert "base_url" not in source and "api_key" not in source  # the seed's default: both from the environment
    script = tmp_path / name
    script.write_text(ran)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPOOL_", "MAITAI_"))}
    env.update(MAITAI_API_KEY=client.key, MAITAI_BASE_URL=str(stack.api_url))
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert CLIENT_SNIPPETS[name](result.stdout), result.stdout
    if name == "b2_overview_invoke_with_session_id.py":  # the run is filed under the snippet's session
        session = client.get("/api/v1/sessions/YOUR_SESSION_ID").json()["data"]
        assert [run["workflow"] for run in session["runs"]] == ["hs_classification"]
