"""Keyed computations that run once, in a bounded pool: once per process (a registry of jobs) and once per machine
(a file lock).

The app asks for derived artifacts (features, predictions, embeddings, influence indexes) by key.
`JOBS.start(key, fn)` queues the computation, or returns the job already queued or under way for that key, so 30
students who open the same page share one computation. A fixed number of worker threads ($CIFARVIZ_JOB_WORKERS,
default 2) take the queue by priority: what someone is waiting for first, background prefetching (`background=True`)
after; asking for a queued background job in the foreground moves it up.

What a viewer can start is bounded: at most PER_OWNER_JOBS of one viewer's jobs wait or run at once, and at most
MAX_WAITING jobs wait in all. A request beyond that is refused with a message (a job that is not kept, so the next
request, once there is room, is admitted). Failed jobs are kept for FAILED_KEPT_SECONDS, without their traceback
frames, so a page shows the error instead of starting the same failing work twice a second, and then forgotten.

Across processes (two `precompute` runs, a CLI beside the server) `computed_once` holds a file lock per output
file, so the second process waits and then reads the first's result.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings
from cifarviz.core.utils import file_lock  # noqa: F401 - re-exported for the services that lock files

_STOPPING = threading.Event()  # set when the interpreter exits: running jobs stop at their next progress report
FOREGROUND, BACKGROUND = 0, 1  # queue priorities: someone is waiting; prefetching
MAX_WAITING = 32
PER_OWNER_JOBS = 2
FAILED_KEPT_SECONDS = 600.0


class JobCancelled(Exception):
    """The process is exiting; the job's partial work is discarded (its output file was never written)."""


class ServerBusy(CifarvizError):
    """A request the pool does not admit now: the viewer's own limit, or a full queue. Asking again later works."""


class Job:
    """One keyed computation: its progress in [0, 1], its error, and whether it waits, runs or has finished."""

    def __init__(self, key: str, fn: Callable[[Callable[[float], None]], object], owner: str | None = None):
        self.key, self.owner = key, owner
        self.progress = 0.0
        self.error: BaseException | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.refused = False  # never queued (ServerBusy): not kept in the registry
        self.stage = ""  # what the work is doing now, in words ("finding neighbours"), when it says
        self.expected: float | None = None  # seconds the same work took on this server last time, when measured
        self.partial: object | None = None  # a preview of the result the work hands over while it runs (replaced
        # whole, never mutated, so a page may read it at any moment)
        self._stage_linear = False  # progress within this stage is proportional to time (epochs, iterations)
        self._stage_from: tuple[float, float] | None = None  # (time, progress) when the stage began
        self._deadline: tuple[float, float] | None = None  # (when it should end, progress at that estimate)
        self._fn = fn
        self._claim = threading.Lock()
        self._finished = threading.Event()

    @classmethod
    def failed(cls, key: str, error: BaseException, *, refused: bool = False) -> Job:
        """A job that could not even start (its input was refused, or the pool is full): shown like a failed job."""
        job = cls(key, lambda report: None)
        job.error, job.refused, job.ended_at = error, refused, time.monotonic()
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

    def progress_reporter(self):
        """What the work is given: call it with a fraction; `.stage(text, linear)` says what it does now;
        `.partial(value)` hands over a preview of the result."""
        def progress(fraction: float) -> None:
            self._report(fraction)

        progress.stage = self.set_stage
        progress.partial = self.set_partial
        return progress

    def set_partial(self, value: object) -> None:
        if _STOPPING.is_set():
            raise JobCancelled
        self.partial = value

    def _report(self, fraction: float) -> None:
        if _STOPPING.is_set():
            raise JobCancelled
        self.progress = max(self.progress, min(1.0, float(fraction)))

    def set_stage(self, text: str, linear: bool = False, now: float | None = None) -> None:
        """The work says what it does now; `linear`: its progress from here grows in proportion to time (epochs,
        iterations), so the pace of this stage predicts the rest."""
        self.stage, self._stage_linear = str(text), bool(linear)
        self._stage_from = (time.monotonic() if now is None else now, self.progress)

    def seconds_left(self, now: float | None = None) -> float | None:
        """An estimate of the seconds left, or None when there is nothing to go by yet.

        From the same work's measured time on this server when there is one (and it is not exceeded), else from
        the pace of a linear stage (time per unit of progress since the stage began), else from the whole job's
        pace once past 2%. The estimate only moves when the progress does: while progress stands still it counts
        down (and stays at 0, "almost done", rather than climbing)."""
        if self.started_at is None or self.done:
            return None
        now = time.monotonic() if now is None else now
        elapsed, p = now - self.started_at, self.progress
        raw = None
        if self.expected is not None and elapsed < self.expected:
            raw = self.expected - elapsed
        elif self._stage_from is not None and self._stage_linear and p - self._stage_from[1] >= 0.02:
            since, at = self._stage_from
            raw = (now - since) / (p - at) * (1 - p)
        elif self._stage_from is None and p >= 0.02:
            raw = elapsed * (1 - p) / p
        if raw is None:
            return None if self._deadline is None else max(self._deadline[0] - now, 0.0)
        if self._deadline is None or p > self._deadline[1]:  # progress moved: a new estimate
            self._deadline = (now + raw, p)
        return max(self._deadline[0] - now, 0.0)

    def run(self) -> None:
        """Run the computation unless a worker already claimed it (an entry moved up the queue is there twice)."""
        if not self._claim.acquire(blocking=False):
            return
        self.started_at = time.monotonic()
        try:
            self._fn(self.progress_reporter())
            self.progress = 1.0
        except BaseException as exc:  # noqa: BLE001 - kept for whoever waits on the job
            exc.__traceback__ = None  # the message is what pages show; the frames would pin arrays in memory
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self._finished.set()


