"""The Embeddings page's Streamlit side: maps computed in the background (one job per map, as cifarviz.ui.app does for
artifacts), their Altair charts with hover thumbnails, and what a click or a box on a map selects."""

from __future__ import annotations

import base64
import threading
import time
import io
from functools import lru_cache

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from cifarviz.analysis.embed import (
    METHODS,
    Embedding,
    embedding,
    embedding_path,
    embedding_ready,
    knn_accuracy,
    layer_names,
    selected_indices,
)
from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.services.jobs import JOBS, Job
from cifarviz.store import timings
from cifarviz.ui import app, identity
from cifarviz.ui.loaders import doing, queued
from cifarviz.ui.text import md, md_message

# points per map whose tooltip shows the picture; a server can lower it (bench/bench_embed.py measures both)
HOVER_THUMBNAILS = settings().hover_thumbnails
TRUE_COLOURS = "tableau10"
STATUS_COLOURS = {"correct": "#9ecae1", "wrong": "#d62728"}
COLOUR_BY = {"true class": "true", "prediction": "predicted", "right or wrong": "status"}
# vega-tooltip shows an `image` field at its natural 32x32: enlarge it, pixelated, for a projector
TOOLTIP_CSS = "<style>#vg-tooltip-element img{width:128px;height:128px;image-rendering:pixelated}</style>"


def map_job(checkpoint, dataset, split: str, method: str, params: dict, subset, layer: str | None = None
            ) -> Job | None:
    """The computation of a map, started (or joined) if it is not on disk yet; None if it is."""
    layer = layer if checkpoint is not None else None  # the pixels have no layers
    if embedding_ready(checkpoint, dataset, split, method, params, subset, layer=layer):
        return None
    if refused := app.classroom_refusal(f"this {METHODS[method].split(' (')[0]} map"):
        return refused
    key = str(embedding_path(checkpoint, dataset, split, method, params, subset, layer=layer))

    def partial(coords: np.ndarray) -> None:  # the job's latest layout, for everyone waiting on it (replaced whole)
        with _PARTIAL_LOCK:
            _PARTIAL[key] = (coords, time.monotonic())
            while len(_PARTIAL) > 8:
                _PARTIAL.pop(next(iter(_PARTIAL)))

    timing = map_timing_key(checkpoint, dataset, split, method, subset, layer)

    def compute(report):
        started = time.monotonic()
        result = embedding(checkpoint, dataset, split, method, params, subset, on_progress=report, on_partial=partial,
                           layer=layer)
        timings.record(timing, time.monotonic() - started)  # what the next one of this size is expected to take
        return result

    job = JOBS.start(key, compute, owner=identity.viewer())
    if job.expected is None and not job.refused:
        job.expected = timings.expected_seconds(timing)  # the same size of map, as measured on this server
    return job


LONG_MAP_POINTS = 20_000  # a t-SNE or UMAP of more points than this is minutes on a CPU (until measured here)


def map_timing_key(checkpoint, dataset, split: str, method: str, subset, layer: str | None = None) -> str:
    points = len(dataset.split(split)) if subset is None else len(subset)
    inputs = "pixels" if checkpoint is None else "features" if layer is None else "layer"
    return f"map/{method}/{inputs}/{points}"


def _said_yes(split: str, method: str, subset) -> str:
    return f"_map_yes_{split}_{method}_{len(subset) if subset is not None else 'all'}"


def map_needs_asking(requests: list[tuple], dataset, split: str, method: str, params: dict, subset,
                     layer: str | None = None):
    """(ask first?, the longest measured time of the maps not on disk, or None when none was measured here). Ask when
    one was measured above a minute, or, never measured, is a t-SNE or UMAP of over LONG_MAP_POINTS images; never
    once this viewer said yes, nor for a map someone already started."""
    if st.session_state.get(_said_yes(split, method, subset)):
        return False, None
    points = len(dataset.split(split)) if subset is None else len(subset)
    ask, longest = False, None
    for _, source in requests:
        mine = layer if source is not None else None
        if embedding_ready(source, dataset, split, method, params, subset, layer=mine) or JOBS.get(
                str(embedding_path(source, dataset, split, method, params, subset, layer=mine))):
            continue
        estimate = timings.expected_seconds(map_timing_key(source, dataset, split, method, subset, mine))
        if estimate is not None:
            ask |= estimate > app.ASK_ABOVE_SECONDS
            longest = max(longest or 0.0, estimate)
        else:
            ask |= method != "pca" and points > LONG_MAP_POINTS
    return ask, longest


