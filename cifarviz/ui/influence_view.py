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
from cifarviz.analysis.influence import METHODS
from cifarviz.ui.loaders import about, ask_first, build_estimate, confirm_build, get_artifacts
from cifarviz.ui.widgets import image_grid
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
    if st.button("Retrain without them", key=f"retrain-{test_index}", icon=":material/model_training:",
                 disabled=full,
                 help=(f"At most {runs.max_per_session()} of your runs may wait or train at once." if full else
                       "Trains the checkpoint's recipe twice in the background, with and without these images, "
                       "and measures this test image's loss after each.")):
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
    runs.schedule()
    found = retrain.retrain_runs(checkpoint_path, test_index)[:6]
    if not any(r.state in runs.ACTIVE for r in found):
        st.rerun()  # all finished: the whole page, drawn once, stops polling
    draw_retrain_results(found, classes)


def draw_retrain_results(found: list, classes) -> None:
    if not found:
        st.caption("Nobody has retrained without this test image's images yet. Two trainings of the recipe, "
                   "queued with the server's other runs.")
        return
    rows = []
    for run in found:
        spec = run.spec
        removed = spec.get("removed_sources")
        what = (f"without {len(removed) if isinstance(removed, list) else '?'} {str(spec.get('choice', '?'))} "
                f"({str(spec.get('method', '?'))})")
        if run.state in runs.ACTIVE:
            draw_progress(run, md(what))
            continue
        result = retrain.retrain_result(run)
        if result is None:
            if run.state == runs.FAILED:
                st.error(f"{md(what)}: failed. {md_message((run.error or '').partition(chr(10))[0])}", icon=":material/error:")
            continue
        before, after = result["before"], result["after"]
        predicted = result.get("predicted_change")
        rows.append({"removed": shown(what), "training images": f"{result['train_images']:,}"
                     + (" (a subset)" if result["subset"] else ""),
                     "loss with them": before["loss"], "loss without": after["loss"], "change": result["change"],
                     "method predicted": predicted,
                     "prediction with → without": shown(f"{classes[before['predicted']]} → {classes[after['predicted']]}")})
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
            "loss with them": st.column_config.NumberColumn(format="%.3f"),
            "loss without": st.column_config.NumberColumn(format="%.3f"),
            "change": st.column_config.NumberColumn(format="%+.3f", help="What really happened: the plain loss "
                                                    "of this test image's true label, without minus with"),
            "method predicted": st.column_config.NumberColumn(format="%+.3f", help="The method's own first-order "
                                                              "estimate of that change (none for similarity or random)"),
        })
        if any(r["training images"].endswith("(a subset)") for r in rows):
            st.caption("Both trainings of a row marked 'a subset' used a random part of the training images (the "
                       "removed ones included in the first): the whole split would have taken longer than "
                       f"{retrain.BUDGET_SECONDS / 60:.0f} minutes here.")
        st.caption("Both trainings use the recipe and seed of the checkpoint on this machine, so the change is the "
                   "removal's, not a new seed's. One retraining is one sample: removing random images moves the loss "
                   "too (the table of measured figures above gives the average over many test images).")


def draw_progress(run: runs.Run, what: str) -> None:
    p = runs.progress(run)
    last, start = p.last, p.start
    if run.state == runs.QUEUED:
        st.progress(0.0, text=f"{what}: waiting for a free training slot ({runs.queue_position(run) or 1} in the queue)")
        return
    if last is None:
        st.progress(0.0, text=f"{what}: starting (timing the recipe on this machine)...")
        return
    fraction = last["step"] / max(last["total_steps"], 1)
    eta = last["elapsed"] / max(last["step"], 1) * (last["total_steps"] - last["step"])
    subset = " on a subset of the training images," if start and start.get("subset") else ""
    left = f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s"
    st.progress(min(fraction, 1.0), text=f"{what}: {md(last.get('phase', 'training'))},{subset} about {left} left")


