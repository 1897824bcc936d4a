"""Training runs that live outside the app: a folder and a worker process per run, and a server-wide queue.

    run_id = submit_training(TrainConfig(model="lenet", epochs=2), data_root, subset=5000)
    schedule()                      # starts queued runs while fewer than CIFARVIZ_MAX_RUNS (default 1) run
    read_metrics(run_id)            # the steps and epochs logged so far
    request_stop(run_id); cancel(run_id); list_runs()

Every run is a folder RUNS/<run id>/ (RUNS: $CIFARVIZ_RUNS, else ./runs):

    config.json      what to run: its kind ("train"), the worker function, the kind's settings
    status.json      queued | running | completed | stopped | failed | cancelled, error, pid, heartbeat, times
    metrics.jsonl    one JSON object per line, appended as it trains ({"event": "step" | "epoch" | ...})
    worker.log       the worker's stdout and stderr (a crash's traceback ends up here)
    stop             present: a stop request (the worker ends within one batch)
    model.safetensors (+ .json)  the last finished epoch, replaced atomically after every epoch
    epochs/epoch-NNN.safetensors  per-epoch snapshots, when asked for

A worker is `python -m cifarviz.services.runs worker RUN_DIR` in a session of its own (a Streamlit rerun or a server
restart does not end it), at the lowest CPU priority, so people browsing the other pages come first. Every
change of status.json happens under one file lock (RUNS/queue.lock), so the server, the CLI and the workers
agree on how many runs are running. A run whose worker died without a word (killed, out of memory) is
reported as failed, with the last lines of its log, the next time anyone looks.

Other kinds of work share the queue (the retraining check of the Influence page): `submit(kind, spec)` for a kind
in KINDS, whose function takes a RunContext and returns ("completed" | "stopped", a note). Nothing else is ever
imported or called: a config.json that names any other target is refused by `submit`, the scheduler and the worker.

Runs belong to someone. `owner` is an opaque id (the app's: a hash of a token the browser keeps in a cookie, so a
reload is the same person); the per-person limit is checked in `submit` under the queue lock, and `request_stop` /
`cancel` with `by=owner` refuse someone else's run. `by=None` is the server's operator: the command line, and a
teacher who entered CIFARVIZ_TEACHER_KEY in the sidebar.

Every file of a run is read as untrusted: a status.json or metrics.jsonl line with wrong types flags that one run as
damaged (`Run.problems`) and never stops the list, the queue or the live view of the others.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import atomic_write, bounded_json

from .jobs import file_lock

DEFAULT_RUNS_DIR = "runs"
QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, CANCELLED = "queued", "running", "completed", "stopped", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
WITH_MODEL = (COMPLETED, STOPPED)  # runs whose checkpoint the other pages offer
CHECKPOINT = "model.safetensors"
WORKER_NICE = 19  # the lowest priority: a viewer's rerun preempts training at once
HEARTBEAT_SECONDS = 5.0
METRICS_EVERY_SECONDS = 0.5  # step lines in metrics.jsonl at most this often (the page redraws every 2 s)
STATES = (QUEUED, RUNNING, COMPLETED, STOPPED, FAILED, CANCELLED)
# The only functions a worker ever calls, by kind (config.json's "target" must name the same one).
KINDS = {"train": "cifarviz.services.runs:train_worker",
         "retrain-without": "cifarviz.services.retrain:retrain_worker"}


class RunError(CifarvizError):
    """A run cannot be submitted, found, stopped or cancelled as asked."""


def runs_dir(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $CIFARVIZ_RUNS, else ./runs."""
    return Path(root) if root else settings().runs_dir


def max_running() -> int:
    """How many runs may train at once on this server: $CIFARVIZ_MAX_RUNS (default 1)."""
    return settings().max_runs


def max_queued() -> int:
    """How many runs may wait: $CIFARVIZ_MAX_QUEUED (default 8), so a class cannot queue a day of training."""
    return settings().max_queued


def max_per_session() -> int:
    """How many runs one browser session may have waiting or training: $CIFARVIZ_SESSION_RUNS (default 3, enough
    to queue a BN/GN/LN comparison in one go)."""
    return settings().session_runs


# --------------------------------------------------------------------------- reading runs


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
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def has_model(self) -> bool:
        return self.state in WITH_MODEL and self.checkpoint.is_file()


