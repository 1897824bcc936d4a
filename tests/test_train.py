import numpy as np
import pytest
import torch

from cifarviz.core.augment import AugmentConfig, augment_batch, random_flip, random_translate, to_float
from cifarviz.core.errors import CifarvizError, TrainingError
from cifarviz.core.models import IMAGENET_MEAN, IMAGENET_STD, create_model
from cifarviz.core.train import TrainConfig, lr_factor, train


def test_translate_cuts_a_window_of_the_reflect_padded_image():
    x = torch.rand(16, 3, 8, 8)
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]  # fmt: skip
        assert matches, f"image {i} is not a window of its padded self"
        offsets.add(matches[0])
    assert len(offsets) > 3  # offsets really vary per image


def test_flip_flips_some_and_keeps_others():
    x = torch.rand(64, 3, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_augmentation_is_seeded_and_stays_in_range():
    x = torch.rand(32, 3, 32, 32)
    cfg = AugmentConfig(translate=4, flip=True, rotate=15, color_jitter=0.4)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, x) and a.min() >= 0 and a.max() <= 1


def test_schedules():
    onecycle = TrainConfig(schedule="onecycle", warmup=0.25, final_lr=0.1)
    assert lr_factor(onecycle, 0, 100) == pytest.approx(0.2)
    assert lr_factor(onecycle, 25, 100) == pytest.approx(1.0)
    assert lr_factor(onecycle, 100, 100) == pytest.approx(0.1)
    cosine = TrainConfig(schedule="cosine", warmup=0.0)
    assert lr_factor(cosine, 50, 100) == pytest.approx(0.5)


def test_training_learns_and_reports(cifar_small):
    events = []
    config = TrainConfig(model="lenet", epochs=3, batch_size=64, lr=0.05, augment=AugmentConfig(flip=True))
    result = train(config, cifar_small, callback=events.append)
    assert result.status == "completed" and len(result.history) == 3
    epochs = [e for e in events if e["event"] == "epoch"]
    steps = [e for e in events if e["event"] == "step"]
    assert len(epochs) == 3 and steps and all(s["images_per_s"] > 0 for s in steps)
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "elapsed"} <= set(epochs[0])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_acc"] > 0.2  # well above chance (0.1) after 6,000 images
    # the model normalises with the training split's statistics
    assert np.allclose(result.model.input_mean.flatten().numpy(), cifar_small.mean, atol=1e-6)


@pytest.mark.slow
def test_training_is_reproducible(cifar_small):
    config = TrainConfig(model="s8net-bn", epochs=1, batch_size=128, augment=AugmentConfig(translate=2, flip=True))
    a = train(config, cifar_small).model.state_dict()
    b = train(config, cifar_small).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_stops_between_batches_and_keeps_history(cifar_small):
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 5  # let 5 batches run

    result = train(TrainConfig(model="lenet", epochs=5, batch_size=64), cifar_small, cancel=cancel)
    assert result.status == "cancelled"
    assert len(result.history) == 1 and result.history[0]["partial"]


def test_non_finite_loss_stops_with_a_clear_message(cifar_small):
    config = TrainConfig(model="lenet", epochs=2, batch_size=64, lr=1e6, schedule="constant", momentum=0.0)
    with pytest.raises(TrainingError, match="smaller learning rate") as err:
        train(config, cifar_small)
    assert isinstance(err.value.history, list)


def test_bad_config_is_rejected():
    with pytest.raises(TrainingError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(TrainingError):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("settings, flag", [
    ({"momentum": -1}, "--momentum"), ({"momentum": 1.0}, "--momentum"), ({"label_smoothing": 2}, "--label-smoothing"),
    ({"weight_decay": -1}, "--weight-decay"), ({"lr": float("inf")}, "--lr"), ({"batch_size": 2.5}, "--batch-size"),
    ({"warmup": 1.5}, "--warmup"), ({"device": "tpu"}, "--device"), ({"tta": "ten-crop"}, "--tta"),
    ({"model_args": [1, 2]}, "--model-args"), ({"model": "fastnet", "model_args": {"width": 3}}, "--model-args"),
    ({"augment": {"translate": 40}}, "--translate"), ({"augment": {"translate": -3}}, "--translate"),
    ({"augment": {"color_jitter": 1.5}}, "--color-jitter"), ({"augment": {"shear": 3}}, "shear"),
])  # fmt: skip
def test_every_setting_is_checked_with_its_flag_and_range(settings, flag):
    with pytest.raises(CifarvizError, match=flag):
        TrainConfig(**settings)
    TrainConfig(**{**settings, **{k: getattr(TrainConfig(), k) for k in settings if k != "model"}})  # defaults pass


def test_a_given_model_is_trained_as_it_is(cifar_small):
    """A passed-in model keeps its own normalisation and whitening; only a created one gets the dataset's."""
    config = TrainConfig(model="fastnet", model_args={"widths": [8, 16, 16]}, epochs=1, batch_size=256)
    given = create_model("fastnet", widths=[8, 16, 16])
    given.set_normalization(IMAGENET_MEAN, IMAGENET_STD)  # e.g. a backbone pretrained on ImageNet
    given.prepare(to_float(torch.from_numpy(cifar_small.train.images[::4])))  # e.g. whitening from earlier training
    whitening = given.whiten.weight.detach().clone()
    trained = train(config, cifar_small, model=given).model.cpu()
    assert np.allclose(trained.input_mean.flatten().numpy(), IMAGENET_MEAN)
    assert np.allclose(trained.input_std.flatten().numpy(), IMAGENET_STD)
    assert torch.equal(trained.whiten.weight, whitening)

    created = train(config, cifar_small).model.cpu()
    assert np.allclose(created.input_mean.flatten().numpy(), cifar_small.mean, atol=1e-6)
    assert not torch.allclose(created.whiten.weight, whitening, atol=1e-3)  # prepared afresh on this data


def test_a_frozen_pretrained_backbone_keeps_its_statistics(cifar_small):
    config = TrainConfig(model="resnet18-transfer", model_args={"pretrained": False, "input_size": 32}, epochs=1,
                         batch_size=256, optimizer="adam", lr=1e-3)
    model = train(config, cifar_small).model
    assert np.allclose(model.input_mean.flatten().cpu().numpy(), IMAGENET_MEAN)
