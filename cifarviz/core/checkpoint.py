"""Checkpoints: safetensors weights plus JSON metadata, written atomically, read without running code.

``NAME.safetensors`` holds the weights and, in its header, the full metadata; the
``NAME.json`` sidecar is the same metadata for people and tools that don't parse
safetensors. The header copy is authoritative: both carry a fresh ``save_id``, and a
sidecar left stale by a save killed between the two writes is rewritten from the header
the next time the checkpoint is read.

Plain ``.pt``/``.pth`` state dicts are accepted for uploads, through
``torch.load(weights_only=True)`` only, which refuses pickled code.

Every file is untrusted: metadata types and architecture arguments are checked, and the
architecture is first built on the meta device (no memory) so that its parameter count
and every tensor shape are compared with the file before the real model is allocated.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import platform
import re
import reprlib
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.overrides import TorchFunctionMode

from .errors import AmbiguousArchitectureError, CheckpointError, ModelError
from .inference import TTA_MODES
from .models import ZooModel, count_parameters, create_model, list_models, model_card, model_cards, validate_arch_args
from .utils import atomic_write, bounded_json

# pretrained weights: an installed wheel carries them as the data package cifarviz/_shipped (looked for first, as
# site-packages/checkpoints could be anyone's); a source checkout or editable install uses the repo's checkpoints/
_WHEEL_SHIPPED = Path(__file__).resolve().parents[1] / "_shipped"
SHIPPED_DIR = _WHEEL_SHIPPED if _WHEEL_SHIPPED.is_dir() else Path(__file__).resolve().parents[2] / "checkpoints"
FORMAT_VERSION = 1
METADATA_KEY = "cifarviz"
MAX_PARAMETERS = 50_000_000  # ~4x ResNet-18; nothing in the zoo comes near it
MAX_FILE_BYTES = 512 * 2**20  # 50 M float64 parameters, with room to spare
_FIX_META = "Re-save it with cifarviz (save_checkpoint), or correct its metadata."
_SAVE_WEIGHTS = "Save only the weights, torch.save(model.state_dict(), path), or use .safetensors."


@dataclass
class Checkpoint:
    model: ZooModel
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    # What training recorded per training image (training_statistics(): checked 1-D arrays of one length), e.g.
    # "source_index" and "mean_margin" (the area under the margin): {} for files that recorded none
    statistics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else self.model.arch_name)

    @property
    def test_accuracy(self) -> float | None:
        return (self.meta.get("metrics") or {}).get("test_accuracy")

    @property
    def tta(self) -> str:
        return (self.meta.get("train_config") or {}).get("tta", "none")


def shipped_files() -> list[Path]:
    """The shipped checkpoints, as the model cards name them (sorted by file name), that are present on disk."""
    files = {SHIPPED_DIR / card.weights for card in model_cards() if card.weights}
    return sorted((path for path in files if path.is_file()), key=lambda path: path.name)


def shipped_file(name: str) -> Path | None:
    """The shipped checkpoint of zoo model NAME (its card's `weights`), or None."""
    card = next((c for c in model_cards() if c.name == name), None)
    path = SHIPPED_DIR / card.weights if card is not None and card.weights else None
    return path if path is not None and path.is_file() else None


ENSEMBLE_SNAPSHOTS = 4  # a run's per-epoch snapshots an ensemble averages over, where it has no replicas


def ensemble_member_files(checkpoint: Checkpoint) -> list[Path]:
    """Other models of the checkpoint's recipe that ensemble influence averages over with it (TRAK's M models):
    the card's shipped replicas when the checkpoint is the card's shipped file; else, for a run saved with
    per-epoch snapshots (epochs/ beside its checkpoint), up to ENSEMBLE_SNAPSHOTS of them spread over the second
    half of training, the last epoch (the checkpoint itself) left out. Empty when there are none."""
    if checkpoint.path is None:
        return []
    path = Path(checkpoint.path).resolve()
    for card in model_cards():
        if card.weights and card.replicas and (SHIPPED_DIR / card.weights).resolve() == path:
            return [SHIPPED_DIR / name for name in card.replicas if (SHIPPED_DIR / name).is_file()]
    snapshots = sorted((path.parent / "epochs").glob("epoch-[0-9][0-9][0-9].safetensors"))
    return [snapshots[i] for i in snapshot_picks(len(snapshots))]


def snapshot_picks(epochs: int) -> list[int]:
    """Which of a run's `epochs` per-epoch snapshots (0-based, the last being the run's own weights) join its
    ensemble: up to ENSEMBLE_SNAPSHOTS spread over the second half, the last left out. The benchmark that measures
    snapshot ensembles (bench/bench_retrain.py) picks with this too."""
    later = list(range(epochs - 1))[(epochs - 1) // 2:]
    if len(later) <= ENSEMBLE_SNAPSHOTS:
        return later
    picks = np.linspace(0, len(later) - 1, ENSEMBLE_SNAPSHOTS).round().astype(int)
    return [later[i] for i in sorted(set(picks.tolist()))]


def output_classes(model) -> int:
    """How many classes a model predicts (its head's last linear layer)."""
    layers = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    return int(layers[-1].out_features) if layers else int(model.arch_args.get("num_classes", 10))


def check_fits_data(checkpoint: Checkpoint, dataset) -> None:
    """Raise CheckpointError, with what to do, when a checkpoint cannot be measured on a dataset: it predicts
    another number of classes, it was trained on classes of other names, or the images are not what it takes."""
    name, where = checkpoint.name, getattr(dataset, "root", "this data")
    predicts, has = output_classes(checkpoint.model), len(dataset.classes)
    fix = "Pick a checkpoint trained on this data (or train one: Train page, `python -m cifarviz train`)."
    if predicts != has:
        raise CheckpointError(f"{name} predicts {predicts} classes, but the data in {where} has {has} "
                              f"({', '.join(dataset.classes)}). {fix}")
    recorded = checkpoint.meta.get("classes") if isinstance(checkpoint.meta, dict) else None
    if isinstance(recorded, list) and [str(c) for c in recorded] != [str(c) for c in dataset.classes]:
        raise CheckpointError(f"{name} was trained on the classes {', '.join(map(str, recorded))}, but the data in "
                              f"{where} has {', '.join(dataset.classes)}. {fix}")
    shape = tuple(dataset.test.images.shape[1:]) if len(dataset.test) else (32, 32, 3)
    if shape != (32, 32, 3):
        raise CheckpointError(f"{name} takes 32x32 RGB images, but the data in {where} holds {shape}. {fix}")


def save_checkpoint(path: str | os.PathLike, model: ZooModel, meta: dict | None = None,
                    statistics: dict | None = None) -> Path:
    """Write PATH (.safetensors) and its .json sidecar atomically; returns the weights path. `statistics`: per
    training image arrays that training recorded (name -> 1-D array), stored as tensors named STATISTICS_PREFIX +
    name beside the weights."""
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
        "save_id": uuid.uuid4().hex,  # new on every save, even when `meta` came from another checkpoint
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, values in (statistics or {}).items():  # beside the weights, in the same atomic file
        tensors[STATISTICS_PREFIX + name] = torch.as_tensor(np.ascontiguousarray(values))
    blob = st_save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    with atomic_write(path) as fh:
        fh.write(blob)
    _write_sidecar(path, meta)
    return path


def _write_sidecar(path: Path, meta: dict) -> None:
    with atomic_write(path.with_suffix(".json"), "w") as fh:
        json.dump(meta, fh, indent=2)


def _heal_sidecar(path: Path, meta: dict) -> None:
    """Rewrite the sidecar from the header when a save was killed between the weights and the sidecar.

    Only files saved with a save_id (this version on) expect a sidecar; a read-only folder is left alone."""
    save_id = meta.get("save_id")
    if not save_id:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if bounded_json(path.with_suffix(".json").read_text()).get("save_id") == save_id:
            return
    with contextlib.suppress(OSError):
        _write_sidecar(path, meta)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- metadata


# Fields that the app and CLI read without further checks, and the types they must have when present.
_META_TYPES = {
    "name": str, "architecture": str, "arch_args": dict, "train_config": dict, "metrics": dict,
    "history": list, "data": dict, "parameters": int, "train_seconds": (int, float), "classes": list,
    "provenance": dict,
}  # fmt: skip


def _check_meta(path: Path, meta) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path.name}: its metadata is a JSON {type(meta).__name__}, not an object. {_FIX_META}")
    for key, kinds in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            wanted = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise CheckpointError(f"{path.name}: metadata field {key!r} must be a {wanted}, not "
                                  f"{type(value).__name__} {reprlib.repr(value)}. {_FIX_META}")
    tta = (meta.get("train_config") or {}).get("tta", "none")
    if tta not in TTA_MODES:
        raise CheckpointError(f"{path.name}: train_config.tta is {reprlib.repr(tta)}; it must be one of "
                              f"{', '.join(TTA_MODES)}. {_FIX_META}")
    accuracy = (meta.get("metrics") or {}).get("test_accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))
                                 or not 0 <= accuracy <= 1):  # fmt: skip
        raise CheckpointError(f"{path.name}: metrics.test_accuracy is {reprlib.repr(accuracy)}, not a fraction "
                              f"between 0 and 1. {_FIX_META}")
    if not all(isinstance(h, dict) for h in meta.get("history") or []):
        raise CheckpointError(f"{path.name}: metadata field 'history' must be a list of per-epoch objects. {_FIX_META}")
    return meta


def _header_meta(path: Path, header: bytes) -> dict:
    """The checked metadata in a safetensors header (the JSON after its 8-byte length)."""
    try:
        text = (bounded_json(header, max_bytes=100_000_000).get("__metadata__") or {}).get(METADATA_KEY, "{}")
        meta = bounded_json(text)
    except (ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: its safetensors header is not valid JSON metadata ({exc}). "
                              "Re-download or re-train it.") from None
    return _check_meta(path, meta)


def read_metadata(path: str | os.PathLike) -> dict:
    """Metadata only, without building the model (cheap: reads the safetensors header)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if not 0 < header_len < 100_000_000:
                    raise ValueError("implausible header length")
                header = fh.read(header_len)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from None
        meta = _header_meta(path, header)
        _heal_sidecar(path, meta)
        return meta
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return _check_meta(path, bounded_json(sidecar.read_text()))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{sidecar}: not readable JSON metadata ({exc}).") from None
    return {}


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    *,
    architecture: str | None = None,
    arch_args: dict | None = None,
    data: bytes | None = None,
) -> Checkpoint:
    """Load a checkpoint safely. `data` lets the app pass uploaded bytes (then `path` only names it).

    `path` may also be a shipped checkpoint's name (`"fastnet"`, as the CLI takes it): a bare name without a
    suffix that is not a file here.
    `.safetensors` files carry their architecture. For `.pt`/`.pth` state dicts pass
    `architecture`, or let cifarviz find the zoo model whose parameter names and shapes match;
    when several match, AmbiguousArchitectureError lists them (its `.candidates`).
    Every problem with the file raises CheckpointError with a message for people.
    """
    given, path = os.fspath(path), Path(path)
    suffix = path.suffix.lower()
    bare = given == path.name and given not in ("", ".", "..")  # a name, not a path
    if data is None and not suffix and bare and not path.exists():
        shipped = shipped_file(path.name)  # the CLI's lookup too (cli.resolve_checkpoint)
        if shipped is None:
            names = ", ".join(p.stem for p in shipped_files()) or "none"
            raise CheckpointError(f"{path.name!r} is neither a checkpoint file nor a shipped checkpoint's name. "
                                  f"Shipped: {names}; or give a .safetensors, .pt or .pth file's path.")
        return load_checkpoint(shipped, architecture=architecture, arch_args=arch_args)
    if suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path.name}: unsupported checkpoint type {suffix or '(none)'}; "
                              "use .safetensors, .pt or .pth.")
    raw = data if data is not None else _read_bytes(path)
    if not raw:
        raise CheckpointError(f"{path.name} is empty (0 bytes): it was not written completely, or the upload failed. "
                              "Save or upload it again.")
    _check_size(path.name, len(raw))
    statistics = {}
    if suffix == ".safetensors":
        state, meta = _read_safetensors(path, raw)
        statistics = training_statistics(path, {k[len(STATISTICS_PREFIX):]: state.pop(k)
                                                for k in [k for k in state if k.startswith(STATISTICS_PREFIX)]})
    else:
        state, meta = _read_torch_state_dict(path, raw), {}

    architecture = architecture or meta.get("architecture") or _guess_architecture(path, state)
    args = arch_args if arch_args is not None else meta.get("arch_args") or {}
    model = _build_fitting(path, architecture, args, state)
    if data is None and suffix == ".safetensors":
        _heal_sidecar(path, meta)
    return Checkpoint(model=model, meta={**meta, "architecture": architecture}, path=path, statistics=statistics)


STATISTICS_PREFIX = "training_statistics."
STATISTICS = {"source_index": "integer", "mean_margin": "float"}  # the names a file may hold, and their kind
MAX_STATISTICS_ROWS = 1_000_000


def training_statistics(path: Path, tensors: dict) -> dict:
    """The per-image statistics a file holds, checked before they are trusted: only known names, 1-D, one length
    (at most MAX_STATISTICS_ROWS), the right kind, finite; anything else is left out whole (a file read back is
    not trusted, and a damaged extra never stops the weights from loading)."""
    if not tensors:
        return {}
    arrays = {}
    for name, tensor in tensors.items():
        if STATISTICS.get(name) != _dtype_kind(tensor.dtype) or tensor.ndim != 1 or \
                not 0 < tensor.numel() <= MAX_STATISTICS_ROWS:
            return {}
        values = tensor.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return {}
        arrays[name] = values
    if len({len(v) for v in arrays.values()}) != 1 or set(arrays) != set(STATISTICS):
        return {}
    return arrays


def _read_bytes(path: Path) -> bytes:
    try:
        _check_size(path.name, path.stat().st_size)
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except OSError as exc:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {exc}") from None


def _check_size(name: str, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{name} is {size / 2**20:,.0f} MB, more than any zoo model needs "
                              f"({MAX_FILE_BYTES / 2**20:,.0f} MB at most).")


def _read_safetensors(path: Path, raw: bytes):
    try:
        state = st_load(raw)
    except Exception as exc:  # noqa: BLE001 - every failure to parse these bytes means "damaged file"
        raise CheckpointError(
            f"{path.name} is not a valid safetensors file (damaged, truncated or another format: {exc}). "
            "Re-download or re-train it."
        ) from None
    header_len = int.from_bytes(raw[:8], "little")
    return state, _header_meta(path, raw[8 : 8 + header_len])


def _read_torch_state_dict(path: Path, raw: bytes) -> dict:
    # torch.save has written zip archives since PyTorch 1.6. The legacy format allocates whatever storage
    # sizes its pickle claims, and a deflated member inflates ~1000x: both are refused before torch.load.
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = archive.infolist()
    except Exception:  # noqa: BLE001 - not a zip archive, or a damaged one
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint (damaged, another format, or the pre-1.6 legacy format). "
            f"{_SAVE_WEIGHTS}"
        ) from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > len(raw):
        raise CheckpointError(f"{path.name} holds compressed data, which torch.save never writes; cifarviz does not "
                              f"inflate it. {_SAVE_WEIGHTS}")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes means "cannot load"
        needs_code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if needs_code:
            raise CheckpointError(
                f"{path.name} needs Python code to load ({needs_code.group(1)}), and cifarviz never runs code from "
                "a file: it reads .pt/.pth files with torch.load(weights_only=True), which allows only tensors and "
                f"plain containers. {_SAVE_WEIGHTS}"
            ) from None
        raise CheckpointError(f"{path.name} is damaged or not a PyTorch state dict ({type(exc).__name__}). "
                              f"{_SAVE_WEIGHTS}") from None
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if obj == {} else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path.name} holds {what}, not a state dict of tensors. {_SAVE_WEIGHTS}")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path.name} is not a state dict of tensors: its entry {reprlib.repr(key)} is "
                                  f"{type(value).__name__} {reprlib.repr(value)}. {_SAVE_WEIGHTS}")
        if not isinstance(key, str):
            raise CheckpointError(f"{path.name}: its state dict has the key {reprlib.repr(key)} "
                                  f"({type(key).__name__}); keys must be parameter names. {_SAVE_WEIGHTS}")
        if value.layout != torch.strided:
            raise CheckpointError(f"{path.name}: tensor {_short(key)} is stored as {value.layout} (sparse); cifarviz "
                                  "reads dense tensors only. Convert it with .to_dense() before saving.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _short(key: str) -> str:
    return reprlib.repr(key)[1:-1] if len(key) > 60 else key


class _SkipInit(TorchFunctionMode):
    """Skips random initialisation while building on the meta device (meta normal_ imports torch._dynamo: slow)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_):
            return args[0]
        return func(*args, **(kwargs or {}))


