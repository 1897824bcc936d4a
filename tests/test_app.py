"""The explorer through Streamlit's AppTest, on the real development data and the shipped checkpoints."""

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import visible
from PIL import Image
from streamlit.testing.v1 import AppTest

from cifarviz.analysis.explore import ImageRef, confusion_cell_indices
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.core.models import model_card
from cifarviz.store import default_store
from cifarviz.store.artifacts import split_artifacts

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints"


def app_at(page: str, cifar) -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    run_until(at, lambda at: len(at.progress) == 0, f"{page} without a progress bar")  # first visits compute
    return at


def open_tab(at, key: str, label: str) -> None:
    """Select a keyed tab (pages draw only the open one) and rerun, as a click on it does."""
    at.session_state[key] = label
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def run_until(at, ready, what: str, timeout: float = 300) -> None:
    """Rerun the page until `ready(at)`: pages draw a progress bar and fill in when background work finishes."""
    deadline = time.monotonic() + timeout
    while not ready(at):
        assert time.monotonic() < deadline, f"{what} never arrived"
        time.sleep(1)
        at.run()
        assert not at.exception, [e.value for e in at.exception]


def wait_for_neighbours(at) -> None:
    """The inspector fills in its neighbours when the training features (computed in the background) are ready."""
    run_until(at, lambda at: any(b.key and b.key.startswith("neighbours-train-") for b in at.button), "neighbours")


