"""The Tuning tab of the Train page: an Optuna study of the cs231n-style source's search, run in the background.

`tuning_tab(dataset)` draws the editable search space and budget, queues the study for a worker (the "tune"
kind of cifarviz.services.work: one study runs at a time per server, like every other long work), and shows the study's trials, best parameters,
optimisation history, learning curves and parameter importances, read from Optuna's storage and
refreshed every two seconds while a study runs. "Train with the best parameters" puts the best
TrainConfig dict in `st.session_state["train_config_request"]` for the Train form.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from cifarviz.core.errors import CifarvizError
from cifarviz.core.models import list_models
from cifarviz.services import runs, tune
from cifarviz.services.work import study as study_kind
from cifarviz.ui import app, identity
from cifarviz.ui.text import md, md_message

TRAIN_REQUEST_KEY = "train_config_request"
SIZE_OPTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)
LABELS = {"lr": "lr", "weight_decay": "weight decay", "dropout": "dropout", "batch_size": "batch size",
          "fc1": "fc1 width", "fc2": "fc2 width"}


def study_running():
    """The study run that waits or runs on this server (a run of the "tune" kind), or None."""
    return next((r for r in runs.list_runs() if r.kind == study_kind.KIND and r.state in runs.ACTIVE), None)


def launch(storage: str, study_name: str, settings: tune.StudySettings, n_trials: int, dataset) -> None:
    """Queue the study for a worker (one runs at a time per server; the queue says so)."""
    try:
        study_kind.submit_study(storage, study_name, settings, n_trials=n_trials, dataset=dataset,
                           owner=identity.viewer())
    except runs.RunError as exc:
        raise tune.TuningError(str(exc)) from None


# --------------------------------------------------------------------------- the tab


def tuning_tab(dataset, train_page: str | None = "pages/train.py") -> None:
    """The whole tab. `train_page`: where "Train with the best parameters" goes (None: rerun this page)."""
    st.caption("Optuna searches the cs231n-style source's space (30 trials of 5 epochs there, kept by the lowest "
               "validation loss) with a small budget per trial; a median pruner stops trials that trail the others "
               "after an epoch. The study lives in a database several machines can share (see the README).")
    locked = app.data_locked()
    left, right = st.columns(2)
    storage = left.text_input(
        "Optuna storage URL", value=tune.default_storage_url(), key="tune_storage", disabled=locked,
        help="Set by the server for this class." if locked else
        "sqlite:///path/optuna.db, or a shared database such as postgresql://user:password@host/db")
    storage = tune.default_storage_url() if locked else storage.strip()
    study_name = right.text_input("Study name", value=tune.DEFAULT_MODEL, key="tune_study").strip()  # the model's
    try:
        stored = tune.stored_settings(storage, study_name)
        elsewhere = stored is not None and tune.has_running_trials(storage, study_name)  # e.g. other machines
    except CifarvizError as exc:
        st.error(md_message(exc))
        return
    if problem := runs.problem():
        st.warning(md_message(problem), icon=":material/cloud_off:")
    busy = study_running() is not None
    every = 2 if busy or elsewhere else None  # fragments that follow a running study; the form stays put
    st.fragment(run_every=every)(status_line)(busy)
    settings_form(dataset, storage, study_name, stored, busy)
    st.fragment(run_every=every)(results)(storage, study_name, train_page)


def status_line(was_busy: bool) -> None:
    """Which study runs, with a Stop button; when the one that ran has ended, the whole tab is drawn again."""
    runs.start()
    run = study_running()
    if run is None:
        if was_busy:
            st.rerun()  # Start is enabled again, and the results stop refreshing
        return
    name, trials = run.spec.get("study"), run.spec.get("trials")
    stopping = (run.dir / "stop").exists()
    done = [r for r in runs.read_metrics(run) if r["event"] == "trial"] if run.state == runs.RUNNING else []
    text = (f"Study **{md(name)}** is running on worker {md(run.where or '?')}: {len(done)} of {md(trials)} trials "
            "done; one study runs at a time on this server." if run.state == runs.RUNNING else
            f"Study **{md(name)}** waits for a worker ({md(runs.where(run))}).")
    columns = st.columns([4, 1])
    columns[0].info(text + (" Stopping after the current batch..." if stopping else ""), icon=":material/tune:")
    allowed = identity.may_control(run.owner)
    if columns[1].button("Stop the study", key="tune_stop", disabled=stopping or not allowed,
                         help="The trial under way is recorded as failed; finished trials stay." if allowed
                         else "Someone else's study: only they, or the teacher, can stop it."):
        runs.request_stop(run.id, by=identity.acting_as())
        st.rerun()


def settings_form(dataset, storage: str, study_name: str, stored: tune.StudySettings | None, busy: bool) -> None:
    """The search space and budget, prefilled from the study when it exists (joining needs the same settings)."""
    start = stored or tune.StudySettings(epochs_per_trial=3, subset=10_000)
    space, base = start.space, start.base_config
    if stored is not None:
        st.caption(f"Study **{md(study_name)}** exists: the form holds its settings (new trials must use the same).")
    with st.form(f"tune_form_{study_name}", border=True, enter_to_submit=False):  # Enter in a box starts nothing
        models = list_models()
        model = st.selectbox("Model (its shipped recipe is the base)", models, index=models.index(base["model"]),
                             help="dropout, fc1 and fc2 are searched for models that take them (the cifar10net family)")
        c = st.columns(3)
        log_scale = {"format": "%.1e", "min_value": 1e-8, "step": 1e-4}  # typed, mostly: the +/- buttons are coarse
        lr = (c[0].number_input("lr from", value=space.lr[0], **log_scale),
              c[0].number_input("lr to", value=space.lr[1], **log_scale))
        wd = (c[1].number_input("weight decay from", value=space.weight_decay[0], **log_scale),
              c[1].number_input("weight decay to", value=space.weight_decay[1], **log_scale))
        dropout = (c[2].number_input("dropout from", value=space.dropout[0], min_value=0.0, max_value=0.99, step=0.05),
                   c[2].number_input("dropout to", value=space.dropout[1], min_value=0.0, max_value=0.99, step=0.05))
        choices = {name: st.pills(f"{LABELS[name]} choices", SIZE_OPTIONS, selection_mode="multi",
                                  default=list(getattr(space, name)))  # one row each: every option readable
                   for name in tune.SearchSpace.CHOICES}
        c = st.columns(3)
        n_trials = c[0].number_input("Trials to run now", min_value=1, max_value=500, value=20, step=1,
                                     help="How many trials this start adds (not a setting the study keeps).")
        epochs = c[1].number_input("Epochs per trial", min_value=1, max_value=50, value=start.epochs_per_trial, step=1)
        subset = c[2].number_input("Training images per trial (0: all)", min_value=0, max_value=len(dataset.train),
                                   value=min(start.subset or 0, len(dataset.train)), step=1000)
        submitted = st.form_submit_button("Start the study", type="primary", disabled=busy,
                                          help="A study is running; one runs at a time." if busy else None)
    if not submitted:
        return
    try:
        settings = tune.StudySettings.for_model(model, epochs_per_trial=int(epochs), subset=int(subset) or None,
                                                space=tune.SearchSpace(lr, wd, dropout, **choices))
        if stored is not None:
            tune.check_same(study_name, stored, settings)
        launch(storage, study_name, settings, int(n_trials), dataset)
    except CifarvizError as exc:
        st.error(md_message(exc))
        return
    st.rerun()


def results(storage: str, study_name: str, train_page: str | None) -> None:
    """The study's trials, best parameters and charts."""
    last = next((r for r in reversed(runs.list_runs()) if r.kind == study_kind.KIND), None)
    if last is not None and last.state == runs.FAILED:
        st.error(f"The last study ({md(last.id)}) ended with an error: {md_message(last.error or '')}")
    try:
        study = tune.load_study(storage, study_name)
        with tune.database_errors(storage):  # every read below: a busy database is said in seconds
            draw_results(study, study_name, train_page)
    except tune.NoStudyError:
        st.caption(f"No study named {md(study_name)} yet: start one above.")
    except CifarvizError as exc:
        st.warning(md_message(exc), icon=":material/database:")