def ask_before_mapping(seconds: float | None, split: str, method: str, subset, points: int) -> None:
    how_long = (f"{app.about(seconds)} (as long as it took on this server last time)" if seconds is not None else
                "a few minutes on a CPU")
    app.ask_first("map-ask", f"A {METHODS[method].split(' (')[0]} map of **{points:,}** images is not computed yet: "
                  f"it takes {how_long}, once for everyone on this server. Fewer images map in seconds.",
                  "Compute this map", lambda: st.session_state.update({_said_yes(split, method, subset): True}),
                  "Computes it in the background; the map shows its layout as it goes.")
    st.stop()


_PARTIAL_LOCK = threading.Lock()
_PARTIAL: dict[str, tuple] = {}  # job key -> (the t-SNE's latest coordinates, when): never mutated, only replaced


def partial_layout(job: Job) -> np.ndarray | None:
    with _PARTIAL_LOCK:
        found = _PARTIAL.get(job.key)
    return None if found is None or job.done else found[0]


def get_maps(requests: list[tuple], dataset, split: str, method: str, params: dict, subset,
             layer: str | None = None) -> list[Embedding]:
    """The maps of several sources (a checkpoint or None for pixels), each computed once for everyone. All missing
    ones start at once; while any runs, this run ends with progress bars that fill in by themselves."""
    try:  # settings that cannot map these points (a perplexity too large for a small split): said, not raised
        ask, seconds = map_needs_asking(requests, dataset, split, method, params, subset, layer)  # minutes: ask
        if ask:
            ask_before_mapping(seconds, split, method, subset, len(dataset.split(split)) if subset is None
                               else len(subset))
        jobs = [(name, map_job(source, dataset, split, method, params, subset, layer)) for name, source in requests]
    except CifarvizError as exc:
        st.error(md_message(exc), icon=":material/error:")
        st.stop()
    waiting = [(name, job) for name, job in jobs if job is not None]
    for name, job in waiting:
        if job.refused:
            app.refused_notice(job, f"The {METHODS[method]} map of {md(name)}")
            st.stop()
        if job.done and job.error is not None:
            st.error(f"The {METHODS[method]} map of {md(name)} failed: {md_message(job.error)}")
            st.stop()
    if waiting:
        points = len(dataset.split(split)) if subset is None else len(subset)
        labels = dataset.split(split).labels if subset is None else dataset.split(split).labels[subset]
        refining(waiting, labels, list(dataset.classes), f"{METHODS[method]} map of {{}}, {points:,} {split} images")
        st.stop()
    return [embedding(source, dataset, split, method, params, subset, layer=layer if source is not None else None)
            for _, source in requests]


def refining(waiting: list[tuple], labels: np.ndarray, classes: list[str], label: str) -> None:
    """While maps compute: each one's progress, and, for a t-SNE, its latest layout (a first view within seconds
    that refines every second or so: points move as the optimisation goes). The page reruns when all are done."""

    @st.fragment(run_every=1.5)
    def view() -> None:
        if all(job.done for _, job in waiting):
            st.rerun()
        columns = st.columns(len(waiting)) if len(waiting) > 1 else [st.container()]
        for column, (name, job) in zip(columns, waiting):
            with column:
                if not job.started:
                    st.progress(0.0, text=f"{label.format(md(name))}: {queued(job)}")
                    continue
                st.progress(job.progress, text=f"{label.format(md(name))}: {doing(job) or 'arranging the points, '}"
                                               f"{job.progress:.0%}{app.time_left(job)}")
                coords = partial_layout(job)
                if coords is not None and len(coords) == len(labels):
                    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1],
                                          "true": np.asarray(classes, dtype=object)[labels]})
                    chart = alt.Chart(frame).mark_circle(size=12, opacity=0.7).encode(  # the finished map's colours
                        x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None),
                        color=alt.Color("true:N", scale=alt.Scale(domain=classes, scheme=TRUE_COLOURS),
                                        title="true class",
                                        legend=alt.Legend(orient="right", labelFontSize=14, titleFontSize=14)))
                    st.altair_chart(chart.properties(height=460), width="stretch")
                    st.caption("Still arranging: images the network finds alike are pulled together. Hover, click "
                               "and box selection come when the map is finished.")

    view()


@lru_cache(maxsize=32)
def map_knn_accuracy(emb: Embedding) -> float:
    """10-NN accuracy in the map, once per map (a map file is loaded once, so it is the same object)."""
    return knn_accuracy(emb.coords, emb.labels)


