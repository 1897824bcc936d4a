"""Keyed background computations (cifarviz.services.jobs) and the artifact cache they fill: once per key, per machine."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cifarviz.core.checkpoint import Checkpoint
from cifarviz.core.models import create_model
from cifarviz.services.jobs import JobRegistry
from cifarviz.store.artifacts import artifact_path, split_artifacts
from cifarviz.store.datasets import load_cifar10

REPO = Path(__file__).resolve().parent.parent


def test_concurrent_requests_for_one_key_run_it_once():
    jobs, calls, release, reported = JobRegistry(), [], threading.Event(), threading.Event()

    def work(report):
        calls.append(1)
        report(0.5)
        reported.set()
        release.wait(10)

    first = [jobs.start("k", work) for _ in range(5)]
    assert reported.wait(5)  # the event itself, not a guess at how long a thread takes to start
    assert len({id(j) for j in first}) == 1 and first[0].progress == 0.5
    other = jobs.start("other", lambda report: calls.append(2))  # another key is not queued behind "k"
    assert other.wait(5) and not first[0].done
    release.set()
    assert first[0].wait(5) and first[0].error is None and calls.count(1) == 1
    assert jobs.get("k") is None  # finished jobs leave the registry; their results live on disk


def test_the_pool_is_bounded_and_serves_waiting_people_before_prefetching():
    """One worker: while it is busy, a background job A, another background job C and a foreground job B queue;
    asking for A in the foreground moves it ahead of C. The order they run in is B, A, C; never two at once."""
    jobs, release, order, running, most = JobRegistry(workers=1), threading.Event(), [], [0], [0]
    lock = threading.Lock()

    began = threading.Event()

    def work(name, wait=None):
        def fn(report):
            began.set()
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            if wait is not None:
                wait.wait(10)
            order.append(name)
            with lock:
                running[0] -= 1
        return fn

    blocker = jobs.start("blocker", work("blocker", release))
    assert began.wait(5) and blocker.started  # the one worker is busy now
    a = jobs.start("a", work("a"), background=True)
    c = jobs.start("c", work("c"), background=True)
    b = jobs.start("b", work("b"))
    assert not a.started and not b.started and jobs.position(b) == 0 and jobs.position(c) == 2
    assert jobs.start("a", work("a")) is a  # someone waits for A now
    assert jobs.position(a) == 1 and jobs.stats()["waiting"] == 3
    release.set()
    assert all(j.wait(10) for j in (blocker, a, b, c))
    assert order == ["blocker", "b", "a", "c"] and most[0] == 1


def test_what_one_viewer_can_start_is_bounded_and_a_refusal_is_not_kept():
    from cifarviz.services.jobs import ServerBusy

    jobs, release, began = JobRegistry(workers=1, per_owner=2, max_waiting=3), threading.Event(), threading.Event()

    def hold(report):
        began.set()
        release.wait(10)

    mine = [jobs.start(f"perplexity-{p}", hold, owner="student") for p in (5, 30)]
    # The one worker picks up the first job in its own thread: until it has, that job still counts as waiting
    # (CI failed once on this race: the second "other" was refused while the first job had not started yet, and
    # the "one too many" was admitted after it had).
    assert began.wait(10) and mine[0].started
    refused = jobs.start("perplexity-50", lambda report: None, owner="student")
    assert refused.done and refused.refused and isinstance(refused.error, ServerBusy)
    assert "at most 2 per person" in str(refused.error) and jobs.get("perplexity-50") is None
    others = [jobs.start(f"other-{i}", hold, owner=f"s{i}") for i in range(2)]
    assert not any(job.refused for job in others) and jobs.stats()["waiting"] == 3
    full = jobs.start("one-too-many", lambda report: None, owner="s9")
    assert full.refused and "computations are waiting already" in str(full.error)
    release.set()
    assert all(j.wait(10) for j in mine + others)
    again = jobs.start("perplexity-50", lambda report: None, owner="student")  # room again: admitted
    assert not again.refused and again.wait(5) and again.error is None


def test_failed_jobs_are_forgotten_after_a_while_without_their_tracebacks():
    from cifarviz.core.errors import DataError

    def bad(report):
        raise DataError("train/cat/0001.png is not an image")

    jobs = JobRegistry(failed_kept_seconds=0.2)
    failed = jobs.start("k", bad)
    assert failed.wait(5) and failed.error.__traceback__ is None and jobs.start("k", bad) is failed
    time.sleep(0.3)
    retried = jobs.start("k", lambda report: None)
    assert retried is not failed and retried.wait(5) and retried.error is None


def test_a_failed_job_reports_its_error_and_can_be_retried():
    jobs = JobRegistry()
    failed = jobs.start("k", lambda report: 1 / 0)
    assert failed.wait(5) and isinstance(failed.error, ZeroDivisionError)
    assert jobs.start("k", lambda report: None, background=True) is failed  # prefetching does not retry it
    retry = jobs.start("k", lambda report: None)
    assert retry is not failed and retry.wait(5) and retry.error is None


def test_a_job_failed_by_bad_input_is_not_retried():
    """A bad training image fails the same way every time: a page that asks again shows the error, not a progress
    bar that starts the same failing work twice a second."""
    from cifarviz.core.errors import DataError

    def bad(report):
        raise DataError("train/cat/0001.png is not an image")

    jobs = JobRegistry()
    failed = jobs.start("k", bad)
    assert failed.wait(5) and jobs.start("k", bad) is failed


def _random_checkpoint(tta="none") -> Checkpoint:
    import torch

    torch.manual_seed(0)
    return Checkpoint(create_model("lenet", num_classes=3).eval(), {"name": "tiny", "train_config": {"tta": tta}})


def test_artifact_key_covers_the_split_not_just_the_data(image_folder):
    """val_size 1 vs 2 on the same folder: each gets its own file with its own number of rows."""
    checkpoint = _random_checkpoint()
    small = load_cifar10(image_folder, download=False, progress=False, val_size=1)
    large = load_cifar10(image_folder, download=False, progress=False, val_size=2)
    assert artifact_path(checkpoint, small, "val") != artifact_path(checkpoint, large, "val")
    assert len(split_artifacts(checkpoint, small, "val").labels) == 1
    assert len(split_artifacts(checkpoint, large, "val").labels) == 2
    assert artifact_path(checkpoint, small, "test") == artifact_path(checkpoint, large, "test")  # same images
    assert artifact_path(_random_checkpoint("flip"), small, "test") != artifact_path(checkpoint, small, "test")


@pytest.mark.slow
def test_two_processes_asking_for_one_artifact_compute_it_once(cifar):
    """Two `precompute`s at once: the second waits for the first's file instead of doing all the work again."""
    script = f"""
import json, sys
import cifarviz.store.artifacts as artifacts
from cifarviz.core.checkpoint import load_checkpoint
from cifarviz.store.datasets import load_cifar10
calls = []
real_predict = artifacts.predict
artifacts.predict = lambda *a, **k: calls.append(1) or real_predict(*a, **k)  # a spy: the real work still runs
dataset = load_cifar10({str(cifar.root)!r}, download=False, progress=False, val_size=4321)
arts = artifacts.split_artifacts(load_checkpoint({str(REPO / 'checkpoints' / 'lenet.safetensors')!r}), dataset, "val")
print(json.dumps({{"computed": len(calls), "rows": len(arts.labels)}}))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(r["computed"] for r in results) == [0, 1]
    assert all(r["rows"] == 4321 for r in results)
    assert not list((Path(os.environ["CIFARVIZ_CACHE"]) / "artifacts").glob(".*.tmp"))
    assert np.isfinite(np.load(next((Path(os.environ["CIFARVIZ_CACHE"]) / "artifacts").glob("*.npz")))["logits"]).all()


def test_prefetching_never_takes_the_last_worker_from_someone_waiting():
    """Two workers, three prefetches that take long: one runs, the others wait, so what a viewer then asks for
    (a map's first view) starts at once instead of queuing behind them."""
    jobs, release, started = JobRegistry(workers=2), threading.Event(), []

    first_started = threading.Event()

    def slow(name):
        def fn(report):
            started.append(name)
            first_started.set()
            release.wait(20)
        return fn

    prefetches = [jobs.start(f"prefetch-{i}", slow(f"prefetch-{i}"), background=True) for i in range(3)]
    assert first_started.wait(5)
    assert sum(j.started for j in prefetches) == 1 and len(started) == 1
    asked = jobs.start("asked", lambda report: started.append("asked"))
    assert asked.wait(5), "the job someone waits for queued behind prefetching"
    release.set()
    assert all(j.wait(20) for j in prefetches) and len(started) == 4


def test_the_time_left_never_climbs_while_progress_stands_still():
    """UMAP sat at 5% for a minute while the page's estimate went 6 -> 22 minutes (the whole job's pace, with the
    neighbour search in it). Now: no estimate inside a stage whose progress says nothing of time, the pace of a
    linear stage (epochs) once it moves, a countdown while nothing changes, and this server's measured time first."""
    from cifarviz.services.jobs import Job

    job = Job("umap", lambda report: None)
    job.started_at = 100.0
    job.set_stage("finding each image's neighbours", now=100.0)
    job._report(0.05)
    assert [job.seconds_left(now=t) for t in (110.0, 130.0, 160.0)] == [None, None, None]
    job.set_stage("laying out", linear=True, now=160.0)
    job._report(0.40)  # 35% of the work in the first 10 s of the layout
    first = job.seconds_left(now=170.0)
    assert first == pytest.approx(10 / 0.35 * 0.60)
    later = [job.seconds_left(now=t) for t in (172.0, 175.0, 180.0, 200.0, 260.0)]
    assert later == sorted(later, reverse=True) and later[0] == pytest.approx(first - 2) and later[-1] == 0.0
    job._report(0.70)  # progress moved: a fresh estimate from the stage's pace
    assert job.seconds_left(now=265.0) == pytest.approx((265 - 160) / (0.70 - 0.05) * 0.30)

    measured = Job("umap again", lambda report: None)
    measured.expected, measured.started_at = 75.0, 0.0
    measured.set_stage("finding each image's neighbours", now=0.0)
    measured._report(0.05)
    assert [measured.seconds_left(now=t) for t in (10.0, 20.0, 60.0)] == [65.0, 55.0, 15.0]
