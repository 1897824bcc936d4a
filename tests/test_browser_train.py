"""The Train page in a real browser: Start a short run with the demo defaults, watch its curve grow, see that another
browser cannot stop it while a reload of this one still can, Stop it.

The run lands in the server's own runs folder ($CIFARVIZ_RUNS, else REPO/runs); the test removes what it created.
"""

import os
import re
import shutil
import time
from pathlib import Path

from browser import REPO, assert_healthy, cut_off_texts, screenshot, wait_idle  # fixtures: conftest.py

from cifarviz.services import runs

STEP_TEXT = re.compile(r"Epoch (\d+)/(\d+), step ([\d,]+)/([\d,]+)")
VAL_SHOWN = re.compile(r"Val accuracy\s+\d+\.\d%")


def server_runs_dir() -> Path:
    return REPO / os.environ.get("CIFARVIZ_RUNS", runs.DEFAULT_RUNS_DIR)  # the server runs in REPO


def current_step(page) -> int:
    text = page.get_by_text(STEP_TEXT).first.inner_text(timeout=120_000)
    return int(STEP_TEXT.search(text).group(3).replace(",", ""))


def test_start_watch_the_curve_grow_and_stop(page, server, browser):
    root = server_runs_dir()
    before = {r.id for r in runs.list_runs(root)}
    try:
        page.goto(f"{server}/train")
        page.get_by_role("heading", name="Train").first.wait_for()
        wait_idle(page)
        assert_healthy(page, "train")
        epochs = page.get_by_label("Epochs", exact=True)
        epochs.fill("20")  # long enough that Stop is what ends it
        epochs.press("Enter")
        wait_idle(page)
        page.get_by_role("button", name="Start", exact=True).click()
        current_step(page)  # the live view appears by itself (no reload) once the worker trains
        page.wait_for_timeout(2000)  # the smooth scroll to it
        top = page.locator("[class*='st-key-live-']").first.bounding_box()["y"]
        assert 0 <= top < page.viewport_size["height"] - 150, f"the live curves start at y={top}, out of view"

        # The run is this browser's: another browser (its own cookie) watches it but cannot stop it, and a reload
        # here is still its owner (the Stop clicked at the end is this tab's, after the reload).
        other = browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            stranger = other.new_page()
            stranger.set_default_timeout(120_000)
            stranger.goto(f"{server}/train")
            stranger.get_by_text(STEP_TEXT).first.wait_for()
            theirs = stranger.locator("[class*='st-key-live-']").first.get_by_role("button", name="Stop")
            assert theirs.is_disabled(), "another browser could stop this browser's run"
        finally:
            other.close()
        page.reload()
        first = current_step(page)

        live = page.locator("[class*='st-key-live-']").first
        loss_chart = live.locator("[data-testid='stVegaLiteChart']").first
        loss_chart.wait_for(timeout=60_000)
        early = loss_chart.screenshot()
        deadline = time.monotonic() + 180
        while current_step(page) <= first or not VAL_SHOWN.search(live.inner_text()):
            assert time.monotonic() < deadline, "the run made no progress in 3 minutes"
            page.wait_for_timeout(1000)  # the page redraws itself every 2 s
        page.wait_for_timeout(2500)
        assert loss_chart.screenshot() != early, "the loss curve did not change while the run trained"
        assert VAL_SHOWN.search(live.inner_text())  # an epoch ended: a validation point
        screenshot(page, "train-live")
        assert_healthy(page, "train while training")
        assert cut_off_texts(page, "[data-testid='stMain']") == []
        size = page.viewport_size
        page.set_viewport_size({"width": 1024, "height": 768})  # a projector
        page.wait_for_timeout(2500)  # a redraw at the new size
        screenshot(page, "train-live-1024x768")
        assert cut_off_texts(page, "[data-testid='stMain']") == []
        page.set_viewport_size(size)

        [run_id] = {r.id for r in runs.list_runs(root)} - before
        stop = live.get_by_role("button", name="Stop")
        assert stop.is_enabled(), "the reloaded tab is no longer the run's owner"
        stop.click()
        page.get_by_text(re.compile(re.escape(run_id) + r" (stopped|completed)")).wait_for(timeout=120_000)
        assert runs.load_run(run_id, root).has_model
        assert_healthy(page, "train after the run")
        page.set_viewport_size({"width": 1024, "height": 768})  # "Use in other pages" whole on a projector
        page.wait_for_timeout(2500)
        page.get_by_role("button", name="Use in other pages").first.scroll_into_view_if_needed()
        screenshot(page, "train-finished-1024x768")
        assert cut_off_texts(page, "[data-testid='stMain']") == []
        page.set_viewport_size(size)
    finally:
        for run in runs.list_runs(root):
            if run.id in before:
                continue
            runs.request_stop(run.id, root)
            deadline = time.monotonic() + 60
            while runs.load_run(run.id, root).state in runs.ACTIVE and time.monotonic() < deadline:
                time.sleep(0.5)
            shutil.rmtree(run.dir, ignore_errors=True)
