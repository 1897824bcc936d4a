"""Broken and hostile checkpoint files: each gives one clear CheckpointError naming the file, never a crash.

CASES is the table: a case id, how to build the bad file, and the words its message must contain. Every row runs
through every entry point in LOADERS (the library and the CLI); the app's uploads are tested on the Models page
in tests/test_app.py.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from cifarviz.core.checkpoint import METADATA_KEY, load_checkpoint, save_checkpoint
from cifarviz.core.errors import CheckpointError
from cifarviz.core.models import create_model, list_models, model_card

REPO = Path(__file__).resolve().parent.parent


def _model(arch: str = "lenet", **kwargs):
    torch.manual_seed(0)
    return create_model(arch, **kwargs)


def safetensors_file(arch="lenet", *, args=None, meta=None, edit=None):
    """A real `arch` model (built with `args`) as bad.safetensors, its metadata updated with `meta`, its tensors
    changed in place by `edit`: metadata and tensors are written directly, as a hostile file would be."""

    def make(folder: Path) -> Path:
        model = _model(arch, **(args or {}))
        state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        if edit:
            edit(state)
        header = {"name": "bad", "architecture": arch, "arch_args": json.loads(json.dumps(model.arch_args))}
        text = meta if isinstance(meta, str) else json.dumps({**header, **(meta or {})})
        path = folder / "bad.safetensors"
        path.write_bytes(st_save(state, metadata={METADATA_KEY: text}))
        return path

    return make


def torch_file(obj: Callable[[], object], name="bad.pt", **save_kwargs):
    """torch.save(obj(), name)."""

    def make(folder: Path) -> Path:
        path = folder / name
        torch.save(obj(), path, **save_kwargs)
        return path

    return make


def raw_file(data: bytes, name="bad.pt"):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def deflated_torch_file(folder: Path) -> Path:
    """A real state dict re-zipped with deflate: torch reads it, and a 200 KB file can inflate to 200 MB."""
    plain = io.BytesIO()
    torch.save(_model().state_dict(), plain)
    path = folder / "bad.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name in source.namelist():
            out.writestr(name, source.read(name))
    return path


class RunsCode:
    """Pickles as a call to exec: loading it with plain pickle would run the code."""

    def __reduce__(self):
        return exec, ("raise SystemExit('code from a checkpoint ran')",)


def _set(key, index, value):
    def edit(state):
        state[key].view(-1)[index] = value

    return edit


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], Path]  # writes the bad file into a temporary folder and returns its path
    words: tuple[str, ...]  # each must appear in the message


CASES = [
    # metadata nested or sized to break a recursive reader: refused with what was wrong, never RecursionError
    Case("nested-100000", safetensors_file(meta='{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"),
         ("nested deeper than", "not valid JSON metadata")),
    Case("nested-in-history", safetensors_file(meta='{"name": "x", "history": ' + "[" * 40 + "]" * 40 + "}"),
         ("nested deeper than",)),
    Case("metadata-17MB", safetensors_file(meta=json.dumps({"name": "x" * (17 * 2**20)})), ("bytes of JSON",)),
    # metadata asks for a model far bigger than the file (the 4.4 MB file that allocated 2.1 GB), or slow to build
    Case("widths-3000", safetensors_file("fastnet", meta={"arch_args": {"widths": [3000, 3000, 3000]}}),
         ("widths", "out of range", "[1, 1024]")),
    Case("blocks-20000", safetensors_file("deepnet-res", meta={"arch_args": {"blocks": 20000}}),
         ("blocks", "[1, 64]")),
    Case("input-size-600", safetensors_file("resnet18-transfer", args={"pretrained": False},
                                            meta={"arch_args": {"input_size": 600}}), ("input_size", "[32, 256]")),
    Case("too-many-parameters", safetensors_file("deepnet-conv", meta={"arch_args": {"hidden": 1024, "blocks": 64}}),
         ("parameters", "50,000,000")),
    Case("in-range-widths-not-the-files", safetensors_file("fastnet", meta={"arch_args": {"widths": [1024] * 3}}),
         ("does not fit architecture 'fastnet'", "other shapes")),
    Case("dropout-nan", safetensors_file("s8net-bn", meta={"arch_args": {"dropout": math.nan}}), ("dropout", "[0, 1)")),
    Case("dropout-one", safetensors_file("cifar10net", meta={"arch_args": {"dropout": 1.0}}), ("dropout", "[0, 1)")),
    Case("blocks-float", safetensors_file("deepnet-skip", meta={"arch_args": {"blocks": 2.5}}), ("blocks", "int")),
    Case("blocks-bool", safetensors_file("deepnet-skip", meta={"arch_args": {"blocks": True}}), ("blocks", "int")),
    Case("widths-string", safetensors_file("fastnet", meta={"arch_args": {"widths": "wide"}}),
         ("widths", "list of 3")),
    Case("pretrained-string", safetensors_file("resnet18-transfer", args={"pretrained": False},
                                               meta={"arch_args": {"pretrained": "no"}}), ("pretrained", "bool")),
    Case("groups-not-dividing", safetensors_file("s8net-gn", meta={"arch_args": {"groups": 3}}), ("num_groups",)),
    # metadata of the wrong type
    Case("architecture-list", safetensors_file(meta={"architecture": ["lenet"]}), ("'architecture'", "str", "list")),
    Case("architecture-unknown", safetensors_file(meta={"architecture": "vgg99"}), ("vgg99", "Available", "lenet")),
    Case("arch-args-list", safetensors_file(meta={"arch_args": [10]}), ("'arch_args'", "dict", "list")),
    Case("train-config-string", safetensors_file(meta={"train_config": "fast"}), ("'train_config'", "dict", "str")),
    Case("tta-bogus", safetensors_file(meta={"train_config": {"tta": "bogus"}}), ("tta", "bogus", "none, flip")),
    Case("metrics-list", safetensors_file(meta={"metrics": [0.9]}), ("'metrics'", "dict")),
    Case("accuracy-string", safetensors_file(meta={"metrics": {"test_accuracy": "97%"}}), ("test_accuracy", "97%")),
    Case("history-of-numbers", safetensors_file(meta={"history": [1, 2]}), ("history",)),
    Case("metadata-list", safetensors_file(meta="[1, 2]"), ("metadata is a JSON list",)),
    Case("metadata-not-json", safetensors_file(meta="{architecture: lenet"), ("not valid JSON",)),
    # tensors
    Case("input-std-zero", safetensors_file(edit=_set("input_std", 1, 0.0)), ("input_std", "(0, 1]")),
    Case("input-std-negative", safetensors_file(edit=_set("input_std", 0, -0.2)), ("input_std", "(0, 1]")),
    Case("input-std-infinite", safetensors_file(edit=_set("input_std", 2, math.inf)), ("input_std", "infinite")),
    Case("input-mean-out-of-range", safetensors_file(edit=_set("input_mean", 0, 3.0)), ("input_mean", "[0, 1]")),
    Case("weights-nan", safetensors_file(edit=_set("head.weight", 5, math.nan)), ("head.weight", "NaN")),
    Case("integer-weights", safetensors_file(edit=lambda s: s.update({"head.weight": s["head.weight"].int()})),
         ("head.weight", "int32", "float32")),
    # .pt / .pth files
    Case("pt-empty", raw_file(b""), ("empty", "0 bytes")),
    Case("pt-random-bytes", raw_file(np.random.default_rng(0).bytes(4096)), ("not a PyTorch checkpoint",)),
    Case("pt-legacy-format", torch_file(lambda: _model().state_dict(), _use_new_zipfile_serialization=False),
         ("legacy",)),
    Case("pt-deflated", deflated_torch_file, ("compressed",)),
    Case("pt-integer-keys", torch_file(lambda: {0: torch.zeros(3)}), ("key 0", "int", "parameter names")),
    Case("pt-sparse", torch_file(lambda: {"head.weight": torch.eye(10, 84).to_sparse()}), ("sparse", "to_dense")),
    Case("pt-needs-code", torch_file(lambda: {"state_dict": _model().state_dict(), "args": argparse.Namespace(lr=1)}),
         ("needs Python code", "argparse.Namespace", "model.state_dict()")),
    Case("pt-runs-code", torch_file(lambda: {"head.weight": RunsCode()}), ("needs Python code", "(exec)")),
    Case("pt-list", torch_file(lambda: [torch.zeros(3)]), ("holds a list",)),
    Case("pt-empty-dict", torch_file(dict), ("empty dict",)),
    Case("pt-training-state", torch_file(lambda: {**_model().state_dict(), "epoch": 3}), ("'epoch'", "int")),
    # state dicts whose shapes fit several architectures
    Case("pth-deepnet-res", torch_file(lambda: _model("deepnet-res").state_dict(), "bad.pth"),
         ("deepnet-conv, deepnet-res", "architecture=", "--arch")),
    Case("pth-s8net-ln", torch_file(lambda: _model("s8net-ln").state_dict(), "bad.pth"), ("s8net-gn, s8net-ln",)),
    Case("pth-cifar10net-dropout", torch_file(lambda: _model("cifar10net-dropout").state_dict(), "bad.pth"),
         ("cifar10net, cifar10net-dropout",)),
]  # fmt: skip


def _via_library(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


def _via_cli(path: Path) -> str:
    """`python -m cifarviz evaluate -c FILE`: one `error:` line on stderr and exit status 2 (the data folder does
    not exist: the checkpoint must be refused before any data is looked for)."""
    import contextlib

    from cifarviz.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["evaluate", "-c", str(path), "--data", str(path.parent / "no-data-here")])
    lines = err.getvalue().strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    return lines[0]


LOADERS: dict[str, Callable[[Path], str]] = {"library": _via_library, "cli": _via_cli}  # each returns the message


@pytest.mark.parametrize("via", ["library", "cli"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_checkpoint_gives_one_clear_message(case, via, tmp_path):
    path = case.make(tmp_path)
    message = LOADERS[via](path)
    assert path.name in message, message
    for word in case.words:
        assert word in message, f"{word!r} not in: {message}"
    assert "weights_only=False" not in message and "Traceback" not in message


def test_every_numeric_model_argument_is_bounded():
    for name in list_models():
        card = model_card(name)
        for key, default in card.defaults().items():
            if isinstance(default, bool) or not isinstance(default, (int, float, tuple, list)):
                continue
            assert key in card.bounds, f"{name}: add bounds for argument {key!r} to its card"
            assert all(v in card.bounds[key] for v in (default if isinstance(default, (tuple, list)) else [default]))


@pytest.mark.slow
def test_arguments_that_do_not_fit_the_file_allocate_nothing(tmp_path):
    """fastnet at widths 1024 has ~48 M parameters (190 MB): a 2 MB file claiming it is refused before allocation."""
    claim = safetensors_file("fastnet", meta={"arch_args": {"widths": [1024] * 3}})(tmp_path)
    honest = save_checkpoint(tmp_path / "honest", _model("fastnet"))
    script = (  # VmHWM: this process's peak memory (ru_maxrss would include the forking parent's)
        "import re, sys\n"
        "from cifarviz.core.checkpoint import load_checkpoint\n"
        "from cifarviz.core.errors import CheckpointError\n"
        "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "load_checkpoint(sys.argv[2])  # warm up: imports, allocator, meta kernels\n"
        "before = peak()\n"
        "try:\n"
        "    load_checkpoint(sys.argv[1])\n"
        "except CheckpointError:\n"
        "    print(peak() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(claim), str(honest)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert int(done.stdout) < 60, f"peak memory grew by {done.stdout.strip()} MB"
