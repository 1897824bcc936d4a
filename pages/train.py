"""Train: pick a model and its hyperparameters, press Start, and watch it learn; compare runs; tune (Optuna)."""

import math
import secrets

import altair as alt
import pandas as pd
import streamlit as st
import torch

from cifarviz.core.checkpoint import SHIPPED_DIR, read_metadata
from cifarviz.core.errors import CifarvizError
from cifarviz.core.models import list_models, model_entry
from cifarviz.core.recipes import RECIPES
from cifarviz.core.train import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MODES, TrainConfig
from cifarviz.services import runs
from cifarviz.ui import app
from cifarviz.ui.charts import PALETTE, SPLITS_NOTE, epoch_curves
from cifarviz.ui.tuning import tuning_tab

CUDA = torch.cuda.is_available()
BATCH_SIZES = [32, 64, 128, 256, 512, 1024]
SUBSETS = [1000, 2000, 5000, 10000, 20000, 45000]
DECAY_MODE_LABELS = {"coefficient": "coefficient (decay per step follows lr)",
                     "per_step": "per step at peak lr (kept when lr changes)"}
KEY = "tr_"  # the form's widget keys
METRIC_WIDTH = 140  # pixels: "Learning rate" and "0.0469" in full

app.sidebar()
st.title("Train")
dataset = app.current_dataset()
if dataset is None:
    st.stop()
owner = st.session_state.setdefault("train_owner", secrets.token_hex(8))  # this browser session's runs


# --------------------------------------------------------------------------- the form


def form_values(config: TrainConfig, subset: int | None = None) -> dict:
    """The form's widget values for a TrainConfig (and a training-subset size)."""
    values = {name: getattr(config, name) for name in (
        "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "weight_decay_mode",
        "label_smoothing", "schedule", "warmup", "final_lr", "lookahead", "tta", "seed")}  # fmt: skip
    values.update({f"aug_{k}": v for k, v in config.augment.to_dict().items()})
    values["dropout"] = config.model_args.get("dropout", model_entry(config.model).defaults().get("dropout"))
    values["model_args"] = {k: v for k, v in config.model_args.items() if k != "dropout"}
    if subset is not None:
        values["subset"] = min((s for s in SUBSETS if s >= subset), default=SUBSETS[-1])
    return values


def load_form(config: TrainConfig | dict, subset: int | None = None) -> None:
    config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    for name, value in form_values(config, subset).items():
        st.session_state[KEY + name] = value


def demo_default() -> TrainConfig:
    """Sized for a live demo: lenet's recipe for 3 epochs (seconds per epoch on 2 CPU cores)."""
    return TrainConfig(**{**RECIPES["lenet"].to_dict(), "epochs": 3})


def on_recipe() -> None:
    name = st.session_state[KEY + "recipe"]
    if name in RECIPES:
        load_form(RECIPES[name])


def on_model() -> None:
    """A new model brings its own dropout default (and no arguments of the previous one)."""
    model = st.session_state[KEY + "model"]
    st.session_state[KEY + "dropout"] = model_entry(model).defaults().get("dropout")
    st.session_state[KEY + "model_args"] = {}


def on_norm() -> None:
    st.session_state[KEY + "model"] = f"s8net-{st.session_state[KEY + 'norm']}"


def config_from_form() -> TrainConfig:
    """The TrainConfig the form describes (checked: a bad value raises a CifarvizError that says which)."""
    get = lambda name: st.session_state[KEY + name]
    model_args = dict(get("model_args") or {})
    if get("dropout") is not None and "dropout" in model_entry(get("model")).defaults():
        model_args["dropout"] = float(get("dropout"))
    return TrainConfig(
        model=get("model"), model_args=model_args, epochs=int(get("epochs")), batch_size=int(get("batch_size")),
        optimizer=get("optimizer"), lr=float(get("lr")), momentum=float(get("momentum")),
        weight_decay=float(get("weight_decay")), weight_decay_mode=get("weight_decay_mode"),
        label_smoothing=float(get("label_smoothing")), schedule=get("schedule"), warmup=float(get("warmup")),
        final_lr=float(get("final_lr")), lookahead=bool(get("lookahead")), tta=get("tta"), seed=int(get("seed")),
        augment={"translate": int(get("aug_translate")), "flip": bool(get("aug_flip")),
                 "rotate": float(get("aug_rotate")), "color_jitter": float(get("aug_color_jitter"))},
    )


