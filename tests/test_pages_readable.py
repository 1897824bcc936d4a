"""Home, Dataset and Models pages through AppTest: what they say about a shipped checkpoint is the checkpoint's
own, their charts can be read on a projector, and the augmentation preview re-rolls on its own.

Layout (nothing cut off at 1024x768, no exception on screen) is checked in a real browser by test_browser.py.
"""

import json

import numpy as np
import pandas as pd
import pytest
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from test_app import SHIPPED, app_at, open_tab

from cifarviz.core.checkpoint import load_checkpoint, read_metadata
from cifarviz.core.models import count_parameters
from cifarviz.core.models import list_models, model_card


def shipped() -> dict[str, dict]:
    return {path.stem: read_metadata(path) for path in sorted(SHIPPED.glob("*.safetensors"))}


def charts(at) -> list[tuple[dict, pd.DataFrame]]:
    """Every Altair chart on the page: its Vega-Lite spec and its data."""
    found = []
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        data = convert_arrow_bytes_to_pandas_df(chart.proto.datasets[0].data.data)
        found.append((spec, data))
    return found


def layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


@pytest.mark.slow
def test_models_page_shows_each_shipped_checkpoints_own_numbers(cifar):
    at = app_at("pages/models.py", cifar)
    zoo = at.dataframe[0].value.set_index("model")
    for name, meta in shipped().items():
        assert zoo.loc[name, "parameters"] == meta["parameters"], name
        assert zoo.loc[name, "test accuracy"] == pytest.approx(100 * meta["metrics"]["test_accuracy"]), name
    fastnet = load_checkpoint(SHIPPED / "fastnet.safetensors").model
    assert zoo.loc["fastnet", "parameters"] == count_parameters(fastnet)  # the network that ships, not the defaults
    # few columns, so the table fits a 1024-pixel projector without scrolling sideways
    assert list(zoo.columns) == ["parameters", "test accuracy", "source's figure"]

    # a source's figure says whether it was a reported result or only a target
    for name in zoo.index:
        shown = zoo.loc[name, "source's figure"]
        figures = model_card(name).figures if name in list_models() else None
        if figures is not None and figures.reported is not None:
            assert shown == f"{figures.reported:.2%} reported", name
        elif figures is not None and figures.target is not None:
            assert shown == f"{figures.target:.0%} target, not a result", name
        else:
            assert pd.isna(shown), name
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["parameters"]["type_config"]["format"] == "localized"
    assert config["test accuracy"]["type_config"]["format"] == "%.2f%%"  # 75.00%, never 75%
    assert at.dataframe[0].proto.placeholder == "—"  # missing values are a dash, never "None"

    # the layer summary of a shipped model is of the shipped architecture
    at.selectbox(key="summary_model").set_value("fastnet").run()
    assert not at.exception
    assert at.dataframe[1].value["parameters"].sum() == count_parameters(fastnet)
    summary = "\n".join(m.value for m in at.markdown)
    assert f"**{count_parameters(fastnet):,}** parameters" in summary
    widths = read_metadata(SHIPPED / "fastnet.safetensors")["arch_args"]["widths"]
    assert json.dumps(widths) in summary  # the shipped arguments, not the zoo defaults


@pytest.mark.slow
def test_models_charts_label_points_and_fit_their_axes(cifar):
    at = app_at("pages/models.py", cifar)
    metas = shipped()
    assert not charts(at)  # only the open tab (the layer summary) is drawn
    open_tab(at, "models_tab", "Training curves")
    found = charts(at)
    open_tab(at, "models_tab", "Comparisons")
    found += charts(at)

    scatter, points = next((s, d) for s, d in found if any(lay["mark"]["type"] == "text" for lay in layers(s)))
    text = next(lay for lay in layers(scatter) if lay["mark"]["type"] == "text")
    assert text["encoding"]["text"]["field"] == "model"
    assert set(points["model"]) == set(metas)
    assert dict(zip(points["model"], points["parameters"])) == {n: m["parameters"] for n, m in metas.items()}
    x = text["encoding"]["x"]
    assert x["scale"]["type"] == "log" and x["axis"]["format"] == "~s"
    low, high = x["scale"]["domain"]
    assert low <= points["parameters"].min() and points["parameters"].max() <= high
    assert set(x["axis"]["values"]) <= {m * 10**e for e in range(3, 9) for m in (1, 3)}  # 30k, 100k, 300k, 1M...
    # labels of nearby points (the three s8 networks share one size) never sit on one another
    y_low, y_high = text["encoding"]["y"]["scale"]["domain"]
    gap = (y_high - y_low) * 18 / scatter["height"]
    for i in range(len(points)):
        for j in range(i):
            near = abs(np.log10(points["parameters"].iat[i] / points["parameters"].iat[j])) < 0.5
            assert not near or abs(points["label"].iat[i] - points["label"].iat[j]) >= gap - 1e-9

    curves = [(s, d) for s, d in found if "strokeDash" in layers(s)[0]["encoding"]]
    assert len(curves) == 3  # training curves, normalisation, blocks
    for spec, data in curves:
        encoding = spec["encoding"]
        colours = encoding["color"]["scale"]["range"]
        assert len(set(colours)) == len(colours) == data["model"].nunique()  # one hue per model, legend of these
        assert encoding["strokeDash"]["field"] == "split" and set(data["split"]) == {"train", "val"}
        assert encoding["y"]["scale"]["zero"] is False and encoding["y"]["axis"]["format"] == "%"
    titles = [s.get("title") for s, _ in curves]
    assert "BatchNorm vs GroupNorm vs LayerNorm" in titles and "plain vs residual vs skip" in titles


