"""Application names as Maitai's docs write them: words separated by spaces ("My Application")."""
from __future__ import annotations

from urllib.parse import quote

from tests.helpers import Client, error_of

APP = {"intents": {"answer": {"model": "m", "base_url": "http://127.0.0.1:9/v1"}}}


def test_an_application_name_with_spaces_is_stored_and_read_back(client: Client) -> None:
    path = "/api/v1/applications/" + quote("My Application")
    assert client.request("PUT", path, json=APP).status_code == 201
    answer = client.get(path)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["name"] == "My Application"
    assert "My Application" in [a["name"] for a in client.get("/api/v1/applications").json()["data"]]


def test_an_application_name_with_a_space_at_an_end_or_a_control_character_is_a_400(client: Client) -> None:
    for name in (" Support", "Support ", "a\tb", "a" * 65):
        answer = client.request("PUT", "/api/v1/applications/" + quote(name, safe=""), json=APP)
        assert answer.status_code == 400, (name, answer.text)
        assert "invalid application name" in error_of(answer)["message"]


def test_an_agent_name_still_refuses_spaces(client: Client) -> None:
    answer = client.request("PUT", "/api/v1/agents/" + quote("My Agent"),
                            json={"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    assert answer.status_code == 400 and "invalid agent name" in error_of(answer)["message"]
