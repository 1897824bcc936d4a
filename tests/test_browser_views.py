"""What a teacher in front of a class relies on, in chromium: a click on the confusion matrix outlines the cell just
clicked (not the one before), a link opens the same view in another browser, Home's lesson steps open their
pages with their selection made, and an answer far down a page is scrolled into view."""

import re
from urllib.parse import parse_qs, urlparse

import numpy as np
from browser import REPO, assert_healthy, wait_idle  # fixtures: conftest.py
from PIL import Image

from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.store.artifacts import split_artifacts

CAPTION = re.compile(r"[\d,]+ (test|val) images are .* predicted as")


def red_box(png: bytes) -> tuple[int, int, int, int] | None:
    """The bounding box (left, top, right, bottom) of the chart's red outline (#d62728), in the screenshot's pixels."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (abs(pixels[..., 0] - 214) < 30) & (abs(pixels[..., 1] - 39) < 30) & (abs(pixels[..., 2] - 40) < 30)
    ys, xs = np.nonzero(red)
    return (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) > 20 else None


def caption(page) -> str:
    return page.get_by_text(CAPTION).first.inner_text()


def test_two_clicks_in_a_row_outline_the_cell_clicked_last(page, server):
    page.goto(f"{server}/evaluate")
    chart = page.locator("[data-testid='stVegaLiteChart']").first
    chart.wait_for()
    wait_idle(page)
    box = chart.bounding_box()
    for fx, fy in ((0.55, 0.45), (0.8, 0.2), (0.45, 0.7)):  # three cells in a row, each away from the last
        before = caption(page)
        x, y = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
        page.mouse.click(x, y)
        page.wait_for_function("(before) => ![...document.querySelectorAll('p')].some(p => p.innerText === before)",
                               arg=before)
        wait_idle(page)
        page.wait_for_timeout(800)  # the chart redraws with its new outline
        outline = red_box(chart.screenshot())
        assert outline is not None, "no cell is outlined"
        left, top, right, bottom = outline
        inside = left <= x - box["x"] <= right and top <= y - box["y"] <= bottom
        assert inside, f"the outline {outline} is not on the cell clicked at {(x - box['x'], y - box['y'])}"
        assert (right - left) < box["width"] / 5  # one cell, not a row
        assert_healthy(page, "evaluate after a click")


def test_a_link_opens_the_same_view_in_another_browser(browser, server, cifar):
    """The address of a view, opened in a fresh browser context (another student), shows the same view."""
    teacher = browser.new_context(viewport={"width": 1400, "height": 900})
    student = browser.new_context(viewport={"width": 1024, "height": 768})
    try:
        page = teacher.new_page()
        page.set_default_timeout(300_000)
        page.goto(f"{server}/evaluate?checkpoint=lenet&split=val&cell=dog,cat")
        page.get_by_text(re.compile(r"val images are dog predicted as cat")).first.wait_for()
        wait_idle(page)
        assert "Evaluating lenet" in page.get_by_text(re.compile("^Evaluating ")).first.inner_text()
        arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "lenet.safetensors"), cifar, "val")
        dog, cat = cifar.classes.index("dog"), cifar.classes.index("cat")
        expected = int(((arts.labels == dog) & (arts.predicted == cat)).sum())
        assert caption(page).startswith(f"{expected:,} val images are dog predicted as cat")
        page.locator("[data-testid='stSidebar']").get_by_text("Link to this view").click()
        link = page.locator("[data-testid='stPopoverBody'] code").first.inner_text().strip()
        view = {"checkpoint": ["lenet"], "split": ["val"], "cell": ["dog,cat"]}
        assert parse_qs(urlparse(link).query) == view, link
        assert parse_qs(urlparse(page.url).query) == view  # the address bar too

        other = student.new_page()
        other.set_default_timeout(300_000)
        other.goto(link)
        other.get_by_text(re.compile(r"val images are dog predicted as cat")).first.wait_for()
        wait_idle(other)
        assert caption(other) == caption(page)
        assert_healthy(other, "a linked view")

        other.goto(f"{server}/influence?checkpoint=fastnet&test=7")  # an influence lookup
        other.get_by_text(re.compile(r"Test image #7: true label")).first.wait_for()
        wait_idle(other)
        other.goto(f"{server}/dataset?image=test-5")  # an image, in the inspector
        inspector = other.locator("[role=dialog] .st-key-inspector")
        inspector.wait_for()
        assert "test image #5" in inspector.inner_text().lower()
        other.goto(f"{server}/evaluate?cell=no-such-class,<b>x</b>&split=../../etc&checkpoint=nothing")
        other.get_by_text(CAPTION).first.wait_for()  # nonsense in a link is ignored: the default view
        wait_idle(other)
        assert_healthy(other, "a link with nonsense in it")
    finally:
        teacher.close()
        student.close()


def test_the_lesson_steps_open_their_pages_with_a_selection(page, server, cifar):
    # The test predictions on disk (the server shares this cache): Home picks its cell from them, never computes
    arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors"), cifar, "test")
    page.goto(f"{server}/")
    page.get_by_text("A lesson in five steps").wait_for()
    wait_idle(page)
    steps = page.locator(".st-key-lesson a")
    assert steps.count() == 5
    assert [steps.nth(i).inner_text().split("\n")[-1].strip() for i in range(5)] == [
        "1. The data", "2. Train", "3. Where it is wrong", "4. What it learned", "5. Why it decided"]
    steps.nth(2).click()
    page.get_by_text(CAPTION).first.wait_for()
    wait_idle(page)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (arts.labels, arts.predicted), 1)
    np.fill_diagonal(confusion, 0)
    t, p = np.unravel_index(confusion.argmax(), confusion.shape)
    assert f"are {cifar.classes[t]} predicted as {cifar.classes[p]}" in caption(page)


def test_a_clicked_test_image_on_influence_brings_its_answer_into_view(page, server):
    page.set_viewport_size({"width": 1024, "height": 768})
    try:
        page.goto(f"{server}/influence")
        page.get_by_text(re.compile(r"Test image #\d+: true label")).first.wait_for()
        wait_idle(page)
        tiles = page.locator("[class*='st-key-influence-pick-test-'] button >> visible=true")
        index = re.search(r"#(\d+)", tiles.nth(5).inner_text()).group(1)
        tiles.nth(5).click()
        heading = page.get_by_text(re.compile(rf"Test image #{index}: true label")).first
        heading.wait_for()
        wait_idle(page)
        page.wait_for_timeout(1500)  # the smooth scroll
        top = heading.bounding_box()["y"]
        assert 0 <= top < 768 - 200, f"the answer's heading is at y={top}, out of view"
    finally:
        page.set_viewport_size({"width": 1600, "height": 1200})


def test_a_cells_images_and_an_influence_lookup_download_as_csv_and_json(page, server, cifar):
    """What the buttons download is the selection on screen, every image of it: the cell's images in the page's
    order (most confident first), and the lookup's helpful then harmful training images with their scores."""
    import csv
    import io
    import json

    arts = split_artifacts(load_checkpoint(REPO / "checkpoints" / "fastnet.safetensors"), cifar, "test")
    cat, dog = cifar.classes.index("cat"), cifar.classes.index("dog")
    cell = np.flatnonzero((arts.labels == cat) & (arts.predicted == dog))
    cell = cell[np.argsort(-arts.probs[cell, dog], kind="stable")]
    page.goto(f"{server}/evaluate?checkpoint=fastnet&cell=cat,dog")
    page.get_by_text(re.compile(r"test images are cat predicted as dog")).first.wait_for()
    wait_idle(page)
    with page.expect_download() as download:
        page.locator(".st-key-export-cell button >> visible=true").filter(has_text="CSV").click()
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    assert [int(r["index"]) for r in rows] == cell.tolist()  # all 90, not only the 24 drawn
    assert {r["label"] for r in rows} == {"cat"} and {r["prediction"] for r in rows} == {"dog"}
    assert [int(r["source_index"]) for r in rows] == cifar.test.source_index[cell].tolist()
    assert np.allclose([float(r["confidence"]) for r in rows], arts.probs[cell].max(1))

    page.goto(f"{server}/influence?checkpoint=fastnet&method=head&test=7")
    page.get_by_text(re.compile(r"Test image #7: true label")).first.wait_for()
    wait_idle(page)
    with page.expect_download() as download:
        page.locator(".st-key-export-test-7 button >> visible=true").filter(has_text="JSON").click()
    saved = json.loads(open(download.value.path(), encoding="utf-8").read())
    assert saved["about"]["query"]["test_index"] == 7 and saved["about"]["method"] == "head"
    effects = [row["effect"] for row in saved["images"]]
    assert effects == ["helpful"] * 8 + ["harmful"] * 8  # "Images per list": 8
    scores = [row["score"] for row in saved["images"]]
    assert all(s > 0 for s in scores[:8]) and all(s < 0 for s in scores[8:])
    assert scores[:8] == sorted(scores[:8], reverse=True)
    shown = page.locator("[class*='st-key-test-7-helpful-train-'] >> visible=true").first.get_attribute("class")
    assert int(re.search(r"st-key-test-7-helpful-train-(\d+)", shown).group(1)) == saved["images"][0]["index"]
