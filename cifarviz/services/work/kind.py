"""Kinds of long work: each kind's module registers its worker function here, by decoration.

    @register("train", priority=5, wants_gpu=True)
    def train_worker(ctx: RunContext) -> tuple[str, str | None]: ...

A job names its kind; the worker calls the function registered under that name and nothing else: no module or
function is ever looked up from a name in a file or a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kind:
    name: str
    function: Callable  # (RunContext) -> ("completed" | "stopped", a note for people)
    priority: int  # higher first, across every queue: a proof a class waits for before tomorrow's homework
    wants_gpu: bool  # sent to a GPU worker when one is connected, else run on a CPU worker
    here: bool  # must run on the machine that submitted it (it reads a file only that machine has)
    what: str  # how pages name it: "training", "retraining proof", ...


KINDS: dict[str, Kind] = {}


def register(name: str, *, priority: int, wants_gpu: bool = True, here: bool = False, what: str = ""):
    def decorate(function):
        if name in KINDS and KINDS[name].function is not function:
            raise ValueError(f"two worker functions for the kind {name!r}")
        KINDS[name] = Kind(name, function, priority, wants_gpu, here, what or name)
        return function

    return decorate
