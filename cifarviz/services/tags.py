"""Tags on images (FiftyOne's tags, cleanlab's review): a viewer marks a training or test image "mislabelled?" or
with a tag of their own; tags persist on the server, per viewer; the teacher sees everyone's; a relabel list
exports them.

One JSON file, `tags.json` in the runs folder (the server's user data, never evicted like a cache):
    {"schema": 1, "datasets": {FINGERPRINT: {VIEWER: {"train-123": ["mislabelled?"], ...}}}}
Keyed by the data's fingerprint, so a tag never lands on another dataset's image 123. Read back as untrusted
(a damaged or hand-edited file loses its bad entries, not the server), written atomically under a file lock
(several server processes share it). Bounded: tags are short words, a few per image, thousands per viewer.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path

from filelock import FileLock

from cifarviz.analysis.explore import ImageRef
from cifarviz.core.errors import CifarvizError
from cifarviz.services.work.records import read_json, runs_dir, usable_runs_dir, write_json

SCHEMA = 1
SUGGESTED = ("mislabelled?", "ambiguous", "duplicate?", "great example")
MISLABELLED = SUGGESTED[0]
MAX_TAG_CHARS, MAX_TAGS_PER_IMAGE, MAX_IMAGES_PER_VIEWER = 32, 8, 5000
_TAG = re.compile(r"[^\W_][\w ?!.'\-]*")  # starts with a letter or digit; words, spaces, ? ! . ' -
_IMAGE = re.compile(r"(train|val|test)-(\d{1,7})")
_VIEWER = re.compile(r"[0-9a-f]{20}")


class TagError(CifarvizError):
    pass


def clean_tag(text: str) -> str:
    """A tag as stored: spaces trimmed and collapsed; refused, saying why, when it cannot be one."""
    tag = " ".join(str(text).split())
    if not tag:
        raise TagError("A tag needs at least one letter or digit.")
    if len(tag) > MAX_TAG_CHARS:
        raise TagError(f"A tag has at most {MAX_TAG_CHARS} characters; {tag[:40]!r}... has {len(tag)}. Shorten it.")
    if not _TAG.fullmatch(tag):
        raise TagError(f"{tag!r} is not a tag: use letters, digits, spaces and ? ! . ' - (starting with a letter "
                       "or digit).")
    return tag


def _image_key(ref: ImageRef) -> str:
    if ref.split not in ("train", "val", "test") or ref.index < 0:
        raise TagError(f"Only dataset images can be tagged, not {ref.split} image {ref.index}.")
    return f"{ref.split}-{int(ref.index)}"


def _valid(raw: dict) -> dict:
    """The parts of a file's content that are well formed; anything else is dropped."""
    out: dict = {}
    datasets = raw.get("datasets") if raw.get("schema") == SCHEMA else None
    for fingerprint, viewers in (datasets or {}).items():
        if not (isinstance(fingerprint, str) and len(fingerprint) <= 128 and isinstance(viewers, dict)):
            continue
        for viewer, images in viewers.items():
            if not (isinstance(viewer, str) and _VIEWER.fullmatch(viewer) and isinstance(images, dict)):
                continue
            kept = {}
            for image, tags in list(images.items())[:MAX_IMAGES_PER_VIEWER]:
                if not (isinstance(image, str) and _IMAGE.fullmatch(image) and isinstance(tags, list)):
                    continue
                good = []
                for tag in tags[:MAX_TAGS_PER_IMAGE]:
                    try:
                        good.append(clean_tag(tag)) if isinstance(tag, str) else None
                    except TagError:
                        pass
                if good:
                    kept[image] = sorted(set(good))
            if kept:
                out.setdefault(fingerprint, {})[viewer] = kept
    return out