def _skeleton(architecture: str, args: dict) -> ZooModel:
    """The architecture on the meta device: shapes and parameter count without allocating memory."""
    with torch.device("meta"), _SkipInit():
        return create_model(architecture, **args)


@functools.cache
def _default_shapes(architecture: str) -> dict:
    args = dict(model_card(architecture).file_args)
    state = _skeleton(architecture, args).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("input_")}


def _guess_architecture(path: Path, state: dict) -> str:
    """The zoo model whose state dict keys and shapes match exactly (ignoring normalisation buffers)."""
    wanted = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("input_")}
    matches = [name for name in list_models() if _default_shapes(name) == wanted]
    if len(matches) > 1:
        raise AmbiguousArchitectureError(
            f"{path.name}: its tensor names and shapes fit {len(matches)} zoo architectures ({', '.join(matches)}), "
            "so cifarviz cannot tell which one it was saved from. Choose one with the architecture= argument, "
            f"e.g. load_checkpoint(path, architecture={matches[0]!r}), or the CLI's --arch {matches[0]}.",
            matches,
        )
    if not matches:
        raise CheckpointError(
            f"{path.name}: its {len(wanted)} tensors match no zoo architecture ({', '.join(list_models())}). "
            "Pick the architecture explicitly, or save the model with cifarviz."
        )
    return matches[0]


