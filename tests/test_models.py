import time

import pytest
import torch

from cifarviz.analysis.summary import format_table, layer_table
from cifarviz.core.errors import ModelError
from cifarviz.core.models import count_parameters, create_model, list_models, model_card

ZOO = list_models()


def build(name):
    return create_model(name, **({"pretrained": False} if name == "resnet18-transfer" else {}))


def test_zoo_has_every_source_network():
    expected = {"lenet", "s8net-bn", "s8net-gn", "s8net-ln", "cifar10net", "cifar10net-dropout",
                "deepnet-conv", "deepnet-res", "deepnet-skip", "resnet18", "resnet18-transfer", "fastnet"}
    assert expected <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_forward_features_and_head(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.forward_features(x)
    logits = model(x)
    assert logits.shape == (3, 10) and features.ndim == 2 and len(features) == 3
    assert torch.allclose(model.forward_head(features), logits, atol=1e-5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_layer_summary_accounts_for_every_parameter(name):
    model = build(name)
    rows = layer_table(model)
    assert rows and all(len(r["output_shape"]) >= 1 for r in rows)
    assert sum(r["parameters"] for r in rows) == count_parameters(model)


def test_parameter_counts_match_the_sources():
    assert count_parameters(build("s8net-bn")) == 37664  # the s8 layer table
    assert count_parameters(build("s8net-gn")) == 37664
    assert count_parameters(build("s8net-ln")) == 37664
    assert count_parameters(build("lenet")) == 62006  # the PyTorch tutorial net
    assert count_parameters(build("deepnet-skip")) < count_parameters(build("deepnet-res"))  # "despite fewer parameters"
    assert count_parameters(build("resnet18-transfer"), trainable_only=True) == 512 * 10 + 10


def test_s8net_table_shapes():
    table = format_table(build("s8net-bn"))
    assert "Total params: 37,664" in table
    shapes = [r["output_shape"] for r in layer_table(build("s8net-bn"))]
    assert [8, 16, 16] in shapes and [32, 14, 14] in shapes and [8, 7, 7] in shapes


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ModelError, match="Available"):
        create_model("vgg99")
    with pytest.raises(ModelError, match="Bad arguments"):
        create_model("lenet", depth=3)
    assert model_card("s8net-gn").defaults()["dropout"] == 0.01


def test_transfer_weights_offline_fail_fast():
    start = time.perf_counter()
    with pytest.raises(ModelError, match="ImageNet"):
        create_model("resnet18-transfer")
    assert time.perf_counter() - start < 10


def test_fastnet_whitening_decorrelates_patches(cifar_small):
    from cifarviz.core.augment import to_float

    model = create_model("fastnet")
    images = to_float(torch.from_numpy(cifar_small.train.images))
    model.set_normalization(cifar_small.mean, cifar_small.std)
    model.prepare(images)
    with torch.no_grad():
        out = model.whiten(model.normalize(images[:1000]))[:, :12]  # the first half; the rest is its negation
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 0.05  # decorrelated
    # unit variance, except the faintest directions, which the eps regulariser deliberately damps
    assert torch.diag(cov).max() < 1.05 and (torch.diag(cov) > 0.7).sum() >= 10


def test_transfer_backbone_stays_frozen_in_training_mode():
    model = build("resnet18-transfer").train()
    assert not model.features.training and model.head.training
    stats = model.features.bn1.running_mean.clone()
    model(torch.rand(4, 3, 32, 32))
    assert torch.equal(stats, model.features.bn1.running_mean)  # ImageNet statistics untouched
