"""FLOWPOOL_PROVIDER_KEYS: which worker variables a route may send, and to which host, however its URL is spelled."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowpool.registry import Agent, ProviderKeys, Route

KEYS = ProviderKeys("OPENAI_API_KEY@api.openai.com, LOCAL_KEY, V6_KEY@[::1]")


@pytest.mark.parametrize("base_url", ["https://api.openai.com/v1", "https://API.OpenAI.com:443/v1",
                                      "http://api.openai.com"])
def test_a_bound_key_goes_to_its_host_however_spelled(base_url: str) -> None:
    assert KEYS.refusal("OPENAI_API_KEY", base_url) is None


@pytest.mark.parametrize("base_url", [
    "http://evil.example\\@api.openai.com/v1",  # urlsplit reads api.openai.com; requests connects to evil.example
    "http://api.openai.com@evil.example/v1",  # user info
    "http://api.openai.com%40evil.example/v1",
    "https://api.openai.com.evil.example/v1",
    "https://evil.example/api.openai.com",
    "https://evil.example/v1?host=api.openai.com",
    "http://api.openai.com\t.evil.example/",
    "http://[::1]/v1",
])
def test_a_bound_key_is_refused_for_any_other_or_ambiguous_host(base_url: str) -> None:
    refusal = KEYS.refusal("OPENAI_API_KEY", base_url)
    assert refusal is not None and "may only be sent to api.openai.com" in refusal


def test_an_unbound_key_goes_anywhere_and_an_unlisted_one_nowhere() -> None:
    assert KEYS.refusal("LOCAL_KEY", "http://127.0.0.1:11434/v1") is None
    assert KEYS.refusal("V6_KEY", "http://[::1]:8000/v1") is None
    refusal = KEYS.refusal("FLOWPOOL_REDIS_URL", "https://api.openai.com/v1")
    assert refusal is not None and "FLOWPOOL_PROVIDER_KEYS" in refusal


@pytest.mark.parametrize("base_url", ["http://evil.example\\@api.openai.com/v1", "http://user@api.openai.com/v1",
                                      "http://api.openai.com /v1", "ftp://api.openai.com/v1"])
def test_routes_and_agents_refuse_urls_that_parsers_read_differently(base_url: str) -> None:
    with pytest.raises(ValidationError):
        Route(model="m", base_url=base_url)
    with pytest.raises(ValidationError):
        Agent(base_url=base_url)