@st.cache_resource(show_spinner=False, max_entries=4)
def thumbnails(root: str, split: str) -> np.ndarray:
    """Every image of a split as a small WebP data URL (about 0.6 KB each), for hover tooltips."""
    images = app.get_dataset(root).split(split).images
    urls = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="WEBP", quality=80)
        urls.append("data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode())
    return np.array(urls, dtype=object)


def map_frame(emb: Embedding, predicted: np.ndarray, classes: list[str], urls: np.ndarray | None) -> pd.DataFrame:
    """One row per point: coordinates, image index, true and predicted class, correct or wrong, thumbnail."""
    correct = predicted == emb.labels
    frame = pd.DataFrame({"x": emb.coords[:, 0], "y": emb.coords[:, 1], "index": emb.indices,
                          "true": np.asarray(classes, dtype=object)[emb.labels],
                          "predicted": np.asarray(classes, dtype=object)[predicted],
                          "status": np.where(correct, "correct", "wrong")})
    if urls is not None and HOVER_THUMBNAILS > 0:
        shown = np.zeros(len(emb), dtype=bool)
        shown[np.random.default_rng(0).permutation(len(emb))[:HOVER_THUMBNAILS]] = True
        frame["image"] = np.where(shown, urls[emb.indices], None)
    return frame.sort_values("status", kind="stable")  # wrong points drawn last, on top


PENULTIMATE = "penultimate"


def layer_choice(checkpoint, key: str = "emb_layer") -> str | None:
    """Which features to map: the penultimate ones (the head's input, the default) or a convolution's channels,
    from the checkpoint's own layers (TensorBoard's projector maps any tensor)."""
    names = layer_names(checkpoint.model)
    options = [PENULTIMATE, *names]
    if st.session_state.get(key) not in options:
        st.session_state[key] = PENULTIMATE
    chosen = st.selectbox("Features from", options, key=key,
                          format_func=lambda n: "penultimate layer" if n == PENULTIMATE else n,
                          help="The penultimate layer is the head's input. A convolution's channels are averaged "
                               "over positions. Early layers see colours and edges; the deeper the layer, the more "
                               "the classes separate (compare the maps' 10-NN accuracy).")
    return None if chosen == PENULTIMATE else chosen


def find(text: str, classes: list[str], labels: np.ndarray) -> np.ndarray:
    """The images a search names (TensorBoard projector's search): image numbers ("12, 3071") and class names
    ("cat"), separated by commas or spaces. Unknown words and numbers outside the split are ignored."""
    found: set[int] = set()
    for word in text.replace(",", " ").split():
        if word.isascii() and word.isdigit() and len(word) <= 7 and int(word) < len(labels):
            found.add(int(word))
        elif word.lower() in [c.lower() for c in classes]:
            index = [c.lower() for c in classes].index(word.lower())
            found.update(np.flatnonzero(labels == index).tolist())
    return np.array(sorted(found), dtype=np.int64)


def map_chart(frame: pd.DataFrame, classes: list[str], colour_by: str, height: int,
              legend_below: bool = False, found: np.ndarray | None = None) -> alt.Chart:
    """The scatter: coloured by the chosen field, misclassified points outlined in black, a legend that toggles its
    entries, a click selects one point ("pick"), a drag a box ("box")."""
    field = COLOUR_BY[colour_by]
    if field == "status":
        scale = alt.Scale(domain=list(STATUS_COLOURS), range=list(STATUS_COLOURS.values()))
    else:
        scale = alt.Scale(domain=classes, scheme=TRUE_COLOURS)
    legend = alt.selection_point(name="legend", fields=[field], bind="legend")
    pick = alt.selection_point(name="pick", fields=["index"], on="click", clear=False)
    box = alt.selection_interval(name="box", encodings=["x", "y"])
    tooltip = (["image"] if "image" in frame else []) + [
        alt.Tooltip("index:Q", title="image #"), alt.Tooltip("true:N", title="true class"),
        alt.Tooltip("predicted:N", title="predicted")]
    bare = alt.Axis(labels=False, ticks=False, title=None, grid=False, domain=False)
    points = alt.Chart(frame).mark_point(filled=True, size=22).encode(
        x=alt.X("x:Q", axis=bare, scale=alt.Scale(zero=False, nice=False)),
        y=alt.Y("y:Q", axis=bare, scale=alt.Scale(zero=False, nice=False)),
        color=alt.Color(f"{field}:N", scale=scale, title=colour_by,
                        legend=alt.Legend(labelFontSize=14, titleFontSize=14, symbolSize=160,
                                          orient="bottom" if legend_below else "right",
                                          columns=4 if legend_below else 1)),
        stroke=alt.condition(alt.datum.status == "wrong", alt.value("black"), alt.value(None)),
        strokeWidth=alt.value(0.8),
        opacity=alt.condition(legend, alt.value(0.85), alt.value(0.04)),
        tooltip=tooltip,
    ).add_params(legend, pick, box).properties(height=height)
    if found is None or not len(found):
        return points
    rings = alt.Chart(frame[frame["index"].isin(found)]).mark_point(size=200, filled=False, color="black",
                                                                    strokeWidth=2.5).encode(
        x="x:Q", y="y:Q", tooltip=tooltip)  # found images ringed, over everything
    return alt.layer(points, rings).properties(height=height)


# Vega's tableau10, the Altair map's class colours: a class has one colour in both drawings of the map
TABLEAU10 = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
             "#bab0ac"]


