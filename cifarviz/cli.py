"""`python -m cifarviz`: everything the app computes, for scripts and for warming caches before a class.

`--help` after any command lists its flags."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from dataclasses import fields
from pathlib import Path

from cifarviz.core.checkpoint import check_fits_data, shipped_file, shipped_files
from cifarviz.core.errors import CheckpointError, CifarvizError

# cifarviz.analysis.influence.METHODS, named here so --help needs no torch import
METHODS = ("trak-ensemble", "head", "trak", "similarity")


def resolve_checkpoint(name_or_path: str) -> Path:
    """Any checkpoint the app lists: a file path, a shipped name (`fastnet`), a run id from the Train page
    (`lenet-20261201-101500-ab12`, its model.safetensors under $CIFARVIZ_RUNS), or an older flat run file."""
    from cifarviz.services.runs import CHECKPOINT, runs_dir

    path = Path(name_or_path)
    if path.is_file():
        return path
    runs = runs_dir()
    if path.is_dir() and (path / CHECKPOINT).is_file():  # a run's folder
        return path / CHECKPOINT
    plain = path.name == name_or_path and name_or_path not in ("", ".", "..")  # a name, not a path
    candidates = [shipped_file(name_or_path), runs / name_or_path / CHECKPOINT,
                  runs / f"{name_or_path}.safetensors"] if plain else []
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    shipped = ", ".join(p.stem for p in shipped_files()) or "none"
    raise CifarvizError(f"No checkpoint file, shipped checkpoint or run named {name_or_path!r}. Shipped: {shipped}; "
                        f"runs: `python -m cifarviz runs` lists them ({runs}).")


def load_named_checkpoint(name_or_path: str, arch: str | None = None):
    """The checkpoint behind a -c value; `arch` (--arch) names the architecture of a .pt/.pth state dict."""
    from cifarviz.core.checkpoint import load_checkpoint, read_metadata

    path = resolve_checkpoint(name_or_path)
    stored = read_metadata(path).get("architecture") if arch and path.suffix == ".safetensors" else None
    if stored and stored != arch:
        raise CheckpointError(f"--arch {arch} contradicts {path.name}, which stores architecture {stored!r}; "
                              "--arch is for .pt/.pth state dicts. Leave it out for this file.")
    return load_checkpoint(path, architecture=arch)  # an ambiguous state dict's error names --arch



def ensure_writable(path: Path, flag: str) -> Path:
    """Fail before any work when PATH cannot be written: make its folder and create a temporary file there."""
    if path.is_dir():
        raise CifarvizError(f"{flag} {path} is a folder; give a file name inside it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        in_the_way = isinstance(exc, (FileExistsError, NotADirectoryError))
        reason = "part of its folder path is a file" if in_the_way else exc.strerror or str(exc)
        raise CifarvizError(f"{flag} {path} cannot be written ({reason}). Choose a writable folder.") from None
    return path


def safe_stem(name: str, fallback: str = "checkpoint") -> str:
    """A file-name stem from a name stored in a file (which may hold '/', '..' or worse): it stays in the folder."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name).replace("\\", "/").rsplit("/", 1)[-1]).strip("._")
    return stem or fallback


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _load_data(args, download: bool = True):
    from cifarviz.store.datasets import load_cifar10

    asked = args.val_size  # None: the library default, which shrinks to a tenth on small datasets
    dataset = load_cifar10(args.data, download=download, val_size=5000 if asked is None else asked,
                           split_seed=args.split_seed)
    if asked is not None and len(dataset.val) != asked:
        total = len(dataset.train) + len(dataset.val)
        raise CifarvizError(f"--val-size {asked:,} is too large: {dataset.root} has {total:,} training images; "
                            f"choose 0 to {total - 1:,}.")
    return dataset


def announced_index(method: str, checkpoint, dataset, *, progress: bool = True):
    """load_or_fit, saying first on stderr what will be built when that takes minutes: how long (this machine's
    last build, or per-example gradients timed now) and how to get a quick answer instead."""
    from cifarviz.analysis.influence import METHODS as INFLUENCE_METHODS
    from cifarviz.analysis.influence import build_estimate, how_sure, index_ready, load_or_fit, method_choice

    cls = INFLUENCE_METHODS[method]
    if not index_ready(method, checkpoint, dataset):
        seconds, source = build_estimate(method, checkpoint, dataset)
        if cls.takes_minutes or (seconds is not None and seconds > 60):
            quick = method_choice(checkpoint).quick
            when = f"about {seconds / 60:.1f} minutes ({source})" if seconds is not None else "several minutes"
            print(f"Building the {cls.title} index of {inert(checkpoint.name)} over {len(dataset.train):,} training "
                  f"images first: {when}, once (it is cached; later lookups take milliseconds).", file=sys.stderr)
            if quick != method:
                print(f"For an answer now: --method {quick} (seconds). {how_sure(checkpoint, quick)}",
                      file=sys.stderr)
    return load_or_fit(method, checkpoint, dataset, progress=progress)


# Terminal control: C0 controls but newline, carriage return and tab; DEL; C1 controls; the bidirectional
# overrides that reorder what a line seems to say. Written as escapes, never sent to the terminal.
_CONTROL = [c for c in range(32) if chr(c) not in "\n\r\t"] + [127, *range(128, 160), *range(0x202A, 0x202F),
                                                           *range(0x2066, 0x206A)]
_INERT_TABLE = {c: chr(c).encode("unicode_escape").decode("ascii") for c in _CONTROL}
MESSAGE_LIMIT = 2000  # characters of an error message (a list of 10,000 class names is cut, and says so)


class InertStream:
    """stdout and stderr as the CLI writes them (main wraps both): every name read from a file (checkpoint names,
    class folders, run ids) passes through here, so an escape sequence in one is shown, never obeyed."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.translate(_INERT_TABLE))

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, buffer: the real stream's
        return getattr(self._stream, name)


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message cut to `limit` characters, saying how long it was."""
    return message if len(message) <= limit else f"{message[:limit]}... (cut: {len(message):,} characters)"


def inert(name) -> str:
    """A name read from a file, printable on a terminal: control and escape characters shown as escapes, bounded."""
    text = str(name)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text):,} characters)"


# --------------------------------------------------------------------------- commands


def cmd_data(args) -> int:
    from cifarviz.core.data import default_data_root, detect_layout

    root = Path(args.data) if args.data else default_data_root()
    if not args.download and not detect_layout(root):
        _load_data(args, download=False)  # raises the explanatory DataError
    t0 = time.perf_counter()
    ds = _load_data(args, download=args.download)
    info = {
        **ds.describe(),
        "classes": list(ds.classes),
        "mean": ds.mean,
        "std": ds.std,
        "per_class": {s: {c: int((ds.split(s).labels == i).sum()) for i, c in enumerate(ds.classes)}
                      for s in ("train", "val", "test")},
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"source      {ds.root} ({ds.layout}), fingerprint {ds.fingerprint}")
        print(f"splits      train {len(ds.train):,} / val {len(ds.val):,} / test {len(ds.test):,} (split seed {ds.split_seed})")
        print(f"classes     {', '.join(ds.classes)}")
        print(f"mean / std  {tuple(round(m, 4) for m in ds.mean)} / {tuple(round(s, 4) for s in ds.std)} (training split)")
        print(f"loaded in   {info['load_seconds']} s")
    return 0