def draw_results(study, study_name: str, train_page: str | None) -> None:
    table = tune.trials_table(study)
    st.subheader(f"Trials of {md(study_name)}: {len(table)}")
    if table.empty:
        st.caption("No trials yet.")
        return
    counts = table["state"].value_counts()
    st.caption(", ".join(f"{n} {state}" for state, n in counts.items()))
    shown_table = table.copy()  # a trial without a finished epoch says so, not "None"
    shown_table["val_loss"] = [f"{v:.4f}" if pd.notna(v) else "after epoch 1" for v in table["val_loss"]]
    shown_table["val_acc"] = [f"{100 * v:.1f}%" if pd.notna(v) else "" for v in table["val_acc"]]
    shown_table["seconds"] = [f"{v:,.0f}" if pd.notna(v) else "" for v in table["seconds"]]
    st.dataframe(shown_table, hide_index=True, key="tune_trials", column_config={
        "val_loss": st.column_config.TextColumn("val loss"),
        "val_acc": st.column_config.TextColumn("val acc"),
        "lr": st.column_config.NumberColumn(format="%.2e"),
        "weight_decay": st.column_config.NumberColumn("weight decay", format="%.2e"),
        "dropout": st.column_config.NumberColumn(format="%.2f"),
        "batch_size": st.column_config.NumberColumn("batch size"),
        "fc1": st.column_config.NumberColumn("fc1 width"), "fc2": st.column_config.NumberColumn("fc2 width"),
    })  # fmt: skip
    best = tune.best_trial(study)
    if best is None:
        st.caption("The best parameters appear when a trial finishes.")
    else:
        best_section(study, best, train_page)
    charts(study)


