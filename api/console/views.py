"""Every view of the console, registered on ``bp`` by importing the modules that define them."""
from __future__ import annotations

from . import auth, common, playground, runs, usage, workflows  # noqa: F401
from . import bp

__all__ = ["bp"]
