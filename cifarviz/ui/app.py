"""The explorer's helpers for pages, in one namespace: `from cifarviz.ui import app`, then `app.sidebar()`,
`app.image_grid(...)`, `app.inspector(...)`. The code lives in the ui modules by what it holds:

* loaders.py: datasets and models once per server, artifacts and influence computed once per key in the
  background with progress;
* sidebar.py: the data folder and checkpoint pickers, and the page starts that need them;
* widgets.py: the clickable image grid;  exports.py: CSV/JSON downloads of a selection;
* layout.py: the page's margins, scrolling an answer into view;  links.py: the view in the address (a link to it);  inspector.py: the image inspector every image opens;
* uploads.py: the server's flags, uploaded checkpoints and photos;
* influence_view.py: the Influence page's measured figures and "retrain without these images";
* charts.py, embeddings.py, tuning.py, train_form.py, runs_view.py, compare.py, models_view.py: one page's pieces.

The ui package is the only part of cifarviz that imports Streamlit.
"""

from cifarviz.core.checkpoint import Checkpoint  # noqa: F401 - pages name it in type hints
from cifarviz.services.runs import runs_dir  # noqa: F401
from cifarviz.ui.uploads import (  # noqa: F401
    UPLOAD_MAX_BYTES,
    UPLOADS_KEPT,
    data_locked,
    uploads_allowed,
    save_uploaded_checkpoint,
    prune_uploads,
    read_upload_image,
)
from cifarviz.ui.loaders import _artifacts  # noqa: F401 - Evaluate reads both passes of a TTA checkpoint
from cifarviz.ui.loaders import (  # noqa: F401
    freeze_imported_modules,
    canonical_root,
    get_dataset,
    get_checkpoint,
    artifacts_job,
    artifacts_ready,
    prefetch,
    influence_job,
    get_influence_index,
    influence_index_now,
    time_left,
    about,
    ask_first,
    influence_of,
    get_artifacts,
    wait_for,
    progress_bar,
    file_stamp,
    classroom_refusal,
    refused_notice,
    needs_asking,
    ASK_ABOVE_SECONDS,
    build_estimate,
    calibration_now,
)
from cifarviz.ui.sidebar import (  # noqa: F401
    PAGES,
    checkpoint_choices,
    sidebar,
    data_and_checkpoint_page,
    current_dataset,
    no_data_help,
    current_checkpoint,
    data_status,
)
from cifarviz.ui.widgets import (  # noqa: F401
    INSPECT_KEY,
    open_inspector,
    close_inspector,
    image_grid,
)
from cifarviz.ui.exports import export_buttons, safe_file_name  # noqa: F401
from cifarviz.ui.layout import scroll_into_view  # noqa: F401
from cifarviz.ui.links import from_link, linked, linked_tab, slug, parse_index, publish as publish_link, show as show_in_link  # noqa: F401
from cifarviz.ui.influence_view import how_sure, measured_table, retrain_section, show_result, suspects_grid, ask_before_building, similarity_explains_better, best_estimate_beside, side_by_side, test_images_to_pick  # noqa: F401
from cifarviz.ui.inspector import (  # noqa: F401
    inspector,
    saliency_png,
    image_probabilities,
    PROBABILITY_CHART_HEIGHT,
    probability_chart,
    neighbours_section,
    influence_section,
    influence_grid,
    SUPERSCRIPT,
    readable_score,
    nearest_training_images,
)
