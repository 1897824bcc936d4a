"""A run's record on the app's machine: a folder per run, read as untrusted, the same for every kind of work.

RUNS/<run id>/ (RUNS: $CIFARVIZ_RUNS, else ./runs):

    config.json      what to run: its kind, the kind's settings (spec), its owner
    status.json      queued | running | completed | stopped | failed | cancelled, error, note, times, and where it
                     runs (worker, host, device)
    metrics.jsonl    one JSON object per line ({"event": "step" | "epoch" | ...}), as the worker streams them
    worker.log       what the worker printed about this run
    model.safetensors (+ .json)  the last finished epoch; epochs/epoch-NNN.safetensors per-epoch snapshots
    result.json      a kind's answer (the retraining proof's)
    stop             present once someone asked it to stop (pages say "stopping..."; the request itself goes
                     to the worker through the broker)

The worker that runs a job writes into its own working folder, on whatever machine it is; everything it writes
reaches this folder through the broker (`collector.py`). Pages and the command line only read here.

Every file is read as untrusted: a status.json or metrics.jsonl line with wrong types flags that one run as damaged
(`Run.problems`) and never stops the list, the queue or the live view of the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import atomic_write, bounded_json

from .kind import KINDS

QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, CANCELLED = "queued", "running", "completed", "stopped", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINAL = (COMPLETED, STOPPED, FAILED, CANCELLED)
WITH_MODEL = (COMPLETED, STOPPED)  # runs whose checkpoint the other pages offer
CHECKPOINT = "model.safetensors"
STATES = (QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, CANCELLED)


class RunError(CifarvizError):
    """A run cannot be submitted, found, stopped or cancelled as asked."""


def runs_dir(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $CIFARVIZ_RUNS, else ./runs."""
    return Path(root) if root else settings().runs_dir


