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
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from tests.conftest import SESSION_PIDS

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
