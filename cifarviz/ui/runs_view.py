"""The Train page's live view: running runs with progress, ETA and curves, the queue, recent runs."""

import math

import altair as alt
import pandas as pd
import streamlit as st

from cifarviz.services import runs
from cifarviz.ui import app, identity
from cifarviz.ui.layout import scroll_into_view
from cifarviz.ui.text import md, md_message

METRIC_WIDTH = 140  # pixels: "Learning rate" and "0.0469" in full


def curve_frame(steps, epochs, max_points: int = 400) -> pd.DataFrame:
    """Long rows (epoch, split, metric, value): the training curve from the step lines (the epoch's running
    mean so far), the validation curve from the epoch lines."""
    every = max(1, math.ceil(len(steps) / max_points))
    rows = [{"epoch": s["step"] / s["steps_per_epoch"], "split": "train", "metric": m, "value": s[f"train_{m}"]}
            for s in list(steps[::every]) + list(steps[-1:]) for m in ("loss", "acc")]  # fmt: skip
    rows += [{"epoch": e["epoch"], "split": split, "metric": m, "value": e[f"{split}_{m}"]}
             for e in epochs for split in ("train", "val") for m in ("loss", "acc") if e.get(f"{split}_{m}") is not None]
    return pd.DataFrame(rows, columns=["epoch", "split", "metric", "value"])


