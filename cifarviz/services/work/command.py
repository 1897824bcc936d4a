"""`python -m cifarviz worker`: a worker with every kind of long work registered (the command's entry point)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cifarviz.core.settings import settings

from . import engine, kinds  # noqa: F401 - kinds: every kind's function registered before a job arrives
from .records import usable_runs_dir
from .worker import serve


def main(args) -> int:
    """`python -m cifarviz worker`."""
    if args.broker:
        os.environ["CIFARVIZ_BROKER"] = args.broker
        settings()  # a malformed URL is said now, as a setting
    if args.nice:
        with contextlib.suppress(OSError, AttributeError):
            os.nice(args.nice)
    gpu = args.gpu
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    url = args.broker or engine.broker_url()
    work = Path(args.work) if args.work else usable_runs_dir() / ".work" / (args.name or engine.HOST)
    return serve(url, name=args.name or f"{engine.HOST}-{os.getpid()}", work=work, gpu=gpu,
                 idle_exit=args.idle_exit, gpu_grace=args.gpu_grace)

