"""flowpool: run multi-step AI workflows as one API call on a self-hosted worker pool.

The SDK's names are imported from here (``from flowpool import Flowpool, NotFoundError``)
but loaded only when first used, so ``import flowpool`` stays light.
"""
from __future__ import annotations

from typing import Any

# The SDK's public names: all of flowpool.sdk's __all__ (tests/integration/test_sdk.py holds the two together).
_CLIENT_NAMES = (
    "Flowpool", "AsyncFlowpool", "Maitai", "AsyncMaitai", "MaitaiAsync", "Stream", "AsyncStream", "Obj", "APIError",
    "BadRequestError",
    "AuthenticationError", "NotFoundError", "WorkflowTimeoutError", "PayloadTooLargeError", "UnprocessableEntityError",
    "RateLimitError", "InternalServerError", "ServiceUnavailableError", "APIConnectionError", "APITimeoutError",
)

# Checking a webhook's signature (flowpool.signing; the standard library only).
_SIGNING_NAMES = {"verify_webhook": "verify", "WebhookSignatureError": "SignatureError"}

__all__ = [*_CLIENT_NAMES, *_SIGNING_NAMES, "Settings", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Written out rather than with flowpool.lazy: the in-sandbox runtime imports this package, and
    # importing flowpool_workflow loads no other module of flowpool than the protocol (a test holds it).
    if name in _CLIENT_NAMES:
        from . import sdk  # which loads only the module holding the name: httpx2 for the async client alone
        return getattr(sdk, name)
    if name in _SIGNING_NAMES:
        from . import signing
        return getattr(signing, _SIGNING_NAMES[name])
    if name == "Settings":
        from .settings import Settings
        return Settings
    raise AttributeError(f"module 'flowpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
