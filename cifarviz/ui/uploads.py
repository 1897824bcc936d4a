"""Uploads: server flags (classroom lock, uploads on or off), uploaded checkpoints kept on disk (bounded) and
uploaded photos."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import streamlit as st

from cifarviz.core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cifarviz.core.decode import load_image_file
from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import atomic_write, cache_dir
from cifarviz.ui.text import md, md_message



UPLOAD_MAX_BYTES = 200 * 1024 * 1024


UPLOADS_KEPT = 20  # uploaded checkpoints kept on disk; older ones are removed first


def data_locked() -> bool:
    """CIFARVIZ_LOCK_DATA=1 (or CIFARVIZ_CLASSROOM=1): the data folder is the server's, not a text box for anyone."""
    return settings().data_locked


def uploads_allowed() -> bool:
    """CIFARVIZ_NO_UPLOADS=1 (or CIFARVIZ_CLASSROOM=1) turns off checkpoint and image uploads."""
    return settings().uploads_allowed


def save_uploaded_checkpoint(name: str, data: bytes, architecture: str | None = None) -> tuple[str, Checkpoint]:
    """Validate an uploaded checkpoint (safely), keep it on disk, and offer it in the sidebar.

    `architecture` answers an AmbiguousArchitectureError (state dicts that fit several zoo models)."""
    if not uploads_allowed():
        raise CifarvizError("Uploads are turned off on this server (CIFARVIZ_NO_UPLOADS / CIFARVIZ_CLASSROOM).")
    if len(data) > UPLOAD_MAX_BYTES:
        raise CifarvizError(f"{name} is {len(data) / 1e6:.0f} MB; the limit is {UPLOAD_MAX_BYTES / 1e6:.0f} MB.")
    checkpoint = load_checkpoint(name, data=data, architecture=architecture)  # a clear CheckpointError if bad
    folder = cache_dir() / "uploads"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    if Path(name).suffix.lower() == ".safetensors":
        with atomic_write(path) as fh:
            fh.write(data)
    else:  # a state dict: re-save as safetensors, so it loads like every other checkpoint
        save_checkpoint(path, checkpoint.model, {"name": Path(name).stem, "notes": f"uploaded as {name}"})
    prune_uploads(folder, keep=UPLOADS_KEPT)
    label = f"{Path(name).stem} (uploaded)"
    st.session_state.setdefault("uploaded_checkpoints", {})[label] = str(path)
    return label, checkpoint


def prune_uploads(folder: Path, keep: int) -> None:
    """Keep the `keep` newest uploaded checkpoints: a class cannot fill the server's disk."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        for leftover in (old, old.with_suffix(".json")):
            leftover.unlink(missing_ok=True)


def read_upload_image(uploaded) -> np.ndarray | None:
    """An uploaded file as 32x32 RGB, or None after showing what was wrong with it."""
    try:
        return load_image_file(uploaded.getvalue())
    except CifarvizError as exc:
        st.error(f"{md(uploaded.name)}: {md_message(exc)}")
        return None
