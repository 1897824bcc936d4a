"""The clickable image grid every page uses; a click opens the image inspector."""

from __future__ import annotations

import numpy as np
import streamlit as st

from cifarviz.analysis.explore import ImageRef, to_png
from cifarviz.ui.tagging import badge, visible_tags

INSPECT_KEY = "inspect"


def open_inspector(split: str, index: int) -> None:
    st.session_state[INSPECT_KEY] = ImageRef(split, int(index))


def close_inspector() -> None:
    st.session_state.pop(INSPECT_KEY, None)


def image_grid(images: np.ndarray, refs: list[ImageRef], captions: list[str], key: str, tile_width: int = 112,
               on_click=None, help: str = "Open in the image inspector") -> None:
    """Clickable images in tiles `tile_width` pixels wide that wrap, as many per row as the screen fits (so captions
    are never squeezed on a projector's narrow page). Each button opens its image in the inspector, or calls
    `on_click(split, index)` instead."""
    if len(refs) == 0:
        st.caption("No images.")
        return
    tags = visible_tags()  # a badge on every tagged tile, wherever it appears
    with st.container(horizontal=True, wrap=True, gap="small"):
        for i, ref in enumerate(refs):
            with st.container(width=tile_width):
                st.image(to_png(images[i], scale=3), width="stretch", output_format="PNG")
                st.button(captions[i] + badge(tags.get(ref)), key=f"{key}-{ref.split}-{ref.index}", on_click=on_click or open_inspector,
                          args=(ref.split, ref.index), help=help, width="stretch", wrap=True)
