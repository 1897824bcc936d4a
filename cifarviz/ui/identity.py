"""Who is looking: a viewer id that survives a reload, and the teacher.

A viewer is a random token the browser keeps in a cookie (set once by a one-line script; read back by Streamlit
from the request on the next visit), so a reload or a second tab is the same person, and another browser is not.
Runs record `owner_id(token)`, a hash, so reading the runs folder never gives anyone a token.

The teacher is whoever typed the server's CIFARVIZ_TEACHER_KEY into the sidebar: they may stop or cancel every run
and study. Without a key set on the server there is no teacher in the app (the command line manages runs).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import streamlit as st

from cifarviz.core.settings import settings

COOKIE = "cifarviz_viewer"
_TOKEN = re.compile(r"[0-9a-f]{32}")


def owner_id(token: str) -> str:
    return hashlib.sha256(("cifarviz-viewer:" + token).encode()).hexdigest()[:20]


def viewer() -> str:
    """This viewer's owner id (what runs record). The first visit of a browser draws the token and sets its
    cookie; a cookie that is not a token of ours is replaced."""
    token = st.session_state.get("_viewer_token")
    if token is None:
        cookie = ""
        try:
            cookie = st.context.cookies.get(COOKIE) or ""
        except Exception:  # noqa: BLE001 - no browser request (a script test): a token of this session only
            cookie = ""
        cookie = cookie if isinstance(cookie, str) else ""  # a script test's stand-in object
        token = cookie if _TOKEN.fullmatch(cookie) else secrets.token_hex(16)
        st.session_state["_viewer_token"] = token
        st.session_state["_viewer_cookie_set"] = token == cookie
    if not st.session_state.get("_viewer_cookie_set"):
        # A year, this site only, never sent to another one. The token is drawn here (hex), never read from input.
        st.html(f"<script>document.cookie = '{COOKIE}={token}; path=/; max-age=31536000; SameSite=Strict';</script>",
                unsafe_allow_javascript=True)
        st.session_state["_viewer_cookie_set"] = True
    return owner_id(token)


def teacher_key_set() -> bool:
    return bool(settings().teacher_key)


def is_teacher() -> bool:
    return teacher_key_set() and st.session_state.get("_teacher_key_ok") == settings().teacher_key


def check_teacher_key(typed: str) -> bool:
    """Remember the key for this session when it is the server's (compared in constant time)."""
    key = settings().teacher_key
    ok = bool(key) and hmac.compare_digest(typed.encode(), key.encode())
    st.session_state["_teacher_key_ok"] = key if ok else None
    return ok


def acting_as() -> str | None:
    """What runs.request_stop / cancel get as `by`: None for the teacher (any run), else this viewer's id."""
    return None if is_teacher() else viewer()


def may_control(owner: str) -> bool:
    return is_teacher() or owner == viewer()
