"""Signing in to the console with an API key, and out again."""
from __future__ import annotations

from flask import Response, redirect, request

from flowpool.errors import AuthenticationError

from ..services import services
from . import bp
from .common import COOKIE, current_session, render, safe_next, sessions

__all__ = ["home", "sign_in", "sign_in_form", "sign_out"]

_MAX_KEY_LENGTH = 512  # far over any key flowpool issues; a longer "key" is not looked up


@bp.get("")
@bp.get("/")
def home() -> Response:
    """The console opens on the workflows page."""
    return redirect("/console/workflows", 303)


@bp.get("/sign-in")
def sign_in_form() -> Response:
    """The sign-in form; a live session goes straight on to ``next``."""
    nxt = safe_next(request.args.get("next"))
    if current_session() is not None:
        return redirect(nxt, 303)
    return render("console/sign_in.html", title="Sign in", next=nxt)


@bp.post("/sign-in")
def sign_in() -> Response:
    """Check the API key, start a session in Redis and set its cookie; the form again, 401, for a wrong key."""
    nxt = safe_next(request.form.get("next"))
    api_key = (request.form.get("api_key") or "").strip()
    try:
        if len(api_key) > _MAX_KEY_LENGTH:
            raise AuthenticationError("unknown API key")
        account = services().accounts.authenticate(api_key)
    except AuthenticationError:
        # The key typed is never sent back: the field comes back empty.
        message = ("Enter an API key." if not api_key else
                   "That API key was not accepted: check that it was copied whole, or create a new one.")
        return render("console/sign_in.html", title="Sign in", next=nxt, error=message, status=401)
    sessions().end(request.cookies.get(COOKIE))  # a session this browser had is replaced, not left behind
    token = sessions().start(account, api_key)
    response = redirect(nxt, 303)
    # No Max-Age: the cookie ends with the browser session; the Redis TTL ends it on the server side.
    response.set_cookie(COOKIE, token, path="/console", httponly=True, samesite="Strict", secure=_secure())
    return response


@bp.post("/sign-out")
def sign_out() -> Response:
    """End the session (in Redis, so the cookie is worthless even if kept) and go back to the sign-in page."""
    sessions().end(request.cookies.get(COOKIE))
    response = redirect("/console/sign-in", 303)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="Strict", secure=_secure())
    return response


def _secure() -> bool:
    """Whether the cookie is Secure (FLOWPOOL_CONSOLE_SECURE_COOKIE): ``auto``, when this request came over https.

    Behind a proxy that ends TLS the request comes over http, so ``auto`` leaves the flag off there: such an
    operator sets ``always``. X-Forwarded-Proto is not read: any client can send it.
    """
    mode = services().settings.console_secure_cookie
    return mode == "always" or (mode == "auto" and request.is_secure)
