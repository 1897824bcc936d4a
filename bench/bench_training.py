"""Training throughput: the cifarviz engine vs. the loop the source projects wrote.

The baseline is a torchvision-CIFAR10-style dataset (uint8 array -> PIL image per item ->
RandomHorizontalFlip/ToTensor/Normalize) in a DataLoader with batch 64, stepping the same
model with the same optimiser. Both run in this one process on the same data, and the
result is printed as a ratio (target: >= 2x for lenet).

    python bench/bench_training.py [--data PATH] [--images 12800]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifarviz.core.augment import AugmentConfig
from cifarviz.core.data import Split
from cifarviz.core.models import create_model
from cifarviz.core.recipes import RECIPES
from cifarviz.core.train import train
from cifarviz.store.datasets import load_cifar10


class PILCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL -> transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_images_per_s(name, model_args, images, labels, mean, std, batch_size=64):
    torch.manual_seed(0)
    model = create_model(name, **model_args)
    model.set_normalization((0, 0, 0), (1, 1, 1))  # the transform normalises, as the sources did
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = DataLoader(PILCifar(images, labels, transform), batch_size=batch_size, shuffle=True)
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 3:  # skip warm-up batches
            seen, start = 0, time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def engine_images_per_s(name, dataset, batch_size, model_args):
    base = RECIPES[name]
    config = dataclasses.replace(base, epochs=1, batch_size=batch_size, model_args=model_args,
                                 augment=AugmentConfig(flip=True), lookahead=base.lookahead)
    events = []
    train(config, dataset, callback=events.append, step_every=1)
    steps = [e for e in events if e["event"] == "step"]
    # images/s over the epoch after the first 3 steps (same warm-up rule as the baseline)
    (t0, s0), (t1, s1) = (steps[2]["elapsed"], steps[2]["step"]), (steps[-1]["elapsed"], steps[-1]["step"])
    return (s1 - s0) * batch_size / (t1 - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--images", type=int, default=12800, help="training images per measurement")
    args = parser.parse_args()
    ds = load_cifar10(args.data, download=False, progress=False)
    idx = np.random.default_rng(0).choice(len(ds.train), args.images, replace=False)
    small = dataclasses.replace(ds, train=Split("train", ds.train.images[idx], ds.train.labels[idx], idx),
                                val=Split("val", ds.val.images[:0], ds.val.labels[:0], ds.val.source_index[:0]))
    results = []
    for name, model_args, fast_batch in (("lenet", {}, 128), ("fastnet", {"widths": [48, 192, 192]}, 1024)):
        n_base = args.images if name == "lenet" else args.images // 4
        base = baseline_images_per_s(name, model_args, small.train.images[:n_base], small.train.labels[:n_base],
                                     ds.mean, ds.std)
        same_batch = engine_images_per_s(name, small, 64, model_args)
        recipe_batch = engine_images_per_s(name, small, fast_batch, model_args)
        row = {"model": name, "baseline_img_s": round(base), "engine_batch64_img_s": round(same_batch),
               f"engine_batch{fast_batch}_img_s": round(recipe_batch),
               "ratio_batch64": round(same_batch / base, 2), "ratio_recipe_batch": round(recipe_batch / base, 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {ds.root}")


if __name__ == "__main__":
    main()
