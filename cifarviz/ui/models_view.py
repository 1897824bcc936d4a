"""The Models page's views: the zoo table, layer summaries, training curves, the family comparisons (from the
model cards), the seed study and parameters vs accuracy."""

import itertools

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from cifarviz.analysis.summary import changed_args, describe_args, layer_table, model_for_summary, shipped_checkpoints
from cifarviz.core.checkpoint import read_metadata, shipped_files
from cifarviz.core.models import count_parameters, list_models, model_card, model_cards
from cifarviz.ui import app
from cifarviz.ui.charts import PALETTE, SPLITS_NOTE, epoch_curves

COUNT = st.column_config.NumberColumn(format="localized")
TABLE_FORMATS = {
    "parameters": COUNT, "trainable": COUNT,
    "test accuracy": st.column_config.NumberColumn(
        format="%.2f%%", help="The shipped checkpoint's test accuracy, measured on the data named on the Home page"),
    "source's figure": st.column_config.TextColumn(
        help="What the source project wrote: a test accuracy it reported for its own run (original CIFAR-10), "
             "or a target it set out to reach (a goal, not a measured result)"),
}  # fmt: skip


@st.cache_data(show_spinner=False)
def zoo_table(stamps: tuple) -> pd.DataFrame:  # stamps: a replaced checkpoint is read again
    """One row per zoo model; a shipped model's size, arguments and accuracy are its checkpoint's own."""
    shipped = {row["name"]: row for row in shipped_checkpoints()}
    rows = []
    for name in list_models() + sorted(set(shipped) - set(list_models())):
        model = model_for_summary(name)  # a shipped name: its checkpoint's architecture and arguments
        row = shipped.get(name, {})
        entry = model_card(model.arch_name)
        rows.append({
            "model": name, "shipped": name in shipped,
            "parameters": row.get("parameters", count_parameters(model)),
            "arguments": describe_args(model) if changed_args(model) else "defaults",
            "test accuracy": row.get("test_accuracy"),
            "source reported": entry.figures.reported if name == entry.name else None,
            "source target": entry.figures.target if name == entry.name else None,
            "source": entry.source, "description": entry.description,
        })  # fmt: skip
    return pd.DataFrame(rows)


@st.cache_data(show_spinner=False)
def summary_rows(name: str, stamps: tuple) -> tuple[pd.DataFrame, int, int]:
    """The layer table of what ships under `name` (its checkpoint's arguments), else of the zoo defaults."""
    model = model_for_summary(name)
    rows = pd.DataFrame(layer_table(model))
    rows["output_shape"] = rows["output_shape"].map(lambda shape: " × ".join(map(str, shape)))
    rows = rows.rename(columns={"output_shape": "output shape", "name": "module"})
    return rows, count_parameters(model), count_parameters(model, trainable_only=True)


@st.cache_data(show_spinner=False)
def histories(stamps: tuple) -> pd.DataFrame:
    rows = [{"model": path.stem, "epoch": h["epoch"], "split": split, "metric": metric, "value": h[f"{split}_{metric}"]}
            for path in shipped_files() for h in read_metadata(path).get("history", [])
            for split in ("train", "val") for metric in ("acc", "loss")]  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "epoch", "split", "metric", "value"])


def styled(chart: alt.Chart) -> alt.Chart:
    """Type a projector can show: larger axis and legend text, legend names never cut."""
    return (chart.configure_axis(labelFontSize=14, titleFontSize=15)
            .configure_legend(labelFontSize=14, titleFontSize=14, labelLimit=0, orient="bottom", columns=3)
            .configure_title(fontSize=16))  # fmt: skip


def source_figure(name: str) -> str | None:
    figures = model_card(name).figures if name in list_models() else None
    if figures is not None and figures.reported is not None:
        return f"{figures.reported:.2%} reported"
    if figures is not None and figures.target is not None:
        return f"{figures.target:.0%} target, not a result"
    return None


def shown_table(frame: pd.DataFrame, all_rows: bool = False) -> None:
    """Accuracies as percentages with two decimals; few enough columns to fit a 1024-pixel projector."""
    frame = frame.copy()
    if "test accuracy" in frame:
        frame["test accuracy"] = 100 * frame["test accuracy"]
    if "source reported" in frame:
        frame.insert(frame.columns.get_loc("source reported"), "source's figure", frame["model"].map(source_figure))
        frame = frame.drop(columns=["source reported", "source target"], errors="ignore")
    frame = frame.dropna(axis=1, how="all")
    height = 35 * (len(frame) + 1) + 3 if all_rows else "auto"  # rows of 35 px and the header: no empty row
    st.dataframe(frame, hide_index=True, column_config=TABLE_FORMATS, placeholder="—", height=height)


