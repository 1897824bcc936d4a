import altair as alt
import pandas as pd
import streamlit as st

from cifarviz import app
from cifarviz.checkpoint import SHIPPED_DIR, read_metadata
from cifarviz.errors import CifarvizError
from cifarviz.models import count_parameters, create_model, list_models, model_entry
from cifarviz.recipes import SOURCE_REPORTED
from cifarviz.summary import layer_table

app.sidebar()
st.title("Models")


@st.cache_data(show_spinner=False)
def zoo_table() -> pd.DataFrame:
    shipped = {p.stem: read_metadata(p) for p in SHIPPED_DIR.glob("*.safetensors")}
    rows = []
    for name in list_models():
        entry = model_entry(name)
        model = create_model(name, **({"pretrained": False} if name == "resnet18-transfer" else {}))
        meta = shipped.get(name, {})
        rows.append({"model": name, "parameters": count_parameters(model),
                     "trainable": count_parameters(model, trainable_only=True),
                     "shipped test accuracy": (meta.get("metrics") or {}).get("test_accuracy"),
                     "source reported": SOURCE_REPORTED.get(name), "source": entry.source,
                     "description": entry.description})  # fmt: skip
    return pd.DataFrame(rows)


@st.cache_data(show_spinner=False)
def summary_rows(name: str) -> pd.DataFrame:
    model = create_model(name, **({"pretrained": False} if name == "resnet18-transfer" else {}))
    rows = pd.DataFrame(layer_table(model))
    rows["output_shape"] = rows["output_shape"].map(lambda shape: " x ".join(map(str, shape)))
    return rows


@st.cache_data(show_spinner=False)
def histories() -> pd.DataFrame:
    rows = []
    for path in sorted(SHIPPED_DIR.glob("*.safetensors")):
        for h in read_metadata(path).get("history", []):
            for metric in ("train_acc", "val_acc", "train_loss", "val_loss"):
                rows.append({"model": path.stem, "epoch": h["epoch"], "metric": metric, "value": h[metric]})
    return pd.DataFrame(rows)


zoo = zoo_table()
percent = st.column_config.NumberColumn(format="percent")
st.dataframe(zoo, hide_index=True, column_config={"shipped test accuracy": percent, "source reported": percent})

tab_summary, tab_curves, tab_compare, tab_upload = st.tabs(["Layer summary", "Training curves", "Comparisons", "Upload a checkpoint"])

with tab_summary:
    name = st.selectbox("Model", list_models(), index=list_models().index("s8net-bn"), key="summary_model")
    rows = summary_rows(name)
    st.caption(f"{model_entry(name).description}. Total parameters: {int(zoo.set_index('model').loc[name, 'parameters']):,}")
    st.dataframe(rows, hide_index=True)

curves = histories()
with tab_curves:
    if curves.empty:
        st.info("No shipped checkpoints with histories.")
    else:
        names = sorted(curves["model"].unique())
        chosen = st.multiselect("Checkpoints", names, default=[n for n in ("fastnet", "s8net-bn") if n in names], key="curve_models")
        metric = st.segmented_control("Metric", ["accuracy", "loss"], default="accuracy", key="curve_metric", required=True)
        shown = curves[curves["model"].isin(chosen) & curves["metric"].str.endswith("acc" if metric == "accuracy" else "loss")]
        st.altair_chart(alt.Chart(shown).mark_line(point=True).encode(
            x="epoch:Q", y=alt.Y("value:Q", title=metric), color="model:N",
            strokeDash=alt.StrokeDash("metric:N", title="split"), tooltip=["model", "metric", "epoch", "value"],
        ).properties(height=360), width="stretch")


def comparison(models: list[str], title: str) -> None:
    present = [m for m in models if not curves.empty and m in set(curves["model"])]
    if not present:
        st.info(f"No shipped checkpoints for {title}.")
        return
    table = zoo.set_index("model").loc[present, ["parameters", "shipped test accuracy", "source reported"]].reset_index()
    a, b = st.columns([1, 1.4])
    a.dataframe(table, hide_index=True, column_config={"shipped test accuracy": percent, "source reported": percent})
    val = curves[curves["model"].isin(present) & (curves["metric"] == "val_acc")]
    b.altair_chart(alt.Chart(val).mark_line(point=True).encode(
        x="epoch:Q", y=alt.Y("value:Q", title="validation accuracy"), color="model:N").properties(height=240, title=title),
        width="stretch")


with tab_compare:
    st.markdown("**Normalisation** (s8 source): the same 37,664-parameter network with BatchNorm, GroupNorm, LayerNorm")
    comparison(["s8net-bn", "s8net-gn", "s8net-ln"], "BatchNorm vs GroupNorm vs LayerNorm")
    st.markdown("**Blocks** (ResNet source): six plain, residual, or skip-concatenation blocks")
    comparison(["deepnet-conv", "deepnet-res", "deepnet-skip"], "plain vs residual vs skip")
    st.markdown("**Parameters vs accuracy** for every shipped checkpoint")
    scatter = zoo.dropna(subset=["shipped test accuracy"])
    st.altair_chart(alt.Chart(scatter).mark_circle(size=120).encode(
        x=alt.X("parameters:Q", scale=alt.Scale(type="log")), y=alt.Y("shipped test accuracy:Q", scale=alt.Scale(zero=False)),
        color="model:N", tooltip=["model", "parameters", "shipped test accuracy"]).properties(height=320), width="stretch")

with tab_upload:
    st.markdown("Upload a `.safetensors` checkpoint, or a `.pt`/`.pth` **state dict** of a zoo architecture. "
                "Files are read without executing any code (safetensors, or `torch.load(weights_only=True)`).")
    upload = st.file_uploader("Checkpoint", type=["safetensors", "pt", "pth"], key="checkpoint_upload")
    if upload is not None and st.session_state.get("checkpoint_upload_done") != upload.file_id:
        try:
            label, checkpoint = app.save_uploaded_checkpoint(upload.name, upload.getvalue())
            st.session_state["checkpoint_upload_done"] = upload.file_id
            st.session_state["checkpoint_label_request"] = label
            st.session_state["upload_message"] = (
                f"Loaded {upload.name}: architecture {checkpoint.model.arch_name}, "
                f"{count_parameters(checkpoint.model):,} parameters. It is now the sidebar's checkpoint.")
            st.rerun()  # so the sidebar, drawn before this page, selects it
        except CifarvizError as exc:
            st.error(str(exc))
    if "upload_message" in st.session_state:
        st.success(st.session_state.pop("upload_message"))
