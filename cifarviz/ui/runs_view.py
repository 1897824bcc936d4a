"""The Train page's live view: running runs with progress, ETA and curves, the queue, recent runs."""

import math

import altair as alt
import pandas as pd
import streamlit as st

from cifarviz.services import runs
from cifarviz.ui import app

METRIC_WIDTH = 140  # pixels: "Learning rate" and "0.0469" in full


def progress_of(rows: list[dict]) -> dict:
    start = next((r for r in rows if r["event"] == "start"), {})
    steps = [r for r in rows if r["event"] == "step"]
    epochs = [r for r in rows if r["event"] == "epoch"]
    return {"start": start, "steps": steps, "epochs": epochs, "last": steps[-1] if steps else None,
            "finishing": any(r["event"] == "finishing" for r in rows)}


def curve_frame(steps: list[dict], epochs: list[dict], max_points: int = 400) -> pd.DataFrame:
    """Long rows (epoch, split, metric, value): the training curve from the step lines (the epoch's running
    mean so far), the validation curve from the epoch lines."""
    every = max(1, math.ceil(len(steps) / max_points))
    rows = [{"epoch": s["step"] / s["steps_per_epoch"], "split": "train", "metric": m, "value": s[f"train_{m}"]}
            for s in steps[::every] + steps[-1:] for m in ("loss", "acc")]  # fmt: skip
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
    p = progress_of(runs.read_metrics(run))
    config, start, last = run.train_config, p["start"], p["last"]
    title = f"**{run.id}**: {config.get('model')}, {config.get('epochs')} epochs"
    if start:
        title += f", {start['train_images']:,} training images on {start['device'].upper()}"
    st.markdown(title)
    stopping = (run.dir / "stop").exists()
    if last is None:
        st.progress(0.0, text="Starting the training process (loading torch and the data)...")
    else:
        fraction = last["step"] / last["total_steps"]
        seconds_per_step = last["elapsed"] / last["step"]
        eta = seconds_per_step * (last["total_steps"] - last["step"])
        text = ("Measuring the test accuracy of the kept epoch..." if p["finishing"] else
                "Stopping after this batch..." if stopping else
                f"Epoch {last['epoch']}/{config.get('epochs')}, step {last['step']:,}/{last['total_steps']:,}")
        st.progress(min(fraction, 1.0), text=text)
        val = p["epochs"][-1]["val_acc"] if p["epochs"] else None
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
        frame = curve_frame(p["steps"], p["epochs"])
        left, right = st.columns(2)
        left.altair_chart(live_chart(frame, "loss", config.get("epochs", 1)), width="stretch")
        right.altair_chart(live_chart(frame, "acc", config.get("epochs", 1)), width="stretch")
    if st.button("Stop", key=f"stop-{run.id}", icon=":material/stop:", disabled=stopping,
                 help="Ends within one batch and keeps the last finished epoch as the checkpoint."):
        runs.request_stop(run.id)
        st.rerun(scope="fragment")


def checkpoint_label(run: runs.Run) -> str | None:
    target = str(run.checkpoint)
    return next((label for label, path in app.checkpoint_choices().items() if path == target), None)


def draw_finished(run: runs.Run) -> None:
    note = run.status.get("note") or ""
    if run.state == runs.FAILED:
        message, _, log = (run.error or "").partition("\n")  # a dead worker's report ends with its log's last lines
        st.error(f"**{run.id}** failed. {message}", icon=":material/error:")
        if log.strip():
            with st.expander(f"The end of {run.id}'s log"):
                st.code(log, language=None)
    elif run.state == runs.CANCELLED:
        st.caption(f"{run.id}: cancelled before it started.")
    else:
        left, right = st.columns([4, 1])
        left.success(f"**{run.id}** {run.state}: {note}", icon=":material/check_circle:")
        label = checkpoint_label(run) if run.has_model else None
        if label and right.button("Use in other pages", key=f"use-{run.id}",
                                  help="Selects this run's checkpoint in the sidebar"):
            st.session_state["checkpoint_label_request"] = label
            st.rerun()


@st.fragment(run_every=2)
def live_view(owner: str) -> None:
    """Every run on the server, redrawn every 2 s: the running ones live, the queue, the recent ones."""
    runs.schedule()  # starts a queued run when a slot is free; reports workers that died
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
        st.caption(f"Nothing is training. At most {runs.max_running()} run(s) train at once on this server; "
                   "others wait in the queue.")
    for run in running:
        with st.container(border=True, key=f"live-{run.id}"):
            draw_running(run)
    for run in (r for r in active if r.state == runs.QUEUED):
        left, right = st.columns([4, 1])
        yours = " (yours)" if run.config.get("owner") == owner else ""
        left.info(f"**#{runs.queue_position(run, every)} in the queue**: {run.id}{yours}, "
                  f"{run.train_config.get('epochs')} epochs. It starts when a running one ends.",
                  icon=":material/hourglass_top:")
        if right.button("Cancel", key=f"cancel-{run.id}"):
            runs.cancel(run.id)
            st.rerun()
    done = sorted((r for r in every if r.state not in runs.ACTIVE), key=lambda r: r.status.get("ended_at", 0))
    if done:
        st.subheader("Recent runs")
        for run in done[::-1][:5]:
            draw_finished(run)