def _build_fitting(path: Path, architecture, args, state: dict) -> ZooModel:
    """Check the arguments, then the shapes on a meta-device skeleton, then the values; only then allocate."""
    if not isinstance(architecture, str):
        raise CheckpointError(f"{path.name}: architecture must be a zoo model name, not {reprlib.repr(architecture)}.")
    try:
        args = validate_arch_args(architecture, args)
        args.update(model_card(architecture).file_args)  # the checkpoint holds every weight: never download here
        skeleton = _skeleton(architecture, args)
    except (ModelError, ValueError) as exc:  # ValueError: arguments the layers reject (GroupNorm groups)
        raise CheckpointError(f"{path.name}: {exc}") from None
    parameters = count_parameters(skeleton)
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(f"{path.name}: {architecture} with arguments {args} would have {parameters:,} "
                              f"parameters, more than cifarviz loads ({MAX_PARAMETERS:,}); its arch_args are "
                              "probably wrong.")
    _check_fits(path, architecture, skeleton.state_dict(), state)
    _check_values(path, state)
    model = create_model(architecture, **args)
    own_stats = {k: v for k, v in model.state_dict().items() if k.startswith("input_")}  # old files lack them
    model.load_state_dict({**own_stats, **state}, strict=True)
    return model.eval()


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return "float"
    return "integer" if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) else str(dtype)


