"""What a job reads, found on whichever machine runs it: the data and a checkpoint, checked before they are used."""

from __future__ import annotations

from pathlib import Path

from cifarviz.core.errors import CifarvizError
from cifarviz.core.settings import settings


def data_spec(root, *, val_size: int, split_seed: int, fingerprint: str | None = None) -> dict:
    return {"root": str(Path(root).resolve()), "val_size": val_size, "split_seed": split_seed,
            "fingerprint": fingerprint}


def load_data(data: dict):
    """The dataset a job names: at its path when this machine has it, else at this worker's CIFARVIZ_DATA; where the
    job recorded the data's fingerprint, this copy must have the same one."""
    from cifarviz.store.datasets import load_cifar10

    root = Path(data["root"])
    if not root.is_dir():
        root = settings().data
    dataset = load_cifar10(root, download=False, progress=False, val_size=data["val_size"],
                           split_seed=data["split_seed"])
    if data.get("fingerprint") and dataset.fingerprint != data["fingerprint"]:
        raise CifarvizError(f"This worker's data at {root} is not the copy the job was submitted with (their "
                            "fingerprints differ): point CIFARVIZ_DATA on this worker at the same CIFAR-10 folder.")
    return dataset


def checkpoint_file(path: str, name: str) -> Path:
    """A job's checkpoint: at its path when this machine has it, else the shipped checkpoint of that name here."""
    from cifarviz.core.checkpoint import SHIPPED_DIR

    if Path(path).is_file():
        return Path(path)
    shipped = SHIPPED_DIR / f"{name}.safetensors"
    if shipped.is_file():
        return shipped
    raise CifarvizError(f"The checkpoint {name} is not on this worker's machine: run this job on the app's machine, "
                        "or ship the checkpoint with the code.")