def training_form() -> None:
    request = st.session_state.pop("train_config_request", None)  # e.g. the Tune tab's best trial
    if request is not None:
        try:
            load_form(request)
            st.session_state[KEY + "recipe"] = "(custom)"
            st.info("The form holds the configuration sent from the Tune tab; press Start to train it.")
        except (CifarvizError, TypeError) as exc:
            st.error(f"The configuration sent to this form was not usable: {exc}")
    if KEY + "model" not in st.session_state:
        load_form(demo_default(), subset=None if CUDA else 10000)
        st.session_state.setdefault(KEY + "subset", SUBSETS[-1])
        st.session_state.setdefault(KEY + "snapshots", False)

    st.selectbox("Start from a recipe", ["(custom)", *RECIPES], key=KEY + "recipe", on_change=on_recipe,
                 help="Fills the form with the settings that trained a shipped checkpoint; change any of them.")
    left, middle, right = st.columns(3)
    with left:
        st.markdown("**Model**")
        st.selectbox("Model", list_models(), key=KEY + "model", on_change=on_model)
        model = st.session_state[KEY + "model"]
        if model.startswith("s8net-"):
            st.session_state[KEY + "norm"] = model.removeprefix("s8net-")
            st.segmented_control("Normalisation", ["bn", "gn", "ln"], key=KEY + "norm", on_change=on_norm,
                                 required=True, help="BatchNorm, GroupNorm or LayerNorm (the s8 study)")
        if "dropout" in model_entry(model).defaults():
            if st.session_state.get(KEY + "dropout") is None:
                st.session_state[KEY + "dropout"] = model_entry(model).defaults()["dropout"]
            st.slider("Dropout", 0.0, 0.9, step=0.05, key=KEY + "dropout")
        if st.session_state.get(KEY + "model_args"):
            st.caption("Model arguments: " + ", ".join(f"{k} {v}" for k, v in st.session_state[KEY + "model_args"].items()))
        st.number_input("Epochs", 1, 200, key=KEY + "epochs")
        st.select_slider("Training images", SUBSETS, key=KEY + "subset",
                         format_func=lambda n: f"{n:,}" + (" (all)" if n >= len(dataset.train) else ""),
                         help="A random subset of the training split (seeded), for quick demos; validation "
                              f"always uses the {len(dataset.val):,} validation images.")
        st.number_input("Seed", 0, 2**31 - 1, key=KEY + "seed")
    with middle:
        st.markdown("**Optimisation**")
        st.selectbox("Optimizer", OPTIMIZERS, key=KEY + "optimizer",
                     format_func=lambda o: {"sgd": "SGD (Nesterov)", "adam": "Adam", "adamw": "AdamW"}[o])
        st.number_input("Learning rate (peak)", min_value=0.0, format="%g", step=None, key=KEY + "lr")
        st.selectbox("Schedule", SCHEDULES, key=KEY + "schedule",
                     help="onecycle: linear warm-up then linear decay; cosine: warm-up then cosine; constant")
        st.select_slider("Batch size", sorted({*BATCH_SIZES, st.session_state[KEY + "batch_size"]}),
                         key=KEY + "batch_size")
        st.number_input("Weight decay", min_value=0.0, format="%g", step=None, key=KEY + "weight_decay")
        st.radio("Weight decay is", WEIGHT_DECAY_MODES, key=KEY + "weight_decay_mode",
                 format_func=DECAY_MODE_LABELS.get,
                 help="coefficient: the optimizer's own weight_decay, so each step shrinks the weights by lr x "
                      "weight decay and a new lr changes the decay too. per step: the shrink per step at the peak "
                      "lr; the coefficient becomes weight decay / lr, so a new lr keeps the recipe's decay.")
    with right:
        st.markdown("**Regularisation and augmentation**")
        st.slider("Label smoothing", 0.0, 0.5, step=0.05, key=KEY + "label_smoothing")
        st.slider("Random translation (pixels)", 0, 4, key=KEY + "aug_translate")
        st.checkbox("Random horizontal flip", key=KEY + "aug_flip")
        st.slider("Random rotation (degrees)", 0.0, 30.0, step=5.0, key=KEY + "aug_rotate")
        st.slider("Colour jitter", 0.0, 0.5, step=0.05, key=KEY + "aug_color_jitter")
        with st.expander("More settings"):
            st.number_input("Momentum (SGD)", 0.0, 0.99, step=0.05, key=KEY + "momentum")
            st.slider("Warm-up (fraction of steps)", 0.0, 1.0, step=0.01, key=KEY + "warmup")
            st.number_input("Final lr (fraction of peak)", 0.0, 1.0, step=0.01, key=KEY + "final_lr")
            st.checkbox("Lookahead (EMA of weights)", key=KEY + "lookahead")
            st.selectbox("Test-time augmentation", ["none", "flip"], key=KEY + "tta")
            st.checkbox("Save a checkpoint of every epoch", key=KEY + "snapshots",
                        help="epochs/epoch-NNN.safetensors in the run folder, e.g. to study how influence changes")

    try:
        config = config_from_form()
    except CifarvizError as exc:
        st.error(str(exc))
        return
    if config.weight_decay_mode == "per_step":
        st.caption(f"Weight decay per step {config.weight_decay:g} at lr {config.lr:g}: coefficient "
                   f"{config.decay_coefficient:.4g}.")
    where = "a CUDA GPU" if CUDA else f"the CPU ({runs.train_threads()} thread, at low priority)"
    mine = [r for r in runs.list_runs() if r.state in runs.ACTIVE and r.config.get("owner") == owner]
    full = len(mine) >= runs.max_per_session()
    start = st.button("Start", type="primary", icon=":material/play_arrow:", disabled=full,
                      help=f"{len(mine)} of your runs wait or train (at most {runs.max_per_session()} per browser "
                           "session): stop or cancel one first." if full else
                           f"Trains on {where}; the run goes on if you leave or reload the page.")
    if start:
        try:
            subset = st.session_state[KEY + "subset"]
            run_id = runs.submit_training(config, dataset.root, subset=None if subset >= len(dataset.train) else subset,
                                          snapshots=st.session_state[KEY + "snapshots"],
                                          val_size=len(dataset.val), split_seed=dataset.split_seed, owner=owner)
            st.toast(f"Submitted {run_id}")
        except CifarvizError as exc:
            st.error(str(exc))


