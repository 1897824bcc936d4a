"""Checkpoints: safetensors weights plus JSON metadata, written atomically, read without running code.

``NAME.safetensors`` holds the weights and, in its header, the full metadata; the
``NAME.json`` sidecar is the same metadata for people and tools that don't parse
safetensors. The header copy is authoritative, so the pair can never disagree in a
way that matters: the weights file is replaced in one atomic rename.

Plain ``.pt``/``.pth`` state dicts are accepted for uploads, through
``torch.load(weights_only=True)`` only, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError, ModelError
from .models import ZooModel, count_parameters, create_model, list_models, model_entry
from .utils import atomic_write

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # pretrained weights shipped in the repo
FORMAT_VERSION = 1
METADATA_KEY = "cifarviz"


@dataclass
class Checkpoint:
    model: ZooModel
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else self.model.arch_name)

    @property
    def test_accuracy(self) -> float | None:
        return (self.meta.get("metrics") or {}).get("test_accuracy")

    @property
    def tta(self) -> str:
        return (self.meta.get("train_config") or {}).get("tta", "none")


def save_checkpoint(path: str | os.PathLike, model: ZooModel, meta: dict | None = None) -> Path:
    """Write PATH (.safetensors) and its .json sidecar atomically; returns the weights path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": path.stem,
        "architecture": model.arch_name,
        "arch_args": _jsonable(model.arch_args),
        "parameters": count_parameters(model),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "platform": platform.platform(),
        **(meta or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    with atomic_write(path) as fh:
        fh.write(blob)
    with atomic_write(path.with_suffix(".json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_metadata(path: str | os.PathLike) -> dict:
    """Metadata only, without building the model (cheap: reads the safetensors header)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if not 0 < header_len < 100_000_000:
                    raise ValueError("implausible header length")
                header = json.loads(fh.read(header_len))
            return json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "{}"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from None
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    return {}


def load_checkpoint(
    path: str | os.PathLike,
    *,
    architecture: str | None = None,
    arch_args: dict | None = None,
    data: bytes | None = None,
) -> Checkpoint:
    """Load a checkpoint safely. `data` lets the app pass uploaded bytes (then `path` only names it).

    `.safetensors` files carry their architecture. For `.pt`/`.pth` state dicts pass
    `architecture`, or let cifarviz find the zoo model whose parameter names and shapes match.
    """
    path = Path(path)
    raw = data if data is not None else _read_bytes(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, meta = _read_safetensors(path, raw)
    elif suffix in (".pt", ".pth", ".bin"):
        state, meta = _read_torch_state_dict(path, raw), {}
    else:
        raise CheckpointError(f"{path.name}: unsupported checkpoint type {suffix or '(none)'}; use .safetensors, .pt or .pth.")

    architecture = architecture or meta.get("architecture") or _guess_architecture(path, state)
    args = arch_args if arch_args is not None else meta.get("arch_args", {})
    if architecture == "resnet18-transfer":
        args = {**args, "pretrained": False}  # the checkpoint holds every weight; never download here
    try:
        entry = model_entry(architecture)
        args = {k: v for k, v in args.items() if k in entry.defaults()}
        model = create_model(architecture, **args)
    except ModelError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    _load_state(path, model, state)
    model.eval()
    return Checkpoint(model=model, meta={**meta, "architecture": architecture}, path=path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except OSError as exc:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {exc}") from None


def _read_safetensors(path: Path, raw: bytes):
    try:
        state = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, ValueError, OSError, Exception) as exc:  # noqa: BLE001 - all mean "damaged file"
        raise CheckpointError(
            f"{path.name} is not a valid safetensors file (damaged, truncated or another format: {exc}). "
            "Re-download or re-train it."
        ) from None
    return state, meta


def _read_torch_state_dict(path: Path, raw: bytes) -> dict:
    import io
    import pickle
    import zipfile

    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path.name} could not be loaded as a plain state dict ({str(exc).splitlines()[0][:300]}). "
            "cifarviz loads .pt/.pth files with weights_only=True and refuses pickled code or objects; "
            "save with torch.save(model.state_dict(), path), or use .safetensors."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _guess_architecture(path: Path, state: dict) -> str:
    """The zoo model whose state dict keys and shapes match exactly (ignoring normalisation buffers)."""
    wanted = {k: s for k, s in _shapes(state).items() if not k.startswith("input_")}
    for name in list_models():
        args = {"pretrained": False} if name == "resnet18-transfer" else {}
        candidate = {k: s for k, s in _shapes(create_model(name, **args).state_dict()).items() if not k.startswith("input_")}
        if candidate == wanted:
            return name
    raise CheckpointError(
        f"{path.name}: its {len(wanted)} tensors match no zoo architecture ({', '.join(list_models())}). "
        "Pick the architecture explicitly, or save the model with cifarviz."
    )


def _load_state(path: Path, model: ZooModel, state: dict) -> None:
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.startswith("input_")}, **state}  # old files lack input stats
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:2])})")
        raise CheckpointError(
            f"{path.name} does not fit architecture {model.arch_name!r}: tensors " + ", ".join(parts) + ". "
            "It was probably saved from another architecture or with other arguments."
        )
    for key, value in state.items():
        if not torch.isfinite(value).all() and value.is_floating_point():
            raise CheckpointError(f"{path.name}: tensor {key} contains NaN or infinite values.")
    model.load_state_dict(state, strict=True)
