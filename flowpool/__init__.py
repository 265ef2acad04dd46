"""flowpool: run multi-step AI workflows as one API call on a self-hosted worker pool."""
from __future__ import annotations

from typing import Any

__all__ = ["Flowpool", "Settings", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Written out rather than with flowpool.lazy: the in-sandbox runtime imports this package, and
    # importing flowpool_workflow loads no other module of flowpool than the protocol (a test holds it).
    if name == "Flowpool":
        from .client import Flowpool
        return Flowpool
    if name == "Settings":
        from .settings import Settings
        return Settings
    raise AttributeError(name)
