"""The page's frame: margins that give the answer the screen's width (a projector's 1024 px, a laptop's 1400 px),
and bringing an answer into view after the click that asked for it."""

from __future__ import annotations

import streamlit as st

# Streamlit's wide layout keeps 5rem of margin each side and 6rem above the title: at 1024x768 a page's first
# answer started 330 px down. Tighter margins, a smaller title and a narrower sidebar (its default 300 px is a
# third of a projector's width) keep more of every page on screen.
PAGE_STYLE = """<style>
[data-testid="stMainBlockContainer"] { padding: 2.75rem 1.75rem 4rem 1.75rem; max-width: none; }
[data-testid="stMainBlockContainer"] h1 { font-size: 2.1rem; padding: 0 0 0.5rem 0; }
section[data-testid="stSidebar"] { width: 232px !important; min-width: 232px !important; }
</style>"""


_UNSET = object()


def page_style() -> None:
    st.html(PAGE_STYLE)


def scroll_into_view(key: str, reason: object, skip_first: bool = True) -> None:
    """Scroll the container with `key` into view once per new `reason` (a click's target): the answer to a click
    far down a page, which would otherwise land below the fold. Drawn after that container. `skip_first`: the
    first reason this session sees is the page opening (it stays at its top)."""
    last = st.session_state.get(f"_scrolled_{key}", _UNSET)
    st.session_state[f"_scrolled_{key}"] = reason
    if (last is _UNSET and skip_first) or last == reason:  # the page's first answer, or the same one: the page stays where it is
        return
    st.html(f"""<script>
        (() => {{ const target = window.parent.document.querySelector('.st-key-{key}') ||
                                document.querySelector('.st-key-{key}');
                 if (target) target.scrollIntoView({{behavior: 'smooth', block: 'start'}}); }})();
        /* {abs(hash(repr(reason)))} */</script>""", unsafe_allow_javascript=True)
