"""One real-browser walk through the explorer: Debian's chromium driven by Playwright.

Starts `streamlit run streamlit_app.py` on a free local port, visits every page, clicks a
confusion-matrix cell and then one of its images, and checks that the inspector shows that
image's prediction as the library computes it.
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
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.set_default_timeout(180_000)
        yield page
        browser.close()


def wait_idle(page):
    """Until Streamlit has finished the current run (no 'running' status widget)."""
    page.wait_for_timeout(500)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=180_000)


def test_every_page_renders(page, server):
    for path, heading in (("", "cifarviz"), ("dataset", "Dataset"), ("evaluate", "Evaluate"), ("models", "Models")):
        page.goto(f"{server}/{path}")
        page.get_by_role("heading", name=re.compile(heading)).first.wait_for()
        wait_idle(page)
        assert page.locator("[data-testid='stException']").count() == 0, path


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
    assert f"test image #{index}" in text

    arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors"), cifar, "test")
    assert cifar.classes[arts.labels[index]] == true_name
    assert cifar.classes[arts.predicted[index]] == pred_name
    probability = arts.probs[index].max()
    assert f"Predicted: {pred_name} ({probability:.1%})" in text