def cmd_models(args) -> int:
    from cifarviz.analysis.summary import (
        build_architecture,
        describe_args,
        format_table,
        model_for_summary,
        shipped_checkpoints,
    )
    from cifarviz.core.models import count_parameters, list_models, model_entry

    if args.action == "summary":
        if not (args.name or args.checkpoint):
            raise CifarvizError("usage: python -m cifarviz models summary NAME (a zoo model or shipped checkpoint), "
                                "or models summary -c CHECKPOINT")
        target = resolve_checkpoint(args.checkpoint) if args.checkpoint else args.name
        model = model_for_summary(target, architecture=args.arch)
        print(f"{args.checkpoint or args.name}: {model.arch_name} ({describe_args(model)}): "
              f"{model_entry(model.arch_name).description}")
        print(format_table(model))
        return 0
    shipped = shipped_checkpoints()
    rows = []
    for name in list_models():
        entry = model_entry(name)
        rows.append({"name": name, "parameters": count_parameters(build_architecture(name)),
                     "source": entry.source, "description": entry.description,
                     "checkpoints": [c for c in shipped if c["architecture"] == name]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    # one width for the first column, from the longest entry it holds (a long checkpoint name shifted its row)
    width = max([len("architecture")] + [len(r["name"]) for r in rows] +
                [2 + len("shipped " + inert(c["name"])) for r in rows for c in r["checkpoints"]])
    print(f"{'architecture':{width}} {'parameters':>12}  description (parameters at default arguments)")
    for row in rows:
        print(f"{row['name']:{width}} {row['parameters']:>12,}  {row['description']}")
        for c in row["checkpoints"]:
            args_text = ", ".join(f"{k}={json.dumps(v)}" for k, v in c["arch_args"].items()) or "default arguments"
            accuracy = f"; test accuracy {c['test_accuracy']:.4f}" if c["test_accuracy"] is not None else ""
            print(f"  {'shipped ' + inert(c['name']):{width - 2}} {c['parameters']:>12,}  {args_text}{accuracy}")
    return 0


def cmd_train(args) -> int:
    from tqdm.auto import tqdm

    from cifarviz.core.recipes import RECIPES, train_and_save
    from cifarviz.core.train import TrainConfig, resolve_device

    if args.recipe:
        if args.recipe not in RECIPES:
            raise CifarvizError(f"Unknown recipe {args.recipe!r}. Recipes: {', '.join(RECIPES)}.")
        config = RECIPES[args.recipe]
    elif args.model:
        config = TrainConfig(model=args.model)
    else:
        raise CifarvizError("Give --model NAME (with hyperparameter flags) or --recipe NAME.")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.model_args is not None:
        try:
            overrides["model_args"] = json.loads(args.model_args)
        except json.JSONDecodeError as exc:
            raise CifarvizError(f"--model-args is not valid JSON ({exc.msg} at character {exc.pos}): {args.model_args!r}. "
                                'Example: --model-args \'{"widths": [32, 128, 128]}\'') from None
    augment = config.augment.to_dict()
    for key in ("translate", "flip", "rotate", "color_jitter"):
        if getattr(args, key) is not None:
            augment[key] = getattr(args, key)
    overrides["augment"] = augment
    config = TrainConfig(**{**config.to_dict(), **overrides})  # checks every value
    if args.queue:  # a worker trains it (this machine's, or one that joined the queue): `runs` follows it
        from cifarviz.core.settings import settings
        from cifarviz.services.runs import submit_training

        if args.out:
            raise CifarvizError("--queue keeps the checkpoint in the run's folder (`python -m cifarviz runs` lists "
                                "it): leave out --out, or train here without --queue.")
        run_id = submit_training(config, args.data or settings().data, split_seed=args.split_seed,
                                 val_size=5000 if args.val_size is None else args.val_size)
        print(f"{run_id}: queued (`python -m cifarviz runs` follows it; `runs stop {run_id}` stops it)")
        return 0
    resolve_device(config.device)  # is that device here?
    out = Path(args.out or f"runs/{config.model}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")
    ensure_writable(out.with_suffix(".safetensors"), "--out")  # now, not after the whole training

    dataset = _load_data(args)
    bar = tqdm(total=None, desc=f"training {config.model}", unit="step")

    def progress(event):
        if event["event"] == "step":
            bar.total = event["total_steps"]
            bar.n = event["step"]
            bar.set_postfix(epoch=event["epoch"], loss=f"{event['loss']:.3f}", img_s=f"{event['images_per_s']:.0f}")
            bar.refresh()
        else:
            bar.write(f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f} acc {event['train_acc']:.4f}"
                      f"  val loss {event['val_loss'] or float('nan'):.4f} acc {event['val_acc'] or float('nan'):.4f}"
                      f"  {event['elapsed']:.0f}s")

    path, result = train_and_save(config, dataset, out, callback=progress)
    bar.close()
    from cifarviz.core.checkpoint import read_metadata

    acc = read_metadata(path)["metrics"]["test_accuracy"]
    print(f"saved {path}: test accuracy {acc:.4f} on {dataset.root} (test split), {result.seconds:.0f} s on {result.device}")
    return 0


def cmd_evaluate(args) -> int:
    from cifarviz.analysis.metrics import classification_report, most_confused_pairs
    from cifarviz.store.artifacts import split_artifacts, split_tta

    checkpoint = load_named_checkpoint(args.checkpoint, args.arch)
    dataset = _load_data(args)
    check_fits_data(checkpoint, dataset)  # classes and images, once, before any work
    arts = split_artifacts(checkpoint, dataset, args.split, progress=not args.json)
    report = classification_report(arts.labels, arts.predicted, dataset.classes)
    report["most_confused"] = most_confused_pairs(report["confusion_matrix"], dataset.classes, top=5)
    report["checkpoint"] = str(checkpoint.path)
    report["measured_on"] = {**dataset.describe(), "split": args.split, "tta": split_tta(checkpoint, args.split)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{checkpoint.name} on {dataset.root} ({args.split}, {len(arts.labels):,} images, "
          f"TTA {split_tta(checkpoint, args.split)})")
    print(f"accuracy {report['accuracy']:.4f}\n")
    print(f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for row in report["per_class"]:
        print(f"{row['class']:>12} {row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f} {row['support']:8d}")
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print("\n".join(confusion_lines(report["confusion_matrix"], dataset.classes)))
    print("\nmost confused: " + "; ".join(f"{p['pair']} ({p['count']})" for p in report["most_confused"]))
    return 0


def column_labels(classes, width: int) -> list[str]:
    """Class names cut to `width` characters for column headers; the class numbers where cut names would clash."""
    cut = [str(c)[:width] for c in classes]
    return cut if len(set(cut)) == len(cut) else [str(i) for i in range(len(classes))]


def confusion_lines(matrix, classes, columns: int = 100) -> list[str]:
    """The confusion matrix as text: a header row of (abbreviated) class names, a row per true class, and a legend
    line for the headers that are not the whole name. Fits `columns` characters where ten classes can."""
    row_width = 12
    count_width = max(5, len(f"{max((max(r) for r in matrix), default=0):d}"))
    longest = max((len(str(c)) for c in classes), default=1)
    room = (columns - row_width) // max(1, len(classes)) - 1  # one space before each column
    width = max(count_width, min(longest, room))
    labels = column_labels(classes, width)
    lines = [f"{'':>{row_width}} " + " ".join(f"{label:>{width}}" for label in labels)]
    lines += [f"{str(name):>{row_width}} " + " ".join(f"{v:{width}d}" for v in row) for name, row in zip(classes, matrix)]
    cut = [f"{label} = {name}" for label, name in zip(labels, classes) if label != str(name)]
    if cut:
        lines.append("columns: " + ", ".join(cut))
    return lines


def cmd_export_features(args) -> int:
    import numpy as np

    from cifarviz.core.utils import atomic_write
    from cifarviz.store.artifacts import split_artifacts

    checkpoint = load_named_checkpoint(args.checkpoint, args.arch)
    # The stored name is data from the file: only a plain stem of it may name a file here.
    stem = safe_stem(checkpoint.name, fallback=safe_stem(checkpoint.path.stem))
    out = ensure_writable(Path(args.out or f"{stem}-{args.split}-features.npz"), "--out")
    dataset = _load_data(args)
    check_fits_data(checkpoint, dataset)
    arts = split_artifacts(checkpoint, dataset, args.split, progress=True)
    with atomic_write(out) as fh:
        np.savez(fh, features=arts.features, logits=arts.logits, labels=arts.labels,
                 index=np.arange(len(arts.labels)), classes=np.array(dataset.classes))
    print(f"wrote {out}: features {arts.features.shape}, logits {arts.logits.shape}, labels {arts.labels.shape}")
    return 0


def cmd_precompute(args) -> int:
    """Warm every disk cache a class demo needs: decoded data, statistics, and per-split artifacts."""
    from cifarviz.store.artifacts import artifacts_cached, split_artifacts

    dataset = _load_data(args)
    names = args.checkpoint or [str(p) for p in shipped_files()]
    for name in names:
        checkpoint = load_named_checkpoint(name, args.arch)
        check_fits_data(checkpoint, dataset)
        for split in ("test", "val", "train") if not args.ship else ():  # --ship: only the influence indexes
            cached = artifacts_cached(checkpoint, dataset, split)
            start = time.perf_counter()
            split_artifacts(checkpoint, dataset, split, progress=not cached)
            state = "already cached" if cached else f"computed in {time.perf_counter() - start:.1f} s"
            print(f"{checkpoint.name:20} {split:5} {state}")
        from cifarviz.analysis.influence import default_method, index_ready

        for method in args.influence or [default_method(checkpoint)]:
            if method == "none":
                continue
            cached = index_ready(method, checkpoint, dataset)
            start = time.perf_counter()
            announced_index(method, checkpoint, dataset, progress=not cached)
            state = "already cached" if cached else f"built in {time.perf_counter() - start:.1f} s"
            print(f"{checkpoint.name:20} {method} influence index {state}")
            if args.ship:
                from cifarviz.analysis.influence import ship_index

                shipped = ship_index(method, checkpoint, dataset)
                print(f"{checkpoint.name:20} {method} influence index shipped as {shipped} "
                      f"({shipped.stat().st_size / 2**20:.1f} MB): commit it")
        if not args.ship:
            precompute_maps(checkpoint, dataset)
    return 0


def cmd_influence(args) -> int:
    """Top-k helpful and harmful training images for a test image (--test-index), a whole test class
    (--class), or the training images ranked by self-influence (--self)."""
    from cifarviz.analysis.influence import METHODS as INFLUENCE_METHODS
    from cifarviz.analysis.influence import (
        class_lookup,
        default_method,
        lookup,
        suspicious,
        training_losses,
    )

    modes = [bool(args.self), args.test_index is not None, args.class_name is not None]
    if sum(modes) != 1:
        raise CifarvizError("Give exactly one of --test-index I, --class NAME or --self.")
    if args.k < 1 or (args.top is not None and args.top < 1):
        raise CifarvizError("--k and --top must be at least 1.")
    checkpoint = load_named_checkpoint(args.checkpoint, args.arch)
    dataset = _load_data(args)
    check_fits_data(checkpoint, dataset)  # classes and images, once, before any work
    # The query is checked before the index is built: the ensemble's takes minutes, a typo should not.
    if args.test_index is not None and not 0 <= args.test_index < len(dataset.test):
        raise CifarvizError(f"--test-index {args.test_index} is out of range: the test split has "
                            f"{len(dataset.test):,} images (0-{len(dataset.test) - 1}).")
    if args.class_name is not None and args.class_name not in dataset.classes:
        raise CifarvizError(f"Unknown class {args.class_name!r} (--class): the classes are "
                            f"{', '.join(dataset.classes)}.")
    given = args.method
    args.method = args.method or default_method(checkpoint)  # the best measured for this checkpoint (the page's too)
    if args.self and not INFLUENCE_METHODS[args.method].has_self_influence:
        if given is not None:
            raise CifarvizError(f"The {args.method} method has no self-influence: use --method head (found flipped "
                                "labels best of the self-influence rankings measured) or trak.")
        args.method = "head"  # the default (similarity) ranks nothing by itself: the best measured self-influence
    index = announced_index(args.method, checkpoint, dataset, progress=not args.json)
    if args.self:
        order, scores = suspicious(index, args.top or 100)
        losses = training_losses(checkpoint, dataset)
        from cifarviz.store.artifacts import split_artifacts

        predicted = split_artifacts(checkpoint, dataset, "train").predicted
        rows = [{"rank": r + 1, "train_index": int(i), "source_index": int(dataset.train.source_index[i]),
                 "label": dataset.classes[dataset.train.labels[i]], "predicted": dataset.classes[predicted[i]],
                 "self_influence": float(s), "training_loss": float(losses[i])}
                for r, (i, s) in enumerate(zip(order, scores))]  # fmt: skip
        if args.json:
            print(json.dumps({"method": args.method, "checkpoint": checkpoint.name, "data_fingerprint":
                              dataset.fingerprint, "suspicious": rows}, indent=2))
            return 0
        print(f"training images of {checkpoint.name} ranked by self-influence ({args.method}); "
              "likely mislabelled or atypical first")
        print(f"{'rank':>5} {'train_index':>11} {'source_index':>12} {'label':>11} {'predicted':>11} "
              f"{'self-infl.':>10} {'loss':>7}")
        for row in rows:
            print(f"{row['rank']:5d} {row['train_index']:11d} {row['source_index']:12d} {row['label']:>11} "
                  f"{row['predicted']:>11} {row['self_influence']:10.4g} {row['training_loss']:7.3f}")
        return 0
    if args.test_index is not None:
        from cifarviz.store.artifacts import split_artifacts

        result = lookup(index, checkpoint, dataset, args.test_index, k=args.k)
        probs = split_artifacts(checkpoint, dataset, "test").probs[args.test_index]
        result.query.update(label=dataset.classes[dataset.test.labels[args.test_index]],
                            predicted=dataset.classes[int(probs.argmax())], confidence=float(probs.max()))
        about = (f"test image #{args.test_index} (true label {result.query['label']}, predicted "
                 f"{result.query['predicted']} with {result.query['confidence']:.0%} confidence)")
    else:
        result = class_lookup(index, checkpoint, dataset, args.class_name, k=args.k)
        about = f"the {result.query['test_images']:,} test images of class {args.class_name}"
    if args.json:
        print(result.to_json())
        return 0
    print(f"{args.method} influence of {checkpoint.name}'s training images on {about}")
    if result.agreement:
        share = result.agreement
        print(f"how sure: {share['helpful_share']:.0%} of the helpful and {share['harmful_share']:.0%} of the harmful "
              f"images listed are in the own top {share['top']} of at least half of the {share['models']} models")
    print("helpful: removing it would raise the test loss; harmful: removing it would lower it")
    for title, entries in (("most helpful", result.helpful), ("most harmful", result.harmful)):
        print(f"\n{title}\n{'rank':>5} {'train_index':>11} {'source_index':>12} {'label':>11} {'predicted':>11} {'score':>11}")
        for rank, e in enumerate(entries, 1):
            print(f"{rank:5d} {e.train_index:11d} {e.source_index:12d} {e.label:>11} {e.predicted:>11} {e.score:11.4g}")
    return 0


def cmd_retrain_without(args) -> int:
    """The Influence page's "Retrain without these images", in this process: one training of the checkpoint's
    recipe without a test image's top-k helpful (or harmful, or k random) training images, against the seed band."""
    import numpy as np

    from cifarviz.analysis.influence import METHODS as INFLUENCE_METHODS
    from cifarviz.analysis.influence import default_method, lookup, trained_positions
    from cifarviz.core.train import TrainConfig
    from cifarviz.services import retrain
    from cifarviz.store.artifacts import split_artifacts

    if args.k < 1:
        raise CifarvizError("--k must be at least 1.")
    checkpoint = load_named_checkpoint(args.checkpoint, args.arch)
    dataset = _load_data(args)
    check_fits_data(checkpoint, dataset)
    if not 0 <= args.test_index < len(dataset.test):
        raise CifarvizError(f"--test-index {args.test_index} is out of range: the test split has "
                            f"{len(dataset.test):,} images (0-{len(dataset.test) - 1}).")
    recipe = checkpoint.meta.get("train_config") if isinstance(checkpoint.meta, dict) else None
    if not isinstance(recipe, dict):
        raise CifarvizError(f"{inert(checkpoint.name)} records no training recipe (train_config), so it cannot be "
                            "retrained: use a shipped checkpoint or a run.")
    config = TrainConfig(**recipe)
    positions, _ = trained_positions(checkpoint, dataset)
    if args.k >= len(positions):
        raise CifarvizError(f"--k {args.k} would remove every one of the {len(positions):,} training images.")
    method = None
    predicted = None
    if args.choice == "random":
        rows = np.random.default_rng(args.test_index).choice(len(positions), args.k, replace=False)
        removed = positions[rows]
    else:
        method = args.method or default_method(checkpoint)
        index = announced_index(method, checkpoint, dataset, progress=not args.json)
        result = lookup(index, checkpoint, dataset, args.test_index, k=args.k)
        entries = getattr(result, args.choice)
        removed = np.array([e.train_index for e in entries])
        probs = split_artifacts(checkpoint, dataset, "test").probs[args.test_index]
        predicted = index.predicted_loss_change(sum(e.score for e in entries),
                                                float(probs[dataset.test.labels[args.test_index]]))
    images = len(positions) - len(removed)
    seconds, source = retrain.estimate_seconds(checkpoint, images)
    when = f"about {seconds / 60:.1f} minutes ({source})" if seconds is not None else "its recipe's training time"
    print(f"Training {inert(checkpoint.name)}'s recipe (seed {config.seed}, {config.epochs} epochs) once on "
          f"{images:,} images, without {len(removed)} {args.choice}"
          + (f" ({INFLUENCE_METHODS[method].title})" if method else "") + f": {when}.", file=sys.stderr)
    bar = None
    if not args.json:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs * -(-images // config.batch_size), desc="retraining", unit="step")

    def callback(event: dict) -> None:
        if bar is not None and event["event"] == "step":
            bar.n = event["step"]
            bar.refresh()

    report = retrain.retrain_without(checkpoint, dataset, test_index=args.test_index,
                                     removed_sources=dataset.train.source_index[removed], choice=args.choice,
                                     method=method or "random", predicted_change=predicted, config=config,
                                     callback=callback)
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    band = report["band"]
    print(f"test image #{args.test_index} ({dataset.classes[dataset.test.labels[args.test_index]]}): plain loss "
          f"{report['retrained']['loss']:.3g} retrained without them; {band['n']} seed(s) of the recipe: "
          f"{band['low']:.3g} to {band['high']:.3g} (mean {band['mean']:.3g})")
    print(report["verdict"])
    return 0


EXPORTS = ("cell", "mistakes", "suspicious", "influence", "predictions", "relabel")  # the app's selections
RANKINGS = {"training-loss": "training loss", "self-influence": "self-influence", "mean-training-loss":
            "mean training loss"}  # --ranking: cifarviz.analysis.influence.suspicious_rankings' names


def _class_number(dataset, name: str, flag: str) -> int:
    if name not in dataset.classes:
        raise CifarvizError(f"Unknown class {name!r} ({flag}): the classes are {', '.join(dataset.classes)}.")
    return dataset.classes.index(name)


def _check_export_flags(args) -> None:
    """Flags that do not belong to --what, before any checkpoint or data is read."""
    wanted = {"cell": ("true", "pred"), "influence": ("test_index",)}.get(args.what, ())
    missing = [f"--{f.replace('_', '-')}" for f in wanted if getattr(args, f) is None]
    if missing:
        raise CifarvizError(f"--what {args.what} needs {' and '.join(missing)}; e.g. "
                            + ("--true cat --pred dog." if args.what == "cell" else "--test-index 42."))
    own = {"true": ("cell", "predictions"), "pred": ("cell", "predictions"), "test_index": ("influence",),
           "method": ("suspicious", "influence"), "ranking": ("suspicious",), "outcome": ("predictions",),
           "sort": ("predictions",)}
    for flag, whats in own.items():
        if getattr(args, flag) is not None and args.what not in whats:
            raise CifarvizError(f"--{flag.replace('_', '-')} is for --what {' or '.join(whats)}, not --what "
                                f"{args.what}.")
    fixed = {"suspicious": "train", "influence": "test", "relabel": "all"}.get(args.what)  # whose images
    if fixed and args.split not in (None, fixed):
        raise CifarvizError(f"--what {args.what} selects from the {fixed} split{'s' if fixed == 'all' else ''}; "
                            "leave --split out (it is for cell, mistakes and predictions).")
    if args.top is not None and args.top < 1:
        raise CifarvizError(f"--top must be at least 1, not {args.top}.")


def cmd_export(args) -> int:
    """One of the app's selections as CSV or JSON (cifarviz.analysis.export): a confusion cell's images, the most
    confident mistakes, the suspicious training images, or a test image's helpful and harmful training images."""
    import numpy as np

    from cifarviz.analysis.explore import confusion_cell_indices, misclassified_by_confidence
    from cifarviz.analysis.export import COLUMNS, influence_rows, rows_to_csv, rows_to_json, selection_rows
    from cifarviz.store.artifacts import split_artifacts, split_tta

    _check_export_flags(args)
    out = ensure_writable(Path(args.output), "--output") if args.output else None
    checkpoint = load_named_checkpoint(args.checkpoint, args.arch)
    dataset = _load_data(args)
    check_fits_data(checkpoint, dataset)  # classes and images, once, before any work
    split = args.split or {"suspicious": "train"}.get(args.what, "test")
    rows_split = "train" if args.what == "influence" else split  # influence lists training images
    about = {"what": args.what, "checkpoint": checkpoint.name, "data_fingerprint": dataset.fingerprint,
             "split": rows_split, "tta": split_tta(checkpoint, rows_split)}
    score, score_name, effects = None, "score", None
    if args.what == "cell":
        # Both names are checked before the (possibly long) first computation of the split's outputs.
        true, pred = _class_number(dataset, args.true, "--true"), _class_number(dataset, args.pred, "--pred")
        arts = split_artifacts(checkpoint, dataset, split, progress=True)
        cell = confusion_cell_indices(arts.labels, arts.predicted, true, pred)
        indices = cell[np.argsort(-arts.probs[cell, pred], kind="stable")][:args.top]  # as the Evaluate page
        about.update(true=args.true, predicted=args.pred, images_in_cell=len(cell),
                     order="most confident in the predicted class first")
    elif args.what == "mistakes":
        arts = split_artifacts(checkpoint, dataset, split, progress=True)
        wrong = misclassified_by_confidence(arts.probs, arts.labels)
        indices = wrong[:args.top]
        about.update(mistakes=len(wrong), order="most confident first")
    elif args.what == "suspicious":
        from cifarviz.analysis.influence import (
            best_ranking,
            default_method,
            loss_ranking,
            suspicious_rankings,
        )

        top = args.top or 100
        if args.ranking == "training-loss":  # needs no influence index (lenet's default takes minutes to build)
            rankings = {RANKINGS["training-loss"]: loss_ranking(checkpoint, dataset, top)}
        else:
            about["method"] = args.method or default_method(checkpoint)  # the page's default
            index = announced_index(about["method"], checkpoint, dataset)
            rankings = suspicious_rankings(index, checkpoint, dataset, top=top)
        if args.ranking is None:
            ranking = best_ranking(checkpoint, rankings)[0]  # the page's left column
        else:  # "self-influence (head)" is the self-influence ranking of the head method
            ranking = next((n for n in rankings if n.split(" (")[0] == RANKINGS[args.ranking]), None)
            if ranking is None:
                have = ", ".join(k for k, v in RANKINGS.items() if any(n.split(" (")[0] == v for n in rankings))
                raise CifarvizError(f"--ranking {args.ranking} is not available with the {about['method']} "
                                    f"method; its rankings: {have}. Another --method may have it.")
        indices, score = rankings[ranking]
        score_name = re.sub(r"\W+", "_", ranking.split(" (")[0]).strip("_")  # "training loss" -> training_loss
        arts = split_artifacts(checkpoint, dataset, "train", progress=True)
        about.update(ranking=ranking, order="most suspicious (likely mislabelled or atypical) first")
    elif args.what in ("predictions", "relabel"):
        pass  # tables of their own (_table_export)
    else:
        from cifarviz.analysis.influence import METHODS as INFLUENCE_METHODS
        from cifarviz.analysis.influence import default_method, lookup

        # The query is checked before the index is built, as in `influence`.
        if not 0 <= args.test_index < len(dataset.test):
            raise CifarvizError(f"--test-index {args.test_index} is out of range: the test split has "
                                f"{len(dataset.test):,} images (0-{len(dataset.test) - 1}).")
        method = args.method or default_method(checkpoint)  # the page's default
        index = announced_index(method, checkpoint, dataset)
        result = lookup(index, checkpoint, dataset, args.test_index, k=args.top or 10)
        test_probs = split_artifacts(checkpoint, dataset, "test", progress=True).probs
        arts = split_artifacts(checkpoint, dataset, "train", progress=True)
        influence = influence_rows(result, dataset, arts.probs)
        effects = [row["effect"] for row in influence]
        [test_image] = selection_rows(dataset, "test", [args.test_index], test_probs)
        about.update(method=method, test_image=test_image, score=INFLUENCE_METHODS[method].score_meaning,
                     training_images=result.training_images, order="the most helpful first, then the most harmful")
    if args.what in ("predictions", "relabel"):
        rows, columns = _table_export(args, checkpoint, dataset, split, about)
    elif effects is None:
        rows = selection_rows(dataset, rows_split, indices, arts.probs, score=score, score_name=score_name)
    else:
        rows, score = influence, [row["score"] for row in influence]  # helpful, then harmful, with their effect
    if args.what not in ("predictions", "relabel"):
        columns = [*COLUMNS, *([score_name] if score is not None else []), *(["effect"] if effects is not None else [])]
    text = rows_to_json(rows, about) + "\n" if args.format == "json" else rows_to_csv(rows, columns=columns)
    if out is None:
        sys.stdout.write(text)
        return 0
    from cifarviz.core.utils import atomic_write

    with atomic_write(out, "w") as fh:  # a reader never sees half a file; a failed run keeps the old one
        fh.write(text)
    print(f"wrote {out}: {len(rows):,} images ({args.what}, {args.format})")
    return 0


def _table_export(args, checkpoint, dataset, split: str, about: dict) -> tuple[list[dict], list[str] | None]:
    """--what predictions: the Predictions page's table, filtered and sorted as there (plain loss and margin;
    calibrated when the split is test). --what relabel: every viewer's tags on this data, as the teacher's relabel
    list (the server's runs folder, CIFARVIZ_RUNS)."""
    if args.what == "relabel":
        from cifarviz.services.tags import TAGS, relabel_rows

        predicted = {}
        for part in ("train", "val", "test"):
            from cifarviz.store.artifacts import artifacts_cached, split_artifacts

            if artifacts_cached(checkpoint, dataset, part):  # a prediction where it is at hand; none computed
                predicted[part] = split_artifacts(checkpoint, dataset, part).predicted
        rows = relabel_rows(dataset, TAGS.everyone(dataset.fingerprint), predicted)
        about.update(split="all", order="most often tagged 'mislabelled?' first", tagged_images=len(rows))
        return rows, ["split", "index", "source_index", "label", "prediction", "tags", "mislabelled_votes"]
    from cifarviz.analysis.calibration import calibrate
    from cifarviz.analysis.predictions import prediction_rows, prediction_table, select
    from cifarviz.store.artifacts import split_artifacts

    names = {}
    for flag in ("true", "pred"):
        given = [n for n in (getattr(args, flag) or "").split(",") if n]
        names[flag] = [dataset.classes[_class_number(dataset, n, f"--{flag}")] for n in given]
    arts = split_artifacts(checkpoint, dataset, split, progress=True)
    temperature = None
    if split == "test":  # as the page: T fitted on the validation split
        val = split_artifacts(checkpoint, dataset, "val", progress=True)
        temperature = calibrate(val.probs, val.labels, arts.probs, arts.labels).temperature
    frame = prediction_table(arts.logits, arts.probs, arts.labels, dataset.classes, temperature)
    sort = args.sort or "loss"
    chosen = select(frame, labels=names["true"], predictions=names["pred"], outcome=args.outcome or "all",
                    sort=sort, descending=sort not in ("margin", "index"))
    rows = prediction_rows(chosen.iloc[:args.top] if args.top else chosen, dataset, split)
    about.update(true=names["true"] or "every class", predicted=names["pred"] or "every class",
                 outcome=args.outcome or "all", sort=sort, matching=len(chosen), temperature=temperature,
                 loss="plain cross-entropy of the true class", margin="logit(true) - largest other logit")
    return rows, None


def add_export_parser(sub, data_args, arch_args) -> None:
    p = sub.add_parser("export", parents=[data_args, arch_args],
                       help="an app selection as CSV or JSON: a confusion cell, mistakes, suspicious or influential "
                            "training images, the Predictions table, the relabel list of tagged images")
    p.add_argument("--checkpoint", "-c", required=True, help="checkpoint file, or a shipped name such as fastnet")
    p.add_argument("--what", required=True, choices=EXPORTS,
                   help="cell (a confusion cell's images: --true, --pred), mistakes (most confident first), "
                        "suspicious (training images, likely mislabelled first), influence (the helpful and harmful "
                        "training images of --test-index), predictions (every prediction: --true, --pred, "
                        "--outcome, --sort), relabel (every viewer's tagged images on this server)")
    p.add_argument("--true", metavar="CLASS", help="with --what cell: the true class; with predictions: classes, "
                                                   "comma-separated")
    p.add_argument("--pred", metavar="CLASS", help="with --what cell: the predicted class; with predictions: "
                                                   "classes, comma-separated")
    p.add_argument("--outcome", choices=["all", "right", "wrong"], help="with --what predictions (default all)")
    p.add_argument("--sort", choices=["loss", "confidence", "margin", "index"],
                   help="with --what predictions (default loss, highest first; margin lowest first)")
    p.add_argument("--test-index", type=int, metavar="N",
                   help="with --what influence: index of the test image (dataset.test)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="with cell or mistakes: which split (default test)")
    p.add_argument("--top", type=int, metavar="K",
                   help="at most K images (default: the whole cell or every mistake; 100 suspicious; 10 helpful "
                        "and 10 harmful)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="with suspicious or influence: influence method (default: the checkpoint's, as on the "
                        "Influence page)")
    p.add_argument("--ranking", choices=list(RANKINGS),
                   help="with suspicious: which ranking (default: the one that found flipped labels best, as on "
                        "the Influence page)")
    p.add_argument("--format", choices=["csv", "json"], default="csv", help="csv (default) or json")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE (atomically) instead of standard output")
    p.set_defaults(func=cmd_export)


def cmd_tune(args) -> int:
    import contextlib

    from tqdm.auto import tqdm

    from cifarviz.core.recipes import RECIPES
    from cifarviz.services.tune import (
        DEFAULT_MODEL,
        WRITE_WAIT_SECONDS,
        SearchSpace,
        StudySettings,
        beside,
        best_config,
        best_trial,
        check_same,
        check_trials,
        default_storage_url,
        exclusive,
        run_study,
        stored_settings,
    )

    check_trials(args.trials)
    storage = args.storage or default_storage_url()
    stored = stored_settings(storage, args.study, WRITE_WAIT_SECONDS)  # joining a study: what was not asked for is the study's own
    asked = {k: v for k, v in (("epochs_per_trial", args.epochs), ("subset", args.subset)) if v is not None}
    space = {k: getattr(args, k) for k in (*SearchSpace.RANGES, *SearchSpace.CHOICES) if getattr(args, k) is not None}
    if stored is None:
        settings = StudySettings.for_model(args.model or DEFAULT_MODEL, space=SearchSpace(**space), **asked)
    else:
        merged = {**stored.to_dict(), **asked, "space": {**stored.space.to_dict(), **space}}
        if args.model:
            merged["base_config"] = StudySettings.for_model(args.model).base_config
        settings = StudySettings.from_dict(merged)
        check_same(args.study, stored, settings)  # before any data is loaded
    lock = Path(args.lock) if args.lock else None
    holding = exclusive(lock, {"study": args.study, "storage": storage, "trials": args.trials,
                               "owner": args.owner or ""}) if lock \
        else contextlib.nullcontext()
    with holding:
        dataset = _load_data(args)
        bar = tqdm(total=args.trials, desc=f"tuning {args.study}", unit="trial")

        def on_epoch(number, event):
            bar.set_postfix(trial=number, epoch=event["epoch"], val_loss=f"{event['val_loss']:.3f}")

        def on_step(number, event):  # a long epoch (resnet18 on a CPU) still shows it is moving
            bar.set_postfix(trial=number, epoch=event["epoch"], step=f"{event['step']}/{event['total_steps']}",
                            refresh=False)
            bar.refresh()

        def on_trial(study, trial):
            bar.update(1)
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
            value = "" if trial.value is None else f" val loss {trial.value:.4f}"
            bar.write(f"trial {trial.number:3d} {trial.state.name.lower():8}{value}  {shown}")

        stop_file = beside(lock, ".stop") if lock else None
        study = run_study(storage, args.study, dataset, settings, n_trials=args.trials, seed=args.seed,
                          device=args.device, on_trial=on_trial, on_epoch=on_epoch, on_step=on_step,
                          should_stop=(lambda: stop_file.exists()) if stop_file else None)
        bar.close()
    best = best_trial(study)
    if best is None:
        print(f"study {args.study} in {storage}: no finished trial yet")
        return 0
    config = best_config(study)
    print(f"best trial {best.number}: val loss {best.value:.4f}; {len(study.trials)} trials in {args.study} ({storage})")
    start = f"--recipe {config['model']}" if config["model"] in RECIPES else f"--model {config['model']}"
    print(f"train with them: python -m cifarviz train {start} --model-args '{json.dumps(config['model_args'])}' "
          f"--lr {config['lr']:.4g} --weight-decay {config['weight_decay']:.4g} --batch-size {config['batch_size']}")
    return 0


def cmd_replicas(args) -> int:
    from cifarviz.core.settings import settings
    from cifarviz.services.work.replicas import submit_replicas

    for run_id in submit_replicas(args.recipe, args.seeds, args.data or settings().data):
        print(f"{run_id}: queued (`python -m cifarviz runs` follows it)")
    return 0


def add_tune_parser(sub, data_args) -> None:
    p = sub.add_parser("tune", parents=[data_args], help="search hyperparameters with Optuna (shared study storage)")
    p.add_argument("--storage", help="Optuna database URL (default sqlite:///$CIFARVIZ_RUNS/optuna.db, runs/ by "
                   "default); give every machine the same URL, e.g. postgresql://user:password@host/db")
    p.add_argument("--study", default="cifar10net-dropout", help="study name (default cifar10net-dropout, the "
                   "default model's name); an existing study is joined with its own settings")
    p.add_argument("--trials", type=int, default=30, help="trials this process runs (default 30, as the source)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 5, as the source)")
    p.add_argument("--subset", type=int, help="training images per trial, a fixed random subset (default: all)")
    p.add_argument("--model", help="zoo model whose recipe is the base (default cifar10net-dropout)")
    p.add_argument("--lr", nargs=2, type=float, metavar=("LOW", "HIGH"), help="learning-rate range, log scale "
                   "(default 1e-4 1e-1)")
    p.add_argument("--weight-decay", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="weight-decay range, log scale (default 5e-4 1e-1)")
    p.add_argument("--dropout", nargs=2, type=float, metavar=("LOW", "HIGH"), help="dropout range (default 0.1 0.9)")
    for name in ("batch-size", "fc1", "fc2"):
        p.add_argument(f"--{name}", nargs="+", type=int, metavar="N",
                       help=f"{name} choices (default 32 64 128 256 512)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0); give each machine its own")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps (this machine's; not stored)")
    p.add_argument("--lock", help="hold this lock file while tuning; another run with it refuses to start, and "
                   "creating LOCK.stop stops the run (the app runs one study at a time this way)")
    p.add_argument("--owner", help="who started it, recorded with --lock (the app's viewer id: only they and the "
                   "teacher may stop it from the app)")
    p.set_defaults(func=cmd_tune)


def cmd_embed(args) -> int:
    """A 2-D map (t-SNE, UMAP or PCA) of a checkpoint's penultimate features, or of raw pixels; the same cached
    map the Embeddings page shows, with its 10-NN accuracy; --out writes it as CSV."""
    from tqdm.auto import tqdm

    from cifarviz.analysis.embed import check_params, embedding, embedding_ready, knn_accuracy, subset_indices

    if (args.checkpoint is None) == (not args.pixels):
        raise CifarvizError("Give exactly one of --checkpoint NAME (its features) or --pixels (the raw-pixel "
                            "baseline).")
    given = {"perplexity": args.perplexity, "n_neighbors": args.n_neighbors, "min_dist": args.min_dist}
    params = check_params(args.method, {k: v for k, v in given.items() if v is not None})  # before any data
    out = ensure_writable(Path(args.out), "--out") if args.out else None
    checkpoint = None if args.pixels else load_named_checkpoint(args.checkpoint, args.arch)
    dataset = _load_data(args)
    if checkpoint is not None:
        check_fits_data(checkpoint, dataset)
    subset = subset_indices(len(dataset.split(args.split)), args.subset, seed=args.seed)
    cached = embedding_ready(checkpoint, dataset, args.split, args.method, params, subset, args.seed)
    with tqdm(total=100, desc=f"{args.method} map", unit="%", disable=cached or args.json) as bar:
        emb = embedding(checkpoint, dataset, args.split, args.method, params, subset, seed=args.seed,
                        on_progress=lambda fraction: bar.update(round(100 * fraction) - bar.n))
    accuracy = knn_accuracy(emb.coords, emb.labels, k=args.k)
    if out is not None:
        from cifarviz.analysis.export import rows_to_csv
        from cifarviz.core.utils import atomic_write

        rows = [{"index": int(i), "x": float(f"{x:.5g}"), "y": float(f"{y:.5g}"),
                 "label": dataset.classes[emb.labels[row]],
                 "predicted": "" if emb.predicted is None else dataset.classes[emb.predicted[row]]}
                for row, (i, (x, y)) in enumerate(zip(emb.indices, emb.coords))]
        with atomic_write(out, "w") as fh:  # one CSV writer for every export: quoted, formulas neutralised
            fh.write(rows_to_csv(rows, columns=["index", "x", "y", "label", "predicted"]))
    summary = {**emb.info, "cached": cached, "knn_k": args.k, "knn_accuracy": accuracy,
               "out": str(out) if out else None}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    state = "already cached" if cached else f"computed in {emb.info['seconds']:.1f} s"
    print(f"{emb.info['source']}: {args.method} map of {len(emb):,} {args.split} images ({params or 'no parameters'}), "
          f"{state}; {args.k}-NN accuracy in the map {accuracy:.4f}" + (f"; wrote {out}" if out else ""))
    return 0


def precompute_maps(checkpoint, dataset) -> None:
    """The Embeddings page's default map (t-SNE of the test images) for `precompute`."""
    from tqdm.auto import tqdm

    from cifarviz.analysis.embed import DEFAULT_PARAMS, embedding, embedding_ready

    cached = embedding_ready(checkpoint, dataset, "test", "tsne", DEFAULT_PARAMS["tsne"])
    with tqdm(total=100, desc=f"{checkpoint.name} t-SNE map", unit="%", disable=cached) as bar:
        emb = embedding(checkpoint, dataset, "test", "tsne", DEFAULT_PARAMS["tsne"],
                        on_progress=lambda fraction: bar.update(round(100 * fraction) - bar.n))
    print(f"{checkpoint.name:20} tsne  map of the test images " +
          ("already cached" if cached else f"computed in {emb.info['seconds']:.1f} s"))


def add_embed_parser(sub, data_args, arch_args) -> None:
    from cifarviz.analysis.embed import DEFAULT_PARAMS
    from cifarviz.analysis.embed import METHODS as MAP_METHODS

    p = sub.add_parser("embed", parents=[data_args, arch_args],
                       help="2-D map (t-SNE, UMAP, PCA) of a checkpoint's features or raw pixels, with its k-NN accuracy")
    p.add_argument("--checkpoint", "-c", help="checkpoint file, or a shipped name such as fastnet")
    p.add_argument("--pixels", action="store_true", help="map the raw pixels instead (the baseline)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split (default test)")
    p.add_argument("--method", choices=list(MAP_METHODS), default="tsne", help="tsne (openTSNE, default), umap, pca")
    p.add_argument("--perplexity", type=float, help=f"t-SNE perplexity (default {DEFAULT_PARAMS['tsne']['perplexity']:g})")
    p.add_argument("--n-neighbors", type=int, help=f"UMAP n_neighbors (default {DEFAULT_PARAMS['umap']['n_neighbors']})")
    p.add_argument("--min-dist", type=float, help=f"UMAP min_dist (default {DEFAULT_PARAMS['umap']['min_dist']})")
    p.add_argument("--subset", type=int, metavar="N", help="map N images of the split picked at random (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the map and of the subset (default 0)")
    p.add_argument("--k", type=int, default=10, help="neighbours of the k-NN accuracy in the map (default 10)")
    p.add_argument("--out", help="write the map as CSV: index,x,y,label,predicted")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_embed)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from cifarviz.core.models import list_models
    from cifarviz.core.recipes import RECIPES
    from cifarviz.core.train import OPTIMIZERS, SCHEDULES

    parser = argparse.ArgumentParser(prog="python -m cifarviz", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data_args = argparse.ArgumentParser(add_help=False)
    data_args.add_argument("--data", help="data folder (default: $CIFARVIZ_DATA, else ./data)")
    data_args.add_argument("--val-size", type=_non_negative_int, help="validation images split off the 50,000 training images (default 5000)")
    data_args.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split (default 0)")

    arch_args = argparse.ArgumentParser(add_help=False)
    arch_args.add_argument("--arch", choices=list_models(), metavar="NAME",
                           help="architecture of a .pt/.pth state dict that several zoo models fit (safetensors files name their own)")

    p = sub.add_parser("data", parents=[data_args], help="find, download or describe the dataset")
    p.add_argument("--download", action="store_true", help="download the CIFAR-10 python archive if the folder has no data")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", parents=[arch_args], help="list the model zoo, or `models summary NAME` for a layer table")
    p.add_argument("action", nargs="?", choices=["list", "summary"], default="list", help="list (default) or summary")
    p.add_argument("name", nargs="?", help="zoo model or shipped checkpoint (shipped ones use their stored arguments)")
    p.add_argument("--checkpoint", "-c", help="`summary` of a checkpoint file's architecture with its stored arguments")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", parents=[data_args], help="train a zoo model and save a checkpoint")
    p.add_argument("--model", help="zoo model name (see `models`)")
    p.add_argument("--recipe", help=f"start from a shipped recipe: {', '.join(RECIPES)}")
    p.add_argument("--model-args", help='JSON of model arguments, e.g. \'{"widths": [32, 128, 128]}\'')
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (Nesterov), adam or adamw")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="weight decay")
    p.add_argument("--label-smoothing", type=float, help="label smoothing (0 = none)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    p.add_argument("--warmup", type=float, help="fraction of steps for warm-up")
    p.add_argument("--final-lr", type=float, help="last learning rate, as a fraction of --lr")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None, help="airbench-style lookahead EMA")
    p.add_argument("--translate", type=int, help="augmentation: random translation in pixels (reflect padding)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="augmentation: random horizontal flip")
    p.add_argument("--rotate", type=float, help="augmentation: random rotation range in degrees")
    p.add_argument("--color-jitter", type=float, help="augmentation: brightness/contrast/saturation jitter strength")
    p.add_argument("--tta", choices=["none", "flip"], help="test-time augmentation for reported accuracy")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto (default: CUDA if present), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="checkpoint path (default runs/MODEL-TIME.safetensors)")
    p.add_argument("--queue", action="store_true", help="submit it to the queue of long work (a worker trains it, "
                                                        "here or on a machine that joined the queue) and return")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("evaluate", cmd_evaluate, "accuracy, per-class precision/recall/F1, confusion matrix"),
                                 ("export-features", cmd_export_features, "penultimate features, logits and labels to .npz")):
        p = sub.add_parser(name, parents=[data_args, arch_args], help=helptext)
        p.add_argument("--checkpoint", "-c", required=True, help="checkpoint file, or a shipped name such as fastnet")
        p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split (default test)")
        if name == "evaluate":
            p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        else:
            p.add_argument("--out", help="output .npz (default CHECKPOINT-SPLIT-features.npz)")
        p.set_defaults(func=func)
    p = sub.add_parser("influence", parents=[data_args, arch_args],
                       help="training images that helped and hurt a test image, a class, or self-influence")
    p.add_argument("--checkpoint", "-c", required=True, help="checkpoint file, or a shipped name such as fastnet")
    p.add_argument("--test-index", type=int, help="index of the test image (dataset.test)")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="a whole test class instead of one image")
    p.add_argument("--self", action="store_true", help="rank the training images by self-influence (suspicious first)")
    p.add_argument("--k", type=int, default=10, help="how many helpful and harmful images (default 10; up to all)")
    p.add_argument("--top", type=int, help="with --self: how many to list (default 100)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="influence method (default: the best measured by retraining for the checkpoint, as on the "
                        "Influence page: trak-ensemble for lenet, similarity where no influence estimate reached it)")
    p.add_argument_group("lists").description = (
        "An index keeps what a lookup needs: the ensemble keeps each test image's top 100 helpful and harmful "
        "images (--k up to 100); the other methods rank every training image (--k up to all).")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_influence)
    p = sub.add_parser("retrain-without", parents=[data_args, arch_args],
                       help="retrain a checkpoint's recipe without a test image's top helpful (or harmful, or random) "
                            "training images, and judge its loss against the recipe's seeds (JSON with --json)")
    p.add_argument("--checkpoint", "-c", required=True, help="checkpoint file, or a shipped name such as lenet")
    p.add_argument("--test-index", type=int, required=True, help="index of the test image (dataset.test)")
    p.add_argument("--choice", choices=["helpful", "harmful", "random"], default="helpful",
                   help="which images to remove (default helpful)")
    p.add_argument("--k", type=int, default=100, help="how many to remove (default 100, as the page)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="influence method that picks them (default: the checkpoint's, as on the Influence page)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress on stderr)")
    p.set_defaults(func=cmd_retrain_without)
    add_export_parser(sub, data_args, arch_args)  # beside influence: it writes the same lists
    p = sub.add_parser("precompute", parents=[data_args, arch_args], help="warm the caches the app uses (run before a class)")
    p.add_argument("--checkpoint", "-c", action="append", help="checkpoint file or shipped name; repeatable (default: all shipped)")
    p.add_argument("--influence", action="append", choices=[*METHODS, "none"],
                   help="influence indexes to build; repeatable (default: the checkpoint's default method; none to skip)")
    p.add_argument("--ship", action="store_true",
                   help="for maintainers: build only the influence indexes and copy each into checkpoints/store/, so that "
                        "a fresh clone on the same data reads it instead of building it (commit the file)")
    p.set_defaults(func=cmd_precompute)
    p = sub.add_parser("runs", help="training runs started on the Train page: list them, stop or cancel one")
    p.add_argument("action", nargs="?", choices=["list", "stop", "cancel"], default="list",
                   help="list (default); stop RUN_ID (keeps its last finished epoch); cancel RUN_ID (a queued run)")
    p.add_argument("run_id", nargs="?", help="a run's id, as `runs` lists it")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=lambda args: __import__("cifarviz.services.runs", fromlist=["cli"]).cli(args))
    p = sub.add_parser("worker", help="take long work (training, proofs, studies, replicas) from the queue: "
                                      "another machine joins a lecture hall's queue with --broker")
    p.add_argument("--broker", help="the queue's Redis URL, e.g. redis://server:6379/0 (default: CIFARVIZ_BROKER, "
                                    "else the SQLite file beside the runs: this machine only)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="take the jobs that want a GPU first (default: when CUDA is available)")
    gpu.add_argument("--cpu", dest="gpu", action="store_false", help="never take the GPU queue first")
    p.add_argument("--work", help="this worker's working folder (default: RUNS/.work/NAME)")
    p.add_argument("--name", help="how pages name this worker (default: HOST-PID)")
    p.add_argument("--gpu-grace", type=float, default=60.0, metavar="SECONDS",
                   help="a CPU worker takes the GPU queue's jobs once no GPU worker has been seen for this long "
                        "(default 60)")
    p.add_argument("--idle-exit", type=float, default=None, help=argparse.SUPPRESS)  # the app's own workers
    p.add_argument("--nice", type=int, default=0, help="lower this worker's CPU priority by N (0-19)")
    p.set_defaults(func=lambda args: __import__("cifarviz.services.work.command", fromlist=["main"]).main(args))
    p = sub.add_parser("replicas", parents=[data_args], help="queue replicas of a recipe (other seeds) for ensembles")
    p.add_argument("--recipe", required=True, help="a recipe name, as `models` lists them")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="one seed per replica, e.g. 1 2 3 4")
    p.set_defaults(func=cmd_replicas)
    p = sub.add_parser("serve", help="a lecture hall: several Streamlit processes behind one nginx address, sticky "
                                     "by cookie (needs Debian's nginx)")
    p.add_argument("--processes", type=int, default=2, help="Streamlit server processes (default 2; about one per "
                                                              "30-40 viewers and core)")
    p.add_argument("--port", type=int, default=8501, help="the address's port (default 8501)")
    p.add_argument("--address", default="127.0.0.1", help="where nginx listens (default 127.0.0.1; 0.0.0.0 for "
                                                          "the classroom's network)")
    p.add_argument("--streamlit-option", action="append", default=[], metavar="KEY=VALUE",
                   help="more Streamlit config for every process, e.g. runner.postScriptGC=true")
    p.set_defaults(func=lambda args: __import__("cifarviz.services.serve", fromlist=["cli"]).cli(args))
    add_tune_parser(sub, data_args)
    add_embed_parser(sub, data_args, arch_args)
    parser.description = describe(sub)
    return parser


def describe(sub) -> str:
    """--help's description, the commands named from the registered subparsers (so the list cannot go stale)."""
    first, flags = __doc__.split("\n\n", 1)

    def fill(text: str) -> str:  # whole names on a line: "export-features", not "export-" then "features"
        return textwrap.fill(text, width=100, break_on_hyphens=False)

    return f"{first}\n\n{fill('Commands: ' + ', '.join(sub.choices) + '.')}\n\n{fill(flags)}"


def main(argv=None) -> int:
    streams = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, InertStream):
        sys.stdout, sys.stderr = InertStream(sys.stdout), InertStream(sys.stderr)
    try:
        return _main(argv)
    except BrokenPipeError:  # `... | head` closed the pipe: stop quietly, as other command-line tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), streams[0].fileno())
        return 141
    finally:
        sys.stdout, sys.stderr = streams  # a caller in the same process (a test, a script) gets its own back


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line usage error (status 2) or the help (0)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except CifarvizError as exc:
        print(f"error: {bounded(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):  # the disk refused a write
            where = f" ({bounded(str(exc.filename), 300)})" if exc.filename else ""
            print(f"error: could not write{where}: {exc.strerror or exc}. Nothing half-written was left there; free "
                  "space or choose another place (--out, CIFARVIZ_CACHE, CIFARVIZ_RUNS) and run it again.",
                  file=sys.stderr)
            return 2
        if exc.filename is None:
            raise
        # a path the system refuses (too long, no permission, a file where a folder should be): path and reason
        print(f"error: {exc.strerror or exc}: {bounded(str(exc.filename), 300)}. Check the path and its "
              "permissions and run it again.", file=sys.stderr)
        return 2
