"""The "tune" kind: trials of an Optuna study, run by a worker (the Train page's Tune tab submits it).

    run_id = submit_study(storage, "cifar10net-dropout", settings, n_trials=20, dataset=dataset, owner=viewer)

One study runs at a time per server (checked with every other limit, under the queue's lock). A study kept in a
SQLite file runs on this machine's workers (the file is here); one in a database server (PostgreSQL) on any worker.
Its trials are in the study's storage as always; the run records each trial and the steps of the trial under way,
so the page shows progress, and Stop ends it within a batch (the trial under way is recorded as failed).
"""

from __future__ import annotations

from cifarviz.services import tune

from .collector import submit
from .inputs import data_spec, load_data
from .kind import register
from .records import COMPLETED, STOPPED
from .train import METRICS_EVERY_SECONDS, train_threads
from .worker import RunContext

KIND = "tune"


def submit_study(storage: str, study_name: str, settings: "tune.StudySettings", *, n_trials: int, dataset,
                 owner: str = "", root=None) -> str:
    """Queue `n_trials` more trials of the study; everything that can be checked is checked now."""
    tune.check_trials(n_trials)
    tune.check_dataset(dataset)
    spec = {"storage": storage, "study": study_name, "settings": settings.to_dict(), "trials": int(n_trials),
            "data": data_spec(dataset.root, val_size=len(dataset.val), split_seed=dataset.split_seed,
                              fingerprint=dataset.fingerprint)}
    return submit(KIND, spec, name=f"study-{study_name}"[:60], root=root, owner=owner, one_at_a_time=True,
                  here=storage.startswith("sqlite"))


@register(KIND, priority=1, wants_gpu=True, what="study")
def study_worker(ctx: RunContext) -> tuple[str, str | None]:
    import time

    import torch

    spec = ctx.spec
    torch.set_num_threads(train_threads())
    dataset = load_data(spec["data"])
    settings = tune.StudySettings.from_dict(spec["settings"], spec["study"])
    total = int(spec["trials"])
    ctx.log({"event": "start", "device": "cuda" if torch.cuda.is_available() else "cpu", "trials": total,
             "train_images": settings.subset or len(dataset.train), "total_steps": 0})
    last = [0.0]

    def on_step(number: int, event: dict) -> None:
        if time.monotonic() - last[0] >= METRICS_EVERY_SECONDS:
            last[0] = time.monotonic()
            ctx.log({**event, "trial": number})

    def on_trial(study, trial) -> None:
        ctx.log({"event": "trial", "trial": trial.number, "state": trial.state.name.lower(),
                 "value": trial.value, "done": sum(t.number >= first for t in study.trials if t.state.is_finished())})

    first = len(tune.load_study(spec["storage"], spec["study"]).trials) \
        if spec["study"] in tune.study_names(spec["storage"]) else 0
    study = tune.run_study(spec["storage"], spec["study"], dataset, settings, n_trials=total, on_trial=on_trial,
                           on_step=on_step, should_stop=ctx.stop_requested)
    best = tune.best_trial(study)
    state = STOPPED if ctx.stop_requested() else COMPLETED
    ctx.log({"event": "saved", "state": state})
    return state, (f"{len(study.trials)} trials in {spec['study']}" +
                   (f"; best validation loss {best.value:.4f} (trial {best.number})" if best else ""))