class JobRegistry:
    def __init__(self, workers: int | None = None, *, max_waiting: int = MAX_WAITING,
                 per_owner: int = PER_OWNER_JOBS, failed_kept_seconds: float = FAILED_KEPT_SECONDS):
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._queue: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._background_running = 0  # workers busy prefetching
        self._workers = workers
        self.max_waiting, self.per_owner, self.failed_kept_seconds = max_waiting, per_owner, failed_kept_seconds

    @property
    def workers(self) -> int:
        return self._workers or settings().job_workers

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def running(self) -> int:
        """How many jobs are under way now (started, not finished)."""
        with self._lock:
            return sum(1 for job in self._jobs.values() if job.started and not job.done)

    def start(self, key: str, fn: Callable[[Callable[[float], None]], object], *, background: bool = False,
              owner: str | None = None) -> Job:
        """The job for `key`: the one queued or under way, else a new one running `fn(report_progress)`, queued
        if the pool admits it (else a refused job whose error says why). `owner`: the viewer asking (their limit
        applies); None: the server itself (prefetching, a page's own needs)."""
        with self._lock:
            self._forget_old_failures()
            job = self._jobs.get(key)
            # A failed job is retried when someone asks for it (not by background prefetching on every rerun),
            # unless bad input failed it (a CifarvizError): the same input would fail the same way, again and again.
            retry = job is not None and job.done and job.error is not None and not background \
                and not isinstance(job.error, CifarvizError)
            if job is not None and not retry:
                if not job.started and not job.done and not background:
                    self._push(FOREGROUND, job)  # someone waits for it now: ahead of the prefetching
                return job
            if _STOPPING.is_set():
                return Job.failed(key, JobCancelled("the server is stopping"), refused=True)
            refusal = self._refusal(owner)
            if refusal is not None:
                return Job.failed(key, ServerBusy(refusal), refused=True)
            job = self._jobs[key] = Job(key, fn, owner)
            self._push(BACKGROUND if background else FOREGROUND, job)
            return job

    def position(self, job: Job) -> int | None:
        """How many queued jobs start before `job` (0: it is next); None once it runs or has ended."""
        with self._lock:
            if job.started or job.done:
                return None
            mine = min((entry[:2] for entry in self._queue if entry[2] is job), default=None)
            return None if mine is None else sum(1 for p, n, other in self._queue
                                                  if (p, n) < mine and not other.started and other is not job)

    def stats(self) -> dict:
        with self._lock:
            live = [j for j in self._jobs.values() if not j.done]
            return {"workers": self.workers, "running": sum(j.started for j in live),
                    "waiting": sum(not j.started for j in live), "failed_kept": len(self._jobs) - len(live)}

    def stop(self) -> None:
        """Let running jobs end at their next progress report and drop queued ones (the interpreter is exiting:
        a thread killed inside torch would abort the process)."""
        _STOPPING.set()
        with self._lock:
            self._queue.clear()
            self._wake.notify_all()

    # ----------------------------------------------------------------------- inside, with the lock held

    def _refusal(self, owner: str | None) -> str | None:
        live = [j for j in self._jobs.values() if not j.done]
        waiting = sum(not j.started for j in live)
        if waiting >= self.max_waiting:
            return (f"The server is busy: {waiting} computations are waiting already. Try again in a minute, when "
                    "some have finished.")
        if owner is not None:
            mine = sum(j.owner == owner for j in live)
            if mine >= self.per_owner:
                return (f"You already have {mine} computations waiting or running on this server (at most "
                        f"{self.per_owner} per person). This one starts when you ask again after one has finished.")
        return None

    def _forget_old_failures(self) -> None:
        now = time.monotonic()
        for key in [k for k, j in self._jobs.items()
                    if j.done and now - (j.ended_at or now) > self.failed_kept_seconds]:
            del self._jobs[key]

    def _push(self, priority: int, job: Job) -> None:
        heapq.heappush(self._queue, (priority, next(self._order), job))
        self._threads = [t for t in self._threads if t.is_alive()]
        if len(self._threads) < self.workers:
            # Never a daemon (a thread started from a daemon script thread would be one): at exit the interpreter
            # joins it after JOBS.stop, so it ends at a progress report, not killed inside torch (an abort).
            thread = threading.Thread(target=self._work, name=f"cifarviz-job-{len(self._threads)}", daemon=False)
            self._threads.append(thread)
            thread.start()
        self._wake.notify()

    # ----------------------------------------------------------------------- the workers

    def _may_take_next(self) -> bool:
        """Prefetching (a BACKGROUND entry) never takes the last free worker: one is always there for what someone
        waits for (a map's first view, an index someone asked for), with two or more workers."""
        priority = self._queue[0][0]
        return priority != BACKGROUND or self._background_running < max(1, self.workers - 1)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not (self._queue and self._may_take_next()) and not _STOPPING.is_set():
                    if not self._wake.wait(timeout=30):  # idle a while: the thread ends (a new one starts on demand)
                        if not self._queue:
                            self._threads = [t for t in self._threads if t is not threading.current_thread()]
                            return
                if _STOPPING.is_set():
                    return
                priority, _, job = heapq.heappop(self._queue)
                if job.started or job.done:  # a duplicate entry of a job moved up the queue
                    continue
                background = priority == BACKGROUND
                self._background_running += background
            try:
                job.run()
            finally:
                with self._lock:
                    self._background_running -= background
                    self._wake.notify_all()  # a waiting prefetch may go now
            if job.error is None:
                self._forget(job)

    def _forget(self, job: Job) -> None:
        """Finished jobs leave the registry (their result is on disk), so it stays as small as the work under way."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]


JOBS = JobRegistry()
# Runs at interpreter exit before non-daemon threads are joined (the hook concurrent.futures itself uses).
threading._register_atexit(JOBS.stop)
