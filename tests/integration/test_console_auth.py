"""The web console's sign-in, sessions, CSRF checks and security headers, over HTTP against the test stack."""
from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer

from ..conftest import second_api
from ..helpers import Client, console_session

STATIC = Path(__file__).resolve().parents[2] / "api" / "console" / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
PAGES = ("/console/workflows", "/console/runs", "/console/usage", "/console/playground")


def _sign_in(base_url: str, key: str, next_path: str = "/console/workflows") -> requests.Response:
    return requests.post(f"{base_url}/console/sign-in", data={"api_key": key, "next": next_path},
                         allow_redirects=False, timeout=30)


def _cookie_header(response: requests.Response) -> str:
    cookies = [v for k, v in response.raw.headers.items() if k.lower() == "set-cookie"]
    assert len(cookies) == 1, cookies
    return cookies[0]


def _new_account(stack: Stack) -> tuple[str, str]:
    name = f"console-{uuid.uuid4().hex[:8]}"
    return name, stack.create_account(name)


def test_sign_in_sets_a_strict_httponly_console_cookie_without_the_key_and_goes_to_next(client: Client) -> None:
    signed = _sign_in(client.base_url, client.key, "/console/runs?status=failed")

    assert signed.status_code == 303
    assert signed.headers["Location"] == "/console/runs?status=failed"
    cookie = _cookie_header(signed)
    attributes = [part.strip() for part in cookie.split(";")]
    assert attributes[0].startswith("flowpool_console=") and len(attributes[0]) > len("flowpool_console=") + 30
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/console" in attributes
    # A browser-session cookie: nothing keeps it past the browser, and it is not Secure over plain http.
    assert not any(a.lower().startswith(("max-age", "expires")) for a in attributes)
    assert "Secure" not in attributes
    assert client.key not in cookie and client.key not in signed.text


def test_behind_a_proxy_ending_tls_the_cookie_can_be_made_secure_always(redis_server: RedisServer,
                                                                       client: Client) -> None:
    with second_api(redis_server, FLOWPOOL_CONSOLE_SECURE_COOKIE="always") as api:
        assert api.api_url is not None
        signed = _sign_in(api.api_url, client.key)
        signed_out = requests.post(f"{api.api_url}/console/sign-out", allow_redirects=False, timeout=30,
                                   headers={"Origin": api.api_url.rstrip("/")})

    assert signed.status_code == 303, signed.text
    assert "Secure" in [part.strip() for part in _cookie_header(signed).split(";")]
    assert signed_out.status_code == 303, signed_out.text
    assert "Secure" in [part.strip() for part in _cookie_header(signed_out).split(";")]


def test_sign_in_goes_nowhere_outside_the_console(client: Client) -> None:
    for target in ("https://elsewhere.invalid/console/x", "//elsewhere.invalid/console/", "/api/v1/runs",
                   "/console\\@elsewhere.invalid", "javascript:alert(1)"):
        signed = _sign_in(client.base_url, client.key, target)

        assert signed.status_code == 303
        assert signed.headers["Location"] == "/console/workflows", target


def test_a_wrong_key_is_answered_401_with_the_form_and_never_the_key(client: Client) -> None:
    wrong = "fp_" + uuid.uuid4().hex + "not-a-key"

    answer = _sign_in(client.base_url, wrong)

    assert answer.status_code == 401
    assert "set-cookie" not in {k.lower() for k in answer.headers}
    assert "That API key was not accepted" in answer.text
    assert 'type="password"' in answer.text and 'autocomplete="off"' in answer.text
    assert wrong not in answer.text and wrong not in str(answer.headers)
    assert "flowpool accounts create NAME" in answer.text  # where keys come from


def test_no_console_page_shows_the_key_after_sign_in(client: Client) -> None:
    session = console_session(client.base_url, client.key)

    for path in ("/console", "/console/sign-in", *PAGES):
        page = session.get(client.base_url + path, timeout=30)
        assert page.status_code == 200, (path, page.status_code, page.text[:300])
        assert client.key not in page.text and client.key not in str(page.headers), path
        assert page.url.startswith(client.base_url + "/console/")


