"""The Python SDK: ``Flowpool`` (requests) and ``AsyncFlowpool`` (httpx2), their errors and answers.

One module per noun: :mod:`.errors` (the APIError tree), :mod:`.objects`
(:class:`Obj`), :mod:`.sansio` (options, retries, decoding: no I/O),
:mod:`.resources` (the methods both clients share), :mod:`.client` and
:mod:`.async_client`. Each name is loaded when first used, so the sync client
never imports httpx2 nor the async one requests.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# Each public name -> the module of this package that holds it (flowpool's __init__ re-exports them all).
_HOMES = {
    "Flowpool": "client", "Maitai": "client", "Stream": "client",
    "AsyncFlowpool": "async_client", "AsyncMaitai": "async_client", "MaitaiAsync": "async_client",
    "AsyncStream": "async_client",
    "Obj": "objects",
    **{name: "errors" for name in (
        "APIError", "BadRequestError", "AuthenticationError", "NotFoundError", "WorkflowTimeoutError",
        "PayloadTooLargeError", "UnprocessableEntityError", "RateLimitError", "InternalServerError",
        "ServiceUnavailableError", "APIConnectionError", "APITimeoutError")},
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