@pytest.mark.slow
def test_home_zoo_is_read_from_the_checkpoints(cifar):
    at = app_at("pages/home.py", cifar)
    table = at.dataframe[0].value.set_index("model")
    for name, meta in shipped().items():
        assert table.loc[name, "parameters"] == meta["parameters"]
        assert table.loc[name, "epochs"] == meta["train_config"]["epochs"]
    assert json.dumps(read_metadata(SHIPPED / "fastnet.safetensors")["arch_args"]["widths"]) in table.loc[
        "fastnet", "arguments"]
    measured = read_metadata(SHIPPED / "fastnet.safetensors")["metrics"]["measured_on"]
    assert f"{measured['sizes']['test']:,} test images" in "\n".join(c.value for c in at.caption)


def augmentation_images(at) -> list[str]:
    """The preview's images (original row first, then three augmented rows), by their content-derived URL."""
    return [url for image in at.tabs[3].image for url in image.value]


@pytest.mark.slow
def test_augmentation_preview_rerolls_on_its_own(cifar):
    at = app_at("pages/dataset.py", cifar)
    open_tab(at, "dataset_tab", "Augmentation")
    first = augmentation_images(at)
    assert len(first) == 32
    at.button(key="augment_reroll").click().run()
    rerolled = augmentation_images(at)
    assert rerolled[:8] == first[:8]  # the same pictures...
    assert rerolled[8:] != first[8:]  # ...augmented afresh
    open_tab(at, "dataset_tab", "Samples")
    at.button(key="sample_reshuffle").click().run()  # the samples tab's reshuffle leaves the preview alone
    open_tab(at, "dataset_tab", "Augmentation")
    assert augmentation_images(at) == rerolled
    at.button(key="augment_images").click().run()
    assert augmentation_images(at)[:8] != rerolled[:8]
    assert not at.exception


@pytest.mark.slow
def test_block_comparison_shows_the_seed_spread(cifar):
    """The plain / residual / skip ranking comes with the same recipes under other seeds: seed 0 is each shipped
    checkpoint's own accuracy, the others the seed study's, with their mean and spread."""
    at = app_at("pages/models.py", cifar)
    open_tab(at, "models_tab", "Comparisons")
    table = next(d.value for d in at.dataframe if "spread" in d.value.columns).set_index("model")
    metas = shipped()
    for name in ("deepnet-conv", "deepnet-res", "deepnet-skip"):
        by_seed = {0: metas[name]["metrics"]["test_accuracy"], **model_card(name).figures.seed_study}
        for seed, accuracy in by_seed.items():
            assert table.loc[name, f"seed {seed}"] == pytest.approx(100 * accuracy)
        assert table.loc[name, "mean"] == pytest.approx(100 * np.mean(list(by_seed.values())))
        assert table.loc[name, "spread"] == pytest.approx(100 * (max(by_seed.values()) - min(by_seed.values())))
    assert any("The source found residual > skip > plain" in m.value for m in at.markdown)


@pytest.mark.slow
def test_evaluate_per_class_table_has_one_number_format(cifar):
    """86.0% beside 88.3%, never 86% beside 88.3% (Streamlit's "percent" format drops trailing zeros)."""
    at = app_at("pages/evaluate.py", cifar)
    table = next(d for d in at.dataframe if "precision" in d.value.columns)
    config = json.loads(table.proto.columns)
    assert all(config[c]["type_config"]["format"] == "%.1f%%" for c in ("precision", "recall", "f1"))
    recall = table.value["recall"]
    assert recall.between(0, 100).all() and recall.max() > 1  # in percent, as the format says
