"""One card per model: bounds on every path that builds from metadata, recipes with every constant, provenance in
every checkpoint, and a clear message wherever a checkpoint does not fit the data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import write_image_folder

from cifarviz.cli import main
from cifarviz.core.checkpoint import SHIPPED_DIR, check_fits_data, load_checkpoint, read_metadata, save_checkpoint
from cifarviz.core.errors import CheckpointError, ModelError
from cifarviz.core.models import (
    CIFAR10_CLASSES,
    count_parameters,
    create_model,
    list_models,
    model_card,
    model_cards,
    register_model,
)
from cifarviz.core.recipes import RECIPES, train_and_save
from cifarviz.core.settings import SettingsError, settings
from cifarviz.core.train import TrainConfig, lr_factor
from cifarviz.store.datasets import load_cifar10


def test_every_card_bounds_every_numeric_argument_and_names_its_weights():
    for card in model_cards():
        for name, default in card.defaults().items():
            numeric = isinstance(default, (int, float, tuple, list)) and not isinstance(default, bool)
            assert not numeric or name in card.bounds, f"{card.name}.{name} has no bounds"
        assert card.classes == CIFAR10_CLASSES and len(card.mean) == len(card.std) == 3
        if card.weights is not None:
            meta = read_metadata(SHIPPED_DIR / card.weights)
            assert meta["architecture"] == card.name
            assert card.recipe is not None  # a shipped checkpoint says how it was trained
    shipped = {p.name for p in SHIPPED_DIR.glob("*.safetensors")}
    assert shipped == {card.weights for card in model_cards() if card.weights}  # no file found by its stem alone


def test_registering_a_numeric_argument_without_bounds_is_refused():
    with pytest.raises(ValueError, match="width need bounds"):
        @register_model("unbounded-test-net", source="test", description="test")
        def unbounded(width: int = 8, num_classes: int = 10):
            raise AssertionError
    assert "unbounded-test-net" not in list_models()


def test_the_recipe_is_the_card_and_reproduces_the_shipped_configs():
    """The recipes that trained the shipped files, now read from the cards, are the configs those files store."""
    for name, config in RECIPES.items():
        stored = read_metadata(SHIPPED_DIR / model_card(name).weights)["train_config"]
        ours = config.to_dict()
        for key, value in stored.items():
            if key == "weight_decay" and stored.get("weight_decay_mode", "coefficient") != ours["weight_decay_mode"]:
                continue  # fastnet's file wrote the same decay in coefficient mode (see the card)
            if key in ("device", "weight_decay_mode"):
                continue
            assert json.loads(json.dumps(ours[key])) == value, f"{name}.{key}"


def test_fastnets_constants_are_arguments_of_its_card():
    model = create_model("fastnet", widths=[8, 16, 16], bias_lr_scale=8.0, whiten_images=100)
    (biases, scale), (_, rest) = model.param_groups()
    assert scale == 8.0 and rest == 1.0 and model.prepare_images == 100
    assert create_model("fastnet").param_groups()[0][1] == 64.0  # airbench's 64x bias learning rate by default
    default = TrainConfig()
    assert lr_factor(default, 0, 100) == pytest.approx(default.warmup_start)
    assert lr_factor(dataclasses.replace(default, warmup_start=0.5), 0, 100) == pytest.approx(0.5)


def test_a_summary_of_untrusted_metadata_applies_the_bounds(tmp_path, capsys):
    """`models summary -c FILE` used to build `blocks: 20000` (94 s, 1.4 GB) or print 8.5 billion parameters."""
    model = create_model("deepnet-res")
    path = save_checkpoint(tmp_path / "hostile.safetensors", model)
    for args, message in (({"blocks": 20000}, "blocks"), ({"num_classes": 10**8}, "num_classes")):
        meta = read_metadata(path)
        meta["arch_args"] = {**meta["arch_args"], **args}
        hostile = tmp_path / f"hostile-{next(iter(args))}.safetensors"
        save_checkpoint(hostile, model, meta)
        assert main(["models", "summary", "-c", str(hostile)]) == 2
        err = capsys.readouterr().err
        assert message in err and "out of range" in err and "Traceback" not in err


@pytest.fixture
def two_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    return write_image_folder(tmp_path / "two", classes=("cat", "dog"), per_class=(12, 6))


def test_a_ten_class_checkpoint_on_two_class_data_gets_a_clear_message(two_classes, capsys):
    dataset = load_cifar10(two_classes, download=False, progress=False)
    lenet = load_checkpoint(SHIPPED_DIR / "lenet.safetensors")
    with pytest.raises(CheckpointError, match="predicts 10 classes, but the data .* has 2"):
        check_fits_data(lenet, dataset)
    for command in (["evaluate", "-c", "lenet"], ["influence", "-c", "lenet", "--test-index", "0"],
                    ["export-features", "-c", "lenet", "--out", str(two_classes / "f.npz")],
                    ["embed", "-c", "lenet", "--method", "pca"], ["precompute", "-c", "lenet"]):
        assert main([*command, "--data", str(two_classes)]) == 2, command
        err = capsys.readouterr().err
        assert "predicts 10 classes" in err and "IndexError" not in err and "accuracy 0.0000" not in err


def test_a_checkpoint_trained_on_other_class_names_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "three")  # cat, dog, frog
    dataset = load_cifar10(root, download=False, progress=False, val_size=3)
    model = create_model("lenet", num_classes=3)
    path = save_checkpoint(tmp_path / "other.safetensors", model, {"classes": ["apple", "pear", "plum"]})
    with pytest.raises(CheckpointError, match="apple, pear, plum"):
        check_fits_data(load_checkpoint(path), dataset)
    check_fits_data(load_checkpoint(save_checkpoint(tmp_path / "same.safetensors", model,
                                                    {"classes": ["cat", "dog", "frog"]})), dataset)


@pytest.mark.slow
def test_a_checkpoint_records_its_provenance_and_the_cli_finds_a_run_by_its_id(cifar_small, tmp_path, monkeypatch,
                                                                               capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("CIFARVIZ_RUNS", str(runs))
    config = TrainConfig(model="lenet", epochs=1, batch_size=256, seed=3)
    path, _ = train_and_save(config, cifar_small, runs / "lenet-20261201-120000-abcd" / "model.safetensors")
    provenance = read_metadata(path)["provenance"]
    assert provenance["architecture"] == "lenet" and provenance["classes"] == list(cifar_small.classes)
    assert provenance["data_fingerprint"] == cifar_small.fingerprint
    assert provenance["split_seed"] == cifar_small.split_seed and provenance["val_size"] == len(cifar_small.val)
    images = provenance["train_images"]
    assert images["count"] == len(cifar_small.train) == 2000
    np.testing.assert_array_equal(images["indices"], cifar_small.train.source_index)  # exactly the images it saw
    assert TrainConfig(**provenance["recipe"]) == config
    # the CLI names the run as the app lists it
    assert main(["evaluate", "-c", "lenet-20261201-120000-abcd", "--split", "val", "--json",
                 "--data", str(cifar_small.root)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main(["evaluate", "-c", "no-such-run", "--data", str(cifar_small.root)]) == 2
    assert "runs" in capsys.readouterr().err


def test_settings_are_read_in_one_place_and_a_bad_value_names_its_variable(monkeypatch):
    monkeypatch.setenv("CIFARVIZ_CACHE_MAX_GB", "0.5")
    assert settings().cache_max_bytes == 2**29
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "many")
    with pytest.raises(SettingsError, match="CIFARVIZ_MAX_RUNS='many'"):
        settings()
    monkeypatch.setenv("CIFARVIZ_MAX_RUNS", "2")
    monkeypatch.setenv("CIFARVIZ_CLASSROOM", "maybe")
    with pytest.raises(SettingsError, match="CIFARVIZ_CLASSROOM"):
        settings()
    monkeypatch.delenv("CIFARVIZ_CLASSROOM")
    # every number is bounded above too: refused with its range, never overflowed (1e308 GB) or obeyed
    for name, value in (("CACHE_MAX_GB", "1e308"), ("CACHE_MAX_GB", "nan"), ("CACHE_MAX_GB", "inf"),
                        ("TRAIN_THREADS", "100000"), ("JOB_WORKERS", "5000"), ("MAX_RUNS", "9" * 400),
                        ("HOVER_THUMBNAILS", "10000000"), ("MAX_QUEUED", "-1")):
        monkeypatch.setenv(f"CIFARVIZ_{name}", value)
        with pytest.raises(SettingsError, match=f"CIFARVIZ_{name}=.*from .* to "):
            settings()
        monkeypatch.delenv(f"CIFARVIZ_{name}")
    assert settings().max_runs == 1  # each refused value gone: the defaults parse again


def test_a_parameter_count_is_never_built_from_unchecked_arguments():
    with pytest.raises(ModelError, match="out of range"):
        from cifarviz.core.models import validate_arch_args

        validate_arch_args("fastnet", {"widths": [48, 192, 10**6]})
    assert count_parameters(create_model("fastnet", widths=[48, 192, 192])) == 1_113_336


def test_training_arguments_are_bounded_too():
    """A run's config.json (or --model-args) is metadata as well: 20,000 blocks are refused before any work."""
    with pytest.raises(ModelError, match="blocks"):
        TrainConfig(model="deepnet-res", model_args={"blocks": 20000})
    assert main(["train", "--model", "deepnet-res", "--model-args", '{"blocks": 20000}', "--epochs", "1"]) == 2
