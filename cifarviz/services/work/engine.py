"""The one queue for long work, on Huey (https://huey.readthedocs.io): submit, stop, cancel, limits, routing.

    run_id = submit("train", spec, name="lenet", owner=viewer)    # queued; a worker takes it
    request_stop(run_id, by=viewer); cancel(run_id, by=None)       # None: the operator or the teacher

Where the queue lives ($CIFARVIZ_BROKER):
* unset: a SQLite file, RUNS/queue.db (Huey's SqliteHuey). One machine; nothing to start: the app starts its own
  workers (`worker.ensure_workers`), CIFARVIZ_MAX_RUNS of them, at the lowest CPU priority.
* redis://HOST:PORT/DB: a Redis server (Huey's PriorityRedisHuey). Workers on any machine that reaches it take jobs
  (`python -m cifarviz worker --broker URL [--gpu]`), and hand back what they produce through it.

Three queues, in one broker: "any" (every worker), "gpu" (jobs that want a GPU, sent there only while a GPU worker
is connected; CPU workers take them too once no GPU worker has been seen for GPU_GRACE_SECONDS) and "host-NAME"
(jobs that read a file only the submitting machine has: a study in a SQLite database). Inside a queue the higher
priority goes first (a retraining proof before a study), then the older job.

Messages are JSON, never pickle: a job names its kind (a registered function, `kind.py`) and carries its settings;
a worker refuses any other name. Limits are checked in `submit`, under the runs folder's lock, against every run
the app's processes know: the queue's length (CIFARVIZ_MAX_QUEUED) and each person's runs (CIFARVIZ_SESSION_RUNS).
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import socket
import threading
import time

from huey import PriorityRedisHuey, SqliteHuey
from huey.registry import Message
from huey.serializer import Serializer

from cifarviz.core.settings import settings
from cifarviz.core.utils import bounded_json, file_lock

from .kind import KINDS
from .records import (
    ACTIVE,
    CANCELLED,
    QUEUED,
    RUNNING,
    RunError,
    clean_status,
    list_runs,
    load_run,
    read_json,
    usable_runs_dir,
    write_json,
)

GPU_GRACE_SECONDS = 60.0  # no GPU worker seen for this long: CPU workers take the GPU queue's jobs too
WORKER_SEEN_SECONDS = 20.0  # a worker that has not said it lives for this long is gone
HOST = socket.gethostname()[:60] or "localhost"
JOB_TASK = "cifarviz.job"


class JSONSerializer(Serializer):
    """Huey's messages and values as JSON: a message read from the broker can name data, never code."""

    def _serialize(self, data) -> bytes:
        if isinstance(data, Message):
            return json.dumps({"message": list(data)}).encode()
        return json.dumps({"value": data}).encode()

    def _deserialize(self, data: bytes):
        value = bounded_json(bytes(data).decode())
        if not isinstance(value, dict):
            raise ValueError("not a cifarviz message")
        if "message" in value:
            fields = value["message"]
            if not isinstance(fields, list) or len(fields) != len(Message._fields):
                raise ValueError("not a cifarviz message")
            return Message(*fields)
        return value.get("value")


def broker_url(root=None) -> str:
    """$CIFARVIZ_BROKER, else the SQLite file beside the runs."""
    return settings().broker or f"sqlite://{(usable_runs_dir(root) / 'queue.db').resolve()}"


