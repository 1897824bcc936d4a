"""Hyperparameter search with Optuna: the cs231n-style source's search, kept in storage several machines can share.

    study = run_study(default_storage_url(), "cifar10net", dataset, n_trials=30)   # the source's search
    trials_table(study); param_importances(study); best_config(study)              # a TrainConfig dict

Each trial trains the study's base recipe (default: cifar10net-dropout's) with sampled values
for a few epochs on a fixed subset of the training split. Every epoch's validation loss is
reported to a median pruner, which stops trials that trail the others at the same epoch; a
finished trial's value is its last validation loss (lower is better, as in the source). The
study and its settings live in Optuna's storage at a database URL (SQLite in the runs folder by
default), so processes on several machines that open one URL and study name share its trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import sqlalchemy.exc

from cifarviz.core.data import Split
from cifarviz.core.errors import CifarvizError, TrainingError
from cifarviz.core.models import model_entry
from cifarviz.core.recipes import RECIPES
from cifarviz.core.settings import settings
from cifarviz.core.train import TrainConfig, resolve_device, train
from cifarviz.core.utils import atomic_write

from .jobs import file_lock

SIZES = (32, 64, 128, 256, 512)  # the source's choices for batch size and both FC widths
DEFAULT_MODEL = "cifar10net-dropout"


class TuningError(CifarvizError):
    """A bad search space, storage URL or study name, or a study that cannot be joined as asked."""


class NoStudyError(TuningError):
    """The database holds no study of that name (yet)."""


def runs_dir() -> Path:
    """Where runs, the default study database and the app's tuning lock live: $CIFARVIZ_RUNS, else ./runs."""
    return settings().runs_dir


def default_storage_url() -> str:
    return f"sqlite:///{(runs_dir() / 'optuna.db').resolve().as_posix()}"


# --------------------------------------------------------------------------- the search space


@dataclass
class SearchSpace:
    """Ranges are (low, high), sampled on a log scale for lr and weight decay; sizes are choices."""

    lr: tuple[float, float] = (1e-4, 1e-1)
    weight_decay: tuple[float, float] = (5e-4, 1e-1)
    dropout: tuple[float, float] = (0.1, 0.9)
    batch_size: tuple[int, ...] = SIZES
    fc1: tuple[int, ...] = SIZES
    fc2: tuple[int, ...] = SIZES

    RANGES = ("lr", "weight_decay", "dropout")
    CHOICES = ("batch_size", "fc1", "fc2")

    def __post_init__(self):
        for name in self.RANGES:
            value = getattr(self, name)
            if not _is_pair(value):
                raise TuningError(f"Search space: {name} needs two numbers (low, high), not {value!r}.")
            low, high = (float(v) for v in value)
            dropout = name == "dropout"
            if not ((low >= 0 and high < 1) if dropout else low > 0) or low >= high:
                bounds = "both at least 0 and below 1" if dropout else "both above 0 (it is sampled on a log scale)"
                raise TuningError(f"Search space: {name} range ({low:g}, {high:g}) must have low below high, "
                                  f"{bounds}. The source's range is {getattr(SearchSpace, name)}.")
            setattr(self, name, (low, high))
        for name in self.CHOICES:
            value = getattr(self, name)
            values = list(value) if isinstance(value, (list, tuple)) else []
            if not values or not all(_is_whole(v) and 1 <= v <= 65536 for v in values):
                raise TuningError(f"Search space: {name} needs one or more whole numbers from 1 to 65536 to choose "
                                  f"from, not {value!r}. The source chose from {', '.join(map(str, SIZES))}.")
            setattr(self, name, tuple(sorted({int(v) for v in values})))

    def to_dict(self) -> dict:
        return {name: list(getattr(self, name)) for name in (*self.RANGES, *self.CHOICES)}

    @classmethod
    def from_dict(cls, values: dict) -> SearchSpace:
        unknown = set(values) - {*cls.RANGES, *cls.CHOICES}
        if unknown:
            raise TuningError(f"Search space: unknown setting(s) {', '.join(sorted(unknown))}; "
                              f"its settings: {', '.join((*cls.RANGES, *cls.CHOICES))}.")
        return cls(**values)