# --------------------------------------------------------------------------- the live view


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
def live_view() -> None:
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


# --------------------------------------------------------------------------- compare


@st.cache_data(show_spinner=False, max_entries=256)
def history_of(path: str, stamp: float) -> tuple[list[dict], dict, dict]:
    """(per-epoch history, train config, status) of a run folder or a checkpoint file."""
    if path.endswith(".safetensors"):
        meta = read_metadata(path)
        status = {"state": meta.get("status"), "test_accuracy": (meta.get("metrics") or {}).get("test_accuracy")}
        return meta.get("history") or [], meta.get("train_config") or {}, status
    run = runs.load_run(path.rsplit("/", 1)[-1], path.rsplit("/", 1)[0])
    epochs = [r for r in runs.read_metrics(run) if r["event"] == "epoch"]
    saved = next((r for r in runs.read_metrics(run) if r["event"] == "saved"), {})
    return epochs, run.train_config, {"state": run.state, "test_accuracy": saved.get("test_accuracy"),
                                      "subset": run.config.get("spec", {}).get("subset")}


def compare_sources() -> dict[str, str]:
    sources = {r.id: str(r.dir) for r in runs.list_runs()[::-1] if r.state != runs.CANCELLED}
    sources.update({f"{p.stem} (shipped)": str(p) for p in sorted(SHIPPED_DIR.glob("*.safetensors"))})
    return sources


