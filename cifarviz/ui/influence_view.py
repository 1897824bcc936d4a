"""The Influence page's "See it for yourself": retrain the checkpoint's recipe without the chosen test image's top
helpful (or harmful, or random) training images in the background, and put what really happened beside what the
method predicted."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.explore import ImageRef
from cifarviz.analysis.export import influence_rows, selection_rows
from cifarviz.services import retrain, runs
from cifarviz.ui import identity
from cifarviz.ui.exports import export_buttons
from cifarviz.ui.inspector import influence_grid
from cifarviz.analysis.influence import METHODS, available_methods, index_ready, method_choice
from cifarviz.analysis.influence import build_estimate as influence_build_estimate
from cifarviz.analysis.influence import how_sure as plain_how_sure
from cifarviz.analysis.influence.choice import MEASURED_TITLES, where_measured
from cifarviz.ui.loaders import (
    about,
    ask_first,
    build_estimate,
    confirm_build,
    file_stamp,
    get_artifacts,
    get_checkpoint,
    get_dataset,
    influence_job,
    influence_of,
    takes_long,
)
from cifarviz.ui.widgets import image_grid
from cifarviz.ui.tagging import tag_many
from cifarviz.ui.text import md, md_message, shown

REMOVED = 100  # the lists an ensemble index keeps, and the measured table's k on the full split


def session_owner() -> str:
    """This browser's runs (the Train page uses the same)."""
    return identity.viewer()


