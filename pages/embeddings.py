import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.embed import DEFAULT_PARAMS, METHODS, class_mix, selected_indices, subset_indices
from cifarviz.analysis.explore import ImageRef
from cifarviz.analysis.export import selection_rows
from cifarviz.ui import app
from cifarviz.ui import embeddings as ui
from cifarviz.ui.text import md

dataset, checkpoint = app.data_and_checkpoint_page("Embeddings")
classes = list(dataset.classes)
st.markdown(f"Each point is an image, placed by a 2-D map of **{md(checkpoint.name)}**'s penultimate features: images "
            "the network sees as similar land close together. Hover a point to see the image, click it to inspect "
            "it, drag a box to see the images inside; click a legend entry to show only that class.")

a, b, c = st.columns([1, 1.5, 1.3])  # "t-SNE | UMAP | PCA" fits a 1024-pixel projector
with c:
    layer = ui.layer_choice(checkpoint)
app.linked("split", "emb_split", choices=("test", "train"), default="test")
app.linked("method", "emb_method", choices=tuple(METHODS), default="tsne")
app.linked("colour", "emb_colour", choices=tuple(ui.COLOUR_BY), default="true class")
split = a.segmented_control("Images", ["test", "train"], key="emb_split", required=True,
                            format_func={"test": "Test", "train": "Training"}.get)
method = b.segmented_control("Method", list(METHODS), key="emb_method", required=True,
                             format_func=lambda m: METHODS[m].split(" (")[0])
subset = None
if split == "train":
    sizes = sorted({n for n in (2_000, 5_000, 10_000, 20_000) if n < len(dataset.train)} | {len(dataset.train)})
    size = a.select_slider("Training images", sizes, value=5_000 if 5_000 in sizes else sizes[-1],
                           key="emb_train_size", format_func="{:,}".format,
                           help="A random sample (the same each time); all 45,000 take a few minutes to map once.")
    subset = subset_indices(len(dataset.train), size)
params = dict(DEFAULT_PARAMS[method])
if method == "tsne":
    params["perplexity"] = float(c.slider("Perplexity", 5, 100, 30, key="emb_perplexity",
                                          help="About how many neighbours each point keeps close (t-SNE)."))
elif method == "umap":
    params["n_neighbors"] = c.slider("n_neighbors", 5, 100, 15, key="emb_neighbors",
                                     help="Larger: more global structure (UMAP).")
    params["min_dist"] = c.slider("min_dist", 0.0, 0.99, 0.1, step=0.05, key="emb_min_dist",
                                  help="How tightly points may pack (UMAP).")
a, b = st.columns([1.3, 1])  # "true class | prediction | right or wrong" whole on a 1024-pixel projector
colour_by = a.segmented_control("Colour by", list(ui.COLOUR_BY), key="emb_colour", required=True)
lasso = a.segmented_control("Select with", ["box", "lasso"], key="emb_select_with", default="box", required=True,
                            help="Box: drag a rectangle (and click a point to inspect it). Lasso: draw around any "
                                 "shape of points.") == "lasso"
others = {label: path for label, path in app.checkpoint_choices().items() if path != str(checkpoint.path)}
compare = b.selectbox("Side by side with", ["nothing", "raw pixels (PCA to 50 dimensions first)", *others],
                       key="emb_compare", help="The same map of another checkpoint, or of the raw pixels: what the "
                       "network learned that the pixels alone do not show.")
app.linked("find", "emb_find", parse=lambda text: text[:200])
search = b.text_input("Find images", key="emb_find", max_chars=200, placeholder="12, 3071 or cat",
                      help="Image numbers or class names: ringed in black on every map, listed below.")
found = ui.find(search, classes, dataset.split(split).labels)

arts = app.get_artifacts(checkpoint, dataset, split)
sources = [(checkpoint.name, checkpoint)]
if compare.startswith("raw pixels"):
    sources.append(("raw pixels", None))
elif compare != "nothing":
    other = app.get_checkpoint(others[compare], app.file_stamp(others[compare]))
    other_predicted = app.get_artifacts(other, dataset, split).predicted
    sources.append((other.name, other))
maps = ui.get_maps(sources, dataset, split, method, params, subset, layer)

