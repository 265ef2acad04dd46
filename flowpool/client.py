"""The SDK's former home, kept for the scripts that import from it: every name of :mod:`flowpool.sdk`.

New code imports from ``flowpool`` (``from flowpool import Flowpool``). The
sync client and the errors load here at once, as they did; the async names
(which need httpx2) when first used.
"""
from __future__ import annotations

from typing import Any

# Re-exported: flowpool.sdk's __all__ names them all.
from .sdk import __all__ as __all__  # noqa: F401
from .sdk.client import Flowpool, Maitai  # noqa: F401
from .sdk.errors import (APIConnectionError, APIError, APITimeoutError, AuthenticationError,  # noqa: F401
                         BadRequestError, InternalServerError, NotFoundError, PayloadTooLargeError, RateLimitError,
                         ServiceUnavailableError, UnprocessableEntityError, WorkflowTimeoutError)
from .sdk.objects import Obj  # noqa: F401
from .sdk.sansio import DEFAULT_BASE_URL  # noqa: F401


def __getattr__(name: str) -> Any:
    from . import sdk

    return getattr(sdk, name)
