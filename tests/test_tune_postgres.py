"""One Optuna study spread over several processes through a real PostgreSQL server, as the README tells a department
to do across machines: Debian's PostgreSQL started here in a private folder on a loopback port, two
`python -m cifarviz tune` processes with different seeds joining one study, their trials read back with
optuna.load_study, and a stopped server reported in seconds (never a hang).

.ci/run installs Debian's postgresql; without it this test is skipped with that reason, and CI fails on a skip."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from browser import free_port
from conftest import REPO

from cifarviz.services import tune

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user Debian creates."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres():
    if not PG_BIN:
        pytest.skip("PostgreSQL test: Debian's postgresql is not installed (apt-get install postgresql)")
    bin_dir = Path(PG_BIN[-1])
    folder = Path(tempfile.mkdtemp(prefix="cifarviz-pg-"))  # not under pytest's folder, which only root may enter
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    init = _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "cifarviz", "--auth=trust", "-E", "UTF8"])
    assert init.returncode == 0, init.stderr
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"

    def ctl(*args):
        return _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), *args])

    started = ctl("-o", options, "-w", "start")
    assert started.returncode == 0, started.stderr + (folder / "server.log").read_text(errors="replace")
    created = _as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "cifarviz",
                            "studies"])
    assert created.returncode == 0, created.stderr
    server = {"url": f"postgresql+psycopg2://cifarviz@127.0.0.1:{port}/studies", "stop": lambda: ctl("-m", "fast",
                                                                                                     "-w", "stop")}
    yield server
    server["stop"]()
    shutil.rmtree(folder, ignore_errors=True)


def _tune(url: str, seed: int, cifar, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "cifarviz", "tune", "--storage", url, "--study", "department",
               "--trials", "2", "--epochs", "1", "--subset", "300", "--seed", str(seed), "--data", str(cifar.root),
               *extra]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "CIFARVIZ_TRAIN_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_share_one_study_and_a_stopped_server_is_said_in_seconds(postgres, cifar):
    import optuna

    url = postgres["url"]
    first = _tune(url, 0, cifar, "--model", "cifar10net-dropout")
    time.sleep(3)  # the first creates the study with its settings; the second joins it with the same
    second = _tune(url, 1, cifar)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    study = optuna.load_study(study_name="department", storage=url)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(study.trials) == 4 and len(finished) == 4, [t.state for t in study.trials]
    assert len({t.params["lr"] for t in study.trials}) == 4  # two seeds: no process repeated the other's points
    assert tune.stored_settings(url, "department").epochs_per_trial == 1

    postgres["stop"]()
    started = time.monotonic()
    with pytest.raises(tune.TuningError, match="did not answer"):
        tune.stored_settings(url.replace("/studies", "/studies?application_name=after-stop"), "department")
    assert time.monotonic() - started < 20
    started = time.monotonic()
    late = _tune(url, 2, cifar)
    output = late.communicate(timeout=120)[0]
    assert late.returncode == 2 and "did not answer" in output, output
    assert time.monotonic() - started < 60  # torch and the data load; the database answers (no) within seconds
