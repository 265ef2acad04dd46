"""A real headless Chromium, driven by Playwright's sync API, for the console's end-to-end tests.

Playwright drives the system's Chromium (Debian's ``chromium`` package), never a
browser it downloads: FLOWPOOL_TEST_CHROMIUM names the binary, else the first
of ``chromium``, ``chromium-browser`` and ``google-chrome`` on PATH. A fresh
CI machine with only Python has none: there, as root on Debian or Ubuntu,
the fixture installs Debian's package with apt-get (bounded in time, saying
so); anywhere else the tests are skipped with how to install one.

One browser serves a whole module; each test opens pages in a context whose
clock reads Asia/Tokyo and whose locale is en-US, so times the console shows
are checked against a zone that is not the machine's.

Also here, for every module: signing a context in (:func:`sign_in`), opening a
page (:func:`open_page`), a gate of the stand-in provider (:func:`gate`),
screenshots (:func:`shoot`), layout measures, and the ``console`` fixture: an
account with three workflows, signed in by keyboard (:class:`Console`). Waits
for a condition in the page use Playwright's ``page.wait_for_function`` with a
function (``"() => ..."``), which works under the console's CSP from Playwright
1.55 on (the test extra's floor); a bare expression would be evaluated as a
string, which the CSP refuses (no 'unsafe-eval').
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from flowpool.devstack import Stack
from tests.conftest import SESSION_PIDS
from tests.helpers import Client
from tests.provider import StandInProvider

# Chromium's own background traffic (updates, sync, QUIC probes, first-run pages) stays off: the tests run
# where nothing past loopback can be reached, and a stray connection would only slow them down.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps"]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
TIMEZONE = "Asia/Tokyo"
VIEWPORT = {"width": 1280, "height": 800}
# Names the folder the tests save their screenshots in, e.g. docs/console to refresh the README's images; unset,
# they go to a temporary folder, so a test run leaves the checkout as it was.
SCREENSHOTS_ENV = "FLOWPOOL_CONSOLE_SCREENSHOTS"
# How long one wait in a browser test may take: a page load, a selector, a streamed chunk (milliseconds).
WAIT_MS = 20_000
# How long installing Chromium with apt-get may take, update and install each (seconds).
APT_SECONDS = 600
HOW_TO_INSTALL = ("no Chromium found: install one (Debian/Ubuntu: apt-get install chromium) or name its binary in "
                  "FLOWPOOL_TEST_CHROMIUM; the tests never download a browser (no `playwright install`)")


def find_chromium() -> str | None:
    """The Chromium binary to drive: FLOWPOOL_TEST_CHROMIUM, else the first known name on PATH; None without one."""
    named = os.environ.get("FLOWPOOL_TEST_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _debian_like() -> bool:
    """Whether this machine is Debian or Ubuntu (or derived from them), by /etc/os-release."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return False
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    family = f"{fields.get('ID', '')} {fields.get('ID_LIKE', '')}".replace('"', "").split()
    return bool({"debian", "ubuntu"} & set(family))


