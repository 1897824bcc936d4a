"""Real-browser helpers shared by the browser tests: one Streamlit server and one chromium per test session."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "bench" / "results" / "screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    """A Streamlit server of the app on a free loopback port, with `env`; (process, url) once it answers."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test: Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    port = free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads fills up and stalls the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        log.seek(0)
        pytest.fail("streamlit did not start: " + log.read().decode(errors="replace")[-2000:])
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def server(cifar):
    proc, url = start_server({**os.environ, "CIFARVIZ_DATA": str(cifar.root)})
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def new_page(browser, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(300_000)  # a busy 2-core machine: first visits compute and cache
    return page


@pytest.fixture(scope="session")
def _shared_page(browser):
    page = new_page(browser, 1600, 1200)
    yield page
    page.close()


@pytest.fixture
def page(_shared_page):
    """One tab for every test; left on a blank page after each, so the last page's live parts (the Train page's
    run view, a retraining's progress) do not keep the server busy for the rest of the test session."""
    yield _shared_page
    _shared_page.goto("about:blank")


def wait_idle(page, quiet_ms: int = 1500, timeout_s: float = 600):
    """Until Streamlit has finished running: no 'running' status widget and no progress bar for `quiet_ms`
    in a row (a page waiting for a background computation reruns itself twice a second)."""
    busy = "document.querySelector('[data-testid=\"stStatusWidget\"], [data-testid=\"stProgress\"]')"
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while True:
        page.wait_for_timeout(250)
        if page.evaluate(f"!!{busy}"):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_ms / 1000:
            return
        assert time.monotonic() < deadline, f"{page.url} was still running after {timeout_s:.0f} s"


def assert_healthy(page, where: str) -> None:
    shown = page.locator("[data-testid='stException']")
    assert shown.count() == 0, f"{where}: an exception is shown: {shown.first.inner_text()[:2000]}"
    assert "Traceback" not in page.inner_text("body"), f"{where}: a raw traceback is shown"


def cut_off_texts(page, scope: str) -> list[str]:
    """Visible texts inside `scope` that CSS cuts off with an ellipsis (wider than their box), and options of
    button groups (segmented controls, pills) that stick out of their column, where they are hidden."""
    return page.evaluate(
        """(scope) => {
               const ellipsis = [...document.querySelectorAll(scope + ' *')].filter(el => {
                   if (!el.offsetParent || !el.innerText || !el.innerText.trim()) return false;
                   const style = getComputedStyle(el);
                   return style.textOverflow === 'ellipsis' && el.scrollWidth > el.clientWidth + 1;
               }).map(el => el.innerText.trim());
               const hidden = [...document.querySelectorAll(scope + ' [data-testid="stButtonGroup"] button')].filter(b => {
                   const box = b.closest('[data-testid="stColumn"]') || b.closest('[data-testid="stVerticalBlock"]');
                   return b.offsetParent && box && b.getBoundingClientRect().right > box.getBoundingClientRect().right + 1;
               }).map(b => 'option out of its column: ' + b.innerText.trim());
               return [...ellipsis, ...hidden];
           }""", scope)


def screenshot(page, name: str, scroller: str = "[data-testid='stMain']") -> None:
    """The viewport as seen, and the whole of `scroller` (the viewport stretched to its height)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    page.screenshot(path=SHOTS / f"{name}.png")
    height = page.evaluate(f"() => document.querySelector(\"{scroller}\")?.scrollHeight || 0")
    if height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height + 40, 12_000)})
        page.wait_for_timeout(700)  # charts re-render at the new size (Vega redraws in well under this)
        page.screenshot(path=SHOTS / f"{name}-full.png")
        page.set_viewport_size(size)
        page.wait_for_timeout(200)