def lasso_figure(frame: pd.DataFrame, classes: list[str], colour_by: str, height: int, found=None):
    """The map drawn by Plotly, whose lasso Vega-Lite lacks: one trace per colour (the legend toggles it), the same
    colours as the Altair map, misclassified points outlined, found images ringed."""
    import plotly.graph_objects as go

    field = COLOUR_BY[colour_by]
    groups = list(STATUS_COLOURS) if field == "status" else classes
    colours = STATUS_COLOURS if field == "status" else {c: TABLEAU10[i % 10] for i, c in enumerate(classes)}
    figure = go.Figure()
    for name in groups:
        part = frame[frame[field] == name]
        if part.empty:
            continue
        figure.add_trace(go.Scattergl(
            x=part["x"], y=part["y"], mode="markers", name=str(name), customdata=part[["index"]].to_numpy(),
            marker={"size": 6, "color": colours[name],
                    "line": {"width": np.where(part["status"] == "wrong", 1.0, 0.0), "color": "black"}},
            text=[f"image #{i}: {t} → {p}" for i, t, p in zip(part["index"], part["true"], part["predicted"])],
            hoverinfo="text"))
    if found is not None and len(found):
        ring = frame[frame["index"].isin(found)]
        figure.add_trace(go.Scattergl(x=ring["x"], y=ring["y"], mode="markers", name="found", hoverinfo="skip",
                                      marker={"size": 14, "color": "rgba(0,0,0,0)",
                                              "line": {"width": 2.5, "color": "black"}}))
    bare = {"visible": False}
    figure.update_layout(height=height, dragmode="lasso", xaxis=bare, yaxis=bare, margin={"l": 0, "r": 0, "t": 10,
                                                                                            "b": 0},
                         legend={"title": {"text": colour_by}, "font": {"size": 14}}, plot_bgcolor="white")
    return figure


def lasso_polygon(event) -> list[tuple[float, float]] | None:
    """The lasso's outline from Streamlit's Plotly selection event, or None."""
    lasso = ((event or {}).get("selection") or {}).get("lasso") or []
    if not lasso or "x" not in lasso[0] or "y" not in lasso[0]:
        return None
    return list(zip(lasso[0]["x"], lasso[0]["y"]))


def lasso_selection(emb: Embedding, event) -> np.ndarray | None:
    """The images a lasso selected: those inside its outline (every trace, hidden classes too, as the box does),
    else the points Plotly reports (their image numbers ride in customdata); None without a lasso."""
    outline = lasso_polygon(event)
    if outline:
        return selected_indices(emb, polygon=outline)
    points = ((event or {}).get("selection") or {}).get("points") or []
    picked = [p["customdata"][0] if isinstance(p.get("customdata"), list) else p.get("customdata") for p in points]
    picked = [int(i) for i in picked if isinstance(i, (int, float))]
    return np.asarray(sorted(set(picked)) , dtype=np.int64) if picked else None


def show_map(emb: Embedding, predicted: np.ndarray, classes: list[str], colour_by: str, key: str, height: int,
             urls: np.ndarray | None, legend_below: bool = False, found: np.ndarray | None = None,
             lasso: bool = False):
    """Draw a map and its class-separation score; return Streamlit's selection event."""
    frame = map_frame(emb, predicted, classes, urls)
    if lasso:
        event = st.plotly_chart(lasso_figure(frame, classes, colour_by, height, found), on_select="rerun",
                                selection_mode=("lasso",), key=key, width="stretch")
    else:
        chart = map_chart(frame, classes, colour_by, height, legend_below, found)
        event = st.altair_chart(chart, on_select="rerun", selection_mode=["pick", "box"], key=key, width="stretch")
    score = map_knn_accuracy(emb)
    st.markdown(f"**10-NN accuracy in this map: {score:.1%}** (chance {1 / len(classes):.0%})")
    return event