def best_section(study, best, train_page: str | None) -> None:
    st.subheader(f"Best: trial {best.number}, validation loss {best.value:.4f}")
    shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in best.params.values()]
    params = pd.DataFrame({"parameter": [LABELS.get(k, k) for k in best.params], "value": shown})
    st.dataframe(params, hide_index=True, width="content")
    config = tune.best_config(study)
    if config is None:
        st.caption("This study was not made by cifarviz (it stores no recipe of ours), so there is no Train form to "
                   "fill in from it.")
        return
    if st.button("Train with the best parameters", key="tune_train_best", type="primary",
                 help=f"Fills the Train form: {config['model']}'s recipe with these values, {config['epochs']} epochs"):
        st.session_state[TRAIN_REQUEST_KEY] = config
        if train_page:
            st.switch_page(train_page)
        st.rerun(scope="app")


RELIABLE_IMPORTANCES = 10  # fewer finished trials than this: the importances carry a caution
LOSS_AXIS = alt.Axis(format=".4~g")  # "1.05", never "1.000000" when the trials' losses are close


def charts(study) -> None:
    history, curves, importances = tune.history_table(study), tune.epoch_table(study), tune.param_importances(study)
    left, right = st.columns(2)
    if not history.empty:
        base = alt.Chart(history).encode(x=alt.X("trial:Q", title="trial", axis=alt.Axis(tickMinStep=1)))
        points = base.mark_circle(size=70).encode(
            y=alt.Y("val_loss:Q", title="validation loss", scale=alt.Scale(zero=False), axis=LOSS_AXIS),
            tooltip=["trial", alt.Tooltip("val_loss", format=".4f")])
        line = base.mark_line(interpolate="step-after", color="#d62728").encode(y="best_so_far:Q")
        left.altair_chart((points + line).properties(title="Optimisation history", height=300), width="stretch")
        left.caption("Each finished trial's validation loss; the line is the best so far.")
    if not curves.empty:
        chart = alt.Chart(curves).mark_line(point=True).encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("val_loss:Q", title="validation loss", scale=alt.Scale(zero=False), axis=LOSS_AXIS),
            color=alt.Color("state:N", title="trial state"), detail="trial:N",
            tooltip=["trial", "epoch", alt.Tooltip("val_loss", format=".4f"), "state"])
        right.altair_chart(chart.properties(title="Validation loss per epoch", height=300), width="stretch")
        right.caption("What the median pruner compares: a trial above the others' median at an epoch is stopped.")
    left, right = st.columns(2)
    if importances:
        frame = pd.DataFrame({"parameter": [LABELS.get(k, k) for k in importances],
                              "importance": list(importances.values())})
        chart = alt.Chart(frame).mark_bar().encode(
            x=alt.X("importance:Q", title="importance (PED-ANOVA, sums to 1)"),
            y=alt.Y("parameter:N", sort="-x", title=None, axis=alt.Axis(labelOverlap=False)),
            tooltip=["parameter", alt.Tooltip("importance", format=".3f")])
        left.altair_chart(chart.properties(title="Parameter importances", height=alt.Step(32)), width="stretch")
        finished = int((history["val_loss"].notna()).sum()) if not history.empty else 0
        if finished < RELIABLE_IMPORTANCES:
            left.caption(f"From only {finished} finished trial{'s' if finished != 1 else ''}: with fewer than "
                         f"{RELIABLE_IMPORTANCES}, which parameter mattered is mostly chance (another few trials "
                         "can reorder the bars). Read it as a hint, not a finding.")
    else:
        left.caption("Parameter importances appear after two finished trials.")
