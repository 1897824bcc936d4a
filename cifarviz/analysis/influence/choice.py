"""Which influence method answers for a checkpoint, and which measured figure belongs to the answer.

The rule: a checkpoint's default is the attribution method with the best measured retraining effect
(bench/bench_retrain.py, on its model card) among those it can run, *and* at least as good as the similarity
baseline's. Where no attribution method reaches similarity, similarity answers, and the page says so in plain words
and shows the best attribution method's lists beside it. A method is the default only on a figure that applies:

* the card of the checkpoint's architecture has figures, and the checkpoint is the shipped file or was trained with
  the card's recipe: "measured on this model's recipe";
* the card has figures, but the run's recipe differs: the same figures, said as such (which settings differ);
* the architecture was never measured: the reference measurement (REFERENCE_MODEL's card), said as such.

An ensemble's figure applies only to the kind of models it was measured with: "trak-ensemble" is the card's shipped
replicas (other seeds of the recipe), "trak-snapshots" a run's own per-epoch snapshots (the ensemble a student's run
gets, bench_retrain.py's trak-snapshots). Both answer as the method "trak-ensemble"; which figure is its figure
depends on its members. While the default's index builds (minutes), the answer comes from `quick`, the best
measured method whose index takes seconds, and its own figure is quoted.
"""

from __future__ import annotations

from dataclasses import dataclass

BASELINE = "similarity"  # shown beside the attribution methods; the default only where none of them reaches it
RANDOM = "random"  # a measured scale, never a method that answers
REFERENCE_MODEL = "lenet"  # whose figures stand in for an architecture never measured
ENSEMBLE, SNAPSHOTS = "trak-ensemble", "trak-snapshots"  # the method, and the figure of a run's snapshot ensemble
# figures measured under a name that is not a method of the app
MEASURED_TITLES = {SNAPSHOTS: "TRAK over a run's own per-epoch snapshots (its weights and up to 4 snapshots)"}
# TrainConfig fields that do not change what a recipe learns (where it ran, which seed)
RECIPE_IRRELEVANT = ("seed", "device", "model")


@dataclass(frozen=True)
class MethodChoice:
    """What answers for one checkpoint, and why."""

    method: str  # the default: the best measured method that applies (an attribution method or the baseline)
    quick: str  # the best measured method whose index takes seconds: answers while `method` builds
    best_attribution: str | None  # the best measured attribution method available (shown beside the baseline)
    similarity_wins: bool  # no available attribution method reached similarity's figure
    figures: object | None  # the RetrainingFigures the choice rests on (None: nothing measured at all)
    measured_on: str  # the card those figures are from
    applies: str  # "recipe": this model's recipe; "other recipe": the card's, the run's differs; "other model"
    differs: tuple[str, ...] = ()  # with "other recipe": the settings that differ
    applicable: tuple[tuple[str, float], ...] = ()  # (method, measured mean change) where it applies to this one
    rose: tuple[tuple[str, int], ...] = ()  # (method, for how many test images the loss rose), the same figures
    ensemble_of: str = ""  # the ensemble's members: "replicas", "snapshots", or "" (none)

    def figure(self, method: str) -> float | None:
        """The measured mean change of the test loss for `method`, where that figure applies to this checkpoint
        (an ensemble's figure is of the kind of members it was measured with: replicas or a run's snapshots)."""
        return dict(self.applicable).get(method)


def _card(checkpoint):
    from cifarviz.core.errors import ModelError
    from cifarviz.core.models import model_card

    try:
        return model_card(checkpoint.model.arch_name)
    except ModelError:  # not a zoo model
        return None


def recipe_differences(checkpoint, card) -> tuple[str, ...] | None:
    """The recipe settings in which the checkpoint's training differs from the card's (empty: the same recipe);
    None when the checkpoint records no recipe (an upload, an old file)."""
    from cifarviz.core.train import TrainConfig

    recorded = checkpoint.meta.get("train_config") if isinstance(checkpoint.meta, dict) else None
    if not isinstance(recorded, dict) or card is None or card.recipe is None:
        return None
    try:
        theirs = TrainConfig(**recorded).to_dict()
    except Exception:  # noqa: BLE001 - a recipe that cannot be read is no recipe; the page says so elsewhere
        return None
    ours = TrainConfig(model=card.name, **card.recipe).to_dict()
    return tuple(sorted(k for k in ours if k not in RECIPE_IRRELEVANT and ours[k] != theirs.get(k)))


def _ensemble_kind(checkpoint, card) -> str:
    """What the checkpoint's ensemble averages over: "replicas" (all the card's shipped replicas: what the
    trak-ensemble figure was measured with), "snapshots" (a run's per-epoch snapshots: the trak-snapshots figure),
    or "" (no ensemble, or some other set of models: never measured)."""
    from pathlib import Path

    from cifarviz.core.checkpoint import SHIPPED_DIR, ensemble_member_files

    files = ensemble_member_files(checkpoint)
    if not files:
        return ""
    members = {Path(p).resolve() for p in files}
    if card is not None and card.replicas:
        shipped = {(SHIPPED_DIR / name).resolve() for name in card.replicas}
        if members <= shipped and len(members) == len(card.replicas):
            return "replicas"
    if all(Path(p).parent.name == "epochs" for p in files):
        return "snapshots"
    return ""