def live_chart(frame: pd.DataFrame, metric: str, epochs: int) -> alt.Chart:
    accuracy = metric == "acc"
    data = frame[frame["metric"] == metric]
    base = alt.Chart(data).encode(
        x=alt.X("epoch:Q", scale=alt.Scale(domain=[0, epochs]), axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("value:Q", title="accuracy" if accuracy else "loss", scale=alt.Scale(zero=False, nice=True),
                axis=alt.Axis(format="%" if accuracy else ".2f")),
        color=alt.Color("split:N", scale=alt.Scale(domain=["train", "val"], range=["#1f77b4", "#ff7f0e"]),
                        legend=alt.Legend(title=None, orient="bottom", labelFontSize=14)),
        tooltip=["split", alt.Tooltip("epoch:Q", format=".2f"),
                 alt.Tooltip("value:Q", format=".2%" if accuracy else ".3f")])
    lines = base.mark_line(strokeWidth=2.5)
    points = base.transform_filter(alt.datum.split == "val").mark_point(size=60, filled=True)
    return (lines + points).properties(height=260, title="Accuracy" if accuracy else "Loss").configure_axis(
        labelFontSize=13, titleFontSize=14).configure_title(fontSize=15)


def draw_running(run: runs.Run) -> None:
    p = runs.progress(run)
    config, start, last = run.train_config, p.start, p.last
    epochs = config.get("epochs") if runs._is_count(config.get("epochs")) and config["epochs"] >= 1 else 1
    title = f"**{md(run.id)}**: {md(config.get('model'))}, {epochs} epochs"
    if start:
        title += f", {start['train_images']:,} training images on {md(start['device'].upper())}"
    if run.where:
        title += f" · worker {md(run.where)}"
    st.markdown(title)
    if p.damaged_lines:
        st.caption(f"{p.damaged_lines} damaged line(s) of its metrics.jsonl were skipped.")
    if p.unread_bytes:
        st.caption(f"Reading its metrics log: {p.unread_bytes / 2**20:,.0f} MB still to read (a little more with "
                   "every refresh, so the page stays quick).")
    stopping = (run.dir / "stop").exists()
    if last is None:
        st.progress(0.0, text="Starting the training process (loading torch and the data)...")
    else:
        fraction = last["step"] / last["total_steps"]
        seconds_per_step = last["elapsed"] / last["step"]
        eta = seconds_per_step * max(last["total_steps"] - last["step"], 0)
        text = ("Measuring the test accuracy of the kept epoch..." if p.finishing else
                "Stopping after this batch..." if stopping else
                f"Epoch {last['epoch']}/{epochs}, step {last['step']:,}/{last['total_steps']:,}")
        st.progress(min(fraction, 1.0), text=text)
        val = p.epochs[-1].get("val_acc") if p.epochs else None
        with st.container(horizontal=True, wrap=True, gap="medium"):  # wraps on a projector, never cuts a number
            st.metric("Images/s", f"{last['images_per_s']:,.0f}", help="Training images per second in this epoch",
                      width=METRIC_WIDTH)
            st.metric("ETA", f"{eta:,.0f} s" if eta < 120 else f"{eta / 60:,.1f} min", width=METRIC_WIDTH,
                      help="Time left for the remaining steps at the current speed (validation not included)")
            st.metric("Learning rate", f"{last['lr']:.3g}", width=METRIC_WIDTH)
            st.metric("Train loss", f"{last['train_loss']:.3f}", help="Mean over this epoch so far",
                      width=METRIC_WIDTH)
            st.metric("Val accuracy", "—" if val is None else f"{val:.1%}", help="After the last finished epoch",
                      width=METRIC_WIDTH)
        frame = curve_frame(p.steps, p.epochs)
        left, right = st.columns(2)
        left.altair_chart(live_chart(frame, "loss", epochs), width="stretch")
        right.altair_chart(live_chart(frame, "acc", epochs), width="stretch")
    stop_button(run, stopping)


def stop_button(run: runs.Run, stopping: bool) -> None:
    """Stop: the owner's and the teacher's; for anyone else a disabled button that says whose it is."""
    allowed = identity.may_control(run.owner)
    if st.button("Stop", key=f"stop-{run.id}", icon=":material/stop:", disabled=stopping or not allowed,
                 help="Ends within one batch and keeps the last finished epoch as the checkpoint." if allowed else
                      "Someone else's run: only they, or the teacher, can stop it."):
        try:
            runs.request_stop(run.id, by=identity.acting_as())
        except runs.RunError as exc:
            st.error(md_message(exc))
            return
        st.rerun(scope="fragment")


def checkpoint_label(run: runs.Run) -> str | None:
    target = str(run.checkpoint)
    return next((label for label, path in app.checkpoint_choices().items() if path == target), None)


def draw_finished(run: runs.Run, curves: bool = False) -> None:
    """A run that ended: its outcome, and (`curves`: the newest, just stopped or finished) the curves it drew
    while it ran, so Stop does not wipe them from the screen."""
    note = run.status.get("note") or ""
    name = md(run.id)
    if run.problems:
        st.warning(f"**{name}**: its files are damaged, so it is left out ({md_message('; '.join(run.problems))}).",
                   icon=":material/report:")
    elif run.state == runs.FAILED:
        message, _, log = (run.error or "").partition("\n")  # a dead worker's report ends with its log's last lines
        st.error(f"**{name}** failed. {md_message(message)}", icon=":material/error:")
        if log.strip():
            with st.expander(f"The end of {name}'s log"):
                st.code(log, language=None)
    elif run.state == runs.CANCELLED:
        st.caption(f"{name}: cancelled before it started.")
    else:
        left, right = st.columns([3, 1], vertical_alignment="center")  # [4, 1] cut "Use in other pages" at 1024 px
        left.success(f"**{name}** {run.state}: {md_message(note)}", icon=":material/check_circle:")
        label = checkpoint_label(run) if run.has_model else None
        if label and right.button("Use in other pages", key=f"use-{run.id}", width="stretch",
                                  help="Selects this run's checkpoint in the sidebar"):
            st.session_state["checkpoint_label_request"] = label
            st.rerun()
        p = runs.progress(run) if curves else None
        if p is not None and p.steps:
            config = run.train_config
            epochs = config.get("epochs") if runs._is_count(config.get("epochs")) and config["epochs"] >= 1 else 1
            frame = curve_frame(p.steps, p.epochs)
            left, right = st.columns(2)
            left.altair_chart(live_chart(frame, "loss", epochs), width="stretch")
            right.altair_chart(live_chart(frame, "acc", epochs), width="stretch")


MAX_RECENT = 5


@st.fragment(run_every=2)
def live_view(owner: str) -> None:
    """Every run on the server, redrawn every 2 s: the running ones live, the queue, the recent ones. The runs
    folder is listed once per tick (configs parsed once, metrics read incrementally)."""
    runs.start()  # this process hears what workers hand back (a background thread; it starts nothing per render)
    if problem := runs.problem():
        st.warning(md_message(problem), icon=":material/cloud_off:")
    every = runs.list_runs()
    active = [r for r in every if r.state in runs.ACTIVE]
    ids = {r.id for r in active}
    if ids != st.session_state.get("_train_active", ids):  # a run ended: redraw the page, its sidebar included
        st.session_state["_train_active"] = ids
        st.rerun()
    st.session_state["_train_active"] = ids
    st.subheader("Training now")
    running = [r for r in active if r.state == runs.RUNNING]
    if not running:
        most = runs.max_running()
        st.caption("Nothing is training. " + (
            "This server trains nothing itself: runs wait for a worker on another machine." if most == 0 else
            f"{'One run trains' if most == 1 else f'At most {most} runs train'} at once on this server (workers on "
            "other machines add more); others wait in the queue."))
    for run in running:
        with st.container(border=True, key=f"live-{run.id}"):
            draw_running(run)
    started = st.session_state.get("train_just_started")
    if started in ids:  # Start was pressed below the fold: bring this run (its curves, or its place in the queue)
        scroll_into_view(f"live-{started}" if started in {r.id for r in running} else "train-queue", started,
                         skip_first=False)
        if started in {r.id for r in running}:
            st.session_state.pop("train_just_started")
    waiting = [r.id for r in every if r.state == runs.QUEUED]
    st.container(key="train-queue")
    for run in (r for r in active if r.state == runs.QUEUED):
        left, right = st.columns([4, 1])
        yours = " (yours)" if run.owner == owner else ""
        left.info(f"**#{waiting.index(run.id) + 1} in the queue**: {md(run.id)}{yours}, "
                  f"{md(run.train_config.get('epochs', '?'))} epochs, {md(runs.where(run))}. It starts when a worker "
                  "is free.",
                  icon=":material/hourglass_top:")
        allowed = identity.may_control(run.owner)
        if right.button("Cancel", key=f"cancel-{run.id}", disabled=not allowed,
                        help=None if allowed else "Someone else's run: only they, or the teacher, can cancel it."):
            try:
                runs.cancel(run.id, by=identity.acting_as())
            except runs.RunError as exc:
                st.error(md_message(exc))
            else:
                st.rerun()
    done = sorted((r for r in every if r.state not in runs.ACTIVE), key=lambda r: r.status.get("ended_at", 0))
    if done:
        st.subheader("Recent runs")
        for i, run in enumerate(done[::-1][:MAX_RECENT]):
            draw_finished(run, curves=i == 0)