def install_chromium(say: Any) -> str | None:
    """Install Debian's ``chromium`` with apt-get where that can work (root, Debian/Ubuntu); the binary or None."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") and _debian_like()):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        say(f"e2e: no Chromium on this machine; running {' '.join(command)} (at most {APT_SECONDS}s)")
        try:
            result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=APT_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"e2e: {' '.join(command)} took over {APT_SECONDS}s; giving up")
            return None
        if result.returncode != 0:
            say(f"e2e: {' '.join(command)} failed with {result.returncode}: {result.stderr.strip()[-500:]}")
            return None
    found = find_chromium()
    say(f"e2e: installed Chromium at {found}" if found else "e2e: apt-get installed chromium, but it is not on PATH")
    return found


@pytest.fixture(scope="session")
def chromium_path(request: pytest.FixtureRequest) -> str:
    """The system Chromium's binary; installed with apt-get on a bare Debian/Ubuntu as root; else the tests skip."""
    found = find_chromium()
    if found is None:
        capture = request.config.pluginmanager.getplugin("capturemanager")

        def say(line: str) -> None:
            with capture.global_and_fixture_disabled():  # shown as it happens: an install takes minutes
                print(line, file=sys.stderr, flush=True)

        found = install_chromium(say)
    if found is None:
        pytest.skip(HOW_TO_INSTALL)
    return found


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    """One headless Chromium for the module (Playwright makes it a fresh profile in a temporary directory)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright is not installed")
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    playwright = sync_api.sync_playwright().start()
    try:
        # The driver (and so the browser, its child) lives for the module: the per-test leak check leaves it be.
        SESSION_PIDS.update(child.pid for child in me.children() if child.pid not in before)
        chromium = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, timeout=WAIT_MS * 3)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save each page's screenshot: $FLOWPOOL_CONSOLE_SCREENSHOTS, else a temporary folder."""
    named = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(named) if named else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_context(browser: Any) -> Any:
    """A browser context as a viewer in Tokyo sees the console: en-US, 1280x800, every wait bounded."""
    context = browser.new_context(timezone_id=TIMEZONE, locale="en-US", viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    return context


def open_page(context: Any, base_url: str, path: str) -> Any:
    """A new tab of ``context`` at ``path`` of the console's site, loaded."""
    page = context.new_page()
    page.goto(base_url + path, wait_until="load", timeout=WAIT_MS)
    return page


def sign_in(target: Any, base_url: str, key: str, keyboard: bool = False) -> None:
    """Sign in through the sign-in form, landing on the workflows page.

    ``target``: a browser context (a tab is opened for it, then closed) or a page (it stays on the workflows
    page). ``keyboard``: as a keyboard user does, the key typed into the focused field, Tab to the button, Enter.
    """
    page = target.new_page() if hasattr(target, "new_page") else target
    page.goto(f"{base_url}/console/sign-in", wait_until="load", timeout=WAIT_MS)
    if keyboard:
        for _ in range(10):  # the field has autofocus; Tab to it where the browser did not focus it
            if page.evaluate("document.activeElement && document.activeElement.id") == "api_key":
                break
            page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "api_key"
        page.keyboard.type(key)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent.trim()") == "Sign in"
        page.keyboard.press("Enter")
    else:
        page.fill("#api_key", key)
        page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/console/workflows$"), timeout=WAIT_MS)
    if page is not target:
        page.close()


def gate(provider: StandInProvider) -> tuple[str, str]:
    """A gate of the stand-in provider: the URL a run is held at, and the one that lets it through."""
    name = uuid.uuid4().hex
    return f"{provider.origin}/hold/{name}", f"{provider.origin}/gate/{name}"


def gate_name(url: str) -> str:
    """The name of the gate a hold URL of :func:`gate` waits at."""
    return url.rsplit("/", 1)[1]


def shoot(page: Any, folder: Path, name: str) -> Path:
    """Save the whole page as <name>.png in ``folder`` (the screenshots fixture's); its path."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, timeout=WAIT_MS)
    assert path.stat().st_size > 0, path
    return path


def mark_page(page: Any) -> None:
    """Leave a mark in the page's window: a reload would lose it."""
    page.evaluate("window.__e2eNoReload = 'still here'")


def not_reloaded(page: Any) -> bool:
    """Whether the page still has the mark :func:`mark_page` left."""
    return page.evaluate("window.__e2eNoReload") == "still here"


def fits_across(page: Any, selector: str) -> dict[str, float]:
    """How wide ``selector``'s content is against its container (.table-wrap) and the window, in CSS pixels."""
    return page.evaluate("""(selector) => {
        const table = document.querySelector(selector);
        const wrap = table.parentElement;
        return {scroll: table.scrollWidth, room: wrap.clientWidth, right: wrap.getBoundingClientRect().right,
                window: document.documentElement.clientWidth};
    }""", selector)


def box(page: Any, selector: str) -> dict[str, float]:
    """Where ``selector`` is drawn (its bounding box in CSS pixels)."""
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not drawn"
    return found


# The window widths the console must fit without scrolling sideways: its narrowest supported, and a laptop's.
WIDTHS = (1024, 1280)

STREAMS = """
    import time

    from flowpool_workflow import WorkflowContext

    INPUT_SCHEMA = {{
        "topic": {{"type": "string", "description": "What the steps are about"}},
        "hold": {{"type": "string", "description": "A URL that answers once the caller lets the run finish"}},
    }}
    TIMEOUT_SECONDS = 60
    CACHE_TTL_SECONDS = 0  # every invocation runs: the tests watch runs, not cached answers
    # {marker}


    def execute(ctx: WorkflowContext):
        topic = (ctx.input or {{}}).get("topic") or "nothing"
        ctx.log.info("starting", topic=topic)
        for i in range(3):
            ctx.emit("step", f"{{topic}} {{i}}")
            time.sleep(0.1)
        hold = (ctx.input or {{}}).get("hold")
        if hold:
            ctx.log.info("waiting to be let through")
            ctx.http.get(hold)
            ctx.emit("step", f"{{topic}} let through")
        ctx.log.info("finished", steps=3)
        return {{"topic": topic, "steps": 3}}
"""

ASKS = """
    from flowpool_workflow import WorkflowContext

    APPLICATION = "{app}"
    INPUT_SCHEMA = {{"q": {{"type": "string", "description": "The question", "required": True}}}}
    CACHE_TTL_SECONDS = 0


    def execute(ctx: WorkflowContext):
        ctx.log.info("asking the model")
        resp = ctx.chat.completions.create(intent="answer", messages=[{{"role": "user", "content": ctx.input["q"]}}])
        return {{"answer": resp["choices"][0]["message"]["content"]}}
"""

FAILS = """
    def execute(ctx):
        ctx.log.warning("about to fail")
        raise ValueError("the e2e workflow fails on purpose")
"""


class Console:
    """The module's account, its workflows and runs, and a browser context signed in to the console."""

    def __init__(self, base_url: str, api: Client, context: Any, provider: StandInProvider, suffix: str,
                 shots: Path) -> None:
        self.base_url = base_url
        self.shots = shots  # where screenshots go (the screenshots fixture)
        self.account = f"e2e-{suffix}"
        self.api = api
        self.context = context
        self.provider = provider
        self.streams, self.asks, self.fails = f"e2e-streams-{suffix}", f"e2e-asks-{suffix}", f"e2e-fails-{suffix}"
        self.session_id = f"e2e-session-{suffix}"
        self.urls: list[str] = []  # every URL the browser asked for
        context.on("request", lambda request: self.urls.append(request.url))

    def page(self, path: str) -> Any:
        """A new tab at ``path``, loaded."""
        return open_page(self.context, self.base_url, path)

    def start(self, ref: str, **body: Any) -> str:
        """Start a run through the API (POST /api/v1/runs); its request id."""
        response = self.api.post("/api/v1/runs", json={"model": f"workflow:{ref}", **body})
        assert response.status_code == 202, response.text
        return response.json()["request_id"]

    def shoot(self, page: Any, name: str) -> None:
        """Save the whole page as <name>.png in the screenshots folder (every page, every run)."""
        shoot(page, self.shots, name)


@pytest.fixture(scope="module")
def console(stack: Stack, browser: Any, provider: StandInProvider, screenshots: Path) -> Iterator[Console]:
    """A fresh account with three workflows (one a draft waiting), signed in to the console by keyboard."""
    assert stack.api_url is not None
    suffix = uuid.uuid4().hex[:6]
    api = Client(stack.api_url, stack.create_account(f"e2e-{suffix}"))
    context = new_context(browser)
    try:
        c = Console(stack.api_url, api, context, provider, suffix, screenshots)
        app = f"e2e-app-{suffix}"
        put = api.request("PUT", f"/api/v1/applications/{app}", json={"intents": {"answer": {
            "model": "fail", "base_url": provider.base_url,
            "fallbacks": [{"model": "echo", "base_url": provider.base_url}]}}})
        assert put.status_code == 201, put.text
        api.upload(c.streams, STREAMS.format(marker="first version"), description="Emits three steps, logging each")
        api.upload(c.asks, ASKS.format(app=app), description="Asks a model, through a fallback")
        api.upload(c.fails, FAILS)
        # A second version as a draft: the workflow page's activate button publishes it.
        api.upload(c.streams, STREAMS.format(marker="second version"), publish_version=False,
                   version_notes="the same steps, published from the console")
        sign_in(context, stack.api_url, api.key, keyboard=True)
        yield c
    finally:
        context.close()

