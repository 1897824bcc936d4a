"""A worker: takes jobs from the queue one at a time, runs each kind's function, and hands back what it produces.

    python -m cifarviz worker [--broker redis://HOST:6379/0] [--gpu | --cpu] [--work DIR] [--name NAME]

The app starts its own (`ensure_workers`: CIFARVIZ_MAX_RUNS of them, on the queue beside its runs, at the lowest CPU
priority); a machine joins a lecture hall's queue with the command above. A job runs in the worker's own working
folder (`--work`, never the app's runs folder); a pusher thread sends the broker, every half second, the new
metrics lines, every changed file (checkpoints, snapshots, result.json), the job's log and a heartbeat. The app's
collector writes them into the run's folder, and reports a run whose heartbeat stopped as failed.

A job's stop request is a key in the broker, read by `RunContext.stop_requested` (at most every half second):
the kind's function stops within a batch and keeps what it finished.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import file_lock

from . import engine
from .kind import KINDS
from .records import CANCELLED, FAILED, RUNNING, RunError, usable_runs_dir, write_json

PUSH_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
IDLE_EXIT_SECONDS = 300.0  # an embedded worker with nothing to do ends; the app starts one again when needed
WORKER_NICE = 19  # the lowest priority: a viewer's page preempts training at once
MAX_FILE_BYTES = 512 * 2**20
LOG_KEEP_BYTES = 64 * 1024


class RunContext:
    """What a kind's function gets: its working folder and settings, a metrics log, and the stop request."""

    def __init__(self, run_id: str, folder: Path, spec: dict, url: str, status: dict | None = None):
        self.run_id, self.dir, self.spec, self._url = run_id, folder, spec, url
        self._status = status if status is not None else {}  # what the pusher sends: the device, once known
        self._metrics = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        self._checked, self._stop = 0.0, False
        self.device = ""

    def log(self, event: dict) -> None:
        """Append one line to metrics.jsonl; the pusher sends it on within half a second."""
        if event.get("event") == "start" and isinstance(event.get("device"), str):
            self.device = self._status["device"] = event["device"][:40]
        self._metrics.write(json.dumps({**event, "time": time.time()}) + "\n")
        self._metrics.flush()

    def stop_requested(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked >= 0.5:
            self._checked = now
            with contextlib.suppress(Exception):  # a broker that is away: keep training, ask again
                self._stop = engine.store(self._url).has_data_for_key(f"cv:stop:{self.run_id}")
        return self._stop

    def close(self) -> None:
        self._metrics.close()


class Pusher:
    """Sends a job's folder to the broker: metrics lines in numbered chunks, changed files, log tail, status."""

    def __init__(self, run_id: str, folder: Path, url: str, status: dict):
        self.run_id, self.folder, self.url, self.status = run_id, folder, url, status
        self.offset, self.chunks, self.versions = 0, 0, {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"push-{run_id}")

    def _loop(self) -> None:
        last_beat = 0.0
        while not self.done.wait(PUSH_SECONDS):
            with contextlib.suppress(Exception):  # the broker away for a moment: the next push catches up
                beat = time.monotonic() - last_beat >= HEARTBEAT_SECONDS
                self.push(status=beat)
                if beat:
                    last_beat = time.monotonic()

    def push(self, status: bool = True) -> None:
        store = engine.store(self.url)
        with self.lock:
            path = self.folder / "metrics.jsonl"
            if path.is_file() and path.stat().st_size > self.offset:
                with open(path, "rb") as fh:
                    fh.seek(self.offset)
                    data = fh.read(16 * 2**20)
                whole = data[: data.rfind(b"\n") + 1]
                if whole:
                    store.put_data(f"cv:metrics:{self.run_id}:{self.chunks}", whole)
                    self.chunks += 1
                    self.offset += len(whole)
            changed = False
            for file in sorted(self.folder.rglob("*")):
                rel = file.relative_to(self.folder).as_posix()
                if not file.is_file() or file.is_symlink() or rel in ("metrics.jsonl",) or "/." in "/" + rel:
                    continue
                info = file.stat()
                version = f"{info.st_mtime_ns}-{info.st_size}"
                if self.versions.get(rel) != version and info.st_size <= MAX_FILE_BYTES:
                    store.put_data(f"cv:file:{self.run_id}:{rel}", file.read_bytes())
                    self.versions[rel] = version
                    changed = True
            if changed:
                engine.put_json(self.url, f"cv:files:{self.run_id}", self.versions)
            if status:
                self.status["beat"] = self.status.get("beat", 0) + 1
                self.status["heartbeat"] = time.time()
                engine.put_json(self.url, f"cv:status:{self.run_id}", {**self.status, "chunks": self.chunks})


class _Terminated(BaseException):
    pass


def _terminated(signum, frame):
    raise _Terminated("the worker was asked to terminate (SIGTERM)")


_WORKER: dict = {}  # this process's worker: name, work folder, gpu


def run_job(huey, run_id: str, kind: str, spec: dict, owner: str, queue_name: str) -> None:
    """Run one job to its end in this worker, handing everything back through the broker."""
    url = _WORKER["url"]
    known = engine.get_json(url, f"cv:status:{run_id}")
    if isinstance(known, dict) and known.get("state") == CANCELLED:
        return
    folder = Path(_WORKER.get("work") or usable_runs_dir() / ".work") / run_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    status = {"state": RUNNING, "started_at": time.time(), "worker": _WORKER.get("name", engine.HOST),
              "host": engine.HOST, "pid": os.getpid(), "queue": queue_name, "device": ""}
    pusher = Pusher(run_id, folder, url, status)
    pusher.push()
    pusher.thread.start()
    _set_current(url, run_id)
    log = io.StringIO()
    ctx = RunContext(run_id, folder, spec, url, pusher.status)
    state, note, error = FAILED, None, None
    try:
        if kind not in KINDS:  # only registered functions ever run
            raise RunError(f"Refused to run: unknown kind {kind!r}.")
        with _tee(log):
            state, note = KINDS[kind].function(ctx)
    except CifarvizError as exc:  # a message for people: a diverging loss, missing data
        error = str(exc)
    except BaseException as exc:  # noqa: BLE001 - recorded, with the traceback in the run's log
        log.write(traceback.format_exc())
        traceback.print_exc()
        error = (f"The worker stopped: {exc}" if isinstance(exc, _Terminated)
                 else f"Unexpected error ({type(exc).__name__}: {exc}); the traceback is in the run's worker.log.")
        if isinstance(exc, _Terminated):
            _finish(pusher, ctx, log, state=FAILED, error=error, note=None)
            raise
    _finish(pusher, ctx, log, state=state if error is None else FAILED, error=error, note=note)
    _set_current(url, None)


def _finish(pusher: Pusher, ctx: RunContext, log: io.StringIO, **final) -> None:
    ctx.close()
    pusher.done.set()
    pusher.thread.join(timeout=10)
    (pusher.folder / "worker.log").write_text(log.getvalue()[-LOG_KEEP_BYTES:])
    pusher.status.update(final, ended_at=time.time(), device=ctx.device)
    for attempt in range(60):  # what the job produced must reach the app: wait out a broker that is away
        try:
            pusher.push()
            break
        except Exception:  # noqa: BLE001
            time.sleep(min(5.0, 0.5 * (attempt + 1)))
    shutil.rmtree(pusher.folder, ignore_errors=True)


@contextlib.contextmanager
def _tee(log: io.StringIO):
    """The job's printed output into its log as well as the worker's."""

    class Tee(io.TextIOBase):
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            if log.tell() > 4 * LOG_KEEP_BYTES:  # a chatty job: keep the end, bounded
                kept = log.getvalue()[-LOG_KEEP_BYTES:]
                log.seek(0)
                log.truncate()
                log.write(kept)
            log.write(text)
            return self.stream.write(text)

        def flush(self):
            self.stream.flush()

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(out), Tee(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


def _set_current(url: str, run_id: str | None) -> None:
    _WORKER["run"] = run_id
    with contextlib.suppress(Exception):
        _announce(url)


def _announce(url: str) -> None:
    name = _WORKER["name"]
    engine.put_json(url, f"cv:worker:{name}", {"name": name, "host": engine.HOST, "pid": os.getpid(),
                                                "gpu": _WORKER["gpu"], "run": _WORKER.get("run"), "at": time.time()})
    names = engine.get_json(url, "cv:workers") or []
    if name not in names:
        engine.put_json(url, "cv:workers", [*names[-255:], name])
    if _WORKER["gpu"]:
        engine.put_json(url, "cv:gpu-seen", time.time())


def serve(url: str, *, name: str, work: Path, gpu: bool, idle_exit: float | None = None,
          gpu_grace: float = engine.GPU_GRACE_SECONDS) -> int:
    """Take jobs until SIGTERM (or `idle_exit` seconds with nothing to do): this machine's queue first, then the GPU
    queue (a GPU worker; a CPU worker too once no GPU worker has been seen for a while), then any worker's."""
    _WORKER.update(name=name, work=str(work), gpu=gpu, url=url, run=None)
    engine.set_runner(run_job)
    work.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminated)
    print(f"cifarviz worker {name} on {engine.HOST}: taking jobs from {engine.shown_broker(url)}"
          f"{' (GPU)' if gpu else ''}; working folder {work}", flush=True)
    idle_since, announced, away = time.monotonic(), 0.0, False
    try:
        while True:
            try:
                if time.monotonic() - announced >= HEARTBEAT_SECONDS:
                    _announce(url)
                    announced = time.monotonic()
                names = [engine.host_queue()] + (["gpu"] if gpu else []) + ["any"]
                if not gpu and not engine.gpu_worker_seen_within(url, gpu_grace):
                    names.append("gpu")  # no GPU worker around: its jobs run on the CPU rather than wait
                task = huey = data = None
                for queue_name in names:
                    huey = engine.queue(queue_name, url)
                    if (data := huey.storage.dequeue()) is not None:
                        break
                if away:
                    print("the work queue answers again", flush=True)
                    away = False
            except _Terminated:
                raise
            except Exception as exc:  # noqa: BLE001 - a broker that is away: wait for it, never exit
                if not away:
                    print(f"the work queue does not answer ({type(exc).__name__}); waiting for it", flush=True)
                away = True
                time.sleep(1.0)
                continue
            if data is None:
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    return 0
                time.sleep(0.25)
                continue
            try:  # JSON naming the one registered task, or nothing runs: never unpickled, never imported
                task = huey.deserialize_task(data)
            except Exception as exc:  # noqa: BLE001
                print(f"refused a message that is not a cifarviz job ({type(exc).__name__}: {str(exc)[:200]})",
                      flush=True)
                continue
            huey.execute(task)
            idle_since = time.monotonic()
    except _Terminated:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the app's own workers


_CHILDREN: dict[int, subprocess.Popen] = {}  # workers this process started, by pid: their exit codes are ours
_CHILDREN_LOCK = threading.Lock()


def exit_note(pid: int) -> str | None:
    """How a worker this process started ended ("killed by SIGKILL"), or None when it is not ours."""
    with _CHILDREN_LOCK:
        child = _CHILDREN.get(pid)
    if child is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        code = child.wait(timeout=2)
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"it was killed by {signal.Signals(-code).name}"
        return f"it exited with status {code}"
    return None


def alive(pid) -> bool:
    """Whether `pid` is a live cifarviz worker on this machine (not a zombie, not a reused number)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    with _CHILDREN_LOCK:
        child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        if not Path("/proc/self").exists():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 0)
                return True
        return False
    return stat not in ("Z", "X") and "cifarviz" in command and "worker" in command


def ensure_workers(root=None) -> list[int]:
    """Start this server's own workers (CIFARVIZ_MAX_RUNS) where fewer live; returns the pids started. Each is a
    process in a session of its own (a page rerun or a server restart does not end it), niced to the lowest
    priority, ending itself after IDLE_EXIT_SECONDS with nothing to do."""
    root = usable_runs_dir(root)
    folder = root / "workers"
    folder.mkdir(exist_ok=True)
    started = []
    with file_lock(folder / "start", timeout=30):
        for slot in range(settings().max_runs):
            record = folder / f"local-{slot}.json"
            with contextlib.suppress(OSError, ValueError):
                if alive(json.loads(record.read_text()).get("pid")):
                    continue
            started.append(_spawn(root, slot, record))
    return started


def _spawn(root: Path, slot: int, record: Path) -> int:
    package_root = str(Path(__file__).resolve().parents[3])  # importable from any working folder
    env = {**os.environ, "CIFARVIZ_RUNS": str(root.resolve()),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    name = f"{engine.HOST}-{slot}"
    command = [sys.executable, "-m", "cifarviz", "worker", "--name", name, "--work", str(root / ".work" / str(slot)),
               "--idle-exit", str(IDLE_EXIT_SECONDS), "--nice", str(WORKER_NICE)]
    with open(root / "workers" / f"local-{slot}.log", "ab") as log:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, close_fds=True)
    with _CHILDREN_LOCK:
        _CHILDREN[child.pid] = child
    write_json(record, {"pid": child.pid, "name": name, "started_at": time.time()})  # atomic: read by others
    return child.pid


def stop_local_workers(root=None, sig: int = signal.SIGTERM) -> None:
    """End this server's own workers (tests, and an operator's `python -m cifarviz worker --stop-local`)."""
    for record in (usable_runs_dir(root) / "workers").glob("local-*.json"):
        with contextlib.suppress(OSError, ValueError):
            pid = json.loads(record.read_text()).get("pid")
            if alive(pid):
                os.kill(pid, sig)
            with _CHILDREN_LOCK:
                child = _CHILDREN.pop(pid, None)
            if child is not None:  # ours: collected, never left a zombie
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
