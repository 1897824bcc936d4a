"""The Train page's form: a TrainConfig bound to widgets, recipes from the model cards, and Start."""

import streamlit as st
import torch

from cifarviz.core.errors import CifarvizError
from cifarviz.core.models import list_models, model_card, model_cards
from cifarviz.core.recipes import RECIPES
from cifarviz.core.train import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MODES, TrainConfig
from cifarviz.services import runs
from cifarviz.ui.text import md, md_message

CUDA = torch.cuda.is_available()
BATCH_SIZES = [32, 64, 128, 256, 512, 1024]
SUBSETS = [1000, 2000, 5000, 10000, 20000, 45000]
DECAY_MODE_LABELS = {"coefficient": "coefficient (decay per step follows lr)",
                     "per_step": "per step at peak lr (kept when lr changes)"}
KEY = "tr_"  # the form's widget keys
DEMO_MODEL, DEMO_EPOCHS = "lenet", 3  # a live demo: lenet's recipe trains in seconds per epoch on 2 CPU cores


def form_values(config: TrainConfig, subset: int | None = None) -> dict:
    """The form's widget values for a TrainConfig (and a training-subset size)."""
    values = {name: getattr(config, name) for name in (
        "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "weight_decay_mode",
        "label_smoothing", "schedule", "warmup", "final_lr", "lookahead", "tta", "seed")}  # fmt: skip
    values.update({f"aug_{k}": v for k, v in config.augment.to_dict().items()})
    values["dropout"] = config.model_args.get("dropout", model_card(config.model).defaults().get("dropout"))
    values["model_args"] = {k: v for k, v in config.model_args.items() if k != "dropout"}
    if subset is not None:
        values["subset"] = min((s for s in SUBSETS if s >= subset), default=SUBSETS[-1])
    return values


def load_form(config: TrainConfig | dict, subset: int | None = None) -> None:
    config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    for name, value in form_values(config, subset).items():
        st.session_state[KEY + name] = value


def demo_default() -> TrainConfig:
    """Sized for a live demo: a small recipe for a few epochs."""
    return TrainConfig(**{**RECIPES[DEMO_MODEL].to_dict(), "epochs": DEMO_EPOCHS})


def on_recipe() -> None:
    name = st.session_state[KEY + "recipe"]
    if name in RECIPES:
        load_form(RECIPES[name])


def on_model() -> None:
    """A new model brings its own dropout default (and no arguments of the previous one)."""
    model = st.session_state[KEY + "model"]
    st.session_state[KEY + "dropout"] = model_card(model).defaults().get("dropout")
    st.session_state[KEY + "model_args"] = {}


def on_variant() -> None:
    """Another variant of the model's family (e.g. s8net's normalisation) is another zoo model."""
    family = model_card(st.session_state[KEY + "model"]).family
    chosen = st.session_state[KEY + "variant"]
    st.session_state[KEY + "model"] = next(c.name for c in model_cards() if c.family == family and c.variant == chosen)
    on_model()


def config_from_form() -> TrainConfig:
    """The TrainConfig the form describes (checked: a bad value raises a CifarvizError that says which)."""
    get = lambda name: st.session_state[KEY + name]
    model_args = dict(get("model_args") or {})
    if get("dropout") is not None and "dropout" in model_card(get("model")).defaults():
        model_args["dropout"] = float(get("dropout"))
    return TrainConfig(
        model=get("model"), model_args=model_args, epochs=int(get("epochs")), batch_size=int(get("batch_size")),
        optimizer=get("optimizer"), lr=float(get("lr")), momentum=float(get("momentum")),
        weight_decay=float(get("weight_decay")), weight_decay_mode=get("weight_decay_mode"),
        label_smoothing=float(get("label_smoothing")), schedule=get("schedule"), warmup=float(get("warmup")),
        final_lr=float(get("final_lr")), lookahead=bool(get("lookahead")), tta=get("tta"), seed=int(get("seed")),
        augment={"translate": int(get("aug_translate")), "flip": bool(get("aug_flip")),
                 "rotate": float(get("aug_rotate")), "color_jitter": float(get("aug_color_jitter"))},
    )