def _is_whole(value) -> bool:
    return isinstance(value, (int, float, np.integer)) and not isinstance(value, bool) and float(value).is_integer()


def _is_pair(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def tuned_parameters(model: str) -> list[str]:
    """The space's parameters that apply to `model`: the optimiser's always; dropout, fc1, fc2 when it takes them."""
    takes = inspect.signature(model_entry(model).builder).parameters
    return ["lr", "weight_decay", "batch_size", *(name for name in ("dropout", "fc1", "fc2") if name in takes)]


# --------------------------------------------------------------------------- a study's settings


@dataclass
class StudySettings:
    """What every trial of one study shares; stored with the study so another machine joins with the same."""

    base_config: dict = field(default_factory=lambda: RECIPES[DEFAULT_MODEL].to_dict())
    space: SearchSpace = field(default_factory=SearchSpace)
    epochs_per_trial: int = 5  # the source's budget
    subset: int | None = None  # training images per trial (a fixed random subset); None: the whole split

    def __post_init__(self):
        if isinstance(self.space, dict):
            self.space = SearchSpace.from_dict(self.space)
        try:
            self.base_config = TrainConfig(**self.base_config).to_dict()  # checks the model and every setting
        except TypeError as exc:
            raise TuningError(f"Base training config: {exc}.") from None
        if not _is_whole(self.epochs_per_trial) or self.epochs_per_trial < 1:
            raise TuningError(f"epochs per trial (--epochs) must be a whole number of at least 1, "
                              f"not {self.epochs_per_trial!r}.")
        if self.subset is not None and (not _is_whole(self.subset) or self.subset < 1):
            raise TuningError(f"training images per trial (--subset) must be a whole number of at least 1, "
                              f"not {self.subset!r}.")
        self.epochs_per_trial = int(self.epochs_per_trial)
        self.subset = None if self.subset is None else int(self.subset)

    @classmethod
    def for_model(cls, model: str = DEFAULT_MODEL, **settings) -> StudySettings:
        """The model's shipped recipe (or TrainConfig's defaults) as the base."""
        base = RECIPES[model] if model in RECIPES else TrainConfig(model=model)
        return cls(base_config=base.to_dict(), **settings)

    def to_dict(self) -> dict:
        return {"base_config": self.base_config, "space": self.space.to_dict(),
                "epochs_per_trial": self.epochs_per_trial, "subset": self.subset}

    @classmethod
    def from_dict(cls, values, study_name: str = "") -> StudySettings:
        """Settings read back from a study (another machine or version wrote them): checked, never trusted."""
        where = f"Study {study_name!r}'s stored settings" if study_name else "Stored study settings"
        if not isinstance(values, dict) or not isinstance(values.get("space", {}), dict) \
                or not isinstance(values.get("base_config", {}), dict):
            raise TuningError(f"{where} are damaged (not a mapping of settings): {json.dumps(values)[:80]}. "
                              "Start a new study under another name.")
        try:
            return cls(**values)
        except TypeError as exc:
            raise TuningError(f"{where} are not this version's: {exc}. Start a new study under another name.") from None

    def config(self, params: dict, epochs: int | None = None) -> TrainConfig:
        """The base recipe with `params` (a trial's values) for `epochs` (default: the recipe's own)."""
        base = dict(self.base_config)
        model_args = {**base["model_args"], **{k: params[k] for k in ("dropout", "fc1", "fc2") if k in params}}
        chosen = {k: params[k] for k in ("lr", "weight_decay", "batch_size") if k in params}
        return TrainConfig(**{**base, **chosen, "model_args": model_args, "epochs": epochs or base["epochs"]})

    def suggest(self, trial: optuna.Trial) -> dict:
        space, params = self.space, {}
        for name in tuned_parameters(self.base_config["model"]):
            if name in SearchSpace.RANGES:
                params[name] = trial.suggest_float(name, *getattr(space, name), log=name != "dropout")
            else:
                params[name] = trial.suggest_categorical(name, list(getattr(space, name)))
        return params


# --------------------------------------------------------------------------- storage


_STORAGES: dict[tuple[str, float], optuna.storages.BaseStorage] = {}
_STORAGES_LOCK = threading.Lock()
MAX_STORAGES = 4  # engines kept open; the oldest is disposed of (a URL typed per keystroke never piles them up)
READ_WAIT_SECONDS = 3.0  # a page or a listing waits this long for a busy database, then says so
WRITE_WAIT_SECONDS = 60.0  # a study's own processes wait for each other this long (each trial writes a few rows)


def open_storage(url: str, wait_seconds: float = WRITE_WAIT_SECONDS) -> optuna.storages.BaseStorage:
    """Optuna's database storage at `url` (once per process and wait). A SQLite file's folder is created.
    `wait_seconds`: how long a statement waits for a locked SQLite file, or a PostgreSQL server to answer.

    Heartbeats mark the running trials of a worker that died as failed, so they do not stay "running" forever."""
    key = (url, float(wait_seconds))
    with _STORAGES_LOCK:
        if key in _STORAGES:
            return _STORAGES[key]
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": wait_seconds}  # several local processes: wait for the writer
    elif url.startswith(("postgresql", "postgres")):
        engine_kwargs["connect_args"] = {"connect_timeout": max(1, int(round(wait_seconds)))}  # a stopped server
    try:
        with warnings.catch_warnings(), database_errors(url):  # a locked or stopped database: said as such
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental"
            storage = optuna.storages.RDBStorage(engine_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                                 grace_period=180)
    except TuningError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's URL, driver and connection errors have no common base
        missing_driver = isinstance(exc, (ImportError, sqlalchemy.exc.NoSuchModuleError))
        password = _password(url) or ""
        if any(c in password for c in "@:/?#"):  # the URL reader splits there: its error would quote a piece of it
            raise TuningError(f"Storage {shown_storage(url)} (--storage) could not be read: characters such as @ : / "
                              "? # in its password must be percent-encoded (%40 %3A %2F %3F %23).") from None
        hint = ("No driver for that kind of database is installed (PostgreSQL's, psycopg2, comes with "
                "requirements.txt); or give a URL such as sqlite:///runs/optuna.db." if missing_driver else
                "Give a database URL such as sqlite:///runs/optuna.db, or postgresql://user:password@host/database.")
        raise TuningError(f"Storage {shown_storage(url)} (--storage) could not be opened: "
                          f"{_reason(exc, url)}. {hint}") from None
    with _STORAGES_LOCK:
        _STORAGES[key] = storage
        while len(_STORAGES) > MAX_STORAGES:
            oldest = next(iter(_STORAGES))
            with contextlib.suppress(Exception):
                _STORAGES.pop(oldest).engine.dispose()
    return storage


def engine_url(url: str) -> str:
    """The URL SQLAlchemy is given: a plain postgresql:// (or postgres://) names the driver requirements.txt installs,
    psycopg2. SQLAlchemy 2.1 takes a plain one to mean psycopg 3, and without it said "Failed to import DB access
    module" about a server whose driver was there all along."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return url


def _reason(exc: BaseException, url: str | None = None) -> str:
    """The first line of what the database said (bounded), with the URL's password taken out (drivers echo it)."""
    text = str(getattr(exc, "orig", None) or exc)
    text = (text.splitlines()[0] if text else type(exc).__name__)[:300]
    password = _password(url) if url else None
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    """The password in a URL's user part (scheme://user:password@host/...), or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    userinfo = rest.rsplit("@", 1)[0]  # the last "@" ends the user part: a password may hold "@", ":" or "/"
    user, colon, password = userinfo.partition(":")
    return password or None


def shown_storage(url: str) -> str:
    """A storage URL as every message shows it: without its password, quoted, inert and bounded."""
    password = _password(url)
    if password:
        scheme, _, rest = url.partition("://")
        userinfo, host = rest.rsplit("@", 1)
        url = f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
    return repr(url if len(url) <= 200 else url[:200] + "...")


@contextlib.contextmanager
def database_errors(url: str):
    """A database that is locked, stopped or unreachable becomes a TuningError that says so (within the wait),
    never a traceback or a hang."""
    try:
        yield
    except TuningError:
        raise
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, optuna.exceptions.StorageInternalError) as exc:
        raise TuningError(f"The study database {shown_storage(url)} did not answer: {_reason(exc, url)}. Another process may "
                          "hold it (a study that is writing), or its server is down; the page tries again on its "
                          "next refresh.") from None


def _check_name(study_name: str) -> None:
    if not isinstance(study_name, str) or not study_name.strip() or len(study_name) > 200:
        raise TuningError(f"Study name (--study) must be 1 to 200 characters, not {study_name!r}.")


def study_names(storage_url: str, wait_seconds: float = READ_WAIT_SECONDS) -> list[str]:
    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).is_file():
        return []  # looking creates no database file
    with database_errors(storage_url):
        return sorted(optuna.get_all_study_names(open_storage(storage_url, wait_seconds)))


def load_study(storage_url: str, study_name: str, wait_seconds: float = READ_WAIT_SECONDS) -> optuna.Study:
    """The study, for reading (a page, the CLI's listing): a busy database is reported after `wait_seconds`."""
    _check_name(study_name)
    names = study_names(storage_url, wait_seconds)
    if study_name not in names:
        raise NoStudyError(f"No study named {study_name!r} in {shown_storage(storage_url)}. "
                          f"Studies there: {', '.join(names) or 'none yet'}.")
    with database_errors(storage_url):
        return optuna.load_study(study_name=study_name, storage=open_storage(storage_url, wait_seconds))


def has_running_trials(storage_url: str, study_name: str) -> bool:
    running = (optuna.trial.TrialState.RUNNING,)
    study = load_study(storage_url, study_name)
    with database_errors(storage_url):
        return bool(study.get_trials(deepcopy=False, states=running))


def stored_settings(storage_url: str, study_name: str, wait_seconds: float = READ_WAIT_SECONDS) -> StudySettings | None:
    """The settings a study was started with, or None when there is no such study yet (damaged ones: an error
    that says so)."""
    if study_name not in study_names(storage_url, wait_seconds):
        return None
    study = load_study(storage_url, study_name, wait_seconds)
    with database_errors(storage_url):
        stored = study.user_attrs.get("settings")
    return StudySettings.from_dict(stored, study_name) if stored is not None else None


def check_same(study_name: str, stored: StudySettings, asked: StudySettings) -> None:
    """A study is joined only with the settings it was started with (its trials must stay comparable)."""
    theirs, ours = stored.to_dict(), asked.to_dict()
    if theirs != ours:
        differ = "; ".join(f"{k}: study {json.dumps(theirs[k])}, asked {json.dumps(ours[k])}"
                           for k in theirs if theirs[k] != ours[k])
        raise TuningError(f"Study {study_name!r} was started with other settings ({differ}). Join it with "
                          "its own settings (leave those flags out) or give a new study name (--study).")


def _settle(study: optuna.Study, settings: StudySettings | None) -> StudySettings:
    """The study's stored settings (a new study stores `settings`, or the defaults); a mismatch is an error."""
    stored = study.user_attrs.get("settings")
    if stored is None:
        settings = settings or StudySettings()
        study.set_user_attr("settings", settings.to_dict())
        return settings
    stored = StudySettings.from_dict(stored, study.study_name)
    if settings is not None:
        check_same(study.study_name, stored, settings)
    return stored


# --------------------------------------------------------------------------- running a study


def training_subset(dataset, size: int | None, seed: int = 0):
    """`dataset` with `size` training images drawn at random (the same ones for every trial and machine)."""
    train_split = dataset.train
    if size is None or size >= len(train_split):
        return dataset
    index = np.sort(np.random.default_rng(seed).choice(len(train_split), size, replace=False))
    subset = Split(train_split.name, train_split.images[index], train_split.labels[index],
                   train_split.source_index[index])
    return dataclasses.replace(dataset, train=subset)


def check_dataset(dataset) -> None:
    if len(dataset.val) == 0:
        raise TuningError("Tuning compares validation losses, but the validation split is empty: "
                          "give --val-size above 0.")


def check_trials(n_trials) -> None:
    if not _is_whole(n_trials) or n_trials < 1:
        raise TuningError(f"Number of trials (--trials) must be a whole number of at least 1, not {n_trials!r}.")


def run_study(
    storage_url: str,
    study_name: str,
    dataset,
    settings: StudySettings | None = None,
    *,
    n_trials: int,
    seed: int = 0,
    device: str | None = None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> optuna.Study:
    """Run `n_trials` more trials of the study (created when new, else joined with its stored settings).

    TPE samples (seeded, offset by the trials already stored; machines that start together need
    their own `seed`), a median pruner stops trials that trail the others at the same epoch, and a
    non-finite loss prunes its trial. `should_stop` is asked between batches; when it returns True
    the trial under way is marked failed and the study stops.
    `device` (this machine's, not the study's) overrides the base recipe's. `on_step(trial number, step event)`
    hears every logged training step, for progress within a trial."""
    check_trials(n_trials)
    check_dataset(dataset)
    _check_name(study_name)
    if device is not None:
        resolve_device(device)  # a missing GPU fails now, not as a failed trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with database_errors(storage_url):
            study = optuna.create_study(
                storage=open_storage(storage_url), study_name=study_name, direction="minimize", load_if_exists=True,
                pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
            # Seeded, and offset by the trials already there: a resumed study does not repeat its first points.
            study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
            settings = _settle(study, settings)
    except ValueError as exc:  # e.g. an existing study that maximises
        raise TuningError(f"Study {study_name!r} in {shown_storage(storage_url)} cannot be used: {exc}") from None
    settings.config({"lr": settings.space.lr[0]}, settings.epochs_per_trial)  # a bad base fails now, not per trial
    data = training_subset(dataset, settings.subset)

    def objective(trial: optuna.Trial) -> float:
        params = settings.suggest(trial)
        config = settings.config(params, settings.epochs_per_trial)
        if device is not None:
            config = dataclasses.replace(config, device=device)

        def report(event: dict) -> None:
            if event["event"] == "step" and on_step is not None:  # word within an epoch (resnet18: minutes each)
                on_step(trial.number, event)
            if event["event"] != "epoch" or event["partial"]:
                return
            loss, epoch = event["val_loss"], event["epoch"]
            if loss is None or not math.isfinite(loss):
                raise TrainingError(f"The validation loss became {loss} at epoch {epoch}.")
            trial.report(loss, epoch)
            trial.set_user_attr("val_acc", event["val_acc"])
            if on_epoch is not None:
                on_epoch(trial.number, event)
            if epoch < config.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {loss:.4f} at epoch {epoch} trails the median")

        try:
            result = train(config, data, callback=report, cancel=should_stop)
        except TrainingError as exc:  # diverged: prune, so the sampler learns to avoid that region
            trial.set_user_attr("diverged", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        if result.status == "cancelled":  # recorded as failed (NaN), without a traceback in the log
            trial.set_user_attr("stopped", "stopped on request")
            study.stop()
            return math.nan
        return result.history[-1]["val_loss"]

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(study, trial)
        if should_stop is not None and should_stop():
            study.stop()

    study.optimize(objective, n_trials=int(n_trials), callbacks=[after_trial])
    return study


# --------------------------------------------------------------------------- reading a study


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, validation loss and accuracy, epochs run, seconds, and its parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        start, end = t.datetime_start, t.datetime_complete or pd.Timestamp.now()  # running: so far
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({
            "trial": t.number, "state": _state(t),
            "val_loss": t.value if t.value is not None else last, "val_acc": t.user_attrs.get("val_acc"),
            "epochs": len(t.intermediate_values),
            "seconds": None if start is None else round((pd.Timestamp(end) - pd.Timestamp(start)).total_seconds()),
            **t.params,
        })  # fmt: skip
    columns = ["trial", "state", "val_loss", "val_acc", "epochs", "seconds"]
    return pd.DataFrame(rows, columns=columns + sorted({k for r in rows for k in r} - set(columns)))


def _state(trial: optuna.trial.FrozenTrial) -> str:
    """Optuna's state, with why: "stopped" (on request) rather than "fail", "diverged" rather than "pruned"."""
    return ("stopped" if "stopped" in trial.user_attrs else "diverged" if "diverged" in trial.user_attrs
            else trial.state.name.lower())


def epoch_table(study: optuna.Study) -> pd.DataFrame:
    """Every reported (trial, epoch, validation loss, state): the learning curves the pruner compared."""
    rows = [{"trial": t.number, "epoch": epoch, "val_loss": value, "state": _state(t)}
            for t in study.get_trials(deepcopy=False) for epoch, value in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "epoch", "val_loss", "state"])


def history_table(study: optuna.Study) -> pd.DataFrame:
    """Finished trials in order with their value and the best value so far (the optimisation history)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    table = pd.DataFrame({"trial": [t.number for t in done], "val_loss": [t.value for t in done]})
    table["best_so_far"] = table["val_loss"].cummin()
    return table


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return min(done, key=lambda t: t.value) if done else None


def best_config(study: optuna.Study) -> dict | None:
    """The study's base recipe with the best trial's values, for its full number of epochs (a TrainConfig dict);
    None without a finished trial, or for a study cifarviz did not make (no settings of ours: nothing to fill in)."""
    best = best_trial(study)
    stored = study.user_attrs.get("settings")
    if best is None or not isinstance(stored, dict):
        return None
    try:
        return StudySettings.from_dict(stored).config(best.params).to_dict()
    except (TuningError, TypeError, ValueError, KeyError):
        return None


def param_importances(study: optuna.Study) -> dict[str, float]:
    """PED-ANOVA parameter importances (Optuna 5's default) over the finished trials; {} with fewer than two."""
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return {}
    try:
        with warnings.catch_warnings():  # experimental before Optuna 5, which made it the default
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. every finished trial has the same value
        return {}


# --------------------------------------------------------------------------- one study at a time (the app)


def lock_target() -> Path:
    """The app's tuning lock (`tuning.lock`), with `tuning.json` (what runs) and `tuning.stop` (a stop request)."""
    return runs_dir() / "tuning"


def beside(target: Path, suffix: str) -> Path:
    return Path(f"{target}{suffix}")


@contextlib.contextmanager
def exclusive(target: Path, status: dict):
    """Hold `target`'s lock while tuning and record `status` beside it; another holder makes this fail at once."""
    from filelock import Timeout

    try:
        with file_lock(target, timeout=0):
            beside(target, ".stop").unlink(missing_ok=True)  # an old stop request is not for this run
            with atomic_write(beside(target, ".json"), "w") as f:
                json.dump({**status, "pid": os.getpid(), "started": time.time()}, f)
            try:
                yield
            finally:
                beside(target, ".json").unlink(missing_ok=True)
                # "This process is done": it may take a while yet to exit (its summary, the interpreter's
                # shutdown), and a page that launched it must not call it "starting" meanwhile.
                with atomic_write(beside(target, ".done"), "w") as f:
                    json.dump({"pid": os.getpid(), "ended": time.time()}, f)
    except Timeout:
        running = running_study(target) or {}
        raise TuningError(f"Another study is running ({running.get('study', 'unknown')}, process "
                          f"{running.get('pid', '?')}); one study runs at a time here. Wait for it or stop it."
                          ) from None


def finished_pids(target: Path | None = None) -> set[int]:
    """The process that last released `target`'s lock (its study is over even while the process still exits)."""
    try:
        done = json.loads(beside(target or lock_target(), ".done").read_text())
    except (OSError, ValueError):
        return set()
    pid = done.get("pid") if isinstance(done, dict) else None
    return {pid} if isinstance(pid, int) and not isinstance(pid, bool) else set()


def running_study(target: Path | None = None) -> dict | None:
    """The status of the study holding `target`'s lock, or None when none is running."""
    from filelock import Timeout

    target = target or lock_target()
    try:
        with file_lock(target, timeout=0):
            return None
    except Timeout:
        try:
            status = json.loads(beside(target, ".json").read_text())
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}  # a damaged status file: "a study runs", no details
