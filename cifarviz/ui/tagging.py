"""Tags in the app: the inspector's tag box, "tag these" beside a selection, badges on every tile, the relabel list.

A viewer's tags are theirs (their browser's viewer id); the teacher sees everyone's, with how many viewers gave
each tag. Tag text is the viewer's own input: shown as text (md-escaped), never rendered."""

from __future__ import annotations

from collections import Counter

import streamlit as st

from cifarviz.analysis.explore import ImageRef
from cifarviz.core.errors import CifarvizError
from cifarviz.services.tags import MAX_TAG_CHARS, MISLABELLED, SUGGESTED, TAGS, clean_tag, relabel_rows
from cifarviz.ui import identity
from cifarviz.ui.exports import export_buttons
from cifarviz.ui.text import md, md_message, shown

_DATA = "_tags_data"  # the fingerprint of the dataset this run shows (set by the sidebar's dataset loader)


def remember_dataset(dataset) -> None:
    st.session_state[_DATA] = dataset.fingerprint


def visible_tags() -> dict[ImageRef, Counter]:
    """The tags this viewer sees: their own, or (the teacher) everyone's with counts."""
    fingerprint = st.session_state.get(_DATA)
    if not fingerprint:
        return {}
    try:
        if identity.is_teacher():
            return TAGS.everyone(fingerprint)
        return {ref: Counter(tags) for ref, tags in TAGS.of_viewer(fingerprint, identity.viewer()).items()}
    except (CifarvizError, OSError):  # no runs folder to read (read-only disk): grids draw without badges
        return {}


def badge(tags: Counter | None) -> str:
    """A tile's badge: "🏷 mislabelled?" (+ how many more tags; ×3 when three viewers gave it)."""
    if not tags:
        return ""
    tag, count = max(tags.items(), key=lambda item: (item[0] == MISLABELLED, item[1], item[0]))
    more = f" +{len(tags) - 1}" if len(tags) > 1 else ""
    return f" 🏷 {md(tag)}" + (f" ×{count}" if count > 1 else "") + more


def tag_box(dataset, ref: ImageRef) -> None:
    """The inspector's tags for one dataset image: pick suggested ones or type a new one (Enter adds it)."""
    if ref.split not in ("train", "val", "test"):
        return
    fingerprint, me = dataset.fingerprint, identity.viewer()
    mine = TAGS.of_viewer(fingerprint, me).get(ref, [])
    key = f"tags-{ref.split}-{ref.index}"

    def changed() -> None:
        try:
            st.session_state[key] = TAGS.set_tags(fingerprint, me, ref, st.session_state.get(key) or [])
            st.session_state.pop("_tag_error", None)
        except CifarvizError as exc:  # nothing saved (a bad tag, no runs folder): the box shows what is kept
            try:
                st.session_state[key] = TAGS.of_viewer(fingerprint, me).get(ref, [])
            except CifarvizError:
                st.session_state[key] = []
            st.session_state["_tag_error"] = str(exc)

    st.session_state.setdefault(key, mine)
    options = sorted(set(SUGGESTED) | set(mine) | set(st.session_state[key]), key=lambda t: (t not in SUGGESTED, t))
    st.multiselect("Your tags", options, key=key, on_change=changed, accept_new_options=True, format_func=shown,
                   placeholder="Add a tag",
                   help=f"Kept on this server for your browser; the teacher sees everyone's. At most "
                        f"{MAX_TAG_CHARS} characters. The Predictions page exports tagged images as a relabel list.")
    if st.session_state.get("_tag_error"):
        st.error(md_message(st.session_state["_tag_error"]))
    if identity.is_teacher():
        everyone = TAGS.everyone(fingerprint).get(ref)
        if everyone:
            st.caption("Everyone's tags: " + ", ".join(f"{md(t)} ({n})" for t, n in sorted(everyone.items())))


def tag_many(dataset, refs: list[ImageRef], key: str, what: str) -> None:
    """A tag field and a button that put one tag on every image of a selection."""
    refs = [r for r in refs if r.split in ("train", "val", "test")]
    if not refs:
        return
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    typed = left.text_input(f"Tag {what}", value=MISLABELLED, key=f"tag-many-text-{key}", max_chars=MAX_TAG_CHARS)
    if right.button(f"Tag {len(refs):,}", key=f"tag-many-{key}", icon=":material/sell:"):
        try:
            n = TAGS.add(dataset.fingerprint, identity.viewer(), refs, clean_tag(typed))
            st.toast(f"Tagged {n:,} images '{md(clean_tag(typed))}'.")
        except CifarvizError as exc:
            st.error(md_message(exc))


def relabel_export(dataset, predicted: dict | None = None) -> None:
    """The tagged images as a relabel list (CSV/JSON): the viewer's own, or everyone's for the teacher."""
    tagged = visible_tags()
    if not tagged:
        st.caption("No tagged images yet: tag one from the image inspector, or tag a selection here.")
        return
    who = "everyone's (you are the teacher)" if identity.is_teacher() else "yours"
    st.caption(f"**{len(tagged):,}** tagged images, {who}; the relabel list puts those most often tagged "
               f"'{MISLABELLED}' first.")
    export_buttons(lambda: relabel_rows(dataset, tagged, predicted), key="relabel", name="relabel-list",
                   about={"view": "relabel list", "whose": who})
