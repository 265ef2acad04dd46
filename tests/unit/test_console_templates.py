"""The console's templates and helpers: nothing the CSP would block, safe redirects, the wheel's files."""
from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest

from flowpool.api.app import create_app
from flowpool.api.console.common import safe_next
from flowpool.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "api" / "console"
TEMPLATES = CONSOLE / "templates"


def _templates() -> list[Path]:
    return sorted(TEMPLATES.rglob("*.html"))


def _inline_code_scripts(html: str) -> list[str]:
    """Each <script> with code in it, or an src elsewhere than this site; a JSON data block is no script."""
    found = []
    for attributes, body in re.findall(r"<script\b([^>]*)>(.*?)</script\s*>", html, flags=re.S | re.I):
        if re.search(r'type\s*=\s*["\']application/json["\']', attributes):
            continue
        if body.strip() or re.search(r'src\s*=\s*["\']?(https?:)?//', attributes):
            found.append(f"<script{attributes}>{body[:60]}")
    return found


def test_the_templates_are_found() -> None:
    names = {path.name for path in _templates()}

    assert {"base.html", "sign_in.html", "_macros.html"} <= names


@pytest.mark.parametrize("path", _templates(), ids=lambda path: path.name)
def test_no_template_has_inline_script_code_styles_or_handlers(path: Path) -> None:
    html = re.sub(r"{#.*?#}", "", path.read_text(), flags=re.S)  # what a comment says is never sent

    assert _inline_code_scripts(html) == []
    assert re.findall(r"\sstyle\s*=", html, flags=re.I) == []
    assert re.findall(r"<style\b", html, flags=re.I) == []
    # onclick="..." and friends are inline script; hx-on:* needs eval, which the htmx config turns off.
    assert re.findall(r"\s(on[a-z]+|hx-on[:\-][\w:-]*)\s*=", html, flags=re.I) == []
    assert "|safe" not in html.replace(" ", "")


def test_the_scan_catches_what_the_csp_would_block() -> None:
    assert _inline_code_scripts('<script>alert(1)</script>') != []
    assert _inline_code_scripts('<script src="https://cdn.invalid/x.js"></script>') != []
    assert _inline_code_scripts('<script type="application/json" id="d">{"a": 1}</script>') == []
    assert _inline_code_scripts('<script src="/console/static/console.js" defer></script>') == []


@pytest.mark.parametrize(("value", "expected"), [
    ("/console/runs?status=failed", "/console/runs?status=failed"),
    ("/console", "/console"),
    (None, "/console/workflows"),
    ("", "/console/workflows"),
    ("https://elsewhere.invalid/console/", "/console/workflows"),
    ("//elsewhere.invalid/console/", "/console/workflows"),
    ("/console\\@elsewhere.invalid", "/console/workflows"),
    ("/consoleX", "/console/workflows"),
    ("/api/v1/runs", "/console/workflows"),
    ("/console/sign-in", "/console/workflows"),
    ("/console/runs\r\nSet-Cookie: x=1", "/console/workflows"),
])
def test_sign_in_returns_only_to_console_pages(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_the_wheel_carries_every_template_and_static_file() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["flowpool.api.console"].split()
    shipped = {path for pattern in patterns for path in CONSOLE.glob(pattern) if path.is_file()}
    files = {path for folder in ("templates", "static") for path in (CONSOLE / folder).rglob("*")
             if path.is_file() and "__pycache__" not in path.parts}

    assert {"base.html", "htmx.min.js", "htmx.LICENSE", "console.js", "console.css"} <= {p.name for p in files}
    assert sorted(map(str, files - shipped)) == []


@pytest.fixture(scope="module")
def macros() -> Any:
    """The console's macros, in an app that never reaches its Redis (nothing here reads it)."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:9"))
    with app.test_request_context("/console/runs"):
        yield app.jinja_env.get_template("console/_macros.html").make_module()


def test_a_time_is_utc_text_marked_for_the_viewers_zone(macros: Any) -> None:
    html = str(macros.time(1714564800.25))

    assert html == ('<time datetime="2024-05-01T12:00:00.250Z" data-local title="2024-05-01 12:00:00 UTC">'
                    "2024-05-01 12:00:00 UTC</time>")
    assert 'data-local="time"' in str(macros.time(1714564800, time_only=True))
    assert "<time" not in str(macros.time(None))


def test_a_status_badge_says_the_status_in_words(macros: Any) -> None:
    html = str(macros.status_badge("timed_out"))

    assert 'class="badge badge-timed-out"' in html and "timed out</span>" in html


def test_a_json_tree_nests_details_open_at_the_top_and_escapes_strings(macros: Any) -> None:
    html = str(macros.json_tree({"a": [1, None, True], "<b>": "<script>x</script>"}))

    assert html.count("<details") == 2 and html.count(" open>") == 1
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html and "&lt;b&gt;" in html
    assert '<span class="json-null">null</span>' in html and '<span class="json-bool">true</span>' in html
    deep: Any = "leaf"
    for _ in range(60):
        deep = [deep]
    assert "json-raw" in str(macros.json_tree(deep))  # past the depth bound, the rest is JSON text


def test_an_empty_state_shows_the_command_to_run(macros: Any) -> None:
    html = str(macros.empty_state("No workflows yet", "Push one:", command="flowpool push flow.py"))

    assert "<h2>No workflows yet</h2>" in html and "<code>flowpool push flow.py</code>" in html