class TagBook:
    """The server's tags. Reads are cached by the file's modification time (grids read them on every rerun)."""

    def __init__(self, folder: str | Path | None = None):
        self._folder = folder
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    @property
    def path(self) -> Path:
        return usable_runs_dir(self._folder) / "tags.json"

    def _read(self) -> dict:
        path = runs_dir(self._folder) / "tags.json"  # reading creates no folder
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return {}
        with self._lock:
            if self._cached is None or self._cached[0] != stamp:
                self._cached = (stamp, _valid(read_json(path)))
            return self._cached[1]

    def of_viewer(self, fingerprint: str, viewer: str) -> dict[ImageRef, list[str]]:
        images = self._read().get(fingerprint, {}).get(viewer, {})
        return {ImageRef(k.split("-")[0], int(k.split("-")[1])): list(v) for k, v in images.items()}

    def everyone(self, fingerprint: str) -> dict[ImageRef, Counter]:
        """Each tagged image: how many viewers gave it each tag."""
        out: dict[ImageRef, Counter] = {}
        for images in self._read().get(fingerprint, {}).values():
            for key, tags in images.items():
                split, index = key.split("-")
                out.setdefault(ImageRef(split, int(index)), Counter()).update(tags)
        return out

    def set_tags(self, fingerprint: str, viewer: str, ref: ImageRef, tags) -> list[str]:
        """Replace `viewer`'s tags on one image (an empty list removes them). Returns the tags as stored."""
        return self._change(fingerprint, viewer, [ref], lambda _old: tags)[0]

    def add(self, fingerprint: str, viewer: str, refs, tag: str) -> int:
        """Add one tag to several images; how many images now carry it."""
        return len(self._change(fingerprint, viewer, list(refs), lambda old: [*old, tag]))

    def _change(self, fingerprint: str, viewer: str, refs: list[ImageRef], change) -> list[list[str]]:
        if not _VIEWER.fullmatch(viewer):
            raise TagError("Tags belong to a viewer of this app; this request has none.")
        keys = [_image_key(ref) for ref in refs]
        path = self.path
        with FileLock(str(path) + ".lock", timeout=10):
            book = _valid(read_json(path))
            mine = book.setdefault(fingerprint, {}).setdefault(viewer, {})
            stored = []
            for key in keys:
                tags = sorted({clean_tag(t) for t in change(mine.get(key, []))})
                if len(tags) > MAX_TAGS_PER_IMAGE:
                    raise TagError(f"An image keeps at most {MAX_TAGS_PER_IMAGE} tags; remove one first.")
                if tags:
                    mine[key] = tags
                else:
                    mine.pop(key, None)
                stored.append(tags)
            if len(mine) > MAX_IMAGES_PER_VIEWER:
                raise TagError(f"You have tagged {MAX_IMAGES_PER_VIEWER:,} images, the most one viewer may; "
                               "export your relabel list and remove tags you are done with.")
            write_json(path, {"schema": SCHEMA, "datasets": book})
        return stored


def relabel_rows(dataset, tagged: dict[ImageRef, Counter | list], predicted: dict[str, object] | None = None
                 ) -> list[dict]:
    """The relabel list: one row per tagged image (split, index, the file's own index, true label, tags with how
    many viewers gave each), images tagged "mislabelled?" by most viewers first."""
    rows = []
    for ref, tags in tagged.items():
        part = dataset.split(ref.split)
        if not 0 <= ref.index < len(part):
            continue  # a tag of an image this copy of the data does not have
        counts = tags if isinstance(tags, Counter) else Counter(tags)
        row = {"split": ref.split, "index": ref.index, "source_index": int(part.source_index[ref.index]),
               "label": dataset.classes[int(part.labels[ref.index])],
               "tags": "; ".join(f"{t} ({n})" if n > 1 else t for t, n in sorted(counts.items())),
               "mislabelled_votes": counts.get(MISLABELLED, 0)}
        if predicted and ref.split in predicted:
            row["prediction"] = dataset.classes[int(predicted[ref.split][ref.index])]
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["mislabelled_votes"], r["split"], r["index"]))


TAGS = TagBook()  # the server's (the runs folder of its settings)
