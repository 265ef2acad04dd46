"""The web console at /console: server-rendered pages over the same stores as the API, signed in with an API key.

One blueprint, ``bp``, defined here and nothing else, so every module of the console can ``from . import bp``
without an import loop. :mod:`.common` holds what every page shares (the signed-in account, rendering, CSRF,
security headers), :mod:`.auth` signs in and out, and each page module registers its views on ``bp``;
:mod:`.views` imports them all, which is what the app does before registering ``bp`` (unless
FLOWPOOL_CONSOLE_ENABLED is false).
"""
from __future__ import annotations

from flask import Blueprint

__all__ = ["bp"]

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static",
               static_url_path="/static")
