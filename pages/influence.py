import streamlit as st

from cifarviz.analysis.explore import to_png
from cifarviz.analysis.influence import (
    METHODS,
    available_methods,
    best_ranking,
    default_method,
    index_ready,
    method_choice,
    ranking_meaning,
    suspicious_rankings,
    trained_positions,
)
from cifarviz.ui import app
from cifarviz.ui.text import md, shown

dataset, checkpoint = app.data_and_checkpoint_page("Influence")
classes = list(dataset.classes)

trained_on, scope_note = trained_positions(checkpoint, dataset)
st.markdown(
    f"Which of the {len(trained_on):,} training images made **{md(checkpoint.name)}** decide what it decided? "
    "A training image is **helpful** for a test image when removing it from training would *raise* the test "
    "image's loss (the model would be less sure of the right answer), and **harmful** when removing it would "
    "*lower* that loss.")
methods = available_methods(checkpoint)
if st.session_state.get("influence_method_of") != str(checkpoint.path) or \
        st.session_state.get("influence_method") not in methods:  # another checkpoint: its own measured default
    st.session_state["influence_method"] = default_method(checkpoint)
    st.session_state["influence_method_of"] = str(checkpoint.path)
app.linked("method", "influence_method", choices=methods)
method = st.segmented_control("Method", methods, key="influence_method", required=True,
                              format_func=lambda name: METHODS[name].title)
titles = {name: cls.title for name, cls in METHODS.items()} | {"random": "k random images (for scale)"}
quick = method_choice(checkpoint).quick  # the best measured method that takes seconds: answers while one builds
if app.needs_asking(method, checkpoint, dataset):  # minutes of work: asked first, answered with `quick` meanwhile
    app.ask_before_building(method, checkpoint, dataset)
    method = quick
index, method, building = app.influence_index_now(method, checkpoint, dataset)
if building is not None:  # the ensemble takes minutes to build, once: answer with `quick` meanwhile
    app.progress_bar(building, f"Building the {METHODS[st.session_state['influence_method']].title} index of "
                     f"{md(checkpoint.name)} (once, for everyone); until then the answers below are the "
                     f"{METHODS[method].title} method's")
# The caption is of the method that answered (not of the one picked while it builds)
st.caption(" ".join(filter(None, [METHODS[method].explanation, app.how_sure(checkpoint, method, titles), scope_note])))
test_arts = app.get_artifacts(checkpoint, dataset, "test")
k = st.slider("Images per list", 4, 24, 8, step=4, key="influence_k")


# Only the open tab is drawn (a tab switch reruns the page): three tabs of image tiles on every rerun of every
# viewer made this one of the slowest pages for a class.
app.linked("test", "influence_test", parse=app.parse_index(len(dataset.test)))
app.linked("class", "influence_whole_class", choices=classes)
one, whole_class, suspects = st.tabs(app.linked_tab("influence_tab", ["One test image", "A whole class",
                                                                           "Suspicious training images"]),
                                     key="influence_tab", on_change="rerun")


def one_test_image() -> None:
    offered = app.test_images_to_pick(dataset, test_arts)
    # Until a click, the first image shown: the page opens with an answer, not an empty space.
    chosen = st.session_state.get("influence_test", int(offered[0]) if len(offered) else None)
    if chosen is None or not 0 <= chosen < len(dataset.test):
        return
    st.divider()
    answer = st.container(key="influence-answer")
    with answer, st.container(horizontal=True, gap="medium"):
        with st.container(width=128):  # a fixed width: a column of the page's width cut "Inspect" at 1024 px
            st.image(to_png(dataset.test.images[chosen], scale=4), width="stretch", output_format="PNG")
            st.button("Inspect", key=f"influence-inspect-{chosen}", on_click=app.open_inspector,
                      args=("test", chosen), icon=":material/zoom_in:", width="stretch")
        right = st.container()
    with right:
        true, predicted = md(classes[test_arts.labels[chosen]]), md(classes[test_arts.predicted[chosen]])
        st.markdown(f"#### Test image #{chosen}: true label **{true}**, predicted **{predicted}** "
                    f"({test_arts.probs[chosen].max():.0%})")
        st.caption(f"Scores: {METHODS[method].score_meaning}.")
    with answer:
        if method == "similarity":  # where no influence estimate reached it: said, the best estimate's lists below
            app.similarity_explains_better(checkpoint, titles)
        if not app.side_by_side(dataset, checkpoint, method, chosen, k):
            app.show_result(dataset, checkpoint, app.influence_of(method, checkpoint, dataset, test_index=chosen, k=k),
                            key=f"test-{chosen}")
        if method == "similarity":
            app.best_estimate_beside(checkpoint, dataset, chosen, k, titles)
    app.scroll_into_view("influence-answer", chosen)  # a click on a tile: its answer, below the grid, into view
    app.retrain_section(index, checkpoint, dataset, chosen, lambda n: app.influence_of(
        method, checkpoint, dataset, test_index=chosen, k=n), test_arts.probs)
    app.measured_table(checkpoint, titles)


def a_whole_class() -> None:
    st.markdown("The training images that help and hurt **a whole test class** on average (the influence-functions "
                "source project analysed the airplane class this way).")
    target = st.selectbox("Test class", classes, key="influence_whole_class", format_func=shown)
    app.show_result(dataset, checkpoint, app.influence_of(method, checkpoint, dataset, class_name=target, k=k), key=f"class-{target}")


def suspicious_training_images() -> None:
    # similarity ranks nothing by itself: the head's self-influence stands beside it once the head's index exists
    ranked_by = index if index.has_self_influence or not index_ready("head", checkpoint, dataset) else \
        app.get_influence_index("head", checkpoint, dataset)
    rankings = suspicious_rankings(ranked_by, checkpoint, dataset, top=k)  # "Images per list" above
    best, recall = best_ranking(checkpoint, rankings)
    others = [name for name in rankings if name != best]
    st.markdown("Training images most likely to be **mislabelled** (or atypical) first. On the left the ranking "
                f"that found flipped labels best when measured: **{best}**"
                + (f" ({recall:.0%} of 5% flipped labels in its top 10%)." if recall is not None else ".")
                + (" On the right another ranking to compare it with." if others else ""))
    train_predicted = app.get_artifacts(checkpoint, dataset, "train").predicted
    if st.session_state.get("suspect_other") not in others:  # another method: other rankings
        st.session_state.pop("suspect_other", None)
    left, right = st.columns(2)
    with left:
        models = f" over the {index.models} models of the ensemble" if best == "mean training loss" else ""
        st.markdown(f"**By {best}**{models}")
        st.caption(ranking_meaning(best))
        app.suspects_grid(dataset, checkpoint, rankings[best], train_predicted, "best", best)
    with right:
        if not others:
            st.info(f"The {METHODS[method].title} method has no self-influence: pick Head influence above (its "
                    "self-influence found flipped labels best of those measured).")
            return
        other = st.segmented_control("Or by", others, default=others[0], required=True, key="suspect_other",
                                     label_visibility="collapsed") if len(others) > 1 else others[0]
        st.markdown(f"**By {other}**")
        st.caption(ranking_meaning(other))
        app.suspects_grid(dataset, checkpoint, rankings[other], train_predicted, "other", other)


for tab, draw in ((one, one_test_image), (whole_class, a_whole_class), (suspects, suspicious_training_images)):
    with tab:
        if tab.open:
            draw()

app.inspector(dataset, checkpoint)
