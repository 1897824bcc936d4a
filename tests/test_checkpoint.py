import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint, read_metadata, save_checkpoint
from cifarviz.core.errors import AmbiguousArchitectureError, CheckpointError
from cifarviz.core.models import create_model
from cifarviz.core.utils import atomic_write


def _model(name="lenet", **kwargs):
    torch.manual_seed(0)
    return create_model(name, **kwargs).eval()


def test_round_trip_is_exact_and_self_describing(tmp_path):
    model = _model("s8net-gn")
    model.set_normalization((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    path = save_checkpoint(tmp_path / "run", model, {"metrics": {"test_accuracy": 0.5}})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded = load_checkpoint(path)
    assert loaded.meta["architecture"] == "s8net-gn" and loaded.test_accuracy == 0.5
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded.model(x), model(x))
    assert json.loads(path.with_suffix(".json").read_text())["parameters"] == 37664
    assert read_metadata(path)["architecture"] == "s8net-gn"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = save_checkpoint(tmp_path / "keep", _model())
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_write(path) as fh:
        fh.write(b"half a checkpoint")
        raise RuntimeError("simulated crash mid-write")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "keep.safetensors"]  # no temp files left


def test_malicious_pickle_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_garbage_and_truncated_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good", _model())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_checkpoint(tmp_path / "notes.txt", data=b"hello")


def test_state_dict_upload_finds_its_architecture(tmp_path):
    model = _model("deepnet-skip")
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.model.arch_name == "deepnet-skip"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model(x))
    # bytes, as the app receives an upload, with a wrapping {"state_dict": ...} and DataParallel prefixes
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    assert load_checkpoint("upload.pt", data=wrapped.read_bytes()).model.arch_name == "deepnet-skip"


def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "lenet.pth"
    torch.save(_model("lenet").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit architecture 's8net-bn'"):
        load_checkpoint(path, architecture="s8net-bn")
    unknown = tmp_path / "unknown.pth"
    torch.save({"w": torch.zeros(3)}, unknown)
    with pytest.raises(CheckpointError, match="match no zoo architecture"):
        load_checkpoint(unknown)


def test_shape_mismatch_is_explained(tmp_path):
    narrow = save_checkpoint(tmp_path / "narrow", _model("fastnet", widths=(16, 32, 32)))
    with pytest.raises(CheckpointError, match="other shapes"):
        load_checkpoint(narrow, arch_args={"widths": [32, 64, 64]})
    assert load_checkpoint(narrow).model.arch_args["widths"] == [16, 32, 32]


def test_non_finite_weights_are_refused(tmp_path):
    state = _model().state_dict()
    state["head.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


@pytest.mark.parametrize("pair", [("deepnet-conv", "deepnet-res"), ("s8net-gn", "s8net-ln"),
                                  ("cifar10net", "cifar10net-dropout")])  # fmt: skip
def test_state_dict_that_fits_several_architectures_is_not_guessed(tmp_path, pair):
    model = _model(pair[1])
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(AmbiguousArchitectureError) as info:
        load_checkpoint(path)
    assert info.value.candidates == list(pair) and isinstance(info.value, CheckpointError)
    assert all(name in str(info.value) for name in pair) and "architecture=" in str(info.value)
    chosen = load_checkpoint(path, architecture=pair[1]).model
    x = torch.rand(2, 3, 32, 32)
    assert chosen.arch_name == pair[1] and torch.equal(chosen(x), model(x))


def test_metadata_of_the_wrong_type_is_refused_by_read_metadata_too(tmp_path):
    path = save_checkpoint(tmp_path / "run", _model(), {"train_config": "fast"})
    with pytest.raises(CheckpointError, match="'train_config' must be a dict"):
        read_metadata(path)


def test_stale_sidecar_is_rewritten_from_the_header(tmp_path):
    path = save_checkpoint(tmp_path / "run", _model(), {"notes": "first"})
    sidecar = path.with_suffix(".json")
    first_sidecar = sidecar.read_text()
    save_checkpoint(path, _model("lenet"), {"notes": "second"})
    header_id = read_metadata(path)["save_id"]
    assert header_id != json.loads(first_sidecar)["save_id"]

    sidecar.write_text(first_sidecar)  # what a save killed between the weights and the sidecar leaves
    assert read_metadata(path)["notes"] == "second"
    assert json.loads(sidecar.read_text())["save_id"] == header_id
    sidecar.write_text(first_sidecar)
    assert load_checkpoint(path).meta["notes"] == "second"
    assert json.loads(sidecar.read_text())["notes"] == "second"
    sidecar.unlink()  # killed during its very first save
    read_metadata(path)
    assert json.loads(sidecar.read_text())["save_id"] == header_id

    sidecar.unlink()
    sidecar.mkdir()  # a sidecar that cannot be written is left alone, without an error
    assert read_metadata(path)["notes"] == "second" and sidecar.is_dir()

    shipped = tmp_path / "lenet.safetensors"  # files from before save_id have no sidecar contract: untouched
    shutil.copy(SHIPPED_DIR / "lenet.safetensors", shipped)
    shipped.with_suffix(".json").write_text("{}")
    read_metadata(shipped)
    assert shipped.with_suffix(".json").read_text() == "{}"


@pytest.mark.slow
def test_temporaries_of_killed_writers_are_removed_after_an_hour(tmp_path):
    target = tmp_path / "run.safetensors"
    writer = ("import sys, time\nfrom cifarviz.core.utils import atomic_write\nwith atomic_write(sys.argv[1]) as fh:\n"
              "    fh.write(b'half a checkpoint'); fh.flush(); print('writing', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (killed,) = tmp_path.glob(".run.safetensors.*.tmp")
    assert killed.read_bytes() == b"half a checkpoint" and not target.exists()
    live = tmp_path / ".run.safetensors.abcd1234.tmp"  # a writer still at work: recent, must survive
    other = tmp_path / ".other.safetensors.abcd1234.tmp"  # another target's: not ours to remove
    live.write_bytes(b"in progress")
    other.write_bytes(b"old")
    two_hours_ago = killed.stat().st_mtime - 7200
    for path in (killed, other):
        os.utime(path, (two_hours_ago, two_hours_ago))

    save_checkpoint(target, _model())
    assert not killed.exists() and live.exists() and other.exists()
    assert load_checkpoint(target).model.arch_name == "lenet"