def _read_json(path: Path) -> dict:
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
_STATUS_CHECKS = {"state": lambda v: v in STATES, "pid": _is_count,
                  "error": lambda v: v is None or isinstance(v, str), "note": lambda v: v is None or isinstance(v, str),
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
    """Why config.json cannot be run: an unknown kind, a target other than the kind's own, a spec that is not a
    mapping, an owner that is not text."""
    problems = []
    kind, target = config.get("kind"), config.get("target")
    if kind not in KINDS:
        problems.append(f"config.json: unknown kind {json.dumps(kind)[:40]} (known: {', '.join(KINDS)})")
    elif target != KINDS[kind]:
        problems.append(f"config.json: target {json.dumps(target)[:60]} is not the {kind} worker; it is never run")
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


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(value, fh, indent=1)


def load_run(run_id: str, root=None) -> Run:
    folder = runs_dir(root) / run_id
    plain = "/" not in run_id and run_id not in ("", ".", "..") and not folder.is_symlink()
    config = _read_json(folder / "config.json") if plain else {}
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
    value = _read_json(path)
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


# --------------------------------------------------------------------------- submitting and controlling


def _lock(root=None):
    return file_lock(usable_runs_dir(root) / "queue", timeout=60)


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


def submit(kind: str, spec: dict, *, name: str, target: str | None = None, root=None, owner: str = "",
           start: bool = True) -> str:
    """Queue a run of `kind` (its worker function is KINDS[kind]; `target`, if given, must be the same); start it
    if a slot is free. Every limit is checked here, under the queue lock: the queue's length, and for an `owner`
    (a viewer; "" is the operator) how many of theirs wait or train."""
    if kind not in KINDS or (target is not None and target != KINDS[kind]):
        raise RunError(f"Unknown kind of run {kind!r} or target {target!r}: runs are one of {', '.join(KINDS)}, "
                       "each with its own worker.")
    if not isinstance(owner, str):
        raise RunError(f"owner must be text, not {type(owner).__name__}.")
    target, root, limit = KINDS[kind], runs_dir(root), max_queued()
    max_running()  # a bad setting is reported now, not by the scheduler
    with _lock(root):
        every = list_runs(root)
        waiting = sum(r.state == QUEUED for r in every)
        if waiting >= limit:
            raise RunError(f"{waiting} run(s) are already waiting (CIFARVIZ_MAX_QUEUED={limit}): wait for one to "
                           "start, or cancel one, before adding another.")
        if owner:
            mine, allowed = sum(r.state in ACTIVE and r.owner == owner for r in every), max_per_session()
            if mine >= allowed:
                raise RunError(f"You already have {mine} run(s) waiting or training (at most {allowed} per person, "
                               "CIFARVIZ_SESSION_RUNS): stop or cancel one of yours first.")
        run_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = root / run_id
        folder.mkdir(parents=True)
        _write_json(folder / "status.json", {"state": QUEUED, "queued_at": time.time()})
        _write_json(folder / "config.json", {"kind": kind, "target": target, "spec": spec, "owner": owner,
                                             "submitted_at": time.time()})  # last: a folder with it is a run
    if start:
        schedule(root)
    return run_id


def submit_training(config, data_root, *, subset: int | None = None, snapshots: bool = False, val_size: int = 5000,
                    split_seed: int = 0, root=None, owner: str = "", start: bool = True) -> str:
    """Queue the training of a TrainConfig on the data at `data_root` (its first `subset` training images, drawn
    with the config's seed, when given). Every setting is checked now, not in the worker."""
    from cifarviz.core.train import TrainConfig, resolve_device

    config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    resolve_device(config.device)
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise RunError(f"subset must be a whole number of training images (1 or more), or None for all, not {subset!r}.")
    spec = {"train_config": config.to_dict(), "subset": subset, "snapshots": bool(snapshots),
            "data": {"root": str(Path(data_root).resolve()), "val_size": val_size, "split_seed": split_seed}}
    return submit("train", spec, name=config.model, root=root, owner=owner, start=start)


def _check_owner(run: Run, by: str | None) -> None:
    if by is not None and run.owner != by:
        raise RunError(f"{run.id} belongs to someone else: only the person who started it, or the teacher (the "
                       "teacher key in the sidebar), can stop or cancel it.")


def request_stop(run_id: str, root=None, *, by: str | None = None) -> str:
    """Ask a running run to stop (within one batch; it keeps its last finished epoch); a queued one is cancelled.
    `by`: the viewer asking (only their own runs); None: the operator or the teacher (any run)."""
    run = load_run(run_id, root)
    _check_owner(run, by)
    if run.state == QUEUED:
        return cancel(run_id, root, by=by)
    if run.state == RUNNING:
        (run.dir / "stop").touch()
    return run.state


def cancel(run_id: str, root=None, *, by: str | None = None) -> str:
    """Take a queued run off the queue (it never starts); a running one is asked to stop. Returns the state.
    `by` as for request_stop."""
    with _lock(root):
        run = load_run(run_id, root)
        _check_owner(run, by)
        if run.state == QUEUED:
            _set_status(run, state=CANCELLED, ended_at=time.time())
            return CANCELLED
    return request_stop(run_id, root, by=by) if run.state == RUNNING else run.state


def _set_status(run: Run, **changes) -> dict:
    """Call with the queue lock held."""
    run.status = {**clean_status(_read_json(run.dir / "status.json"))[0], **changes}
    _write_json(run.dir / "status.json", run.status)
    return run.status


# --------------------------------------------------------------------------- the scheduler


_CHILDREN: dict[str, subprocess.Popen] = {}  # workers this process started: polled so they never linger as zombies
_EXIT_CODES: dict[str, int] = {}  # how they ended (a negative code: the signal that killed it)
_CHILDREN_LOCK = threading.Lock()  # every viewer's page calls schedule() from its own thread


def _alive(pid, run_dir: Path) -> bool:
    """Whether `pid` is still this run's worker (not a zombie, not a new process that reuses the number)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and str(run_dir.name) in command
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_note(run: Run) -> str:
    with _CHILDREN_LOCK:
        child = _CHILDREN.pop(run.id, None)
    if child is not None:  # ours: dead by now (a zombie at worst), so its status is there to collect
        with contextlib.suppress(subprocess.TimeoutExpired):
            _EXIT_CODES[run.id] = child.wait(timeout=2)
    code = _EXIT_CODES.get(run.id)
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"it was killed by {signal.Signals(-code).name}"
    return f"it exited with status {code}" if code is not None else "it was killed or ran out of memory"


def schedule(root=None, start: bool = True) -> list[str]:
    """Mark runs whose worker died as failed, then (unless `start` is False) start queued runs while fewer than
    max_running() run. Pages call this on every render, and every worker calls it as it ends. Returns the runs
    started."""
    root, limit = runs_dir(root), max_running()
    with _CHILDREN_LOCK:
        for run_id, child in list(_CHILDREN.items()):
            if child.poll() is not None:
                _EXIT_CODES[run_id] = _CHILDREN.pop(run_id).returncode
    started = []
    if not root.is_dir():
        return started
    with _lock(root):
        runs = list_runs(root)
        for run in runs:
            if run.state == RUNNING and not _alive(run.status.get("pid"), run.dir):
                tail = log_tail(run)
                _set_status(run, state=FAILED, ended_at=time.time(),
                            error=f"The training process (pid {run.status.get('pid')}) ended without reporting: "
                                  f"{_exit_note(run)}." + (f" The last lines of its log:\n{tail}" if tail else ""))
            elif run.problems and _read_json(run.dir / "status.json").get("state") == QUEUED:
                _set_status(run, state=FAILED, ended_at=time.time(),
                            error="Never started: its files are damaged (" + "; ".join(run.problems) + ").")
        running = sum(r.state == RUNNING for r in runs)
        for run in runs if start else ():
            if running >= limit:
                break
            if run.state == QUEUED and not run.problems:
                child = _launch(run)
                _set_status(run, state=RUNNING, pid=child.pid, started_at=time.time(), heartbeat=time.time())
                started.append(run.id)
                running += 1
    return started


def _launch(run: Run) -> subprocess.Popen:
    package_root = str(Path(__file__).resolve().parents[2])  # importable from any working folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with open(run.dir / "worker.log", "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "cifarviz.services.runs", "worker", str(run.dir.resolve())],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, close_fds=True)  # fmt: skip
    with _CHILDREN_LOCK:
        _CHILDREN[run.id] = child
    return child


# --------------------------------------------------------------------------- the worker


class RunContext:
    """What a worker function gets: its folder and settings, a metrics log, and the stop request."""

    def __init__(self, run: Run):
        self.run, self.dir, self.spec = run, run.dir, run.spec
        self._stop_file = run.dir / "stop"
        self._metrics = open(run.dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, event: dict) -> None:
        """Append one line to metrics.jsonl (flushed at once: the page reads it while training goes on)."""
        self._metrics.write(json.dumps({**event, "time": time.time()}) + "\n")
        self._metrics.flush()

    def stop_requested(self) -> bool:
        return self._stop_file.exists()


def worker_main(run_dir: str) -> int:
    """Run one queued run to its end and record how it ended; then start whatever waits next."""
    folder = Path(run_dir)
    root, run = folder.parent, load_run(folder.name, folder.parent)
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no os.nice (Windows)
        os.nice(WORKER_NICE)
    signal.signal(signal.SIGTERM, _terminated)
    with _lock(root):
        run = load_run(folder.name, root)
        if run.state != RUNNING:  # cancelled between launch and now
            return 0
        _set_status(run, pid=os.getpid())
    done = threading.Event()
    threading.Thread(target=_heartbeat, args=(run, done), daemon=True).start()
    state, note, error = FAILED, None, None
    try:
        if run.problems:  # a target that is not the kind's own worker is never imported
            raise RunError("Refused to run: " + "; ".join(run.problems) + ".")
        module, function = KINDS[run.kind].split(":")
        state, note = getattr(importlib.import_module(module), function)(RunContext(run))
    except CifarvizError as exc:  # a message for people: a diverging loss, missing data
        error = str(exc)
    except BaseException as exc:  # noqa: BLE001 - recorded, with the traceback in worker.log
        traceback.print_exc()
        error = (f"The training process stopped: {exc}" if isinstance(exc, _Terminated)
                 else f"Unexpected error ({type(exc).__name__}: {exc}); the traceback is in {folder / 'worker.log'}.")
    finally:
        done.set()
        with _lock(root):
            _set_status(run, state=state if error is None else FAILED, error=error, note=note, ended_at=time.time())
    with contextlib.suppress(Exception):  # the next run starts even when nobody has a page open
        schedule(root)
    return 0


class _Terminated(BaseException):
    pass


def _terminated(signum, frame):
    raise _Terminated("it was asked to terminate (SIGTERM)")


def _heartbeat(run: Run, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(Exception), _lock(run.dir.parent):
            if _read_json(run.dir / "status.json").get("state") == RUNNING:
                _set_status(run, heartbeat=time.time())


def training_subset(dataset, size: int | None, seed: int = 0):
    """The dataset with `size` training images drawn at random (seeded; all when None or larger)."""
    import dataclasses

    import numpy as np

    from cifarviz.core.data import Split

    train = dataset.train
    if size is None or size >= len(train):
        return dataset
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size, replace=False))
    return dataclasses.replace(dataset, train=Split("train", train.images[idx], train.labels[idx], train.source_index[idx]))


def train_threads() -> int:
    """CPU threads for training: $CIFARVIZ_TRAIN_THREADS, else all cores but one, which the viewers keep (on a
    busy small machine threads that wait for each other whenever one is preempted run slower than fewer threads:
    see the README's Benchmarks)."""
    return settings().train_threads


def train_worker(ctx: RunContext) -> tuple[str, str | None]:
    """The "train" kind: train, checkpoint every finished epoch, and keep the last one when asked to stop."""
    import torch

    from cifarviz.core.checkpoint import load_checkpoint, save_checkpoint
    from cifarviz.core.recipes import checkpoint_meta, save_snapshot
    from cifarviz.core.train import TrainConfig, resolve_device, train
    from cifarviz.store.datasets import load_cifar10

    spec, run_id = ctx.spec, ctx.run.id
    config = TrainConfig(**spec["train_config"])
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(train_threads())
    data = spec["data"]
    dataset = load_cifar10(data["root"], download=False, progress=False, val_size=data["val_size"],
                           split_seed=data["split_seed"])
    dataset = training_subset(dataset, spec.get("subset"), config.seed)
    steps_per_epoch = -(-len(dataset.train) // config.batch_size)
    ctx.log({"event": "start", "device": device.type, "threads": torch.get_num_threads(),
             "train_images": len(dataset.train), "val_images": len(dataset.val), "steps_per_epoch": steps_per_epoch,
             "total_steps": steps_per_epoch * config.epochs, "epochs": config.epochs})
    path = ctx.dir / CHECKPOINT
    last_logged = [0.0]

    def callback(event: dict) -> None:
        now = time.monotonic()
        epoch_end = event["event"] == "epoch" or event["step"] % event["steps_per_epoch"] == 0
        if epoch_end or now - last_logged[0] >= METRICS_EVERY_SECONDS:
            last_logged[0] = now
            ctx.log(event)

    def on_epoch(model, history) -> None:
        meta = checkpoint_meta(config, dataset, model, history, RUNNING, notes=f"run {run_id} in progress")
        save_checkpoint(path, model, {**meta, "name": run_id})
        if spec.get("snapshots"):
            save_snapshot(ctx.dir / "epochs", model, meta)

    result = train(config, dataset, callback=callback, cancel=ctx.stop_requested, on_epoch=on_epoch, step_every=1,
                   validate_partial=False)
    state = COMPLETED if result.status == "completed" else STOPPED
    if not result.history:
        return state, "Stopped before the first epoch finished: there is no checkpoint to keep."
    # Stopped mid-epoch: the checkpoint of the last finished epoch is the one to keep, not the half-trained weights.
    model = result.model if state == COMPLETED else load_checkpoint(path).model
    ctx.log({"event": "finishing", "state": state})
    meta = checkpoint_meta(config, dataset, model, result.history, state, result.history[-1]["elapsed"],
                           measure_test=True, notes=f"trained in the app as run {run_id}")
    meta["device"] = result.device
    # the area under the margin goes with every finished run (a stopped run's covers the epochs it finished)
    save_checkpoint(path, model, {**meta, "name": run_id}, statistics=result.statistics(dataset))
    test = meta["metrics"]["test_accuracy"]
    ctx.log({"event": "saved", "state": state, "test_accuracy": test})
    epochs = len(result.history)
    return state, (f"{epochs} epoch{'s' * (epochs != 1)}, test accuracy {test:.2%}" +
                   ("" if state == COMPLETED else f" (stopped; epoch {epochs} kept)"))


# --------------------------------------------------------------------------- command line


def cli(args) -> int:
    """`python -m cifarviz runs [list|stop|cancel] [RUN_ID] [--json]`."""
    if args.action != "list" and not args.run_id:
        raise RunError(f"usage: python -m cifarviz runs {args.action} RUN_ID (`python -m cifarviz runs` lists them)")
    if args.action == "stop":  # the command line is the server's operator: any run
        state = request_stop(args.run_id)
        print(f"{args.run_id}: {state}" + (" (asked to stop; it keeps its last finished epoch)" if state == RUNNING else ""))
        return 0
    if args.action == "cancel":
        print(f"{args.run_id}: {cancel(args.run_id)}")
        return 0
    schedule(start=False)  # a dead worker's run is listed as failed; listing starts nothing
    runs = list_runs()
    if args.json:
        rows = [{"id": r.id, "kind": r.kind, **r.status,
                 "checkpoint": str(r.checkpoint) if r.has_model else None, "queue_position": queue_position(r, runs),
                 "problems": list(r.problems)} for r in runs]
        print(json.dumps(rows, indent=2, allow_nan=False))  # strict JSON: status fields are checked finite
        return 0
    if not runs:
        print(f"no runs in {runs_dir()}")
    for run in runs:
        where = f"#{queue_position(run, runs)} in the queue" if run.state == QUEUED else run.status.get("note") or ""
        error = (run.error or "").splitlines()[0] if run.error else ""
        damaged = "damaged: " + "; ".join(run.problems) if run.problems else ""
        print(f"{run.id:40} {run.state:10} {damaged or where or error}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        from cifarviz.services import runs  # the module itself, not a second copy named __main__

        sys.exit(runs.worker_main(sys.argv[2]))
    sys.exit("usage: python -m cifarviz.services.runs worker RUN_DIR (started by cifarviz.services.runs.schedule)")
