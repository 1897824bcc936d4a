"""One real-browser walk through the explorer: Debian's chromium driven by Playwright.

Starts `streamlit run streamlit_app.py` on a free local port, visits every page, clicks a
confusion-matrix cell and then one of its images, and checks that the inspector shows that
image's prediction as the library computes it. It also screenshots every page, every tab and
an open inspector at a projector's 1024x768 and a laptop's 1400x900 (into bench/results/screenshots/,
git-ignored) and checks that no page shows an exception, a traceback or text cut off with an ellipsis.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cifarviz.artifacts import split_artifacts
from cifarviz.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "bench" / "results" / "screenshots"
PAGES = (("home", "", "cifarviz"), ("dataset", "dataset", "Dataset"), ("evaluate", "evaluate", "Evaluate"),
         ("influence", "influence", "Influence"), ("models", "models", "Models"))
VIEWPORTS = ((1024, 768), (1400, 900))
TRUNCATION_CHECKED = {name for name, _, _ in PAGES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cifar):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test: Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    port = free_port()
    env = {**os.environ, "CIFARVIZ_DATA": str(cifar.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
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
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def page(browser):
    page = new_page(browser, 1600, 1200)
    yield page
    page.close()


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
    """Visible texts inside `scope` that CSS cuts off with an ellipsis (wider than their box)."""
    return page.evaluate(
        """(scope) => [...document.querySelectorAll(scope + ' *')].filter(el => {
               if (!el.offsetParent || !el.innerText || !el.innerText.trim()) return false;
               const style = getComputedStyle(el);
               return style.textOverflow === 'ellipsis' && el.scrollWidth > el.clientWidth + 1;
           }).map(el => el.innerText.trim())""", scope)


def screenshot(page, name: str, scroller: str = "[data-testid='stMain']") -> None:
    """The viewport as seen, and the whole of `scroller` (the viewport stretched to its height)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    page.screenshot(path=SHOTS / f"{name}.png")
    height = page.evaluate(f"() => document.querySelector(\"{scroller}\")?.scrollHeight || 0")
    if height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height + 40, 12_000)})
        page.wait_for_timeout(1500)  # charts re-render at the new size
        page.screenshot(path=SHOTS / f"{name}-full.png")
        page.set_viewport_size(size)
        page.wait_for_timeout(500)


def test_every_page_renders(page, server):
    for name, path, heading in PAGES:
        page.goto(f"{server}/{path}")
        page.get_by_role("heading", name=re.compile(heading)).first.wait_for()
        wait_idle(page)
        assert_healthy(page, name)


def test_confusion_cell_then_image_opens_the_inspector(page, server, cifar):
    page.goto(f"{server}/evaluate")
    chart = page.locator("[data-testid='stVegaLiteChart']").first
    chart.wait_for()
    wait_idle(page)
    before = page.get_by_text(re.compile(r"test images are .* predicted as")).first.inner_text()
    box = chart.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.45)  # a cell near the middle
    page.wait_for_function(
        "(before) => ![...document.querySelectorAll('p')].some(p => p.innerText === before)", arg=before)
    wait_idle(page)
    caption = page.get_by_text(re.compile(r"test images are .* predicted as")).first.inner_text()
    true_name, pred_name = re.search(r"are (\w+) predicted as (\w+)", caption).groups()

    cell_button = page.locator("[class*='st-key-cell-test-'] button").first
    key = cell_button.locator("xpath=ancestor::*[contains(@class,'st-key-cell-test-')][1]").get_attribute("class")
    index = int(re.search(r"st-key-cell-test-(\d+)", key).group(1))
    cell_button.click()
    inspector = page.locator("[role=dialog] .st-key-inspector")
    inspector.wait_for()
    wait_idle(page)
    text = inspector.inner_text()
    assert f"test image #{index}" in text.lower()  # the heading reads "Test image #..."

    arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors"), cifar, "test")
    assert cifar.classes[arts.labels[index]] == true_name
    assert cifar.classes[arts.predicted[index]] == pred_name
    probability = arts.probs[index].max()
    assert f"Predicted: {pred_name} ({probability:.1%})" in text


@pytest.mark.parametrize("width,height", VIEWPORTS, ids=[f"{w}x{h}" for w, h in VIEWPORTS])
def test_screenshots_every_page_tab_and_the_inspector(browser, server, width, height):
    page = new_page(browser, width, height)
    size = f"{width}x{height}"
    cut_off = {}
    try:
        for name, path, heading in PAGES:
            page.goto(f"{server}/{path}")
            page.get_by_role("heading", name=re.compile(heading)).first.wait_for()
            wait_idle(page)
            assert_healthy(page, name)
            screenshot(page, f"{name}-{size}")
            tabs = page.locator("[data-testid='stMain'] [role=tab]")
            for i in range(tabs.count()):
                label = tabs.nth(i).inner_text().strip()
                tabs.nth(i).click()
                wait_idle(page, quiet_ms=800)
                assert_healthy(page, f"{name} / {label}")
                if i:  # the first tab is in the page's own screenshot
                    screenshot(page, f"{name}-{size}-tab{i}-{re.sub(r'[^a-z]+', '-', label.lower())}")
                cut_off[f"{name} / {label}"] = cut_off_texts(page, "[data-testid='stMain']")
            cut_off.setdefault(name, cut_off_texts(page, "[data-testid='stMain']"))

        page.goto(f"{server}/dataset")  # the inspector, opened from the first sample image
        page.get_by_role("tab", name="Samples").click()
        page.locator("[class*='st-key-sample-'] button").first.click()
        page.locator("[role=dialog] [class*='st-key-neighbours-train-']").first.wait_for(timeout=900_000)
        wait_idle(page)
        assert_healthy(page, "inspector")
        screenshot(page, f"inspector-{size}", scroller="[role=dialog]")
        print(f"{size}: cut off in the inspector: {cut_off_texts(page, '[role=dialog]')}")
    finally:
        page.close()
    for where, texts in cut_off.items():
        print(f"{size}: cut off on {where}: {texts}")
    assert not {where: texts for where, texts in cut_off.items()
                if texts and where.split(" / ")[0] in TRUNCATION_CHECKED}, "text cut off with an ellipsis"