def _figures(checkpoint):
    from cifarviz.core.errors import ModelError
    from cifarviz.core.models import model_card

    try:
        return model_card(checkpoint.model.arch_name).influence
    except ModelError:  # not a zoo model
        return None


def how_sure(checkpoint, method: str, titles: dict) -> str:
    """One sentence: the method's measured retraining effect beside similarity's and random's (the model card's
    figures, from bench/bench_retrain.py), or that it was not measured."""
    figures = _figures(checkpoint)
    if figures is None:
        return (f"No method has been checked by retraining for {checkpoint.model.arch_name} yet (it takes hours on a "
                "CPU): the default is the best one measured on lenet. See it for yourself below.")
    change = figures.mean_change
    if method not in change:
        return (f"**How sure?** This method has not been checked by retraining for {checkpoint.model.arch_name}; the "
                "table at the bottom has the ones that were.")
    others = ", ".join(f"{titles.get(m, m).split(' (')[0].lower()} {change[m]:+.2f}" for m in ("similarity", "random")
                       if m in change and m != method)
    return (f"**How sure?** Retrained without this method's top helpful images, the test image's loss rose by "
            f"**{change[method]:+.2f}** on average (for {figures.rose[method]} of {figures.tests}); {others} "
            f"({figures.protocol}).")


def measured_table(checkpoint, titles: dict) -> None:
    """Every method's measured retraining effect, in a small table (nothing when none was measured)."""
    figures = _figures(checkpoint)
    if figures is None:
        return
    with st.expander("Each method checked by retraining"):
        rows = [{"method": titles.get(m, m), "mean change of the test loss": v,
                 "rose for": f"{figures.rose[m]} of {figures.tests}"}
                for m, v in sorted(figures.mean_change.items(), key=lambda item: -item[1])]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
            "mean change of the test loss": st.column_config.NumberColumn(format="%+.3f")})
        st.caption(f"{figures.protocol}. For each test image, the recipe was retrained without the method's top "
                   f"helpful training images and the test image's plain loss measured. Measured at commit "
                   f"{figures.commit} with `{figures.command}`.")


def show_result(dataset, checkpoint, result, key: str) -> None:
    """An influence lookup: the most helpful and most harmful training images side by side, and its export."""
    helpful, harmful = st.columns(2)
    with helpful:
        st.markdown("**Most helpful** (removing it would raise the loss)")
        influence_grid(dataset, result.helpful, key=f"{key}-helpful")
    with harmful:
        st.markdown("**Most harmful** (removing it would lower the loss)")
        influence_grid(dataset, result.harmful, key=f"{key}-harmful")
    export_buttons(lambda: influence_rows(result, dataset, get_artifacts(checkpoint, dataset, "train").probs),
                   key=key, name=f"influence-{checkpoint.name}-{key}",
                   about={"view": "influence", "method": result.method, "checkpoint": checkpoint.name,
                          "query": result.query, "data": dataset.root.name,
                          "order": "the most helpful first, then the most harmful"})


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


def ask_before_building(method: str, checkpoint, dataset, fallback: str = "head") -> None:
    """The index of `method` takes minutes to build and nobody asked for it yet: say so, how long, and offer to
    start it (the answers meanwhile are `fallback`'s)."""
    estimate = build_estimate(method, checkpoint, dataset)
    how_long = (f"{about(estimate)} (as long as it took on this server last time)" if estimate is not None else
                "several minutes on a CPU (ten for fastnet on two cores)")
    ask_first(f"build-{method}",
              f"The **{METHODS[method].title}** index of **{md(checkpoint.name)}** is not built yet. Building it takes "
              f"{how_long}, once for everyone on this server; the answers below use **{METHODS[fallback].title}** "
              "until it is ready.", "Build it now", partial(confirm_build, method, checkpoint),
              "Runs in the background; this page keeps answering meanwhile.",
              f"Or before class: `python -m cifarviz precompute --checkpoint {md(checkpoint.name)} --influence {method}`.")
