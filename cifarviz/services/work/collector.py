"""The app's side of the queue: what workers hand back through the broker, written into each run's folder.

A thread per app process (`ensure_running`), once a second: for every run that waits or runs, the new metrics
chunks are appended to metrics.jsonl, changed files (checkpoints, snapshots, result.json) written atomically, the
log and status.json replaced; a finished run's keys are then removed from the broker. Several app processes on one
machine share the runs folder: a run is collected by one of them at a time (a lock per run, never waited for).

A run whose worker stopped answering is reported as failed, with the reason: at once when the worker was on this
machine and its process is gone (with its exit signal when this process started it), else after STALE_SECONDS
without a heartbeat. Its slot is free (the worker is gone), and the queue moves on with the other workers.
The same thread keeps this server's own workers alive while runs wait (`worker.ensure_workers`).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from cifarviz.core.utils import atomic_write

from . import engine, worker
from .records import (
    ACTIVE,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    Run,
    clean_status,
    list_runs,
    read_json,
    runs_dir,
    write_json,
)

STALE_SECONDS = 30.0
IDLE_STOP_SECONDS = 120.0  # the thread ends after this long with nothing to collect; submit starts it again
SAFE_FILE = re.compile(r"^(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}/)?[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")
_SEEN: dict[str, tuple[int, float]] = {}  # run id -> (last heartbeat count, when it changed, this clock)
_THREADS: dict[str, tuple[threading.Thread, threading.Event]] = {}
_THREADS_LOCK = threading.Lock()


def submit(kind: str, spec: dict, **options) -> str:
    """`engine.submit`, then this machine's side of it: its own workers, and this process's collector."""
    run_id = engine.submit(kind, spec, **options)
    worker.ensure_workers(options.get("root"))
    ensure_running(options.get("root"))
    return run_id


def ensure_running(root=None) -> None:
    """Start this process's collector for the runs folder, unless it runs (cheap: pages may call it every time)."""
    key = str(runs_dir(root).resolve())
    with _THREADS_LOCK:
        known = _THREADS.get(key)
        if known is not None and known[0].is_alive():
            return
        stop = threading.Event()
        thread = threading.Thread(target=_loop, args=(Path(key), stop), daemon=True, name="cifarviz-collector")
        _THREADS[key] = (thread, stop)
        thread.start()


def stop_all() -> list[Path]:
    """End this process's collectors (tests, between runs folders); returns the folders they served."""
    with _THREADS_LOCK:
        known = dict(_THREADS)
        _THREADS.clear()
    for thread, stop in known.values():
        stop.set()
        thread.join(timeout=30)
    return [Path(key) for key in known]


def _loop(root: Path, stop: threading.Event) -> None:
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_STOP_SECONDS and not stop.is_set():
        with contextlib.suppress(Exception):  # a broker away, a damaged run: the next round tries again
            if collect(root):
                idle_since = time.monotonic()
        stop.wait(1.0)


def collect(root=None) -> int:
    """One round: every waiting or running run brought up to date. Returns how many are still active."""
    root = runs_dir(root)
    active = [r for r in list_runs(root) if r.state in ACTIVE and not r.problems]
    if not active:
        return 0
    url = engine.broker_url(root)
    if any(r.state == QUEUED for r in active):
        worker.ensure_workers(root)
    for run in active:
        lock = FileLock(str(run.dir / ".collect.lock"))
        with contextlib.suppress(Timeout):
            with lock.acquire(timeout=0):
                _collect_one(run, url)
    return len(active)


def _collect_one(run: Run, url: str) -> None:
    remote = engine.get_json(url, f"cv:status:{run.id}")
    if not isinstance(remote, dict):
        return  # no worker has taken it yet
    status, _ = clean_status(remote)
    done_path = run.dir / ".collected.json"
    done = read_json(done_path)  # how far this folder is: checked, as every file read back
    if not (isinstance(done.get("chunks"), int) and done["chunks"] >= 0 and isinstance(done.get("files"), dict)):
        done = {"chunks": 0, "files": {}}
    store = engine.store(url)
    chunks = remote.get("chunks") if isinstance(remote.get("chunks"), int) else 0
    while done["chunks"] < chunks:
        data = store.peek_data(f"cv:metrics:{run.id}:{done['chunks']}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            break
        with open(run.dir / "metrics.jsonl", "ab") as fh:
            fh.write(bytes(data))
        done["chunks"] += 1
        write_json(done_path, done)  # after each chunk: another process never appends one twice
    versions = engine.get_json(url, f"cv:files:{run.id}") or {}
    for rel, version in versions.items() if isinstance(versions, dict) else ():
        if done["files"].get(rel) == version or not SAFE_FILE.match(rel) or ".." in rel:
            continue
        data = store.peek_data(f"cv:file:{run.id}:{rel}")
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > worker.MAX_FILE_BYTES:
            continue
        target = run.dir / rel
        target.parent.mkdir(exist_ok=True)
        with atomic_write(target, "wb") as fh:
            fh.write(bytes(data))
        done["files"][rel] = version
        write_json(done_path, done)
    state = status.get("state")
    if state == RUNNING and _stale(run, status):
        status = _declare_lost(run, url, status)
        state = FAILED
    if state == QUEUED:
        return
    local = clean_status(read_json(run.dir / "status.json"))[0]
    write_json(run.dir / "status.json", {**local, **status})
    if state in FINAL and done["chunks"] >= chunks:
        _forget(url, run.id, chunks, versions)


def _stale(run: Run, status: dict) -> bool:
    """Whether the run's worker is gone: its process on this machine has ended, or its heartbeat stopped."""
    if status.get("host") == engine.HOST and isinstance(status.get("pid"), int):
        if not worker.alive(status["pid"]):
            time.sleep(0.5)  # its last push may be on its way
            return not worker.alive(status["pid"])
    beat, now = status.get("beat", 0), time.monotonic()
    seen = _SEEN.get(run.id)
    if seen is None or seen[0] != beat:
        _SEEN[run.id] = (beat, now)
        return False
    return now - seen[1] > STALE_SECONDS


def _declare_lost(run: Run, url: str, status: dict) -> dict:
    remote = engine.get_json(url, f"cv:status:{run.id}")  # a last look: it may have just finished
    if isinstance(remote, dict) and remote.get("state") in FINAL:
        return clean_status(remote)[0]
    pid, where = status.get("pid"), f"{status.get('worker', '?')} on {status.get('host', '?')}"
    how = (worker.exit_note(pid) if status.get("host") == engine.HOST else None) or \
        ("its process has ended (killed, or out of memory)" if status.get("host") == engine.HOST
         else f"it sent no heartbeat for {STALE_SECONDS:.0f} s (killed, out of memory, or its machine went away)")
    kept = " The last finished epoch's checkpoint is kept in the run's folder." if (run.dir / "model.safetensors").is_file() else ""
    failed = {**status, "state": FAILED, "ended_at": time.time(),
              "error": f"The worker {where} (pid {pid}) stopped while running this job: {how}.{kept}"}
    engine.put_json(url, f"cv:status:{run.id}", failed)
    return failed


def _forget(url: str, run_id: str, chunks: int, versions: dict) -> None:
    store = engine.store(url)
    for n in range(chunks):
        store.delete_data(f"cv:metrics:{run_id}:{n}")
    for rel in versions:
        store.delete_data(f"cv:file:{run_id}:{rel}")
    for key in ("files", "stop", "status"):
        store.delete_data(f"cv:{key}:{run_id}")
    _SEEN.pop(run_id, None)