def test_a_page_without_a_session_redirects_to_sign_in_naming_the_page(stack: Stack) -> None:
    answer = requests.get(f"{stack.api_url}/console/runs?status=failed", allow_redirects=False, timeout=30)

    assert answer.status_code == 303
    location = urlsplit(answer.headers["Location"])
    assert location.path == "/console/sign-in"
    assert parse_qs(location.query) == {"next": ["/console/runs?status=failed"]}
    form = requests.get(f"{stack.api_url}{answer.headers['Location']}", timeout=30)
    assert form.status_code == 200
    assert 'name="next" value="/console/runs?status=failed"' in form.text


def test_an_htmx_request_without_a_session_is_told_to_load_the_sign_in_page(stack: Stack) -> None:
    answer = requests.get(f"{stack.api_url}/console/workflows", allow_redirects=False, timeout=30,
                          headers={"HX-Request": "true",
                                   "HX-Current-URL": f"{stack.api_url}/console/runs?workflow=a"})

    assert answer.status_code == 200
    redirect = urlsplit(answer.headers["HX-Redirect"])
    assert redirect.path == "/console/sign-in"
    assert parse_qs(redirect.query) == {"next": ["/console/runs?workflow=a"]}


def test_an_event_stream_without_a_session_is_a_401_json_error(stack: Stack) -> None:
    answer = requests.get(f"{stack.api_url}/console/workflows", allow_redirects=False, timeout=30,
                          headers={"Accept": "text/event-stream"})
    stream = requests.get(f"{stack.api_url}/console/runs/{uuid.uuid4().hex}/stream", allow_redirects=False,
                          timeout=30)

    for refused in (answer, stream):
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"


def test_a_post_without_the_csrf_token_is_refused(client: Client) -> None:
    ref = f"guarded-{uuid.uuid4().hex[:6]}"
    client.upload(ref, "def execute(ctx):\n    return 1\n")
    activate = f"{client.base_url}/console/workflows/{ref}/activate"
    session = console_session(client.base_url, client.key)
    token = session.headers.pop("X-CSRF-Token")

    refused = session.post(activate, data={"version": "1.0.0"}, allow_redirects=False, timeout=30)
    wrong = session.post(activate, data={"version": "1.0.0", "csrf_token": token[:-2] + "xx"},
                         allow_redirects=False, timeout=30)

    assert refused.status_code == 403 and wrong.status_code == 403
    assert "CSRF" in refused.json()["error"]["message"]
    # The form field is accepted as well as the header (the page's forms are plain forms too).
    accepted = session.post(activate, data={"version": "1.0.0", "csrf_token": token}, allow_redirects=False,
                            timeout=30)
    assert accepted.status_code == 200 and "Version 1.0.0 is active again." in accepted.text


def test_a_second_sign_in_over_a_live_session_needs_no_csrf_token(client: Client) -> None:
    # Two tabs: B signed in; A, opened before, now sends its sign-in form, which has no session's token.
    session = console_session(client.base_url, client.key)
    del session.headers["X-CSRF-Token"]
    first = session.cookies.get("flowpool_console")

    again = session.post(f"{client.base_url}/console/sign-in", data={"api_key": client.key, "next": "/console/runs"},
                         headers={"Origin": client.base_url}, allow_redirects=False, timeout=30)

    assert again.status_code == 303 and again.headers["Location"] == "/console/runs"
    second = session.cookies.get("flowpool_console")
    assert second and second != first
    assert session.get(f"{client.base_url}/console/runs", allow_redirects=False, timeout=30).status_code == 200
    # The session it replaced is over: a copy of the first cookie opens nothing.
    replay = requests.get(f"{client.base_url}/console/runs", cookies={"flowpool_console": first},
                          allow_redirects=False, timeout=30)
    assert replay.status_code == 303