def texts(at) -> str:
    return visible("\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.subheader]))


@pytest.fixture(scope="module")
def fastnet_test(cifar):
    checkpoint = load_checkpoint(SHIPPED / "fastnet.safetensors")
    return split_artifacts(checkpoint, cifar, "test")


@pytest.mark.slow
def test_home_lists_the_zoo_with_measured_accuracy(cifar):
    at = app_at("pages/home.py", cifar)
    table = at.dataframe[0].value
    assert {"fastnet", "s8net-bn", "lenet"} <= set(table["model"])
    stored = json.loads((SHIPPED / "fastnet.json").read_text())["metrics"]["test_accuracy"]
    assert table.set_index("model").loc["fastnet", "test accuracy"] == pytest.approx(100 * stored)  # in points:
    assert table.shape[0] == len(list(SHIPPED.glob("*.safetensors")))  # shown as "%.2f%%", no empty row
    assert "image-folder tree" in texts(at)


@pytest.mark.slow
def test_dataset_page_grids_filters_and_inspector(cifar):
    at = app_at("pages/dataset.py", cifar)
    assert [t.label for t in at.tabs] == ["Class counts", "Samples", "Statistics", "Augmentation", "Browser"]
    assert not [b for b in at.button if b.key and b.key.startswith("sample-")]  # only the open tab is drawn
    open_tab(at, "dataset_tab", "Samples")
    first = [b for b in at.button if b.key and b.key.startswith("sample-airplane-")]
    assert len(first) == 8
    before = {b.key for b in first}
    [b for b in at.button if b.label == "Reshuffle"][0].click().run()
    after = {b.key for b in at.button if b.key and b.key.startswith("sample-airplane-")}
    assert after and after != before

    # browser: filter by class, every shown image is of that class
    open_tab(at, "dataset_tab", "Browser")
    assert not [b for b in at.button if b.key and b.key.startswith("sample-")]
    at.multiselect(key="browse_classes").set_value(["frog"]).run()
    at.selectbox(key="browse_split").set_value("test").run()
    shown = [b for b in at.button if b.key and b.key.startswith("browse-test-")]
    assert len(shown) == 32
    assert all(cifar.test.labels[int(b.key.rsplit("-", 1)[1])] == cifar.classes.index("frog") for b in shown)

    # clicking an image opens the inspector with that image
    shown[3].click().run()
    index = int(shown[3].key.rsplit("-", 1)[1])
    assert f"Test image #{index}" in texts(at)
    assert "**True label:** frog" in texts(at)


@pytest.mark.slow
def test_evaluate_confusion_cell_and_inspector(cifar, fastnet_test):
    at = app_at("pages/evaluate.py", cifar)
    accuracy = (fastnet_test.predicted == fastnet_test.labels).mean()
    assert at.metric[0].value == f"{accuracy:.2%}"
    at.selectbox(key="cm_true").set_value("cat").run()
    at.selectbox(key="cm_pred").set_value("dog").run()
    expected = confusion_cell_indices(fastnet_test.labels, fastnet_test.predicted, 3, 5)
    shown = [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("cell-test-")]
    assert shown and set(shown) <= set(expected.tolist()) and len(shown) == min(24, len(expected))  # beside it
    confidence = fastnet_test.probs[shown, 5]
    assert (np.diff(confidence) <= 0).all() and confidence[-1] >= np.sort(fastnet_test.probs[expected, 5])[-24]
    button = next(b for b in at.button if b.key == f"cell-test-{shown[0]}")
    button.click().run()
    page = texts(at)
    assert f"Test image #{shown[0]}" in page and "**Predicted:** dog" in page
    assert "Nearest training images" in page
    wait_for_neighbours(at)
    assert len([b for b in at.button if b.key and b.key.startswith("neighbours-train-")]) == 8
    at.button(key="inspector-close").click().run()
    assert "Test image #" not in texts(at) and "inspect" not in at.session_state


def confusion_cells(at) -> tuple[dict, dict]:
    """The confusion chart's cells as the browser receives them (Streamlit sends the data as Arrow tables)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    chart = at.get("vega_lite_chart")[0].proto
    frame = convert_arrow_bytes_to_pandas_df(chart.datasets[0].data.data)
    return {(c["true"], c["predicted"]): c for c in frame.to_dict("records")}, json.loads(chart.spec)


@pytest.mark.slow
def test_confusion_matrix_normalised_by_row(cifar, fastnet_test):
    """The toggle shows each cell as its share of the true class: the diagonal is each class's recall."""
    at = app_at("pages/evaluate.py", cifar)
    cells, spec = confusion_cells(at)
    assert cells[("cat", "dog")]["count"] == len(confusion_cell_indices(fastnet_test.labels, fastnet_test.predicted, 3, 5))
    assert "row" not in json.dumps(spec["layer"][1]["encoding"]["text"])  # counts drawn while off
    at.toggle(key="cm_by_row").set_value(True).run()
    cells, spec = confusion_cells(at)
    cats = fastnet_test.labels == 3
    recall = 100 * (fastnet_test.predicted[cats] == 3).mean()
    assert cells[("cat", "cat")]["share"] == pytest.approx(recall, abs=0.05)
    assert sum(cells[("cat", p)]["share"] for p in cifar.classes) == pytest.approx(100, abs=0.5)
    assert spec["layer"][1]["encoding"]["text"]["field"] == "label"  # "73.1%" drawn in each cell
    assert "percent of the row" in texts(at)


@pytest.mark.slow
def test_calibration_is_fitted_on_val_measured_on_test_and_shown_in_the_inspector(cifar, fastnet_test):
    """fastnet was trained with label smoothing 0.2: underconfident. The temperature that minimises the plain NLL
    on the validation split (fitted here independently, with torch's LBFGS on log T) sharpens it, and on the
    held-out test split the calibration error and the NLL both fall; the inspector's switch shows the scaled
    probability of that image."""
    from cifarviz.analysis.calibration import scaled_probabilities
    from cifarviz.analysis.metrics import reliability

    val = split_artifacts(load_checkpoint(SHIPPED / "fastnet.safetensors"), cifar, "val")
    logp, labels = torch.log(torch.as_tensor(val.probs, dtype=torch.float64).clamp_min(1e-12)), torch.as_tensor(val.labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    temperature = float(log_t.detach().exp())
    assert 0.3 < temperature < 0.8  # sharpened: label smoothing left it underconfident

    at = app_at("pages/evaluate.py", cifar)
    metrics = {m.label: m for m in at.metric}
    _, ece_before = reliability(fastnet_test.probs, fastnet_test.labels)
    _, ece_after = reliability(scaled_probabilities(fastnet_test.probs, temperature), fastnet_test.labels)
    assert ece_before > 0.1 and ece_after < ece_before / 4
    assert metrics["ECE on test"].value == f"{ece_after:.3f}"
    assert f"T = {temperature:.2f}" in texts(at) and "5,000 validation images" in texts(at)

    index = int(np.flatnonzero(fastnet_test.predicted == fastnet_test.labels)[0])
    at.session_state["inspect"] = ImageRef("test", index)
    at.run()
    plain = fastnet_test.probs[index].max()
    assert f"({plain:.1%})" in texts(at)
    at.toggle(key="calibrated-inspector").set_value(True).run()
    scaled = scaled_probabilities(fastnet_test.probs[index][None], temperature)[0].max()
    assert f"({scaled:.1%})" in texts(at) and "temperature-scaled" in texts(at)
    assert at.session_state["calibrated_probabilities"] is True  # one setting: Evaluate's switch follows
    assert at.toggle(key="calibrated-evaluate").value is True


@pytest.mark.slow
def test_switching_checkpoint_changes_the_numbers(cifar):
    at = app_at("pages/evaluate.py", cifar)
    fast = at.metric[0].value
    at.sidebar.selectbox(key="checkpoint_label").set_value("lenet (shipped)").run()
    run_until(at, lambda at: len(at.metric) > 0, "lenet's metrics")  # computed in the background, then shown
    stored = json.loads((SHIPPED / "lenet.json").read_text())["metrics"]["test_accuracy"]
    assert at.metric[0].value == f"{stored:.2%}" != fast
    at.switch_page("pages/dataset.py").run()  # the choice holds across pages
    assert at.sidebar.selectbox(key="checkpoint_label").value == "lenet (shipped)"


def _png(width, height, colour=(20, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_uploads_own_image_and_bad_images(cifar):
    at = app_at("pages/evaluate.py", cifar)
    at.file_uploader(key="own_image").set_value(("photo.png", _png(200, 150), "image/png")).run()
    assert not at.exception and "Your uploaded image" in texts(at)
    assert "**Predicted:**" in texts(at)
    at.file_uploader(key="own_image").set_value(("notes.txt", b"not an image at all", "text/plain")).run()
    assert any("not an image" in visible(e.value) for e in at.error)
    at.file_uploader(key="own_image").set_value(("huge.png", _png(10000, 5000), "image/png")).run()  # 50 megapixels
    assert any("10000x5000" in visible(e.value) for e in at.error) and not at.exception


@pytest.mark.slow
def test_models_page_summary_and_checkpoint_uploads(cifar, tmp_path):
    at = app_at("pages/models.py", cifar)
    assert "s8net-ln" in set(at.dataframe[0].value["model"])
    assert at.selectbox(key="summary_model").value == "fastnet"  # the sidebar's network first
    at.selectbox(key="summary_model").set_value("s8net-bn").run()
    summary = at.dataframe[1].value
    assert summary["parameters"].sum() == 37664

    open_tab(at, "models_tab", "Upload a checkpoint")  # only the open tab is drawn
    assert len(at.dataframe) == 1  # the zoo table only: the layer summary's tab is closed
    at.file_uploader(key="checkpoint_upload").set_value(("broken.safetensors", b"\x00garbage", "application/octet-stream")).run()
    assert any("broken.safetensors" in visible(e.value) for e in at.error) and not at.exception

    foreign = io.BytesIO()
    torch.save({"encoder.weight": torch.zeros(4, 4)}, foreign)  # another architecture entirely
    at.file_uploader(key="checkpoint_upload").set_value(("foreign.pth", foreign.getvalue(), "application/octet-stream")).run()
    assert any("match no zoo architecture" in visible(e.value) for e in at.error)

    good = io.BytesIO()
    torch.save(load_checkpoint(SHIPPED / "lenet.safetensors").model.state_dict(), good)
    at.file_uploader(key="checkpoint_upload").set_value(("mine.pth", good.getvalue(), "application/octet-stream")).run()
    assert any("architecture lenet" in visible(s.value) for s in at.success)
    assert at.sidebar.selectbox(key="checkpoint_label").value == "mine (uploaded)"


@pytest.mark.slow
def test_wrong_data_folder_explains_and_keeps_serving(cifar, tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "x.png")
    at = app_at("pages/dataset.py", cifar)
    at.sidebar.text_input(key="data_root").set_value(str(tmp_path)).run()
    assert not at.exception
    assert any("No CIFAR-10 data" in w.value for w in at.warning)
    said = at.get("code")[0]
    assert "Looked in" in said.value and "--data PATH" not in said.value  # a CLI flag means nothing here
    assert said.proto.wrap_lines  # wrapped to the page: nothing lost off its right edge at 1024 px
    assert "Data folder* in the sidebar" in texts(at)  # what to do, in the app's terms
    assert "does not look like CIFAR-10" in "\n".join(c.value for c in at.code)
    at.switch_page("pages/models.py").run()  # pages that need no data still work
    assert not at.exception and len(at.dataframe) >= 1


# --------------------------------------------------------------------------- inspector and classroom settings


@pytest.mark.slow
def test_inspector_explains_the_class_it_calls_predicted(cifar, fastnet_test):
    """With flip TTA the page's prediction can differ from the plain argmax; Grad-CAM must follow the page."""
    from cifarviz.core.inference import predict

    checkpoint = load_checkpoint(SHIPPED / "fastnet.safetensors")
    plain = predict(checkpoint.model, cifar.test.images[:2000], features=False).predicted
    differs = int(next(i for i in range(2000) if plain[i] != fastnet_test.predicted[i]))
    at = app_at("pages/dataset.py", cifar)
    at.session_state["inspect"] = ImageRef("test", differs)
    at.run()
    predicted = cifar.classes[fastnet_test.predicted[differs]]
    assert f"**Predicted:** {predicted}" in texts(at)
    explained = at.selectbox(key=f"cam-test-{differs}")
    assert explained.value == predicted
    def caption() -> str:
        return next(c for image in at.image for c in image.captions if c.startswith("Where the model"))

    assert caption() == (f"Where the model found evidence for '{predicted}' (the predicted class), "
                         "by Grad-CAM at features.4.conv1")  # the last convolution whose map is at least 4x4
    other = next(c for c in cifar.classes if c != predicted)
    explained.set_value(other).run()
    assert not at.exception and at.selectbox(key=f"cam-test-{differs}").value == other
    assert caption().startswith(f"Where the model found evidence for '{other}' (not the predicted class)")

    # the layer is the reader's choice, among the network's convolutions, each with its map's size
    layer = at.selectbox(key="cam_layer")
    assert "features.0 (31x31)" in layer.options and "features.4.conv2 (3x3)" in layer.options
    layer.set_value("features.2.conv1").run()
    assert not at.exception and caption().endswith("by Grad-CAM at features.2.conv1")
    # and a pixel attribution computed by Captum, kept while other images are opened
    at.selectbox(key="attribution_method").set_value("occlusion").run()
    assert not at.exception and caption().endswith("by Occlusion (Captum)")
    assert not any(s.key == "cam_layer" for s in at.selectbox)  # a layer only for Grad-CAM
    at.session_state["inspect"] = ImageRef("test", 0)
    at.run()
    assert caption().endswith("by Occlusion (Captum)")


@pytest.mark.slow
def test_classroom_mode_locks_the_data_folder_and_uploads(cifar, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CLASSROOM", "1")
    monkeypatch.setenv("CIFARVIZ_DATA", str(cifar.root))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = "/etc"  # a student's earlier choice is ignored
    at.run()
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception
    box = at.sidebar.text_input(key="data_root")
    assert box.disabled and box.value == str(cifar.root)
    assert not at.file_uploader and "Uploads are turned off on this server." in texts(at)


def test_uploaded_checkpoints_are_bounded_on_disk(tmp_path):
    from cifarviz.ui.app import prune_uploads

    for i in range(7):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(b"x")
        path.with_suffix(".json").write_text("{}")
        os.utime(path, (1000 + i, 1000 + i))
    prune_uploads(tmp_path, keep=3)
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["4", "5", "6"]
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["4", "5", "6"]


def test_one_dataset_cache_entry_per_folder(tmp_path):
    from cifarviz.ui.app import canonical_root

    (tmp_path / "data").mkdir()
    spellings = [str(tmp_path / "data"), str(tmp_path / "data") + "/", str(tmp_path / "data" / ".." / "data"),
                 str(tmp_path / "." / "data")]
    assert len({canonical_root(s) for s in spellings}) == 1


@pytest.mark.slow
def test_ambiguous_state_dict_upload_asks_which_architecture(cifar):
    from cifarviz.core.models import create_model

    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.save(create_model("deepnet-res").state_dict(), buffer)
    at = app_at("pages/models.py", cifar)
    open_tab(at, "models_tab", "Upload a checkpoint")
    at.file_uploader(key="checkpoint_upload").set_value(("mine.pth", buffer.getvalue(), "application/octet-stream")).run()
    assert not at.exception and any("deepnet-conv, deepnet-res" in visible(w.value) for w in at.warning)
    assert at.sidebar.selectbox(key="checkpoint_label").value != "mine (uploaded)"  # nothing guessed
    choice = next(s for s in at.selectbox if s.key and s.key.startswith("upload_arch_"))
    choice.set_value("deepnet-res").run()
    assert any("architecture deepnet-res" in visible(s.value) for s in at.success)
    assert at.sidebar.selectbox(key="checkpoint_label").value == "mine (uploaded)"


@pytest.mark.slow
def test_hostile_uploads_get_clear_messages_and_the_server_keeps_serving(cifar, tmp_path):
    """Rows of the bad-input table (tests/test_bad_inputs.py) through the app's upload."""
    from test_bad_inputs import CASES

    at = app_at("pages/models.py", cifar)
    open_tab(at, "models_tab", "Upload a checkpoint")
    for case in [c for c in CASES if c.id in {"widths-3000", "tta-bogus", "pt-random-bytes", "pt-needs-code",
                                               "input-std-zero", "pt-empty"}]:
        path = case.make(tmp_path / case.id if (tmp_path / case.id).mkdir() is None else tmp_path)
        at.file_uploader(key="checkpoint_upload").set_value((path.name, path.read_bytes(), "application/octet-stream"))
        at.run()
        assert not at.exception, case.id
        message = visible("\n".join(e.value for e in at.error))
        assert all(word in message for word in case.words), (case.id, message)
    at.switch_page("pages/evaluate.py").run()  # and every page still works
    assert not at.exception and at.metric


@pytest.mark.slow
def test_imported_modules_are_kept_out_of_the_collectors_reach(cifar):
    """Streamlit runs a full gc.collect() after every script run; the ~300,000 long-lived objects of torch,
    scikit-learn and Streamlit itself must not be walked each time (0.2-0.3 s a rerun on a 2-core CPU)."""
    import gc
    import sys

    app_at("pages/home.py", cifar)
    assert gc.get_freeze_count() > 100_000
    init = sys.modules["torch"].nn.Module.__init__
    assert not any(obj is init for obj in gc.get_objects(generation=2))


@pytest.mark.slow
def test_evaluate_shows_plain_predictions_until_the_augmented_ones_arrive(cifar):
    """A cold Evaluate is usable after one pass over the test images: fastnet's flip test-time augmentation needs a
    second, mirrored pass, and the page shows the plain pass's numbers (saying so) until it is done."""
    from cifarviz.services.jobs import file_lock
    from cifarviz.store.artifacts import artifact_path

    checkpoint = load_checkpoint(SHIPPED / "fastnet.safetensors")
    plain = split_artifacts(checkpoint, cifar, "test", tta="none")
    final_path = artifact_path(checkpoint, cifar, "test")
    final_path.unlink(missing_ok=True)
    default_store().forget()  # nor kept in this process's memory
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    with file_lock(final_path):  # the augmented predictions cannot finish while the page is first drawn (Home
        at.run()  # starts them in the background: they wait for the lock too)
        at.switch_page("pages/evaluate.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.metric[0].value == f"{(plain.predicted == plain.labels).mean():.2%}"
        assert "without test-time augmentation for now" in at.markdown[0].value
        assert len(at.progress) == 1
    run_until(at, lambda at: len(at.progress) == 0, "the flip-averaged predictions")
    final = split_artifacts(checkpoint, cifar, "test")
    assert final.tta == "flip"
    assert at.metric[0].value == f"{(final.predicted == final.labels).mean():.2%}"
    assert "with flip test-time augmentation" in at.markdown[0].value


def test_a_first_pass_previews_a_random_sample_whose_interval_holds_the_whole_splits_accuracy(cifar):
    """While a split's first pass runs, what it hands over is a random sample (the development copy stores its test
    split class by class: in the split's order the first 1,000 are all airplanes), the stated 95% interval holds
    the accuracy the whole split ends with, and the stored result is the one a plain pass in order gives."""
    from cifarviz.analysis.metrics import sample_accuracy
    from cifarviz.core.inference import predict
    from cifarviz.store.artifacts import artifact_path, preview_order

    checkpoint = load_checkpoint(SHIPPED / "s8net-bn.safetensors")
    labels = cifar.test.labels
    assert len(set(labels[:1000].tolist())) == 1  # why the order matters: a prefix in order is one class
    artifact_path(checkpoint, cifar, "test", "none").unlink(missing_ok=True)
    default_store().forget()
    partials = []
    arts = split_artifacts(checkpoint, cifar, "test", tta="none", on_partial=partials.append)
    in_order = predict(checkpoint.model, cifar.test.images)
    np.testing.assert_array_equal(arts.logits, in_order.logits)
    np.testing.assert_array_equal(arts.features, in_order.features)

    order = preview_order(len(labels))
    sizes = [len(p.predicted) for p in partials]
    assert sizes == sorted(sizes) and sizes[-1] == len(labels) and sizes[0] <= 256  # the first within a batch or two
    final = float((arts.predicted == labels).mean())
    covered, checked = 0, 0
    for p in partials:
        np.testing.assert_array_equal(p.positions, order[:len(p.predicted)])
        np.testing.assert_array_equal(p.predicted, arts.predicted[p.positions])  # what it said is what it stored
        if 200 <= len(p.predicted) < len(labels):
            accuracy, half = sample_accuracy(p.predicted, labels[p.positions], p.total)
            covered, checked = covered + (abs(accuracy - final) <= half), checked + 1
            shares = np.bincount(labels[p.positions], minlength=10) / len(p.positions)
            assert shares.max() < 0.2, shares  # every class in it, none dominating
    assert checked > 20 and covered / checked >= 0.9, (covered, checked)
    # the same prefixes in the split's own order would have said "all airplanes": far outside
    naive, half = sample_accuracy(arts.predicted[:1000], labels[:1000], len(labels))
    assert abs(naive - final) > half


@pytest.mark.slow
def test_a_cold_evaluate_shows_the_accuracy_so_far_within_seconds(cifar):
    """A first visit on a server that has never predicted the test split: before the first pass is done, Evaluate
    shows the accuracy of the images predicted so far (a random sample), how many, and its interval; then the
    report. The figure shown is the accuracy of exactly those images in the final predictions."""
    import re

    from cifarviz.store.artifacts import artifact_path, preview_order

    checkpoint = load_checkpoint(SHIPPED / "fastnet.safetensors")
    for tta in ("none", "flip"):
        artifact_path(checkpoint, cifar, "test", tta).unlink(missing_ok=True)
    default_store().forget()
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.switch_page("pages/evaluate.py").run()
    previews = []

    def seen(at) -> bool:
        metrics = {m.label: m.value for m in at.metric}
        if "Accuracy so far" in metrics:
            n = int(re.search(r"On ([\d,]+) of the 10,000 test images", texts(at)).group(1).replace(",", ""))
            previews.append((metrics["Accuracy so far"], n, texts(at)))
        return bool(previews) or "Accuracy" in metrics

    run_until(at, seen, "a first figure", timeout=120)
    assert previews, "the report came before any preview (a first pass of fastnet takes seconds on a CPU)"
    run_until(at, lambda at: "Accuracy" in {m.label for m in at.metric}, "the report")
    plain = split_artifacts(checkpoint, cifar, "test", tta="none")
    value, n, words = previews[0]
    sample = preview_order(10_000)[:n]
    assert value == f"{(plain.predicted[sample] == plain.labels[sample]).mean():.1%}"
    assert "within ±" in words and "random order" in words
    # fastnet averages a flip at test time: the preview is of the plain pass, and says so (its figure is not the
    # flip-averaged accuracy the report ends with)
    assert "accuracy without test-time augmentation is within" in words and "then the flip-averaged one" in words


@pytest.mark.slow
def test_image_tiles_are_sent_as_their_own_pngs(cifar):
    """Streamlit re-encodes an image whose bytes differ from the asked-for format on every rerun (PNG -> JPEG by
    default): 72 tiles on Evaluate were re-encoded each time. Tiles go out as the memoised PNGs they are."""
    at = app_at("pages/evaluate.py", cifar)
    urls = [img.url for element in at.main if type(element).__name__ == "Image" for img in element.proto.imgs]
    assert len(urls) >= 24
    assert all(url.endswith(".png") for url in urls), urls[:5]


@pytest.mark.slow
def test_a_bad_training_image_is_named_where_it_is_needed(tmp_path):
    """The training images are decoded on first use (a first Evaluate waits for the test images only): a broken
    one is named by the inspector's neighbours and by the Dataset page, and Evaluate keeps working."""
    from conftest import write_image_folder, visible

    from cifarviz.core.data import CIFAR10_CLASSES

    root = write_image_folder(tmp_path / "data", classes=CIFAR10_CLASSES, per_class=(2, 1))
    (root / "train" / "cat" / "0001.png").write_bytes(b"not a picture")
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(root)
    at.run()
    at.sidebar.selectbox(key="checkpoint_label").set_value("lenet (shipped)").run()
    at.switch_page("pages/evaluate.py").run()
    run_until(at, lambda at: len(at.progress) == 0 and len(at.metric) > 0, "Evaluate's metrics")
    assert at.metric[0].label == "Accuracy" and "10 test images" in texts(at)
    at.session_state["inspect"] = ImageRef("test", 0)
    at.run()
    run_until(at, lambda at: any("0001.png" in visible(e.value) for e in at.error), "the neighbours' error")
    assert any("Test image #0" in m.value for m in at.markdown)  # the rest of the inspector is there
    at.session_state["inspect"] = None
    at.switch_page("pages/dataset.py").run()
    assert not at.exception and "0001.png" in "\n".join(c.value for c in at.code)


@pytest.mark.slow
def test_influence_asks_before_minutes_of_work_and_says_how_long(cifar):
    """TRAK on fastnet is minutes of work: choosing it starts nothing, says how long (per-example gradients timed on
    this machine), and answers meanwhile with the best measured method that takes seconds (similarity), whose own
    figure the caption quotes. A method measured here at over a minute says how long it took; "Build it now"
    starts it in the background and the page keeps answering."""
    from cifarviz.analysis.influence import build_timing_key, index_path
    from cifarviz.services.jobs import JOBS
    from cifarviz.store import timings

    checkpoint = load_checkpoint(SHIPPED / "fastnet.safetensors")
    index_path("head", checkpoint, cifar).unlink(missing_ok=True)  # not built, and measured here at 8 min
    timings.record(build_timing_key("head", checkpoint, cifar), 480.0)
    at = app_at("pages/influence.py", cifar)
    at.segmented_control(key="influence_method").set_value("trak").run()
    assert not at.exception, [e.value for e in at.exception]
    page = texts(at)
    assert "index of **fastnet** is not built yet" in page and "estimated from per-example gradients timed" in page
    assert "the answers below use **Feature similarity (baseline)**" in page
    assert JOBS.get(str(index_path("trak", checkpoint, cifar))) is None  # nothing started without a yes
    assert any(b.key == "build-trak-yes" for b in at.button)
    assert any(b.key and b.key.startswith("test-") and "-helpful-train-" in b.key for b in at.button)  # answered
    caption = next(c.value for c in at.caption if "How sure?" in c.value)
    similarity = model_card("lenet").influence.mean_change["similarity"]
    assert f"{similarity:+.2f}" in caption and "measured on lenet, not on fastnet" in caption  # similarity's, said whose

    at.segmented_control(key="influence_method").set_value("head").run()
    assert "about 8 minutes (as long as it took on this server last time)" in texts(at)
    assert JOBS.get(str(index_path("head", checkpoint, cifar))) is None
    at.button(key="build-head-yes").click().run()
    job = JOBS.get(str(index_path("head", checkpoint, cifar)))
    assert job is not None  # started, in the background
    assert "is not built yet" not in texts(at)
    job.wait(600)
    assert job.error is None
    assert timings.expected_seconds(build_timing_key("head", checkpoint, cifar)) < 480  # its real time, recorded
    run_until(at, lambda at: not at.progress, "the head index")
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.slow
def test_the_figure_on_the_influence_page_belongs_to_the_method_that_answered(cifar, monkeypatch):
    """lenet's default is the 20-model ensemble; where its index is not at hand (the shipped copy left out here:
    other data, or other weights), nothing is built without a yes and the answer is similarity's: the caption quotes
    similarity's figure, never the ensemble's. With the shipped index (a fresh clone) the ensemble answers at once,
    with its own figure. fastnet, where no influence estimate reached similarity, answers with similarity and says
    so in words, the head's lists beside."""
    from cifarviz.analysis.influence import index_path, index_ready
    from cifarviz.store.cache import default_store

    figures = model_card("lenet").influence.mean_change
    ensemble, similarity = f"{figures['trak-ensemble']:+.2f}", f"{figures['similarity']:+.2f}"
    lenet = load_checkpoint(SHIPPED / "lenet.safetensors")
    assert index_ready("trak-ensemble", lenet, cifar)  # shipped with the project
    shipped = default_store().shipped
    monkeypatch.setattr(default_store(), "shipped", None)
    assert not index_ready("trak-ensemble", lenet, cifar)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.run()
    at.sidebar.selectbox(key="checkpoint_label").set_value("lenet (shipped)").run()
    at.switch_page("pages/influence.py").run()
    run_until(at, lambda at: not at.progress, "the similarity answer")
    assert at.segmented_control(key="influence_method").value == "trak-ensemble"  # the default, asked for first
    assert any(b.key == "build-trak-ensemble-yes" for b in at.button)
    caption = next(c.value for c in at.caption if "How sure?" in c.value)
    assert similarity in caption and ensemble not in caption, caption
    assert not index_ready("trak-ensemble", lenet, cifar) and not index_path("trak-ensemble", lenet, cifar).exists()

    monkeypatch.setattr(default_store(), "shipped", shipped)  # a fresh clone: the shipped index answers at once
    at.run()
    run_until(at, lambda at: not at.progress, "the ensemble's answer")
    assert not any(b.key == "build-trak-ensemble-yes" for b in at.button)
    caption = next(c.value for c in at.caption if "How sure?" in c.value)
    assert ensemble in caption and similarity in caption, caption  # its own figure, similarity's beside it

    at.sidebar.selectbox(key="checkpoint_label").set_value("fastnet (shipped)").run()
    run_until(at, lambda at: not at.progress, "fastnet's answer")
    assert at.segmented_control(key="influence_method").value == "similarity"
    page = texts(at) + "\n".join(visible(i.value) for i in at.info)
    assert "the most similar training images explain its decision better than any influence estimate" in page
    run_until(at, lambda at: any("-helpful-train-" in (b.key or "") and (b.key or "").startswith("best-head-")
                                 for b in at.button), "the head's lists beside")
    # similarity ranks no suspects by itself: with the head's index at hand, its self-influence stands beside
    open_tab(at, "influence_tab", "Suspicious training images")
    keys = [b.key or "" for b in at.button]
    assert sum(k.startswith("suspect-best-") for k in keys) == 8 and sum(k.startswith("suspect-other-") for k in keys) == 8
    assert "no self-influence" not in "\n".join(visible(i.value) for i in at.info)


@pytest.mark.slow
def test_a_link_full_of_nonsense_opens_the_default_view(cifar):
    """Every link parameter is read by one strict rule (ASCII digits): "²", "٣", "1e3", " 7", "-1" and a 5,000-digit
    number are refused, so the page opens its default view instead of a traceback (str.isdigit() took "²")."""
    from cifarviz.ui.links import parse_count, parse_image, parse_index

    for bad in ("²", "٣", "1e3", " 7", "-1", "7 ", "", "9" * 5000, "１２"):
        assert parse_count(bad) is None and parse_image(f"test-{bad}") is None and parse_index(10)(bad) is None
    assert parse_image("test-42").index == 42 and parse_index(10)("9") == 9 and parse_index(10)("10") is None
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(cifar.root)
    at.query_params["image"] = "test-²"
    at.query_params["test"] = "٣"
    at.query_params["checkpoint"] = "fastnet"
    at.run()
    at.switch_page("pages/influence.py").run()
    assert not at.exception, [e.value for e in at.exception]


def test_the_lesson_says_no_confusion_it_has_not_computed(tmp_path, monkeypatch):
    """Home's step 3 named "cat taken for dog" on a fresh server (a hard-coded guess); before the checkpoint's test
    predictions exist it names no cell, and once they exist it names the real most confused cell."""
    from conftest import write_image_folder

    from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
    from cifarviz.store.artifacts import split_artifacts
    from cifarviz.store.datasets import load_cifar10
    from cifarviz.ui.lesson import lesson_steps

    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    dataset = load_cifar10(write_image_folder(tmp_path / "data", classes=classes, per_class=(4, 6)),
                           download=False, progress=False, val_size=5)
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    step = lesson_steps(lenet, dataset)[2]
    assert "taken for" not in step["text"] and "cell" not in step["params"]
    arts = split_artifacts(lenet, dataset, "test")
    step = lesson_steps(lenet, dataset)[2]
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (arts.labels, arts.predicted), 1)
    np.fill_diagonal(confusion, 0)
    t, p = np.unravel_index(confusion.argmax(), confusion.shape)
    assert f"{classes[t]} taken for {classes[p]}" in step["text"]
    assert step["params"]["cell"] == f"{classes[t]},{classes[p]}"


@pytest.mark.slow
def test_the_link_to_the_view_stays_in_the_sidebar_while_a_page_computes(cifar, tmp_path):
    """Pages stop their run while they wait for a computation; the link is drawn before that, not at the end. And
    the link shows commas as commas ("cell=cat,dog"), as a teacher copies it onto the board."""
    import threading

    from conftest import write_image_folder

    from cifarviz.core.data import CIFAR10_CLASSES
    from cifarviz.services.jobs import JOBS
    from cifarviz.ui.links import query_string

    assert query_string({"cell": "cat,dog", "q": "a&b"}) == "cell=cat,dog&q=a%26b"
    root = write_image_folder(tmp_path / "data", classes=CIFAR10_CLASSES, per_class=(2, 1))
    release = threading.Event()
    blockers = [JOBS.start(f"test-blocker-{i}", lambda report: release.wait(120)) for i in range(JOBS.workers)]
    try:
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
        at.session_state["_data_root"] = str(root)
        at.run()
        at.switch_page("pages/evaluate.py").run()
        waiting = [p.proto.text for p in at.get("progress")]  # behind the blockers (and any job of an earlier test)
        assert any("next, when one of the" in t or "waiting for" in t for t in waiting), waiting
        assert "Link to this view" in [p.proto.popover.label for p in at.sidebar.get("popover")]
    finally:
        release.set()
        for job in blockers:
            job.wait(30)


@pytest.mark.slow
def test_home_starts_the_checkpoints_predictions_so_evaluate_has_them_when_the_class_gets_there(tmp_path,
                                                                                                 monkeypatch):
    """A cold Evaluate on a busy machine took 73 s: Home, the first page a class sees, now starts the selected
    checkpoint's predictions in the background, and they are there before anyone opens Evaluate."""
    from conftest import write_image_folder

    from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
    from cifarviz.core.data import CIFAR10_CLASSES
    from cifarviz.store.artifacts import artifacts_cached
    from cifarviz.store.datasets import load_cifar10

    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "data", classes=CIFAR10_CLASSES, per_class=(3, 2))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.session_state["_data_root"] = str(root)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    name = at.session_state["checkpoint_label"].split(" (")[0]
    checkpoint = load_checkpoint(SHIPPED_DIR / f"{name}.safetensors")
    dataset = load_cifar10(root, download=False, progress=False)
    deadline = time.monotonic() + 120
    while not artifacts_cached(checkpoint, dataset, "test"):  # Home only: no other page was opened
        assert time.monotonic() < deadline, "Home started no predictions"
        time.sleep(0.5)
