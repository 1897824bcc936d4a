"""The "replica" kind: a recipe trained again with another seed, on every training image (an ensemble's member).

    run_ids = submit_replicas("lenet", seeds=range(1, 5), data_root=data)   # python -m cifarviz replicas ...

Ensemble influence (TRAK over M models) and the retraining proof's seed band need other seeds of one recipe. They
are ordinary jobs: the lowest priority but one, sent to a GPU worker when one is connected. A finished replica is
the run's model.safetensors, recorded with its recipe and seed like any checkpoint.
"""

from __future__ import annotations

import dataclasses

from .kind import register
from .records import RunError
from .train import submit_training, train_worker
from .worker import RunContext

KIND = "replica"


def submit_replicas(recipe: str, seeds, data_root, *, owner: str = "", root=None) -> list[str]:
    """Queue one replica of `recipe` per seed; stops at the first limit (the queue's length, the person's runs)."""
    from cifarviz.core.recipes import RECIPES

    if recipe not in RECIPES:
        raise RunError(f"Unknown recipe {recipe!r}. Recipes: {', '.join(RECIPES)}.")
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise RunError("Give one or more seeds, 0 or more (the shipped checkpoint is seed 0).")
    return [submit_training(dataclasses.replace(RECIPES[recipe], seed=seed), data_root, root=root, owner=owner,
                            kind=KIND, name=f"{recipe}-seed{seed}") for seed in seeds]


@register(KIND, priority=2, wants_gpu=True, what="replica")
def replica_worker(ctx: RunContext) -> tuple[str, str | None]:
    return train_worker(ctx)  # the same training and checkpoints; only the queue's priority and the name differ