def test_signing_out_with_a_stale_token_signs_out_and_goes_to_the_sign_in_page(client: Client) -> None:
    session = console_session(client.base_url, client.key)
    stale = session.headers.pop("X-CSRF-Token")
    # Another tab signs in again: this tab's page keeps the token of the session that ended.
    resigned = session.post(f"{client.base_url}/console/sign-in", data={"api_key": client.key},
                            allow_redirects=False, timeout=30)
    assert resigned.status_code == 303

    out = session.post(f"{client.base_url}/console/sign-out", data={"csrf_token": stale},
                       headers={"Origin": client.base_url}, allow_redirects=False, timeout=30)

    assert out.status_code == 303 and out.headers["Location"] == "/console/sign-in"
    assert "flowpool_console=;" in _cookie_header(out)
    page = session.get(f"{client.base_url}/console/runs", allow_redirects=False, timeout=30)
    assert page.status_code == 303 and urlsplit(page.headers["Location"]).path == "/console/sign-in"


def test_a_post_from_another_origin_is_refused_even_with_the_token(client: Client) -> None:
    session = console_session(client.base_url, client.key)

    for header in ({"Origin": "http://elsewhere.invalid"}, {"Origin": "null"},
                   {"Referer": "http://elsewhere.invalid/page"}):
        refused = session.post(f"{client.base_url}/console/sign-out", headers=header, allow_redirects=False,
                               timeout=30)
        assert refused.status_code == 403, header
        # The session is still there: a page of another site cannot sign anyone out.
        assert session.get(f"{client.base_url}/console/usage", allow_redirects=False, timeout=30).status_code == 200
    login = requests.post(f"{client.base_url}/console/sign-in", data={"api_key": client.key},
                          headers={"Origin": "http://elsewhere.invalid"}, allow_redirects=False, timeout=30)
    assert login.status_code == 403 and "set-cookie" not in {k.lower() for k in login.headers}
    same = session.post(f"{client.base_url}/console/sign-out", headers={"Origin": client.base_url},
                        allow_redirects=False, timeout=30)
    assert same.status_code == 303


def test_signing_out_ends_the_session_for_a_kept_cookie_too(client: Client) -> None:
    session = console_session(client.base_url, client.key)
    kept = session.cookies.get("flowpool_console")
    assert session.get(f"{client.base_url}/console/usage", allow_redirects=False, timeout=30).status_code == 200

    out = session.post(f"{client.base_url}/console/sign-out", allow_redirects=False, timeout=30)

    assert out.status_code == 303 and out.headers["Location"] == "/console/sign-in"
    assert "flowpool_console=;" in _cookie_header(out)  # the browser is told to drop it
    replay = requests.get(f"{client.base_url}/console/usage", cookies={"flowpool_console": kept},
                          allow_redirects=False, timeout=30)
    assert replay.status_code == 303
    assert urlsplit(replay.headers["Location"]).path == "/console/sign-in"


def test_the_session_lives_in_redis_under_the_token_hash_with_a_ttl_and_no_key(client: Client,
                                                                                 stack_db: redis.Redis) -> None:
    session = console_session(client.base_url, client.key)
    token = session.cookies.get("flowpool_console")
    name = f"fp:console:{hashlib.sha256(token.encode()).hexdigest()}"

    stored = stack_db.hgetall(name)

    assert stored[b"key_hash"] == hashlib.sha256(client.key.encode()).hexdigest().encode()
    assert not any(client.key.encode() in v or token.encode() in v for v in stored.values())
    assert 0 < stack_db.ttl(name) <= 8 * 3600


