"""Keyed computations that run once: once per process (a registry of jobs) and once per machine (a file lock).

The app asks for derived artifacts (features, predictions, later embeddings and influence
indexes) by key. `JOBS.start(key, fn)` starts the computation in a thread of its own, or
returns the job already under way for that key, so 30 students who open the same page
share one computation while a student who picks another checkpoint is not queued behind
them. `background=True` puts it in a one-worker prefetch queue instead (warming caches
must not crowd out what someone is waiting for); asking for a queued job in the
foreground starts it at once.

Across processes (two `precompute` runs, a CLI beside the server) `computed_once` holds
a file lock per output file, so the second process waits and then reads the first's result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cifarviz.core.errors import CifarvizError
from cifarviz.core.utils import file_lock  # noqa: F401 - re-exported for the services that lock files

_STOPPING = threading.Event()  # set when the interpreter exits: running jobs stop at their next progress report


class JobCancelled(Exception):
    """The process is exiting; the job's partial work is discarded (its output file was never written)."""




class Job:
    """One keyed computation: its progress in [0, 1], its error, and whether it has finished."""

    def __init__(self, key: str, fn: Callable[[Callable[[float], None]], object]):
        self.key = key
        self.progress = 0.0
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self._fn = fn
        self._claim = threading.Lock()
        self._finished = threading.Event()

    @classmethod
    def failed(cls, key: str, error: BaseException) -> "Job":
        """A job that could not even start (its input was refused): shown like any failed job."""
        job = cls(key, lambda report: None)
        job.error = error
        job._finished.set()
        return job

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def started(self) -> bool:
        return self.started_at is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def _report(self, fraction: float) -> None:
        if _STOPPING.is_set():
            raise JobCancelled
        self.progress = max(self.progress, min(1.0, float(fraction)))

    def run(self) -> None:
        """Run the computation unless another thread already claimed it (prefetch queue vs foreground)."""
        if not self._claim.acquire(blocking=False):
            return
        self.started_at = time.monotonic()
        try:
            self._fn(self._report)
            self.progress = 1.0
        except BaseException as exc:  # noqa: BLE001 - kept for whoever waits on the job
            self.error = exc
        finally:
            self._finished.set()


class JobRegistry:
    def __init__(self, prefetch_workers: int = 1):
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._prefetch = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="cifarviz-prefetch")

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: str, fn: Callable[[Callable[[float], None]], object], *, background: bool = False) -> Job:
        """The job for `key`: the one under way (or queued), else a new one running `fn(report_progress)`."""
        with self._lock:
            job = self._jobs.get(key)
            # A failed job is retried when someone asks for it (not by background prefetching on every rerun),
            # unless bad input failed it (a CifarvizError): the same input would fail the same way, again and again.
            retry = job is not None and job.done and job.error is not None and not background \
                and not isinstance(job.error, CifarvizError)
            if job is None or retry:
                job = self._jobs[key] = Job(key, fn)
                fresh = True
            else:
                fresh = False
        if _STOPPING.is_set():
            return job
        if fresh and background:
            self._prefetch.submit(self._run, job)
        elif not job.started and not background:
            threading.Thread(target=self._run, args=(job,), name=f"cifarviz-{key[:40]}").start()
        return job

    def stop(self) -> None:
        """Let running jobs end at their next progress report and drop queued ones (the interpreter is exiting:
        a thread killed inside torch would abort the process)."""
        _STOPPING.set()
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        job.run()
        if job.done and job.error is None:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        """Finished jobs leave the registry (their result is on disk), so it stays as small as the work under way."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]


JOBS = JobRegistry()
# Runs at interpreter exit before non-daemon threads are joined (the hook concurrent.futures itself uses).
threading._register_atexit(JOBS.stop)