def retrain_section(index, checkpoint, dataset, test_index: int, influence_of, probs) -> None:
    """`influence_of(k)`: the method's result for this test image with k per list; probs: the test split's."""
    st.markdown("#### See it for yourself: retrain without these images")
    k = min(REMOVED, index.n_train // 10)
    labels = {"helpful": f"its top {k} helpful", "harmful": f"its top {k} harmful", "random": f"{k} random images"}
    # One under the other: side by side, a 1024-pixel projector cut both the choices and the button's label.
    choice = st.segmented_control("Remove", list(labels), format_func=labels.get, default="helpful",
                                  required=True, key="retrain_choice")
    mine = [r for r in runs.list_runs() if r.state in runs.ACTIVE and r.config.get("owner") == session_owner()]
    full = len(mine) >= runs.max_per_session()
    seconds, source = retrain.estimate_seconds(checkpoint, index.n_train - k)
    band = 1 + len(retrain.seed_files(checkpoint))  # file names only: nothing loaded on a rerun
    st.caption(f"One training of {md(checkpoint.name)}'s recipe and seed on the {index.n_train - k:,} other images it "
               "was trained on (never a subset), in the background with the server's other runs"
               + (f": {about(seconds)} here ({source})." if seconds is not None else ".")
               + (f" The loss with the images is the spread of this test image's loss over the {band} seeds of the "
                  "recipe the app ships (the checkpoint and its replicas), so you see whether the change is beyond "
                  "what a new seed alone does." if band > 1 else
                  " This checkpoint ships no other seeds of its recipe, so the result cannot be told from seed noise."))
    if seconds is not None and seconds > retrain.CLASS_MINUTES * 60:
        st.warning(f"That is longer than a class discussion on this machine ({about(seconds)}). On a GPU it takes "
                   "seconds to minutes; here, the same proof on lenet (19 seeds shipped) takes about two minutes: "
                   "[open lenet's Influence page](/influence?checkpoint=lenet).", icon=":material/schedule:")
    if problem := runs.problem():  # the queue's broker is away: said before anyone clicks
        st.warning(md_message(problem), icon=":material/cloud_off:")
    if st.button("Retrain without them", key=f"retrain-{test_index}", icon=":material/model_training:",
                 disabled=full or bool(problem),
                 help=(f"At most {runs.max_per_session()} of your runs may wait or train at once." if full else
                       "Trains the checkpoint's recipe once in the background without these images, and measures "
                       "this test image's loss against the seeds' spread.")):
        try:
            if choice == "random":
                rows = np.random.default_rng(test_index).choice(index.n_train, k, replace=False)
                removed = (index.positions[rows] if index.positions is not None else rows)
                predicted = None
            else:
                entries = getattr(influence_of(k), choice)
                removed = [e.train_index for e in entries]
                true_p = float(probs[test_index, dataset.test.labels[test_index]])
                predicted = index.predicted_loss_change(sum(e.score for e in entries), true_p)
            retrain.submit_retrain(checkpoint, dataset, test_index=test_index, choice=choice, removed=removed,
                                   method=index.name, predicted_change=predicted, owner=session_owner())
        except runs.RunError as exc:
            st.error(md_message(exc), icon=":material/error:")
    retrain_results(str(checkpoint.path), test_index, dataset.classes)


def retrain_results(checkpoint_path: str, test_index: int, classes) -> None:
    """The runs of this test image, drawn once; redrawn every 3 s only while one waits or trains (a hall of viewers
    on the page must not all poll for nothing)."""
    found = retrain.retrain_runs(checkpoint_path, test_index)[:6]
    if any(r.state in runs.ACTIVE for r in found):
        live_retrain_results(checkpoint_path, test_index, classes)
    else:
        draw_retrain_results(found, classes)


@st.fragment(run_every=3)
def live_retrain_results(checkpoint_path: str, test_index: int, classes) -> None:
    runs.start()
    found = retrain.retrain_runs(checkpoint_path, test_index)[:6]
    if not any(r.state in runs.ACTIVE for r in found):
        st.rerun()  # all finished: the whole page, drawn once, stops polling
    draw_retrain_results(found, classes)


def _what(spec: dict) -> str:
    removed = spec.get("removed_sources")
    return (f"without {len(removed) if isinstance(removed, list) else '?'} {str(spec.get('choice', '?'))} "
            f"({str(spec.get('method', '?'))})")


def draw_retrain_results(found: list, classes) -> None:
    if not found:
        st.caption("Nobody has retrained without this test image's images yet.")
        return
    finished = []
    for run in found:
        what = _what(run.spec)
        if run.state in runs.ACTIVE:
            draw_progress(run, md(what))
            continue
        result = retrain.retrain_result(run)
        if result is None:
            if run.state == runs.FAILED:
                st.error(f"{md(what)}: failed. {md_message((run.error or '').partition(chr(10))[0])}", icon=":material/error:")
            elif run.state == runs.COMPLETED:
                st.caption(f"{md(what)}: finished by an older version of the app, which measured it another way; "
                           "retrain again to see it against the seeds.")
            continue
        finished.append((what, result))
    if finished:
        st.altair_chart(seed_band_chart(finished), width="stretch")
        for what, result in finished:
            predicted = result.get("predicted_change")
            guess = f" The method predicted a change of {predicted:+.3f}." if predicted is not None else ""
            st.markdown(f"**{md(what)}**, {result['train_images']:,} training images: {md(result['verdict'])}{guess}")
        st.caption("Each row: the grey dots are this test image's plain loss under each seed of the recipe "
                   "(the checkpoint and its replicas: what a new seed alone does), the red diamond the model "
                   "retrained without the images. Loss is the plain cross-entropy of the true label.")


def seed_band_chart(finished: list):
    """One row per finished retraining: the seeds' losses as dots, the retrained model's as a red diamond."""
    import altair as alt

    points = []
    for what, result in finished:
        points += [{"run": shown(what), "loss": s["loss"], "model": "a seed of the recipe", "name": shown(s["name"])}
                   for s in result["seeds"]]
        points.append({"run": shown(what), "loss": result["retrained"]["loss"], "model": "retrained without them",
                       "name": "retrained"})
    frame = pd.DataFrame(points)
    low, high = frame["loss"].min(), frame["loss"].max()
    wide = low > 0 and high / low > 20  # a confident image's losses span decades: a log axis keeps them apart
    scale = alt.Scale(type="log") if wide else alt.Scale(zero=False)
    return alt.Chart(frame).mark_point(filled=True, size=90).encode(
        x=alt.X("loss:Q", title="this test image's loss (plain cross-entropy" + (", log scale)" if wide else ")"),
                scale=scale, axis=alt.Axis(format=".2g")),
        y=alt.Y("run:N", title=None, axis=alt.Axis(labelLimit=360)),
        color=alt.Color("model:N", scale=alt.Scale(domain=["a seed of the recipe", "retrained without them"],
                                                   range=["#8c8c8c", "#d62728"]), legend=alt.Legend(orient="top", title=None)),
        shape=alt.Shape("model:N", scale=alt.Scale(domain=["a seed of the recipe", "retrained without them"],
                                                   range=["circle", "diamond"]), legend=None),
        tooltip=["name", alt.Tooltip("loss:Q", format=".3f")],
    ).properties(height=60 + 40 * len(finished))


def draw_progress(run: runs.Run, what: str) -> None:
    p = runs.progress(run)
    last, start = p.last, p.start
    if run.state == runs.QUEUED:
        ahead = runs.queue_position(run) or 1
        st.progress(0.0, text=f"{what}: {md(runs.where(run))} (#{ahead} in the queue): it trains on the whole "
                    "training split when its turn comes, never on fewer images")
        return
    if last is None:
        estimate = (start or {}).get("estimate_seconds")
        st.progress(0.0, text=f"{what}: starting" + (f" ({about(estimate)} in all)"
                                                       if runs._is_number(estimate) else "..."))
        return
    fraction = last["step"] / max(last["total_steps"], 1)
    eta = last["elapsed"] / max(last["step"], 1) * (last["total_steps"] - last["step"])
    where = f" on {md(run.where)}" if run.where else ""
    st.progress(min(fraction, 1.0), text=f"{what}: {md(last.get('phase', 'training'))}{where}, {about(eta)} left")


def how_sure(checkpoint, method: str, titles: dict) -> str:
    """The sentence of the method that actually answered (analysis.influence.how_sure), its figure in bold. Plain
    text from the library (numbers and the card's words, no names from files): safe as Markdown."""
    sentence = plain_how_sure(checkpoint, method, titles).replace("How sure?", "**How sure?**", 1)
    figure = method_choice(checkpoint).figure(method)
    return sentence if figure is None else sentence.replace(f"by {figure:+.2f}", f"by **{figure:+.2f}**", 1)


def similarity_explains_better(checkpoint, titles: dict) -> None:
    """Where no influence estimate reached the similarity baseline when retrained (the default is then similarity),
    say so in plain words above the lists (best_estimate_beside shows that estimate's lists below them)."""
    choice = method_choice(checkpoint)
    if not choice.similarity_wins or choice.best_attribution is None:
        return
    best = choice.best_attribution
    st.info(f"For {md(checkpoint.model.arch_name)}, the most similar training images explain its decision better than "
            f"any influence estimate we can compute here: removed and retrained, they raised the test loss by "
            f"{choice.figure('similarity'):+.2f} against {choice.figure(best):+.2f} for the best estimate "
            f"({md(titles.get(best, best))}). So the lists below are similarity's; the estimate's are under them.",
            icon=":material/info:")


def best_estimate_beside(checkpoint, dataset, test_index: int, k: int, titles: dict) -> None:
    """The best influence estimate's lists for this image, in an expander (built only if that takes seconds)."""
    choice = method_choice(checkpoint)
    if not choice.similarity_wins or choice.best_attribution is None:
        return
    best = choice.best_attribution
    if not index_ready(best, checkpoint, dataset):  # prepared in the background when it takes seconds
        if not takes_long(best, checkpoint, dataset):
            influence_job(best, checkpoint, dataset, background=True)
        st.caption(f"The {md(titles.get(best, best))} lists for this image appear here once its index is built.")
        return
    with st.expander(f"What {titles.get(best, best)} says for this image"):
        show_result(dataset, checkpoint, influence_of(best, checkpoint, dataset, test_index=test_index, k=k),
                    key=f"best-{best}-{test_index}")


def measured_table(checkpoint, titles: dict) -> None:
    """Every method's measured retraining effect, in a small table (nothing when none was measured)."""
    choice = method_choice(checkpoint)
    figures = choice.figures
    if figures is None:
        return
    where = "" if choice.applies == "recipe" else f" (measured on {choice.measured_on})"
    with st.expander(f"Each method checked by retraining{where}"):
        rows = [{"method": titles.get(m) or MEASURED_TITLES.get(m, m), "mean change of the test loss": v,
                 "rose for": f"{figures.rose[m]} of {figures.count(m)}"}
                for m, v in sorted(figures.mean_change.items(), key=lambda item: -item[1])]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
            "mean change of the test loss": st.column_config.NumberColumn(format="%+.3f")})
        st.caption(f"{md(where_measured(choice, checkpoint.model.arch_name))}. For each test image, the recipe was "
                   "retrained without the method's top helpful training images and the test image's plain loss "
                   f"measured. Measured at commit {figures.commit} with `{figures.command}`.")


