"""The Train page's Compare tab: any runs' and shipped checkpoints' curves overlaid, configurations side by side."""

import altair as alt
import pandas as pd
import streamlit as st

from cifarviz.core.checkpoint import read_metadata, shipped_files
from cifarviz.core.models import model_cards
from cifarviz.services import runs
from cifarviz.ui import app
from cifarviz.ui.charts import PALETTE, SPLITS_NOTE, epoch_curves

DEFAULT_STUDY = "normalisation"  # the family shown before any run exists


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
                                      "subset": run.spec.get("subset")}


def compare_sources() -> dict[str, str]:
    sources = {r.id: str(r.dir) for r in runs.list_runs()[::-1] if r.state != runs.CANCELLED}
    sources.update({f"{p.stem} (shipped)": str(p) for p in shipped_files()})
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
            "augmentation": ", ".join(k if v is True else f"{k} {v}" for k, v in aug.items() if v) or "none",
            "training images": f"{status['subset']:,}" if status.get("subset") else "all",
            "seed": config.get("seed"), "state": status.get("state"),
            "test accuracy": f"{status['test_accuracy']:.2%}" if status.get("test_accuracy") is not None else "—",
        }  # fmt: skip

    return pd.DataFrame({name: {k: str(v) for k, v in describe(c, s).items()} for name, (_, c, s) in configs.items()})


def compare_tab() -> None:
    sources = compare_sources()
    st.caption("Overlay the learning curves of any runs (and the shipped checkpoints' own training), e.g. s8net with "
               "BN, GN and LN, or deepnet conv / res / skip trained with the same settings.")
    # your latest runs; before any, the normalisation study the shipped checkpoints already hold
    study = [f"{card.name} (shipped)" for card in model_cards() if card.family == DEFAULT_STUDY]
    default = [name for name in sources if not name.endswith("(shipped)")][:3] or [s for s in study if s in sources]
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