def shown_broker(url: str) -> str:
    """A broker URL as messages show it: no password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://…@{rest.rsplit('@', 1)[1]}"
    return url


_RUNNER = None  # what executes a job: set by a worker process (`worker.serve`), nowhere else


def set_runner(runner) -> None:
    global _RUNNER
    _RUNNER = runner


@functools.lru_cache(maxsize=64)
def queue(name: str, url: str):
    """The Huey instance of one queue at `url`, with the one job task registered (cached per process)."""
    common = {"name": f"cifarviz-{name}", "results": False, "serializer": JSONSerializer(), "utc": True}
    if url.startswith("sqlite://"):
        huey = SqliteHuey(filename=url[len("sqlite://"):], timeout=30, **common)
    else:
        import redis

        pool = redis.ConnectionPool.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        huey = PriorityRedisHuey(connection_pool=pool, blocking=False, **common)

    @huey.task(name=JOB_TASK)
    def job(run_id: str, kind: str, spec: dict, owner: str, queue_name: str):
        if _RUNNER is None:
            raise RuntimeError("cifarviz jobs run only in a worker (`python -m cifarviz worker`)")
        _RUNNER(huey, run_id, kind, spec, owner, queue_name)

    huey.job = job  # the task every message names
    return huey


def host_queue(host: str = HOST) -> str:
    return "host-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in host)


def store(url: str):
    """The key-value store every queue of `url` shares: statuses, metrics, files, stop requests, workers."""
    return queue("any", url).storage


def put_json(url: str, key: str, value) -> None:
    store(url).put_data(key, json.dumps(value).encode())


def get_json(url: str, key: str, max_bytes: int = 2**20):
    from huey.constants import EmptyData

    data = store(url).peek_data(key)
    if data is EmptyData or data is None:
        return None
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        return bounded_json(bytes(data).decode(), max_bytes=max_bytes)
    return None


# --------------------------------------------------------------------------- workers and the broker's health


def workers(url: str) -> list[dict]:
    """The workers that said they live within WORKER_SEEN_SECONDS: name, host, gpu, device, pid, run."""
    names = get_json(url, "cv:workers") or []
    seen = []
    for name in names if isinstance(names, list) else []:
        info = get_json(url, f"cv:worker:{name}")
        if isinstance(info, dict) and isinstance(info.get("at"), (int, float)) and \
                time.time() - info["at"] < WORKER_SEEN_SECONDS:
            seen.append(info)
    return seen


def gpu_worker_seen_within(url: str, seconds: float) -> bool:
    at = get_json(url, "cv:gpu-seen")
    return isinstance(at, (int, float)) and time.time() - at < seconds


_HEALTH: dict[str, tuple[float, str | None]] = {}
_HEALTH_LOCK = threading.Lock()


def problem(root=None) -> str | None:
    """None when the queue answers, else what pages and the command line say (checked at most every 2 s)."""
    url = broker_url(root)
    with _HEALTH_LOCK:
        known = _HEALTH.get(url)
    if known and time.monotonic() - known[0] < 2.0:
        return known[1]
    try:
        store(url).has_data_for_key("cv:ping")
        message = None
    except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is said the same way
        message = (f"The work queue at {shown_broker(url)} does not answer ({type(exc).__name__}). Training, "
                   "tuning and retraining proofs wait until it is back; everything else works. Runs already "
                   "submitted are kept by the broker.")
    with _HEALTH_LOCK:
        _HEALTH[url] = (time.monotonic(), message)
    return message


def _broker_errors(url: str):
    """Turn a broker that does not answer into a RunError that says so."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001
            if type(exc).__module__.split(".")[0] not in ("redis", "sqlite3", "huey"):
                raise
            raise RunError(f"The work queue at {shown_broker(url)} does not answer ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); try again when it is back.") from None

    return guard()


# --------------------------------------------------------------------------- submitting and controlling


def _lock(root=None):
    return file_lock(usable_runs_dir(root) / "queue", timeout=60)


def route(kind: str, spec: dict, url: str, here: bool | None = None) -> str:
    """The queue a job goes to: its machine's own, the GPU workers', or any worker's."""
    info = KINDS[kind]
    if info.here if here is None else here:
        return host_queue()
    device = spec.get("train_config", {}).get("device", "auto") if isinstance(spec.get("train_config"), dict) else "auto"
    if info.wants_gpu and device != "cpu" and any(w.get("gpu") for w in workers(url)):
        return "gpu"
    return "any"