def show_result(dataset, checkpoint, result, key: str) -> None:
    """An influence lookup: the most helpful and most harmful training images side by side, and its export."""
    helpful, harmful = st.columns(2)
    with helpful:
        st.markdown("**Most helpful** (removing it would raise the loss)")
        influence_grid(dataset, result.helpful, key=f"{key}-helpful")
    with harmful:
        st.markdown("**Most harmful** (removing it would lower the loss)")
        influence_grid(dataset, result.harmful, key=f"{key}-harmful")
    if result.agreement:
        st.caption(agreement_sentence(result.agreement, len(result.helpful)))
    export_buttons(lambda: influence_rows(result, dataset, get_artifacts(checkpoint, dataset, "train").probs),
                   key=key, name=f"influence-{checkpoint.name}-{key}",
                   about={"view": "influence", "method": result.method, "checkpoint": checkpoint.name,
                          "query": result.query, "data": dataset.root.name,
                          "order": "the most helpful first, then the most harmful"})


def agreement_sentence(agreement: dict, k: int) -> str:
    """How sure this one answer is: how many of the shown images most of the ensemble's models agree on."""
    models, top = agreement["models"], agreement["top"]
    helpful = round(agreement["helpful_share"] * k)
    harmful = round(agreement["harmful_share"] * k)
    mean_helpful = float(np.mean(agreement["helpful"])) if agreement["helpful"] else 0.0
    mean_harmful = float(np.mean(agreement["harmful"])) if agreement["harmful"] else 0.0
    return (f"**How sure is this answer?** {helpful} of the {k} most helpful images shown are in the own top {top} of "
            f"at least half of the {models} models (each model alone, another seed; on average {mean_helpful:.1f} "
            f"models each), and {harmful} of the {k} most harmful (on average {mean_harmful:.1f}). Images few models "
            "agree on could change with another seed: the ensemble's average is surer than any one model.")


