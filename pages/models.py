"""Models: the zoo, each model's layers, training curves, the comparisons the sources made, uploads."""

import streamlit as st

from cifarviz.core.errors import AmbiguousArchitectureError, CifarvizError
from cifarviz.core.models import count_parameters
from cifarviz.ui import app
from cifarviz.ui.models_view import ZooView, shown_table
from cifarviz.ui.text import md, md_message

app.sidebar()
st.title("Models")

view = ZooView()
st.caption("Parameters and accuracy of a shipped model are its checkpoint's own; models without a checkpoint "
           "show the zoo's defaults. The layer summary below names each model's source and arguments.")
shown_table(view.zoo[["model", "parameters", "test accuracy", "source reported", "source target"]], all_rows=True)

# Only the open tab is drawn (a tab switch reruns the page): its charts were the costliest rerun of any page.
tab_summary, tab_curves, tab_compare, tab_upload = st.tabs(
    app.linked_tab("models_tab", ["Layer summary", "Training curves", "Comparisons", "Upload a checkpoint"]),
    key="models_tab", on_change="rerun")

with tab_summary:
    if tab_summary.open:
        st.fragment(view.layer_summary)()

with tab_curves:
    if tab_curves.open:
        st.fragment(view.training_curves)()

with tab_compare:
    if tab_compare.open:
        view.comparisons()

with tab_upload:

    @st.fragment
    def upload_checkpoint() -> None:
        if not app.uploads_allowed():
            st.caption("Uploads are turned off on this server.")
            return
        st.markdown("Upload a `.safetensors` checkpoint, or a `.pt`/`.pth` **state dict** of a zoo architecture. "
                    "Files are read without executing any code (safetensors, or `torch.load(weights_only=True)`).")
        upload = st.file_uploader("Checkpoint", type=["safetensors", "pt", "pth"], key="checkpoint_upload")
        if upload is not None and st.session_state.get("checkpoint_upload_done") != upload.file_id:
            try:
                architecture = st.session_state.get(f"upload_arch_{upload.file_id}")
                label, checkpoint = app.save_uploaded_checkpoint(upload.name, upload.getvalue(), architecture)
                st.session_state["checkpoint_upload_done"] = upload.file_id
                st.session_state["checkpoint_label_request"] = label
                st.session_state["upload_message"] = (
                    f"Loaded {md(upload.name)}: architecture {checkpoint.model.arch_name}, "
                    f"{count_parameters(checkpoint.model):,} parameters. It is now the sidebar's checkpoint.")
                st.rerun()  # the whole app, so the sidebar, drawn before this page, selects it
            except AmbiguousArchitectureError as exc:  # never guess: the user says which network it is
                st.warning(f"{md(upload.name)} fits {len(exc.candidates)} zoo architectures with identical tensor shapes "
                           f"({', '.join(exc.candidates)}). Which one was it saved from?")
                st.selectbox("Architecture", exc.candidates, index=None, key=f"upload_arch_{upload.file_id}",
                             placeholder="Choose the architecture")
            except CifarvizError as exc:
                st.error(md_message(exc))
        if "upload_message" in st.session_state:
            st.success(st.session_state.pop("upload_message"))

    if tab_upload.open:
        upload_checkpoint()
app.publish_link()
