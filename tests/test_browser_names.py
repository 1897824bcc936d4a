"""Names from files in a real browser: a checkpoint named with a Markdown image link and class folders named with
Markdown are shown as the text they are; chromium never fetches the link, nothing is bold, coloured or maths."""

import os
import re

import pytest
import torch
from browser import assert_healthy, screenshot, start_server, stop_server, wait_idle
from conftest import write_image_folder
from test_lecture_hall import HOSTILE_CLASSES, HOSTILE_NAME

from cifarviz.core.checkpoint import save_checkpoint
from cifarviz.core.models import create_model
from cifarviz.ui.text import shown


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    data = write_image_folder(folder / "data", classes=HOSTILE_CLASSES, per_class=(4, 10))
    runs_dir = folder / "runs"
    runs_dir.mkdir()
    torch.manual_seed(0)
    save_checkpoint(runs_dir / "hostile.safetensors", create_model("lenet", num_classes=3),
                    {"name": HOSTILE_NAME, "classes": sorted(HOSTILE_CLASSES)})
    proc, url = start_server({**os.environ, "CIFARVIZ_DATA": str(data), "CIFARVIZ_RUNS": str(runs_dir),
                              "CIFARVIZ_LOCK_DATA": "1"})
    yield url
    stop_server(proc)


def test_names_are_shown_as_text_and_never_fetched(browser, hostile_server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(300_000)
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(f"{hostile_server}/evaluate")
        wait_idle(page)
        picker = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").filter(has_text="Checkpoint")
        picker.click()
        page.keyboard.type("hostile")
        page.keyboard.press("Enter")
        wait_idle(page)
        main = page.locator("[data-testid='stMain']")
        text = main.inner_text().replace("\u2060", "")  # the word joiner that keeps a URL from being linked
        assert shown(HOSTILE_NAME) in text, text[:1500]  # the name, character for character (less the RTL override)
        assert_healthy(page, "evaluate with a hostile checkpoint name")
        bad = main.locator("a[href*='127.0.0.1:9'], .katex")
        assert bad.count() == 0, bad.first.evaluate("e => e.parentElement.outerHTML")  # not a link, not maths
        screenshot(page, "hostile-names-evaluate")

        page.goto(f"{hostile_server}/dataset")
        wait_idle(page)
        page.get_by_role("tab", name="Samples").click()
        wait_idle(page)
        text = main.inner_text().replace("\u2060", "")  # the word joiner that keeps a URL from being linked
        for name in HOSTILE_CLASSES:
            assert name in text, (name, text[:1500])
        # Rendered, they would be a bold word, a red span, a KaTeX formula, an image.
        assert main.locator("strong").filter(has_text=re.compile(r"^bold$")).count() == 0
        assert main.locator(".katex").count() == 0
        assert page.locator("img[src*='127.0.0.1:9'], a[href*='127.0.0.1:9']").count() == 0
        assert not [url for url in requested if "127.0.0.1:9/" in url]
        screenshot(page, "hostile-names-dataset")
    finally:
        context.close()