def config_rows(configs: dict[str, tuple]) -> pd.DataFrame:
    def describe(config: dict, status: dict) -> dict:
        aug = config.get("augment") or {}
        return {
            "model": config.get("model"), "model arguments": str(config.get("model_args") or "defaults"),
            "epochs": config.get("epochs"), "batch size": config.get("batch_size"),
            "optimizer": config.get("optimizer"), "learning rate": config.get("lr"), "schedule": config.get("schedule"),
            "weight decay": f"{config.get('weight_decay', 0):.4g} ({config.get('weight_decay_mode', 'coefficient')})",
            "label smoothing": config.get("label_smoothing"),
            "augmentation": ", ".join(f"{k} {v}" for k, v in aug.items() if v) or "none",
            "training images": f"{status['subset']:,}" if status.get("subset") else "all",
            "seed": config.get("seed"), "state": status.get("state"),
            "test accuracy": f"{status['test_accuracy']:.2%}" if status.get("test_accuracy") is not None else "—",
        }  # fmt: skip

    return pd.DataFrame({name: {k: str(v) for k, v in describe(c, s).items()} for name, (_, c, s) in configs.items()})


def compare_tab() -> None:
    sources = compare_sources()
    st.caption("Overlay the learning curves of any runs (and the shipped checkpoints' own training), e.g. s8net with "
               "BN, GN and LN, or deepnet conv / res / skip trained with the same settings.")
    # your latest runs; before any, the s8 normalisation study the shipped checkpoints already hold
    default = [name for name in sources if not name.endswith("(shipped)")][:3] or [
        f"s8net-{norm} (shipped)" for norm in ("bn", "gn", "ln") if f"s8net-{norm} (shipped)" in sources]
    chosen = st.multiselect("Runs", list(sources), default=default, key="compare_runs", max_selections=len(PALETTE))
    if not chosen:
        st.info("Choose runs to compare.")
        return
    metric = st.segmented_control("Metric", ["accuracy", "loss"], default="accuracy", key="compare_metric",
                                  required=True)
    data = {name: history_of(sources[name], app.file_stamp(sources[name] + ("" if sources[name].endswith(
        ".safetensors") else "/metrics.jsonl"))) for name in chosen}
    key = "acc" if metric == "accuracy" else "loss"
    rows = [{"run": name, "epoch": h["epoch"], "split": split, "value": h.get(f"{split}_{key}")}
            for name, (history, _, _) in data.items() for h in history for split in ("train", "val")
            if h.get(f"{split}_{key}") is not None]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["run", "epoch", "split", "value"])
    if frame.empty:
        st.info("None of these runs has finished an epoch yet.")
    else:
        colour = alt.Color("run:N", scale=alt.Scale(domain=chosen, range=PALETTE[: len(chosen)]),
                           legend=alt.Legend(title=None, orient="bottom", columns=2, labelLimit=0, labelFontSize=13))
        chart = epoch_curves(frame, key, colour, series="run", height=380).configure_axis(labelFontSize=13,
                                                                                          titleFontSize=14)
        st.altair_chart(chart, width="stretch")
        st.caption(SPLITS_NOTE)
    st.markdown("**Configurations side by side**")
    st.dataframe(config_rows(data), width="stretch")


# --------------------------------------------------------------------------- the page


if "train_config_request" in st.session_state:  # "Train with the best parameters" on the Tune tab: show the form
    st.session_state["train_tabs"] = "Train"
train_tab, compare, tune = st.tabs(["Train", "Compare", "Tune"], key="train_tabs", on_change="rerun")
with train_tab:
    training_form()
    live_view()
with compare:
    compare_tab()
with tune:
    tuning_tab(dataset)
