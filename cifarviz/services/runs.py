"""Runs: every kind of long work (training, retraining proofs, studies, replicas) as the app and the CLI see it.

    run_id = submit_training(TrainConfig(model="lenet", epochs=2), data_root, subset=5000, owner=viewer)
    load_run(run_id).state; progress(run); read_metrics(run_id)
    request_stop(run_id, by=viewer); cancel(run_id); list_runs()

The pieces live in `cifarviz/services/work/`: the run folder format (`records`), the queue on Huey (`engine`), the
workers (`worker`), the hand-back into run folders (`collector`) and one module per kind (`train`, `study`,
`replicas`, and `cifarviz/services/retrain.py`). This module is their public face for the pages and the CLI.
"""

from __future__ import annotations

import json

from .work import collector, engine
from .work.collector import submit
from .work.engine import cancel, problem, request_stop
from .work.kind import KINDS
from .work.records import (
    _PROGRESS,
    ACTIVE,
    CANCELLED,
    CHECKPOINT,
    COMPLETED,
    FAILED,
    FINAL,
    MAX_CURVE_STEPS,
    QUEUED,
    READ_PER_TICK,
    RUNNING,
    STATES,
    STOPPED,
    WITH_MODEL,
    Progress,
    Run,
    RunError,
    _is_count,
    _is_number,
    clean_status,
    config_problems,
    list_runs,
    load_run,
    log_tail,
    progress,
    queue_position,
    read_metrics,
    runs_dir,
    usable_runs_dir,
    valid_event,
)
from .work.train import submit_training, train_threads, training_subset
from .work.worker import WORKER_NICE, RunContext

DEFAULT_RUNS_DIR = "runs"  # relative to the server's working folder, when CIFARVIZ_RUNS is unset

__all__ = ["_PROGRESS", "MAX_CURVE_STEPS", "READ_PER_TICK", "DEFAULT_RUNS_DIR", "ACTIVE", "CANCELLED", "CHECKPOINT", "COMPLETED", "FAILED", "FINAL", "QUEUED", "RUNNING", "STATES",
           "STOPPED", "WITH_MODEL", "KINDS", "Progress", "Run", "RunContext", "RunError", "WORKER_NICE", "cancel",
           "clean_status", "config_problems", "list_runs", "load_run", "log_tail", "max_per_session",
           "max_queued", "max_running", "problem", "progress", "queue_position", "read_metrics", "request_stop", "runs_dir",
           "start", "submit", "submit_training", "train_threads", "training_subset", "usable_runs_dir",
           "valid_event", "where", "_is_count", "_is_number"]


def max_running() -> int:
    """How many jobs this server's own workers run at once: $CIFARVIZ_MAX_RUNS (default 1; workers on other
    machines add to it)."""
    return engine.settings().max_runs


def max_queued() -> int:
    """How many runs may wait: $CIFARVIZ_MAX_QUEUED (default 8), so a class cannot queue a day of training."""
    return engine.settings().max_queued


def max_per_session() -> int:
    """How many runs one person may have waiting or running: $CIFARVIZ_SESSION_RUNS (default 3)."""
    return engine.settings().session_runs


def start(root=None) -> None:
    """Make sure this process hears back from the queue: its collector thread, which also keeps this server's own
    workers alive while runs wait. Cheap and idempotent (a thread's liveness): pages call it on every render, which
    starts or advances nothing else."""
    collector.ensure_running(root)


def where(run: Run) -> str:
    """Where a run trains or trained, or which queue it waits in, for people."""
    if run.where:
        return run.where
    queue = run.status.get("queue") or "any"
    return {"gpu": "waiting for a GPU worker", "any": "waiting for any worker"}.get(
        queue, f"waiting for a worker on {queue.removeprefix('host-')}")


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
    collector.collect()  # what workers handed back, and runs whose worker died, before the list
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
        said = f"#{queue_position(run, runs)} in the queue" if run.state == QUEUED else run.status.get("note") or ""
        error = (run.error or "").splitlines()[0] if run.error else ""
        damaged = "damaged: " + "; ".join(run.problems) if run.problems else ""
        print(f"{run.id:40} {run.state:10} {damaged or said or error}")
    return 0


from .work import kinds  # noqa: E402,F401 - every kind registered wherever runs are read (their configs are checked)
