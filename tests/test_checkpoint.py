import json

import pytest
import torch

from cifarviz.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from cifarviz.errors import CheckpointError
from cifarviz.models import create_model
from cifarviz.utils import atomic_write


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
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
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