def suspects_grid(dataset, checkpoint, ranking: tuple, train_predicted, key: str, name: str) -> None:
    """One suspicious-images ranking, `(positions in dataset.train, values)`, as tiles "label → prediction"."""
    idx, values = ranking
    classes, labels = dataset.classes, dataset.train.labels
    captions = [md(classes[labels[i]]) + ("" if train_predicted[i] == labels[i] else
                f" →\u00a0{md(classes[train_predicted[i]])}") for i in idx]  # as the other grids
    image_grid(dataset.train.images[idx], [ImageRef("train", int(i)) for i in idx], captions, key=f"suspect-{key}")
    export_buttons(lambda: selection_rows(dataset, "train", idx, get_artifacts(checkpoint, dataset, "train").probs,
                                          score=values, score_name="_".join(name.split(" (")[0].split())),
                   key=f"suspect-{key}", name=f"suspicious-{checkpoint.name}-{name}",
                   about={"view": "suspicious training images", "ranking": name, "checkpoint": checkpoint.name,
                          "order": "most suspicious first"})
    tag_many(dataset, [ImageRef("train", int(i)) for i in idx], key=f"suspect-{key}", what="these")


def ask_before_building(method: str, checkpoint, dataset, fallback: str | None = None) -> None:
    """The index of `method` takes minutes to build and nobody asked for it yet: say so, how long, and offer to
    start it (the answers meanwhile are `fallback`'s: by default the best measured method that takes seconds)."""
    fallback = fallback or method_choice(checkpoint).quick
    estimate, source = build_estimate_probed(method, str(checkpoint.path), file_stamp(checkpoint.path),
                                             dataset.root.as_posix(), build_estimate(method, checkpoint, dataset))
    how_long = (f"{about(estimate)} ({source.replace('this machine', 'this server')})" if estimate is not None else
                "several minutes on a CPU")
    ask_first(f"build-{method}",
              f"The **{METHODS[method].title}** index of **{md(checkpoint.name)}** is not built yet. Building it takes "
              f"{how_long}, once for everyone on this server; the answers below use **{METHODS[fallback].title}** "
              "until it is ready.", "Build it now", partial(confirm_build, method, checkpoint),
              "Runs in the background; this page keeps answering meanwhile.",
              f"Or before class: `python -m cifarviz precompute --checkpoint {md(checkpoint.name)} --influence {method}`.")


