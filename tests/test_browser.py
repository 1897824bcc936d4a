"""One real-browser walk through the explorer: Debian's chromium driven by Playwright.

Starts `streamlit run streamlit_app.py` on a free local port, visits every page, clicks a
confusion-matrix cell and then one of its images, and checks that the inspector shows that
image's prediction as the library computes it. It also screenshots every page, every tab and
an open inspector at a projector's 1024x768 and a laptop's 1400x900 (into bench/results/screenshots/,
git-ignored) and checks that no page shows an exception, a traceback or text cut off with an ellipsis.
"""

import re

import pytest
from browser import REPO, assert_healthy, cut_off_texts, new_page, screenshot, wait_idle  # fixtures: conftest.py

from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.store.artifacts import split_artifacts

PAGES = (("home", "", "cifarviz"), ("dataset", "dataset", "Dataset"), ("train", "train", "Train"),
         ("evaluate", "evaluate", "Evaluate"), ("predictions", "predictions", "Predictions"),
         ("embeddings", "embeddings", "Embeddings"),
         ("influence", "influence", "Influence"), ("models", "models", "Models"))
VIEWPORTS = ((1024, 768), (1400, 900))
README_SIZE, README_SHOTS = "1400x900", {"evaluate", "predictions", "influence", "embeddings", "train"}
DOCS_SHOTS = REPO / "docs" / "screenshots"
TRUNCATION_CHECKED = {name for name, _, _ in PAGES}


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


def hover_a_point(page, chart, tries: int = 400):
    """Move the mouse over the map until the tooltip shows an image: (x, y, image index, true class)."""
    import random

    box = chart.bounding_box()
    rng = random.Random(0)
    for _ in range(tries):  # the middle of the plot, where the points are (the legend is on the right)
        x, y = box["x"] + box["width"] * rng.uniform(0.1, 0.7), box["y"] + box["height"] * rng.uniform(0.1, 0.9)
        page.mouse.move(x, y)
        page.wait_for_timeout(60)
        text = page.evaluate("() => { const t = document.querySelector('#vg-tooltip-element');"
                             " return t && t.classList.contains('visible') ? t.innerText : ''; }")
        found = re.search(r"image #\s*(\d+).*?true class\s*(\w+)", text, re.DOTALL)
        if found:
            return x, y, int(found.group(1)), found.group(2)
    raise AssertionError("no point of the map showed a tooltip")


def test_embedding_map_hover_shows_the_image_and_a_click_opens_its_inspector(page, server, cifar):
    page.goto(f"{server}/embeddings")
    chart = page.locator("[data-testid='stVegaLiteChart']").first
    chart.wait_for()
    wait_idle(page)
    x, y, index, true_name = hover_a_point(page, chart)
    assert page.locator("#vg-tooltip-element img").count() == 1  # the thumbnail
    assert cifar.classes[cifar.test.labels[index]] == true_name
    page.mouse.click(x, y)
    inspector = page.locator("[role=dialog] .st-key-inspector")
    inspector.wait_for()
    wait_idle(page)
    text = inspector.inner_text()
    assert f"test image #{index}" in text.lower() and f"True label: {true_name}" in text
    arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors"), cifar, "test")
    assert f"Predicted: {cifar.classes[arts.predicted[index]]} ({arts.probs[index].max():.1%})" in text
    page.keyboard.press("Escape")
    inspector.wait_for(state="detached")
    wait_idle(page)  # the map is drawn afresh after a click

    box = page.locator("[data-testid='stVegaLiteChart']").first.bounding_box()  # drag a box: its images below
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45, steps=8)
    page.mouse.up()
    page.get_by_text(re.compile(r"[\d,]+ images in the box")).wait_for()
    wait_idle(page)
    assert page.locator("[class*='st-key-emb-selection-test-'] button").count() > 0
    assert_healthy(page, "embeddings selection")


@pytest.mark.parametrize("width,height", VIEWPORTS, ids=[f"{w}x{h}" for w, h in VIEWPORTS])
def test_screenshots_every_page_tab_and_the_inspector(browser, server, width, height):
    """Every page renders (its heading, no exception, no traceback, nothing cut off), every tab and an open
    inspector, at a projector's and a laptop's size; the first size also waits out the cold computations."""
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
            if size == README_SIZE and name in README_SHOTS:  # the README's pictures, current with every run
                page.screenshot(path=DOCS_SHOTS / f"{name}.jpg", type="jpeg", quality=70)
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
        if size == README_SIZE:
            page.screenshot(path=DOCS_SHOTS / "inspector.jpg", type="jpeg", quality=70)
        print(f"{size}: cut off in the inspector: {cut_off_texts(page, '[role=dialog]')}")
    finally:
        page.close()
    for where, texts in cut_off.items():
        print(f"{size}: cut off on {where}: {texts}")
    assert not {where: texts for where, texts in cut_off.items()
                if texts and where.split(" / ")[0] in TRUNCATION_CHECKED}, "text cut off with an ellipsis"