def training_form(dataset, owner: str) -> None:
    """The form, its checks, and Start (which submits a run owned by `owner`, this browser session)."""
    request = st.session_state.pop("train_config_request", None)  # e.g. the Tune tab's best trial
    if request is not None:
        try:
            load_form(request)
            st.session_state[KEY + "recipe"] = "(custom)"
            st.info("The form holds the configuration sent from the Tune tab; press Start to train it.")
        except (CifarvizError, TypeError) as exc:
            st.error(f"The configuration sent to this form was not usable: {md_message(exc)}")
    if KEY + "model" not in st.session_state:
        load_form(demo_default(), subset=None if CUDA else 10000)
        st.session_state.setdefault(KEY + "subset", SUBSETS[-1])
        st.session_state.setdefault(KEY + "snapshots", False)

    st.selectbox("Start from a recipe", ["(custom)", *RECIPES], key=KEY + "recipe", on_change=on_recipe,
                 help="Fills the form with the settings that trained a shipped checkpoint; change any of them.")
    left, middle, right = st.columns(3)
    with left:
        st.markdown("**Model**")
        st.selectbox("Model", list_models(), key=KEY + "model", on_change=on_model)
        model = st.session_state[KEY + "model"]
        card = model_card(model)
        variants = [c.variant for c in model_cards() if card.family and c.family == card.family]
        if variants:  # one control for a family compared on the Models page (s8net's normalisation, ...)
            st.session_state[KEY + "variant"] = card.variant
            st.segmented_control(card.family.capitalize(), variants, key=KEY + "variant", on_change=on_variant,
                                 required=True, help=f"The {card.family} study: {', '.join(variants)}")
        if "dropout" in model_card(model).defaults():
            if st.session_state.get(KEY + "dropout") is None:
                st.session_state[KEY + "dropout"] = model_card(model).defaults()["dropout"]
            st.slider("Dropout", 0.0, 0.9, step=0.05, key=KEY + "dropout")
        if st.session_state.get(KEY + "model_args"):
            st.caption("Model arguments: " + ", ".join(f"{k} {v}" for k, v in st.session_state[KEY + "model_args"].items()))
        st.number_input("Epochs", 1, 200, key=KEY + "epochs")
        st.select_slider("Training images", SUBSETS, key=KEY + "subset",
                         format_func=lambda n: f"{n:,}" + (" (all)" if n >= len(dataset.train) else ""),
                         help="A random subset of the training split (seeded), for quick demos; validation "
                              f"always uses the {len(dataset.val):,} validation images.")
        st.number_input("Seed", 0, 2**31 - 1, key=KEY + "seed")
    with middle:
        st.markdown("**Optimisation**")
        st.selectbox("Optimizer", OPTIMIZERS, key=KEY + "optimizer",
                     format_func=lambda o: {"sgd": "SGD (Nesterov)", "adam": "Adam", "adamw": "AdamW"}[o])
        st.number_input("Learning rate (peak)", min_value=0.0, format="%g", step=None, key=KEY + "lr")
        st.selectbox("Schedule", SCHEDULES, key=KEY + "schedule",
                     help="onecycle: linear warm-up then linear decay; cosine: warm-up then cosine; constant")
        st.select_slider("Batch size", sorted({*BATCH_SIZES, st.session_state[KEY + "batch_size"]}),
                         key=KEY + "batch_size")
        st.number_input("Weight decay", min_value=0.0, format="%g", step=None, key=KEY + "weight_decay")
        st.radio("Weight decay is", WEIGHT_DECAY_MODES, key=KEY + "weight_decay_mode",
                 format_func=DECAY_MODE_LABELS.get,
                 help="coefficient: the optimizer's own weight_decay, so each step shrinks the weights by lr x "
                      "weight decay and a new lr changes the decay too. per step: the shrink per step at the peak "
                      "lr; the coefficient becomes weight decay / lr, so a new lr keeps the recipe's decay.")
    with right:
        st.markdown("**Regularisation and augmentation**")
        st.slider("Label smoothing", 0.0, 0.5, step=0.05, key=KEY + "label_smoothing")
        st.slider("Random translation (pixels)", 0, 4, key=KEY + "aug_translate")
        st.checkbox("Random horizontal flip", key=KEY + "aug_flip")
        st.slider("Random rotation (degrees)", 0.0, 30.0, step=5.0, key=KEY + "aug_rotate")
        st.slider("Colour jitter", 0.0, 0.5, step=0.05, key=KEY + "aug_color_jitter")
        with st.expander("More settings"):
            st.number_input("Momentum (SGD)", 0.0, 0.99, step=0.05, key=KEY + "momentum")
            st.slider("Warm-up (fraction of steps)", 0.0, 1.0, step=0.01, key=KEY + "warmup")
            st.number_input("Final lr (fraction of peak)", 0.0, 1.0, step=0.01, key=KEY + "final_lr")
            st.checkbox("Lookahead (EMA of weights)", key=KEY + "lookahead")
            st.selectbox("Test-time augmentation", ["none", "flip"], key=KEY + "tta")
            st.checkbox("Save a checkpoint of every epoch", key=KEY + "snapshots",
                        help="epochs/epoch-NNN.safetensors in the run folder, e.g. to study how influence changes")

    try:
        config = config_from_form()
    except CifarvizError as exc:
        st.error(md_message(exc))
        return
    if config.weight_decay_mode == "per_step":
        st.caption(f"Weight decay per step {config.weight_decay:g} at lr {config.lr:g}: coefficient "
                   f"{config.decay_coefficient:.4g}.")
    where = "a CUDA GPU" if CUDA else f"the CPU ({runs.train_threads()} thread, at low priority)"
    mine = [r for r in runs.list_runs() if r.state in runs.ACTIVE and r.config.get("owner") == owner]
    full = len(mine) >= runs.max_per_session()
    start = st.button("Start", type="primary", icon=":material/play_arrow:", disabled=full,
                      help=f"{len(mine)} of your runs wait or train (at most {runs.max_per_session()} per browser "
                           "session): stop or cancel one first." if full else
                           f"Trains on {where}; the run goes on if you leave or reload the page.")
    if start:
        try:
            subset = st.session_state[KEY + "subset"]
            run_id = runs.submit_training(config, dataset.root, subset=None if subset >= len(dataset.train) else subset,
                                          snapshots=st.session_state[KEY + "snapshots"],
                                          val_size=len(dataset.val), split_seed=dataset.split_seed, owner=owner)
            st.toast(f"Submitted {md(run_id)}")
            st.session_state["train_just_started"] = run_id  # the live view scrolls its curves into view
        except CifarvizError as exc:
            st.error(md_message(exc))