def test_a_request_pushes_back_the_end_of_a_session_idle_over_a_minute(client: Client,
                                                                        stack_db: redis.Redis) -> None:
    session = console_session(client.base_url, client.key)
    name = f"fp:console:{hashlib.sha256(session.cookies.get('flowpool_console').encode()).hexdigest()}"
    stack_db.hset(name, "refreshed_at", 0)  # last pushed back long ago
    stack_db.expire(name, 100)

    assert session.get(f"{client.base_url}/console/usage", allow_redirects=False, timeout=30).status_code == 200

    assert stack_db.ttl(name) > 100
    stack_db.expire(name, 100)
    session.get(f"{client.base_url}/console/usage", allow_redirects=False, timeout=30)
    assert stack_db.ttl(name) <= 100  # pushed back at most once a minute: no write on every request


def test_deleting_the_api_key_ends_its_console_sessions(stack: Stack, stack_db: redis.Redis) -> None:
    _, key = _new_account(stack)
    session = console_session(stack.api_url, key)
    assert session.get(f"{stack.api_url}/console/usage", allow_redirects=False, timeout=30).status_code == 200

    stack_db.delete(f"fp:key:{hashlib.sha256(key.encode()).hexdigest()}")

    ended = session.get(f"{stack.api_url}/console/usage", allow_redirects=False, timeout=30)
    assert ended.status_code == 303


def test_a_session_shows_its_own_account_and_never_another_accounts_workflows(stack: Stack) -> None:
    name_a, key_a = _new_account(stack)
    name_b, key_b = _new_account(stack)
    ref = f"only-a-{uuid.uuid4().hex[:8]}"
    Client(stack.api_url, key_a).upload(ref, "def execute(ctx):\n    return {}\n")
    session_a, session_b = console_session(stack.api_url, key_a), console_session(stack.api_url, key_b)

    page_a = session_a.get(f"{stack.api_url}/console/workflows", timeout=30)
    page_b = session_b.get(f"{stack.api_url}/console/workflows", timeout=30)

    assert page_a.status_code == page_b.status_code == 200
    assert name_a in page_a.text and name_b not in page_a.text
    assert name_b in page_b.text and name_a not in page_b.text
    assert ref in page_a.text and ref not in page_b.text
    assert session_b.get(f"{stack.api_url}/console/workflows/{ref}", timeout=30).status_code == 404


def test_every_console_answer_carries_the_csp_and_pages_are_never_cached(client: Client) -> None:
    session = console_session(client.base_url, client.key)
    anonymous = requests.get(f"{client.base_url}/console/sign-in", timeout=30)
    page = session.get(f"{client.base_url}/console/usage", timeout=30)
    static = requests.get(f"{client.base_url}/console/static/console.css", timeout=30)

    for answer in (anonymous, page, static):
        assert answer.headers["Content-Security-Policy"] == CSP
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "same-origin"
    assert anonymous.headers["Cache-Control"] == page.headers["Cache-Control"] == "no-store"
    assert "public" in static.headers["Cache-Control"] and "max-age=" in static.headers["Cache-Control"]


def test_the_static_files_are_served_with_their_content_types(stack: Stack) -> None:
    for name, mimetype in (("console.css", "text/css"), ("console.js", "text/javascript"),
                           ("htmx.min.js", "text/javascript")):
        answer = requests.get(f"{stack.api_url}/console/static/{name}", timeout=30)

        assert answer.status_code == 200, name
        assert answer.headers["Content-Type"].split(";")[0] == mimetype, name
        assert answer.content == (STATIC / name).read_bytes()
    page = requests.get(f"{stack.api_url}/console/sign-in", timeout=30).text
    # The page loads exactly the console's own files, from this origin.
    assert re.findall(r'<script src="([^"?]+)', page) == ["/console/static/htmx.min.js", "/console/static/console.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"?]+)', page) == ["/console/static/console.css"]


def test_the_console_is_a_404_when_turned_off(redis_server: RedisServer, stack: Stack) -> None:
    with second_api(redis_server, FLOWPOOL_CONSOLE_ENABLED="false") as api:
        for path in ("/console", "/console/sign-in", "/console/static/console.js"):
            assert requests.get(f"{api.api_url}{path}", allow_redirects=False, timeout=30).status_code == 404
        assert requests.get(f"{api.api_url}/healthz", timeout=30).status_code == 200
