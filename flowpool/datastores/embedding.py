"""A datastore's embedding endpoint: OpenAI-compatible ``POST {base_url}/embeddings``, through the egress guard.

A store created with ``embedding: {base_url, model, api_key_env?}`` has its
query text embedded on ``search(query=...)`` (the search is then a hybrid),
and records ingested without a vector embedded from their ``text_fields``.
The engine calls :class:`EmbeddingClient` as ``embedder(config, texts)``.

The endpoint is reached the way a model provider is (tasks/model_calls.py):
a guarded session, so loopback, private and metadata addresses are refused
unless FLOWPOOL_EGRESS_ALLOW lists them; and the key comes from an
environment variable of the process that embeds (an API process on ingest and
search, a worker on ``ctx.datastore.search``), named by ``api_key_env`` and
allowed only when FLOWPOOL_PROVIDER_KEYS lists it (``NAME@host``: sent only
to that host). The key never reaches a sandbox or a response.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import requests

from flowpool.errors import RequestError, UpstreamError
from flowpool.registry import ProviderKeys
from flowpool.settings import Settings

__all__ = ["EmbeddingClient"]

# Texts sent per request: OpenAI takes up to 2048 inputs; smaller batches keep each answer small.
_BATCH = 256
# Statuses worth one more try (the provider's own back-pressure and restarts).
_RETRYABLE = {429, 500, 502, 503, 504}


class EmbeddingClient:
    """Embeds texts for the stores that name an endpoint; safe to share between threads."""

    def __init__(self, egress_allow: str, provider_keys: ProviderKeys, environ: Mapping[str, str],
                 connect_timeout: float = 5.0, timeout_seconds: float = 30.0, retries: int = 2) -> None:
        self._egress_allow = egress_allow
        self._provider_keys = provider_keys
        # Only the variables the operator lists: the rest of ``environ`` is never kept.
        self._keys = {name: environ[name] for name in provider_keys.hosts if name in environ}
        self.connect_timeout = connect_timeout
        self.timeout_seconds = timeout_seconds  # for each answer: an ingest embeds its batches one after another
        self.retries = retries
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings, environ: Mapping[str, str]) -> EmbeddingClient:
        return cls(settings.egress_allow, ProviderKeys(settings.provider_keys), environ,
                   connect_timeout=settings.model_connect_timeout_seconds, retries=settings.model_retries)

    def __call__(self, config: dict[str, Any], texts: list[str]) -> list[list[float]]:
        """One vector per text, in order; UpstreamError (502) when the endpoint fails or answers nonsense."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), _BATCH):
            vectors.extend(self._embed_batch(config, texts[start:start + _BATCH]))
        return vectors

    def _embed_batch(self, config: dict[str, Any], texts: list[str]) -> list[list[float]]:
        base_url = str(config.get("base_url") or "")
        url = base_url.rstrip("/") + "/embeddings"
        headers = {"Content-Type": "application/json"}
        name = config.get("api_key_env")
        if name:
            refusal = self._provider_keys.refusal(name, base_url)
            if refusal is not None:  # the operator changed FLOWPOOL_PROVIDER_KEYS since the store was made
                raise RequestError(f"the datastore's embedding: {refusal}", param="embedding.api_key_env")
            key = self._keys.get(name)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        body = {"model": config.get("model"), "input": texts}
        response = self._post(url, body, headers)
        return _vectors(response, len(texts), url)

    def _post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> requests.Response:
        from flowpool.egress import EgressDenied

        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                response = self.session.post(url, json=body, headers=headers, allow_redirects=False,
                                             timeout=(self.connect_timeout, self.timeout_seconds))
            except EgressDenied as exc:
                raise UpstreamError(f"the embedding endpoint may not be reached: {exc}") from exc
            except requests.RequestException as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return response
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in _RETRYABLE:
                    break
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise UpstreamError(f"the embedding endpoint {url} failed: {failure}")

    @property
    def session(self) -> requests.Session:
        """The guarded session, made on first use: a process whose stores embed nothing never loads the guard."""
        with self._lock:
            if self._session is None:
                from flowpool.egress import EgressPolicy, guarded_session

                self._session = guarded_session(EgressPolicy(self._egress_allow))
            return self._session


def _vectors(response: requests.Response, count: int, url: str) -> list[list[float]]:
    """The ``data[].embedding`` of an answer, in input order (by ``index``); UpstreamError when malformed."""
    try:
        items = response.json()["data"]
        ordered = sorted(items, key=lambda item: item.get("index", 0))
        vectors = [[float(x) for x in item["embedding"]] for item in ordered]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UpstreamError(f"the embedding endpoint {url} answered without data[].embedding: "
                            f"{type(exc).__name__}: {exc}") from exc
    if len(vectors) != count:
        raise UpstreamError(f"the embedding endpoint {url} answered {len(vectors)} vectors for {count} texts")
    return vectors
