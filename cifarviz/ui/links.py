"""A link to any view: the page's choices live in the address (Streamlit's query parameters), so a teacher can put
one link on the board and every student opens the same view.

Each run, a page binds the URL parameters it understands to its session-state keys with `linked(...)`, before
drawing their widgets; `publish()` (called by `app.inspector`, at every page's end) writes the view back into the
address bar. A parameter is applied only when the address is new to this session (opened from a link, typed or
pasted), never over a choice the viewer has just made. Every value from an address is checked against what the
page offers (classes, splits, checkpoints, ranges); anything else is ignored.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import urlencode

import streamlit as st

from cifarviz.analysis.explore import ImageRef
from cifarviz.ui.widgets import INSPECT_KEY

_WRITTEN = "_link_written"  # the parameters this session last wrote: a different address came from outside
_FIELDS = "_link_fields"  # this run's bound parameters: {param: (session key, format)}
_FRESH = "_link_fresh"


def begin() -> None:
    """At the start of every page run (the sidebar calls it): is the address new to this session?"""
    current = st.query_params.to_dict()
    st.session_state[_FRESH] = bool(current) and current != st.session_state.get(_WRITTEN)
    st.session_state[_FIELDS], st.session_state[_SHOWN] = {}, {}
    if st.session_state[_FRESH]:
        image = parse_image(current.get("image", ""))
        if image is not None:
            st.session_state[INSPECT_KEY] = image


def from_link(param: str) -> str | None:
    """The address's value of `param` when the address is new to this session, else None."""
    if not st.session_state.get(_FRESH):
        return None
    return st.query_params.get(param)


def linked(param: str, key: str, *, choices=None, parse: Callable[[str], object] | None = None,
           default=None, format: Callable[[object], str] = str) -> None:
    """Bind URL parameter `param` to session key `key`. A new address's value is applied when `parse` (or
    membership in `choices`) accepts it; otherwise the key keeps its value, or gets `default` the first time
    (so the widget is drawn without a `default=` of its own, and Streamlit never sees two defaults)."""
    raw = from_link(param)
    if raw is not None:
        value = parse(raw) if parse is not None else (raw if choices is not None and raw in choices else None)
        if value is not None:
            st.session_state[key] = value
    if key not in st.session_state and default is not None:
        st.session_state[key] = default
    st.session_state.setdefault(_FIELDS, {})[param] = (key, format)


_SHOWN = "_link_shown"


def show(param: str, value: str) -> None:
    """A parameter the page computes itself (a confusion cell is two keys): written with the view this run."""
    st.session_state.setdefault(_SHOWN, {})[param] = value


def slug(label: str) -> str:
    """A tab's name in a link: "Class counts" -> "class-counts"."""
    return "-".join(label.lower().split())


def linked_tab(key: str, labels: list[str]) -> list[str]:
    """Bind `tab=` to a keyed st.tabs (its state is the open tab's label); returns the labels, to draw them."""
    by_slug = {slug(label): label for label in labels}
    linked("tab", key, parse=by_slug.get, format=slug)
    return labels


_WHOLE = re.compile(r"[0-9]{1,7}")  # ASCII digits only: str.isdigit() also takes "²" and "٣", which int() refuses


def parse_count(text: str) -> int | None:
    """A link's whole number (ASCII digits, at most 7), or None: one strict rule for every parameter, so a link
    full of nonsense opens the default view instead of an error."""
    return int(text) if isinstance(text, str) and _WHOLE.fullmatch(text) else None


def parse_image(text: str) -> ImageRef | None:
    """`test-123` -> ImageRef("test", 123); the inspector itself checks the index against the split's size."""
    split, _, index = text.partition("-")
    number = parse_count(index)
    if split in ("train", "val", "test") and number is not None:
        return ImageRef(split, number)
    return None


def parse_index(limit: int) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        number = parse_count(text)
        return number if number is not None and number < limit else None

    return parse


def view_params(extra: dict | None = None) -> dict[str, str]:
    """This run's view as URL parameters: the checkpoint, the bound fields, an open inspector's image."""
    params = {}
    name = st.session_state.get("_checkpoint_link")
    if name:
        params["checkpoint"] = name
    for param, (key, format) in st.session_state.get(_FIELDS, {}).items():
        value = st.session_state.get(key)
        if value is not None and value != "" and format(value) != "":  # "": the default, left out of the link
            params[param] = format(value)
    params.update(st.session_state.get(_SHOWN, {}))
    ref = st.session_state.get(INSPECT_KEY)
    if isinstance(ref, ImageRef) and ref.split != "upload":
        params["image"] = f"{ref.split}-{ref.index}"
    params.update(extra or {})
    return params


_SLOT = "_link_slot"


def share_slot() -> None:
    """A place in the sidebar for the link, drawn now with the view as it stands (so it stays in the sidebar while
    the page computes) and refreshed by `publish()` at the end of the run."""
    slot = st.empty()
    _draw_link(slot)
    st.session_state[_SLOT] = slot


def _draw_link(slot) -> None:
    with slot.container():
        with st.popover("Link to this view", icon=":material/link:", width="stretch"):
            st.caption("Open it in any browser to see this page with the same choices (checkpoint, split, "
                       "selected image or cell): put it on the board for the class.")
            st.code(link_to_view(), language=None, wrap_lines=True)


def publish() -> None:
    """Write this view into the address bar (no rerun; only when it changed), and offer it in the sidebar."""
    params = view_params()
    if params != st.query_params.to_dict():
        st.query_params.from_dict(params)
    st.session_state[_WRITTEN] = params
    slot = st.session_state.pop(_SLOT, None)
    if slot is not None:
        _draw_link(slot)


def link_to_view() -> str:
    """The whole address of this view, for the board."""
    base = (getattr(st.context, "url", None) or "").split("?")[0]
    query = query_string(view_params())
    return base + ("?" + query if query else "")


def query_string(params: dict[str, str]) -> str:
    """The address's query, readable on a board: commas stay commas ("cell=cat,dog", not "cell=cat%2Cdog")."""
    return urlencode(params, safe=",")
