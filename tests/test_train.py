import numpy as np
import pytest
import torch

from cifarviz.augment import AugmentConfig, augment_batch, random_flip, random_translate
from cifarviz.errors import TrainingError
from cifarviz.train import TrainConfig, lr_factor, train


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
