"""What every console page shares: the signed-in account, rendering, CSRF checks and the security headers.

The session cookie carries only a random token (flowpool.registry.console_sessions keeps what it stands for);
the API key is never stored in the browser, put in a URL or rendered.
"""
from __future__ import annotations

import hmac
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Response, g, jsonify, make_response, redirect, render_template, request

from flowpool import __version__
from flowpool.errors import AuthenticationError, FlowpoolError, PermissionDenied
from flowpool.registry import Account
from flowpool.registry.console_sessions import ConsoleSession, ConsoleSessions
from flowpool.run import ERRORED, UNENDED

from ..errors import render as render_error
from ..services import services
from . import bp
from .formats import duration_text, seconds_text

__all__ = ["COOKIE", "NAV", "SignInRequired", "csrf_protect", "current_session", "json_response", "render",
           "safe_next", "sessions", "signed_in"]

COOKIE = "flowpool_console"  # holds the session's random token, nothing else

# Every console response: scripts and styles only from the console's own files, so an injected tag or
# attribute runs nothing (templates carry no inline <script> code and no style="" attributes).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

STATIC_MAX_AGE = 3600  # the static files carry ?v=<version> in their URLs, so an upgrade is fetched at once

# The nav's links: the key ``render(nav=...)`` marks active (its path under /console), and the text.
NAV = (("workflows", "Workflows"), ("runs", "Runs"), ("usage", "Usage"), ("playground", "Playground"))

_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

# Writes that need this site's origin but no session's CSRF token. Signing in has no session yet, or (a second
# sign-in, from a tab opened before another tab signed in) one whose token its form cannot have. Signing out ends
# whatever session the cookie holds, so a tab left open over a newer sign-in, whose token is stale, still signs
# out. Neither is reachable from another site: its Origin (or Referer) is refused, and SameSite=Strict keeps the
# cookie off its requests.
_ORIGIN_ONLY = frozenset({"console.sign_in", "console.sign_out"})


class SignInRequired(Exception):
    """The request has no live console session: the blueprint answers with the way to the sign-in page."""


def sessions() -> ConsoleSessions:
    """The console's session store, on the app's Redis."""
    return ConsoleSessions(services().redis, services().settings.console_session_seconds)


def current_session() -> ConsoleSession | None:
    """The live session of this request's cookie, looked up once per request; None when there is none."""
    if "console_session" not in g:
        g.console_session = sessions().find(request.cookies.get(COOKIE))
    return g.console_session


def signed_in() -> Account:
    """The account of the console session cookie; SignInRequired (a way to the sign-in page) without one."""
    session = current_session()
    if session is None:
        raise SignInRequired()
    return session.account


def render(template_name: str, *, title: str, nav: str | None = None, status: int = 200,
           **context: Any) -> Response:
    """A console page: ``template_name`` (e.g. "console/runs.html") with the account's name, the CSRF token and
    ``nav`` (the active nav key) added, never cached."""
    session = current_session()
    html = render_template(template_name, title=title, nav=nav,
                           account=session.account.name if session else None,
                           csrf_token=session.csrf if session else "", **context)
    response = make_response(html, status)
    response.headers["Cache-Control"] = "no-store"
    return response


def safe_next(value: str | None) -> str:
    """Where to go after signing in: ``value`` when it is a path of the console, else the workflows page."""
    default = "/console/workflows"
    if not value or "\\" in value or any(ord(c) < 32 for c in value):
        return default
    parts = urlsplit(value)
    # No scheme and no host (not even "//host"): the browser stays on this site.
    if parts.scheme or parts.netloc or value.startswith("//"):
        return default
    if parts.path != "/console" and not parts.path.startswith("/console/"):
        return default
    if parts.path.startswith("/console/sign-"):
        return default
    return value


def _same_host(url: str) -> bool:
    """Whether ``url`` (an Origin or Referer) names this host.

    The host and port are compared, not the scheme: behind a proxy ending TLS the API sees http while the
    browser says https, and a page of another site always differs in host.
    """
    try:
        return bool(urlsplit(url).netloc) and urlsplit(url).netloc.lower() == request.host.lower()
    except ValueError:
        return False