def _check_fits(path: Path, architecture: str, expected: dict, state: dict) -> None:
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith("input_"))  # old files lack these
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]  # fmt: skip
    mismatched += [f"{k}: file {state[k].dtype} vs model {expected[k].dtype}" for k in expected
                   if k in state and _dtype_kind(state[k].dtype) != _dtype_kind(expected[k].dtype)]  # fmt: skip
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(map(_short, unexpected[:3]))})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes or types (e.g. {'; '.join(mismatched[:2])})")
        raise CheckpointError(
            f"{path.name} does not fit architecture {architecture!r}: tensors " + ", ".join(parts) + ". "
            "It was probably saved from another architecture or with other arguments."
        )


# Models normalise [0, 1] pixels with these buffers; a zero std divides by zero and silently predicts one class.
_INPUT_STAT_RANGES = {"input_mean": ("[0, 1]", lambda v: (v >= 0) & (v <= 1)),
                      "input_std": ("(0, 1]", lambda v: (v > 0) & (v <= 1))}


def _check_values(path: Path, state: dict) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path.name}: tensor {key} contains NaN or infinite values.")
    for key, (allowed, in_range) in _INPUT_STAT_RANGES.items():
        if key in state and not in_range(state[key]).all():
            raise CheckpointError(
                f"{path.name}: its input normalisation {key} is {[round(v, 4) for v in state[key].reshape(-1).tolist()]};"
                f" each channel must be in {allowed}, as pixels are in [0, 1]. Re-save the model after training, or "
                "set the training split's statistics with model.set_normalization(mean, std)."
            )