class ZooView:
    """The Models page's data (the zoo table, the training curves, one colour per model) and its views.
    Built per rerun from the checkpoint files' stamps; nothing shared is mutated."""

    def __init__(self):
        self.stamps = tuple((p.name, app.file_stamp(p)) for p in shipped_files())
        self.zoo = zoo_table(self.stamps)
        self.curves = histories(self.stamps)
        self.shipped_names = set(self.zoo.loc[self.zoo["shipped"], "model"])
        self.all_models = list(self.zoo["model"])
        ordered = sorted(self.all_models, key=lambda m: m not in self.shipped_names)
        self.COLOURS = dict(zip(ordered, itertools.cycle(PALETTE)))

    def most_accurate(self, n: int) -> list[str]:
        """The n shipped checkpoints of the highest test accuracy (the zoo's first models when none is shipped)."""
        ranked = self.zoo.dropna(subset=["test accuracy"]).sort_values("test accuracy", ascending=False)
        return (list(ranked["model"]) or self.all_models)[:n]

    def model_colour(self, models) -> alt.Color:
        """The same colour for a model in every chart of this page; the legend lists only `models`."""
        models = [m for m in self.COLOURS if m in set(models)]
        return alt.Color("model:N", scale=alt.Scale(domain=models, range=[self.COLOURS[m] for m in models]),
                         legend=alt.Legend(title=None, symbolStrokeWidth=4))

    def curve_chart(self, frame: pd.DataFrame, metric: str, height: int) -> alt.Chart:
        """Lines per model (its colour on every chart of this page) and split, the y axis fitted to the data."""
        return epoch_curves(frame, metric, self.model_colour(frame["model"].unique()), height=height)

    def layer_summary(self) -> None:
        picked = app.current_checkpoint(quiet=True)  # start on the sidebar's network, else the most accurate
        known = picked is not None and picked.model.arch_name in self.all_models
        start = picked.model.arch_name if known else self.most_accurate(1)[0]
        name = st.selectbox("Model", self.all_models, index=self.all_models.index(start), key="summary_model",
                            format_func=lambda n: f"{n} ({'shipped checkpoint' if n in self.shipped_names else 'zoo defaults'})")
        rows, total, trainable = summary_rows(name, self.stamps)
        row = self.zoo.set_index("model").loc[name]
        made = "as shipped" if name in self.shipped_names else "with the zoo's defaults (no checkpoint shipped)"
        args = "default arguments" if row["arguments"] == "defaults" else row["arguments"]
        st.markdown(f"{row['description']} (source: *{row['source']}*).  \n**{name}** {made} ({args}): "
                    f"**{total:,}** parameters ({trainable:,} trainable).")
        shown_table(rows)

    def training_curves(self) -> None:
        if self.curves.empty:
            st.info("No shipped checkpoints with histories.")
            return
        names = sorted(self.curves["model"].unique())
        a, b = st.columns([3, 2], vertical_alignment="bottom")
        chosen = a.multiselect("Checkpoints", names, default=[n for n in self.most_accurate(3) if n in names],
                               key="curve_models")
        metric = b.segmented_control("Metric", ["accuracy", "loss"], default="accuracy", key="curve_metric", required=True)
        key = "acc" if metric == "accuracy" else "loss"
        shown = self.curves[self.curves["model"].isin(chosen) & (self.curves["metric"] == key)]
        st.caption(SPLITS_NOTE)
        st.altair_chart(styled(self.curve_chart(shown, key, 460)), width="stretch")

    def comparison(self, models: list[str], title: str) -> None:
        present = [m for m in models if m in set(self.curves["model"])]
        if not present:
            st.info(f"No shipped checkpoints for {title}.")
            return
        table = self.zoo.set_index("model").loc[present, ["parameters", "arguments", "test accuracy", "source reported",
                                                     "source target"]].reset_index()
        shown_table(table)
        shown = self.curves[self.curves["model"].isin(present) & (self.curves["metric"] == "acc")]
        st.caption(SPLITS_NOTE)
        st.altair_chart(styled(self.curve_chart(shown, "acc", 440).properties(title=title)), width="stretch")

    def family(self, name: str) -> list[str]:
        """The self.zoo models of one comparison family (their cards say which), in registry order."""
        return [card.name for card in model_cards() if card.family == name]

    def seed_table(self, models: list[str]) -> pd.DataFrame:
        """Test accuracy (%) of each recipe per seed: seed 0 is the shipped checkpoint's own number, the others
        come from bench/deepnet_seeds.py (the same recipe retrained)."""
        shipped = self.zoo.set_index("model")["test accuracy"]
        rows = []
        for name in models:
            if name not in set(self.zoo.loc[self.zoo["shipped"], "model"]):
                continue
            by_seed = {0: float(shipped[name]), **model_card(name).figures.seed_study}
            values = np.array(list(by_seed.values())) * 100
            rows.append({"model": name, **{f"seed {k}": 100 * v for k, v in sorted(by_seed.items())},
                         "mean": values.mean(), "spread": values.max() - values.min()})
        return pd.DataFrame(rows)

    def seed_study(self, models: list[str]) -> None:
        table = self.seed_table(models)
        if table.empty or table.shape[1] <= 4:  # only the shipped seed: nothing to compare
            return
        seeds = [c for c in table.columns if c.startswith("seed ")]
        st.markdown(f"**Is the ranking real?** Each recipe retrained with {len(seeds)} seeds (seed 0 is the shipped "
                    "checkpoint); test accuracy on the same data:")
        percent = st.column_config.NumberColumn(format="%.2f%%")
        points = st.column_config.NumberColumn(format="%.2f pt", help="best seed minus worst seed")
        st.dataframe(table, hide_index=True, column_config={**{c: percent for c in [*seeds, "mean"]}, "spread": points})
        variant = {name: model_card(name).variant for name in models}
        ranks = [" > ".join(table.sort_values(c, ascending=False)["model"].map(variant)) for c in seeds]
        size = self.zoo.set_index("model")["parameters"]
        by_variant = {variant[name]: name for name in models}
        plain, skip = by_variant.get("plain"), by_variant.get("skip")
        if plain not in size or skip not in size:
            return
        same = len(set(ranks)) == 1
        st.markdown(
            (f"Every seed ranks them **{ranks[0]}**" if same else "The ranking changes with the seed: "
             + "; ".join(f"seed {i}: {r}" for i, r in enumerate(ranks)))
            + f", with a seed-to-seed spread of {table['spread'].max():.1f} points at most. "
            "The source found residual > skip > plain (71.5% / 69.4% / 65.2%) after 30 epochs of Adam at lr 1e-4 "
            "without augmentation, where its plain network overfitted most: that comparison measured how well each "
            "block resists overfitting. Our recipe (12 epochs, one-cycle Adam at lr 2e-3, flip and translate "
            "augmentation) never overfits (at the last epoch validation accuracy still rises and matches training "
            "accuracy), so it "
            "measures capacity and ease of optimisation instead: the residual block still wins, and the skip "
            f"network, with {1 - size[skip] / size[plain]:.0%} fewer parameters "
            f"({size[skip]:,} vs {size[plain]:,}), falls behind the plain one.")

    def label_heights(self, frame: pd.DataFrame, gap: float) -> np.ndarray:
        """Label heights that keep labels of nearby points (within half a decade) at least `gap` apart."""
        placed: list[tuple[float, float]] = []
        heights = np.empty(len(frame))
        for i in np.argsort(frame["test accuracy"].to_numpy(), kind="stable"):
            x, y = np.log10(frame["parameters"].iat[i]), frame["test accuracy"].iat[i]
            for px, py in sorted(placed, key=lambda p: p[1]):
                if abs(px - x) < 0.5 and abs(py - y) < gap:
                    y = py + gap
            placed.append((x, y))
            heights[i] = y
        return heights

    def parameters_vs_accuracy(self) -> None:
        frame = self.zoo.dropna(subset=["test accuracy"])[["model", "parameters", "test accuracy", "arguments"]].copy()
        if frame.empty:
            return
        low, high = frame["test accuracy"].min() - 0.02, frame["test accuracy"].max() + 0.03
        height = 420
        frame["label"] = self.label_heights(frame, gap=(high - low) * 18 / height)  # 18 px between labels
        decades = [m * 10**e for e in range(3, 9) for m in (1, 3)]
        ticks = [t for t in decades if frame["parameters"].min() / 3 <= t <= frame["parameters"].max() * 3]
        x = alt.X("parameters:Q", scale=alt.Scale(type="log", domain=[ticks[0], ticks[-1]]),
                  axis=alt.Axis(values=ticks, format="~s", title="parameters (log scale)"))
        y = alt.Y("test accuracy:Q", scale=alt.Scale(domain=[low, high]), axis=alt.Axis(format="%"))
        base = alt.Chart(frame)
        points = base.mark_circle(size=160, opacity=1).encode(
            x=x, y=y, color=self.model_colour(frame["model"]).legend(None),
            tooltip=["model", "arguments", alt.Tooltip("parameters:Q", format=","),
                     alt.Tooltip("test accuracy:Q", format=".2%")])  # fmt: skip
        labels = base.mark_text(align="left", dx=10, fontSize=14, fontWeight="bold").encode(  # in its point's colour
            x=x, y=alt.Y("label:Q", scale=alt.Scale(domain=[low, high]), title="test accuracy"), text="model:N",
            color=self.model_colour(frame["model"]).legend(None))
        st.altair_chart(styled((points + labels).properties(height=height)), width="stretch")

    def comparisons(self) -> None:
        norms, blocks = self.family("normalisation"), self.family("blocks")
        st.markdown("**Normalisation** (s8 source): the same 37,664-parameter network with BatchNorm, GroupNorm, LayerNorm")
        self.comparison(norms, " vs ".join(model_card(n).variant for n in norms))
        st.markdown("**Blocks** (ResNet source): six plain, residual, or skip-concatenation blocks")
        self.comparison(blocks, " vs ".join(model_card(n).variant for n in blocks))
        self.seed_study(blocks)
        st.markdown("**Parameters vs accuracy** of every shipped checkpoint (test accuracy on the data it was measured on)")
        self.parameters_vs_accuracy()