def usable_runs_dir(root=None) -> Path:
    """The runs folder, created if needed; a RunError that says what to fix when it cannot be (a file is in the
    way, no permission), instead of a traceback."""
    folder = runs_dir(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "it, or a folder above it, is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else exc.strerror or str(exc)
        raise RunError(f"The runs folder {folder} cannot be used ({what}). Fix: point CIFARVIZ_RUNS at a folder "
                       "you can write.") from None
    return folder


def write_json(path: Path, value: dict) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(value, fh, indent=1)


@dataclass
class Run:
    id: str
    dir: Path
    config: dict
    status: dict
    problems: tuple[str, ...] = ()  # what is wrong with its files (shown; such a run is never started)

    @property
    def state(self) -> str:
        return self.status.get("state", FAILED)

    @property
    def owner(self) -> str:
        owner = self.config.get("owner", "")
        return owner if isinstance(owner, str) else ""

    @property
    def error(self) -> str | None:
        return self.status.get("error")

    @property
    def kind(self) -> str:
        kind = self.config.get("kind", "")
        return kind if isinstance(kind, str) else ""

    @property
    def spec(self) -> dict:
        spec = self.config.get("spec", {})
        return spec if isinstance(spec, dict) else {}

    @property
    def train_config(self) -> dict:
        config = self.spec.get("train_config", {})
        return config if isinstance(config, dict) else {}

    @property
    def where(self) -> str:
        """Where it runs or ran, for people: "worker gpu-box-1 on gpu-box (cuda)"; "" before a worker took it."""
        worker, host, device = (self.status.get(k) for k in ("worker", "host", "device"))
        return f"{worker} on {host}" + (f" ({device})" if device else "") if worker and host else ""

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def has_model(self) -> bool:
        return self.state in WITH_MODEL and self.checkpoint.is_file()


def read_json(path: Path) -> dict:
    """A JSON object from a file, or {} when it is missing, unreadable, too large or not an object."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        value = bounded_json(path.read_text())
        if isinstance(value, dict):
            return value
    return {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TIMES = ("queued_at", "started_at", "ended_at", "heartbeat")
_TEXTS = ("error", "note", "worker", "host", "device", "queue")  # where it runs: the worker's name, machine, device
_STATUS_CHECKS = {"state": lambda v: v in STATES, "pid": _is_count, "beat": _is_count,
                  **{key: (lambda v: v is None or (isinstance(v, str) and len(v) < 100_000)) for key in _TEXTS},
                  **{key: _is_number for key in _TIMES}}


def clean_status(raw: dict) -> tuple[dict, list[str]]:
    """status.json's fields that have the right type, and a line per field that has not (a damaged or hand-edited
    file: the field is dropped, the run is flagged; no page ever computes with 'abc' as a time)."""
    clean, problems = {}, []
    for key, value in raw.items():
        check = _STATUS_CHECKS.get(key)
        if check is None:  # not a field cifarviz writes: ignored
            continue
        if check(value):
            clean[key] = value
        else:
            problems.append(f"status.json: {key} is {json.dumps(value)[:40]}")
    if "state" not in clean:
        clean["state"] = FAILED
        if "state" not in raw:
            problems.append("status.json: no state (missing or unreadable)")
    return clean, problems


def config_problems(config: dict) -> list[str]:
    """Why config.json cannot be run: an unknown kind, a spec that is not a mapping, an owner that is not text."""
    problems = []
    kind = config.get("kind")
    if kind not in KINDS:
        problems.append(f"config.json: unknown kind {json.dumps(kind)[:40]} (known: {', '.join(KINDS)}); it is never run")
    if not isinstance(config.get("spec", {}), dict):
        problems.append("config.json: spec is not a mapping")
    if not isinstance(config.get("owner", ""), str):
        problems.append("config.json: owner is not text")
    spec = config.get("spec", {})
    if kind == "train" and isinstance(spec, dict) and not isinstance(spec.get("train_config", {}), dict):
        problems.append("config.json: train_config is not a mapping")
    return problems


def _make_run(folder: Path, config: dict) -> Run:
    status, problems = clean_status(_cached_json(folder / "status.json"))  # a copy: Run.status is the run's own
    problems += config_problems(config)
    if problems and status["state"] in ACTIVE and status["state"] != RUNNING:
        status = {**status, "state": FAILED}  # shown as what it is; the scheduler records why
    return Run(folder.name, folder, config, status, tuple(problems))


def load_run(run_id: str, root=None) -> Run:
    folder = runs_dir(root) / run_id
    plain = "/" not in run_id and run_id not in ("", ".", "..") and not folder.is_symlink()
    config = read_json(folder / "config.json") if plain else {}
    if not config:
        known = ", ".join(r.id for r in list_runs(root)[-5:]) or "none yet"
        raise RunError(f"No run {run_id!r} in {runs_dir(root)} (latest: {known}). `python -m cifarviz runs` lists them.")
    return _make_run(folder, config)


_PARSED: dict[str, tuple[tuple, dict]] = {}  # a run file by path, re-read only when its (inode, mtime, size) moved
_PARSED_LOCK = threading.Lock()


def _cached_json(path: Path) -> dict:
    """A run's config.json or status.json, parsed once per version (every write is a rename: a new inode). A page
    that lists 300 runs every 2 s stats 600 files instead of reading and parsing them. Callers never mutate it."""
    try:
        info = path.stat()
    except OSError:
        return {}
    stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
    with _PARSED_LOCK:
        known = _PARSED.get(str(path))
    if known and known[0] == stamp:
        return known[1]
    value = read_json(path)
    with _PARSED_LOCK:
        if len(_PARSED) > 8192:
            _PARSED.clear()
        _PARSED[str(path)] = (stamp, value)
    return value


def _config_of(folder: Path) -> dict:
    return _cached_json(folder / "config.json")


def list_runs(root=None) -> list[Run]:
    """Every run in the runs folder, oldest first (folders without a config.json, such as a study database's, are
    not runs; a damaged run is listed with its problems)."""
    runs = []
    with contextlib.suppress(OSError):
        for folder in runs_dir(root).iterdir():
            # a run is a real folder inside the runs folder: a link to another place would put its status, lock
            # and slot somewhere the queue does not look (the same rule for load_run)
            config = _config_of(folder) if folder.is_dir() and not folder.is_symlink() else {}
            if config:
                runs.append(_make_run(folder, config))
    return sorted(runs, key=lambda r: (r.status.get("queued_at", 0), r.id))


def queue_position(run: Run, runs: list[Run] | None = None) -> int | None:
    """1 for the next run to start, 2 for the one after, ...; None when `run` is not waiting."""
    waiting = [r.id for r in (runs if runs is not None else list_runs(run.dir.parent)) if r.state == QUEUED]
    return waiting.index(run.id) + 1 if run.id in waiting else None


# The fields the pages compute with, per event: a line whose field has another type is skipped (and counted).
_NUMBER, _COUNT, _TEXT = "number", "count", "text"
_EVENT_FIELDS = {
    "step": {"step": _COUNT, "total_steps": _COUNT, "steps_per_epoch": _COUNT, "epoch": _COUNT, "elapsed": _NUMBER,
             "images_per_s": _NUMBER, "lr": _NUMBER, "train_loss": _NUMBER, "train_acc": _NUMBER},
    "epoch": {"epoch": _COUNT, "train_loss": _NUMBER, "train_acc": _NUMBER},
    "start": {"train_images": _COUNT, "total_steps": _COUNT, "device": _TEXT},
}
_OPTIONAL_NUMBERS = ("val_loss", "val_acc", "test_accuracy")  # None (no validation split) or a number
_CHECK = {_NUMBER: _is_number, _COUNT: lambda v: _is_count(v) and v >= 0, _TEXT: lambda v: isinstance(v, str)}


def valid_event(row) -> bool:
    """Whether a parsed metrics.jsonl line is one the pages can use: an object with an event, the event's fields of
    the right types (a step's counts positive), optional figures None or numbers."""
    if not isinstance(row, dict) or not isinstance(row.get("event"), str):
        return False
    fields = _EVENT_FIELDS.get(row["event"], {})
    if not all(key in row and _CHECK[kind](row[key]) for key, kind in fields.items()):
        return False
    if row["event"] == "step" and not (row["step"] >= 1 and row["total_steps"] >= 1 and row["steps_per_epoch"] >= 1):
        return False
    return all(row.get(key) is None or _is_number(row[key]) for key in _OPTIONAL_NUMBERS)


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in data.splitlines():
        try:
            row = bounded_json(line, max_bytes=65536)
        except (ValueError, UnicodeDecodeError):
            row = None
        if valid_event(row):
            rows.append(row)
        elif line.strip():
            bad += 1
    return rows, bad


def read_metrics(run: Run | str, root=None) -> list[dict]:
    """Every usable line logged so far (a line still being written is left for the next read; a damaged line is
    skipped). The whole file: for the command line and tests; pages use `progress`, which reads incrementally."""
    run = load_run(run, root) if isinstance(run, str) else run
    try:
        data = (run.dir / "metrics.jsonl").read_bytes()
    except OSError:
        return []
    return _parse_lines(data[: data.rfind(b"\n") + 1])[0]


@dataclass(frozen=True)
class Progress:
    """What a page shows of a run's metrics: a bounded summary, the same object for every viewer (never mutated)."""

    start: dict
    steps: tuple[dict, ...]  # thinned to at most 2 x MAX_CURVE_STEPS lines, evenly, the last one always kept
    epochs: tuple[dict, ...]
    last: dict | None
    finishing: bool
    saved: dict
    damaged_lines: int
    unread_bytes: int = 0  # of the log, still to read: a huge log is read READ_PER_TICK at a time


MAX_CURVE_STEPS = 400
READ_PER_TICK = 16 * 2**20  # bytes of a log one refresh reads at most: a 1 GB log costs a few seconds per refresh,
# never 37 s and 2.8 GB at once; the page says how much is left
_PROGRESS: dict[str, dict] = {}  # metrics.jsonl by path: how far it was read, and the summary so far
_PROGRESS_LOCK = threading.Lock()


def progress(run: Run) -> Progress:
    """The run's progress, reading only what was appended since the last call from any viewer (a 77 MB log is
    parsed once, not on every 2-s refresh of every viewer), with the step lines thinned so memory stays bounded.
    One lock per log: viewers of other runs never wait for a long first read."""
    path = run.dir / "metrics.jsonl"
    try:
        info = path.stat()
    except OSError:
        return Progress({}, (), (), None, False, {}, 0)
    with _PROGRESS_LOCK:
        state = _PROGRESS.get(str(path))
        if state is None or state["inode"] != info.st_ino:
            state = _fresh_state(info.st_ino)
            if len(_PROGRESS) > 1024:
                _PROGRESS.clear()
            _PROGRESS[str(path)] = state
    with state["lock"]:
        if info.st_size < state["offset"]:  # truncated in place: start again
            state.update({k: v for k, v in _fresh_state(info.st_ino).items() if k != "lock"})
        if info.st_size > state["offset"] or state["summary"] is None:
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                handle.seek(state["offset"])
                data = handle.read(min(info.st_size - state["offset"], READ_PER_TICK))
                whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
                if not whole and len(data) == READ_PER_TICK:  # one line longer than a tick's read: not a log line
                    whole, state["bad"] = data, state["bad"] + 1
                    rows, bad = [], 0
                else:
                    rows, bad = _parse_lines(whole)
                state["offset"] += len(whole)
                state["bad"] += bad
                for row in rows:
                    _absorb(state, row)
            state["summary"] = Progress(state["start"], tuple(state["steps"]), tuple(state["epochs"]), state["last"],
                                        state["finishing"], state["saved"], state["bad"],
                                        max(0, info.st_size - state["offset"]))
        return state["summary"]


def _fresh_state(inode: int) -> dict:
    return {"inode": inode, "lock": threading.Lock(), "offset": 0, "start": {}, "steps": [], "stride": 1,
            "epochs": [], "last": None, "finishing": False, "saved": {}, "bad": 0, "seen_steps": 0, "summary": None}


def _absorb(state: dict, row: dict) -> None:
    event = row["event"]
    if event == "step":
        state["last"] = row
        state["seen_steps"] += 1
        if state["seen_steps"] % state["stride"] == 0:
            state["steps"].append(row)
            if len(state["steps"]) >= 2 * MAX_CURVE_STEPS:  # keep every other one, and take half as many from now
                state["steps"] = state["steps"][1::2]
                state["stride"] *= 2
    elif event == "epoch":
        state["epochs"].append(row)
    elif event == "start":
        state["start"] = row
    elif event == "finishing":
        state["finishing"] = True
    elif event == "saved":
        state["saved"] = row


def log_tail(run: Run, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((run.dir / "worker.log").read_text(errors="replace").splitlines()[-lines:])
    return ""