st.html(ui.TOOLTIP_CSS)
urls = ui.thumbnails(dataset.root.as_posix(), split)
columns = st.columns(len(maps)) if len(maps) > 1 else [st.container()]
events = []
for column, (name, source), emb in zip(columns, sources, maps):
    with column:
        st.subheader(f"{md(name)}: {METHODS[method].split(' (')[0]}" if len(maps) > 1 else METHODS[method])
        if source is None:  # pixels carry no prediction: the sidebar checkpoint's colours and outlines
            predicted = arts.predicted[emb.indices]
        else:
            predicted = (arts.predicted if source is checkpoint else other_predicted)[emb.indices]
        key = f"emb-map-{name}-{'lasso' if lasso else 'box'}-{st.session_state.get('emb_round', 0)}"
        events.append(ui.show_map(emb, predicted, classes, colour_by, key=key, height=560 if len(maps) == 1 else 460,
                                  urls=urls, legend_below=len(maps) > 1, found=found[np.isin(found, emb.indices)],
                                  lasso=lasso))
        st.caption(f"{len(emb):,} {split} images; outlined: misclassified by "
                   f"{md(name if source is not None else checkpoint.name)}; computed in {emb.info['seconds']:.1f} s.")
st.caption("10-NN accuracy: how often a point's 10 nearest points on the map share its true class (leave-one-out); "
           f"higher means the classes are better separated. {METHODS[method]} of "
           + (f"layer {md(layer)}'s channels (averaged over positions)" if layer else "the penultimate features")
           + (", or of the raw pixels (reduced to 50 dimensions with PCA first)" if len(maps) > 1 else "") + ".")

for emb, event in zip(maps, events):
    selection = event.selection if event else {}
    picked = [p["index"] for p in selection.get("pick") or [] if "index" in p]
    if picked:  # a click: inspect that image, and start the chart afresh so the same point can be clicked again
        app.open_inspector(split, int(picked[0]))
        st.session_state["emb_round"] = st.session_state.get("emb_round", 0) + 1
    lassoed = ui.lasso_selection(emb, event) if lasso else None
    if lassoed is not None:
        st.session_state["emb_selected"] = (split, lassoed.tolist())
        st.session_state["_emb_selected_by"] = "in the lasso"
    box = selection.get("box") if not lasso else None
    if box and "x" in box and "y" in box:
        st.session_state["emb_selected"] = (split, selected_indices(emb, box=box).tolist())
        st.session_state["_emb_selected_by"] = "in the box"

if search.strip() and st.session_state.get("_emb_found_for") != (split, search):  # a new search: its images below
    st.session_state["_emb_found_for"] = (split, search)
    st.session_state["emb_selected"] = (split, found.tolist())
    st.session_state["_emb_selected_by"] = "found"
chosen_split, chosen = st.session_state.get("emb_selected", (split, []))
if chosen_split == split and chosen:
    chosen = np.asarray(chosen)
    data = dataset.split(split)
    st.container(key="emb-box").subheader(f"{len(chosen):,} images {st.session_state.get('_emb_selected_by', 'in the box')}")
    app.scroll_into_view("emb-box", (split, len(chosen), int(chosen[0])))  # the answer to a drag, below the map
    mix = class_mix(data.labels[chosen], len(classes))
    wrong = int((arts.predicted[chosen] != data.labels[chosen]).sum())
    st.markdown("**Class mix:** " + ", ".join(f"{md(classes[i])} {mix[i]}" for i in np.argsort(-mix) if mix[i]) +
                f". **{wrong}** misclassified by {md(checkpoint.name)}.")
    st.bar_chart(pd.DataFrame({"class": classes, "images": mix}), x="class", y="images", height=220,
                 horizontal=False)
    shown = chosen[:60]
    if len(chosen) > 60:
        st.caption("Showing the first 60; drag a smaller box to see the rest.")
    app.image_grid(data.images[shown], [ImageRef(split, int(i)) for i in shown],
                   [f"#{i} ✓ {md(classes[data.labels[i]])}" if arts.predicted[i] == data.labels[i] else  # true first
                    f"#{i} ✗ {md(classes[data.labels[i]])} → {md(classes[arts.predicted[i]])}" for i in shown],
                   key="emb-selection", tile_width=96)
    app.export_buttons(lambda: selection_rows(dataset, split, chosen, arts.probs), key="box",
                       name=f"{checkpoint.name}-{split}-{method}-box",
                       about={"view": "box on the map", "checkpoint": checkpoint.name, "split": split,
                              "method": method, "params": params, "data": dataset.root.name})
    if st.button("Clear the selection", key="emb-clear", icon=":material/close:"):
        st.session_state.pop("emb_selected", None)
        st.session_state["emb_round"] = st.session_state.get("emb_round", 0) + 1  # a fresh chart, without the box
        st.rerun()
else:
    st.caption(f"{'Draw a lasso' if lasso else 'Drag a box'} on a map to see its images here.")

app.inspector(dataset, checkpoint)