def submit(kind: str, spec: dict, *, name: str, root=None, owner: str = "", here: bool | None = None,
           one_at_a_time: bool = False) -> str:
    """Queue a job of a registered `kind` (kinds submit through `collector.submit`, which also makes sure this machine
    hears back and has its workers). Every limit is checked here, under the runs folder's
    lock: the queue's length, for an `owner` (a viewer; "" is the operator) how many of theirs wait or run, and
    with `one_at_a_time` whether one of this kind already waits or runs (a study). `here`: on this machine's
    workers only (default: the kind's)."""
    if kind not in KINDS:
        raise RunError(f"Unknown kind of run {kind!r}: runs are one of {', '.join(KINDS)}, each with its own worker.")
    if not isinstance(owner, str):
        raise RunError(f"owner must be text, not {type(owner).__name__}.")
    root, limit = usable_runs_dir(root), settings().max_queued
    url = broker_url(root)
    if message := problem(root):
        raise RunError(message)
    with _lock(root), _broker_errors(url):
        every = list_runs(root)
        waiting = sum(r.state == QUEUED for r in every)
        if waiting >= limit:
            raise RunError(f"{waiting} run(s) are already waiting (CIFARVIZ_MAX_QUEUED={limit}): wait for one to "
                           "start, or cancel one, before adding another.")
        if owner:
            mine, allowed = sum(r.state in ACTIVE and r.owner == owner for r in every), settings().session_runs
            if mine >= allowed:
                raise RunError(f"You already have {mine} run(s) waiting or training (at most {allowed} per person, "
                               "CIFARVIZ_SESSION_RUNS): stop or cancel one of yours first.")
        if one_at_a_time and any(r.state in ACTIVE and r.kind == kind for r in every):
            raise RunError(f"A {KINDS[kind].what} is already waiting or running on this server; one runs at a time.")
        run_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        queue_name = route(kind, spec, url, here)
        folder = root / run_id
        folder.mkdir(parents=True)
        write_json(folder / "status.json", {"state": QUEUED, "queued_at": time.time(), "queue": queue_name})
        write_json(folder / "config.json", {"kind": kind, "spec": spec, "owner": owner, "submitted_at": time.time()})
        huey = queue(queue_name, url)
        huey.enqueue(huey.job.s(run_id, kind, spec, owner, queue_name, id=run_id, priority=KINDS[kind].priority))
    return run_id


def _check_owner(run, by: str | None) -> None:
    if by is not None and run.owner != by:
        raise RunError(f"{run.id} belongs to someone else: only the person who started it, or the teacher (the "
                       "teacher key in the sidebar), can stop or cancel it.")


def request_stop(run_id: str, root=None, *, by: str | None = None) -> str:
    """Ask a running run to stop (within one batch; a training keeps its last finished epoch); a queued one is
    cancelled. `by`: the viewer asking (only their own runs); None: the operator or the teacher (any run)."""
    run = load_run(run_id, root)
    _check_owner(run, by)
    if run.state == QUEUED:
        return cancel(run_id, root, by=by)
    if run.state == RUNNING:
        url = broker_url(root)
        with _broker_errors(url):
            store(url).put_data(f"cv:stop:{run_id}", b"1")
        (run.dir / "stop").touch()  # for pages: "stopping..." until the worker reports the end
    return run.state


def cancel(run_id: str, root=None, *, by: str | None = None) -> str:
    """Take a queued run off the queue (it never starts); a running one is asked to stop. Returns the state."""
    url = broker_url(root)
    with _lock(root):
        run = load_run(run_id, root)
        _check_owner(run, by)
        if run.state == QUEUED:
            with _broker_errors(url):
                taken = get_json(url, f"cv:status:{run_id}")
                if isinstance(taken, dict) and taken.get("state") == RUNNING:  # a worker took it a moment ago
                    store(url).put_data(f"cv:stop:{run_id}", b"1")
                    (run.dir / "stop").touch()
                    return RUNNING
                queue(run.status.get("queue") or "any", url).revoke_by_id(run_id)
                put_json(url, f"cv:status:{run_id}", {"state": CANCELLED})  # a worker that already took it skips it
            status = {**clean_status(read_json(run.dir / "status.json"))[0], "state": CANCELLED,
                      "ended_at": time.time()}
            write_json(run.dir / "status.json", status)
            return CANCELLED
    return request_stop(run_id, root, by=by) if run.state == RUNNING else run.state


def pending(root=None) -> dict[str, int]:
    """How many jobs wait in each queue of this broker (for the page's "where" line and the benchmarks)."""
    url = broker_url(root)
    names = ["any", "gpu", host_queue()]
    return {name: queue(name, url).pending_count() for name in names}