@st.cache_data(show_spinner="Timing a few per-example gradients...", max_entries=64)
def build_estimate_probed(method: str, path: str, stamp: float, root: str, measured: float | None):
    """analysis.influence.build_estimate, its probe (about a second) run once per server and index, not on every
    rerun; `measured` (this server's last build) is in the key, so a build that finishes replaces the guess."""
    return influence_build_estimate(method, get_checkpoint(path, stamp), get_dataset(root))


def side_by_side(dataset, checkpoint, method: str, test_index: int, k: int) -> bool:
    """Two methods' answers for one test image, row by row (helpful, then harmful), with how many images both
    lists share. Only methods whose index is built are offered: a comparison never starts minutes of work (the
    Method picker above builds one). True when the comparison was drawn (instead of the single answer)."""
    built = [m for m in available_methods(checkpoint) if m != method and index_ready(m, checkpoint, dataset)]
    if not built:
        return False
    other = st.selectbox("Side by side with", ["nothing", *built], key="influence_compare",
                         format_func=lambda m: "nothing" if m == "nothing" else METHODS[m].title,
                         help="Another method whose index is built, on the same test image. Build another from "
                              "the Method picker above.")
    if other not in built:
        return False
    results = {m: influence_of(m, checkpoint, dataset, test_index=test_index, k=k) for m in (method, other)}
    for side, sentence in (("helpful", "removing it would raise the loss"), ("harmful", "removing it would lower "
                                                                                         "the loss")):
        lists = {m: [e.train_index for e in getattr(r, side)] for m, r in results.items()}
        shared = len(set(lists[method]) & set(lists[other]))
        st.markdown(f"**Most {side}** ({sentence}): **{shared}** of {k} images in both lists")
        for column, (m, result) in zip(st.columns(2, gap="medium"), results.items()):
            with column:
                st.caption(METHODS[m].title)
                influence_grid(dataset, getattr(result, side), key=f"compare-{m}-{test_index}-{side}")
    for m, result in results.items():
        st.caption(f"Export {METHODS[m].title}:")
        export_buttons(lambda result=result: influence_rows(result, dataset, get_artifacts(
            checkpoint, dataset, "train").probs), key=f"compare-{m}-{test_index}",
            name=f"influence-{checkpoint.name}-{m}-test-{test_index}",
            about={"view": "influence", "method": m, "checkpoint": checkpoint.name, "query": result.query})
    return True


def _pick_test_image(split: str, index: int) -> None:
    st.session_state["influence_test"] = int(index)


def test_images_to_pick(dataset, test_arts) -> np.ndarray:
    """The filters (class, right or wrong, confidence) and 16 of the matching test images as clickable tiles; a
    click makes that image the one answered (`influence_test`). Returns the indices offered."""
    classes = list(dataset.classes)
    a, b, c = st.columns([1, 1, 1.4])
    class_name = a.selectbox("Class", ["all classes", *classes], key="influence_class_filter", format_func=shown)
    kind = b.selectbox("Prediction", ["all", "misclassified", "correct"], key="influence_kind")
    low, high = c.slider("Model's confidence in its prediction", 0.0, 1.0, (0.0, 1.0), step=0.05,
                         key="influence_confidence")
    confidence = test_arts.probs.max(1)
    keep = (confidence >= low) & (confidence <= high)
    if class_name != "all classes":
        keep &= test_arts.labels == classes.index(class_name)
    if kind != "all":
        keep &= (test_arts.predicted == test_arts.labels) == (kind == "correct")
    candidates = np.flatnonzero(keep)
    st.caption(f"{len(candidates):,} test images match; click one to see the training images that helped and "
               "hurt it (showing 16 of them, picked at random; ✓ right, ✗ wrong: true → predicted class).")
    offered = np.sort(np.random.default_rng(0).permutation(candidates)[:16])  # a mix of classes, the same each visit
    labels, predicted = test_arts.labels, test_arts.predicted
    image_grid(dataset.test.images[offered], [ImageRef("test", int(i)) for i in offered],
               [f"#{i} ✓ {md(classes[labels[i]])}" if predicted[i] == labels[i] else
                f"#{i} ✗ {md(classes[labels[i]])} → {md(classes[predicted[i]])}" for i in offered],
               key="influence-pick", on_click=_pick_test_image, help="Show its most helpful and harmful training images")
    return offered