def method_choice(checkpoint) -> MethodChoice:
    """The measured default for `checkpoint` and the figures it rests on (see the module's docstring)."""
    from cifarviz.core.errors import ModelError
    from cifarviz.core.models import model_card

    from . import METHODS, available_methods

    card = _card(checkpoint)
    available = available_methods(checkpoint)
    if card is not None and card.influence is not None:
        figures, measured_on = card.influence, card.name
        differs = recipe_differences(checkpoint, card)
        applies = "recipe" if differs == () else "other recipe"
        differs = differs or ()
    else:
        try:
            reference = model_card(REFERENCE_MODEL)
        except ModelError:
            reference = None
        figures = reference.influence if reference is not None else None
        measured_on, applies, differs = REFERENCE_MODEL, "other model", ()
    measured = dict(figures.mean_change) if figures is not None else {}
    rose = dict(figures.rose) if figures is not None else {}
    ensemble_of = _ensemble_kind(checkpoint, card)
    replicas_figure, snapshots_figure = measured.pop(ENSEMBLE, None), measured.pop(SNAPSHOTS, None)
    replicas_rose, snapshots_rose = rose.pop(ENSEMBLE, None), rose.pop(SNAPSHOTS, None)
    if ensemble_of == "replicas" and applies != "other model" and replicas_figure is not None:
        measured[ENSEMBLE], rose[ENSEMBLE] = replicas_figure, replicas_rose
    elif ensemble_of == "snapshots" and snapshots_figure is not None:  # a run's snapshots, as measured on a run
        measured[ENSEMBLE], rose[ENSEMBLE] = snapshots_figure, snapshots_rose
    usable = {m: v for m, v in measured.items() if m in available and m != RANDOM}
    attribution = {m: v for m, v in usable.items() if m != BASELINE}
    best = max(attribution, key=attribution.get) if attribution else None
    baseline = usable.get(BASELINE)
    if best is not None and (baseline is None or attribution[best] >= baseline):
        method, similarity_wins = best, False
    elif baseline is not None:
        method, similarity_wins = BASELINE, True
    else:  # nothing measured at all: the baseline, which claims no more than it is
        method, similarity_wins = BASELINE, False
    seconds = {m: v for m, v in usable.items() if not (METHODS[m].takes_minutes or METHODS[m].needs_members)}
    quick = method if method in seconds or not seconds else max(seconds, key=seconds.get)
    if quick not in available:
        quick = BASELINE
    return MethodChoice(method, quick, best, similarity_wins, figures, measured_on, applies, differs,
                        tuple(measured.items()), tuple(rose.items()), ensemble_of)


def _measured_name(choice: MethodChoice, method: str) -> str:
    """The name `method`'s figure was measured under (a run's snapshot ensemble: trak-snapshots)."""
    return SNAPSHOTS if method == ENSEMBLE and choice.ensemble_of == "snapshots" else method


def default_method(checkpoint) -> str:
    """The page's, inspector's and CLI's default method for `checkpoint` (method_choice)."""
    return method_choice(checkpoint).method


def where_measured(choice: MethodChoice, arch: str) -> str:
    """Which measurement a figure comes from, in words."""
    if choice.figures is None:
        return ""
    if choice.applies == "recipe":
        return choice.figures.protocol
    if choice.applies == "other recipe":
        return (f"{choice.figures.protocol}; this run's recipe differs from that one in "
                f"{', '.join(choice.differs)}, so the figure is a guide, not a measurement of this run")
    return (f"measured on {choice.measured_on}, not on {arch}: {choice.figures.protocol}. "
            f"No method has been checked by retraining on {arch} yet")


def how_sure(checkpoint, method: str, titles: dict | None = None) -> str:
    """One sentence (plain text) for the method that actually answered: its measured retraining effect beside
    similarity's and random's, and which measurement that is."""
    choice = method_choice(checkpoint)
    titles = titles or {}
    arch = checkpoint.model.arch_name
    figure = choice.figure(method)
    if figure is None:
        return (f"How sure? The {titles.get(method, method)} method has not been checked by retraining "
                f"on {arch}{' or ' + choice.measured_on if choice.measured_on != arch else ''}, so nobody "
                "knows how faithful this answer is.")
    change, rose = dict(choice.applicable), dict(choice.rose)
    others = ", ".join(f"{titles.get(m, m).split(' (')[0].lower()} {change[m]:+.2f}" for m in (BASELINE, RANDOM)
                       if m in change and m != method)
    if method == ENSEMBLE and choice.ensemble_of == "snapshots":
        others += ("; this is the figure of an ensemble of a run's own per-epoch snapshots, the ensemble this run "
                   "has")
    tests = choice.figures.count(_measured_name(choice, method))
    return (f"How sure? Retrained without this method's top helpful images, the test image's loss rose by "
            f"{figure:+.2f} on average (for {rose.get(method, '?')} of {tests} test images); "
            f"{others} ({where_measured(choice, arch)}).")