def csrf_protect() -> None:
    """Refuse (403) a cross-site write: Origin (else Referer) must be this host when sent, and a request of a
    signed-in session must carry its CSRF token (header X-CSRF-Token, or form field csrf_token), but for signing in
    and out (_ORIGIN_ONLY)."""
    origin = request.headers.get("Origin")
    referer = request.headers.get("Referer")
    if origin is not None:
        if not _same_host(origin):  # "null" too: a sandboxed frame or a redirect from another site
            raise PermissionDenied("this request was sent from another site")
    elif referer and not _same_host(referer):
        raise PermissionDenied("this request was sent from another site")
    if request.endpoint in _ORIGIN_ONLY:
        return
    session = current_session()
    if session is None:
        return  # nothing of a session to act on: the view sends to the sign-in page
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    if not session.csrf or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise PermissionDenied("the request lacks this session's CSRF token: reload the page and try again")


@bp.before_request
def _protect_writes() -> None:
    if request.method not in _SAFE_METHODS:
        csrf_protect()


def _wants_json() -> bool:
    """Whether the client reads JSON rather than pages: an event stream, or a fetch() asking for JSON."""
    accept = request.accept_mimetypes
    named = {value for value, _ in accept}  # what is named, not matched: "*/*" would match anything
    if request.path.endswith("/stream") or "text/event-stream" in named:
        return True
    return request.is_json or ("application/json" in named and accept["application/json"] > accept["text/html"])


@bp.errorhandler(SignInRequired)
def _to_sign_in(_exc: SignInRequired) -> Response:
    if _wants_json():
        return render_error(AuthenticationError("the console session has ended: sign in again at /console/sign-in"))
    here = request.full_path.rstrip("?") if request.method == "GET" else ""
    if request.headers.get("HX-Request") == "true":
        # A fragment request: the page it came from is where to come back to, and htmx must load the whole
        # sign-in page, not swap it into a fragment.
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        here = current.path + (f"?{current.query}" if current.query else "")
    target = "/console/sign-in"
    nxt = safe_next(here)
    if here and nxt == here:
        target += "?next=" + quote(nxt, safe="/")
    if request.headers.get("HX-Request") == "true":
        response = make_response("", 200)
        response.headers["HX-Redirect"] = target
        return response
    return redirect(target, 303)


@bp.errorhandler(FlowpoolError)
def _error_page(exc: FlowpoolError) -> Response:
    """A page for an error of a page; the JSON of the API for fetch(), streams and fragments."""
    if _wants_json() or request.headers.get("HX-Request") == "true" or request.method != "GET":
        return render_error(exc)
    return render("console/error.html", title=f"Error {exc.status}", status=exc.status, error=exc)


@bp.after_request
def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "same-origin"
    headers["X-Frame-Options"] = "DENY"
    if request.endpoint == "console.static":
        response.cache_control.no_cache = None
        response.cache_control.public = True
        response.cache_control.max_age = STATIC_MAX_AGE
    elif "Cache-Control" not in headers or response.mimetype == "text/html":
        headers["Cache-Control"] = "no-store"
    return response


def _as_datetime(ts: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(ts), timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


@bp.app_template_filter("console_iso")
def _iso(ts: Any) -> str:
    """Unix time as ISO 8601 in UTC ("2024-05-01T12:00:00Z"), for <time datetime>."""
    moment = _as_datetime(ts)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z" if moment else ""


@bp.app_template_filter("console_utc")
def _utc(ts: Any, time_only: bool = False) -> str:
    """Unix time as UTC text: what a page shows until console.js puts it in the viewer's zone."""
    moment = _as_datetime(ts)
    if moment is None:
        return "—"
    return moment.strftime("%H:%M:%S UTC" if time_only else "%Y-%m-%d %H:%M:%S UTC")


def _number(value: Any) -> float | None:
    """A template's value as a number; None for none or not a number (a record's field may hold anything)."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@bp.app_template_filter("console_duration")
def _duration(value: Any) -> str:
    """Milliseconds as the console writes a duration (formats.duration_text); "—" for none or not a number."""
    return duration_text(_number(value))


@bp.app_template_filter("console_seconds")
def _seconds(value: Any) -> str:
    """Seconds (a setting such as a timeout) as the console writes them (formats.seconds_text): "60 s"."""
    return seconds_text(_number(value))


def _template_globals(state: Any) -> None:
    """What every console template may read, imported macros included (they see no page's context): the nav and
    the run statuses grouped as flowpool.run groups them."""
    state.app.jinja_env.globals.update(console_nav=NAV, unended_statuses=UNENDED, errored_statuses=ERRORED)


bp.record_once(_template_globals)


@bp.context_processor
def _static_version() -> dict[str, Any]:
    """The version the static files' URLs carry (?v=), so a browser fetches them again after an upgrade."""
    return {"console_version": __version__}


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON answer of a console route, never cached."""
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response
