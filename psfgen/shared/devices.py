"""The torch device a run uses, from the config's ``device`` (auto | cpu | cuda | cuda:K)."""

from __future__ import annotations

import re

import torch

from psfgen.shared.errors import InputError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device that is absent is an input error.

    With ``local_rank`` (one process of several on a node, e.g. under torchrun), ``auto``
    and ``cuda`` mean the node's GPU number local_rank; a fixed ``cuda:K`` is refused,
    since every process would share it.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise InputError(f"{{device}} must be auto, cpu, cuda or cuda:K, got {name!r}", {"device": "device"})
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    if local_rank is not None and re.fullmatch(r"cuda:\d+", name):
        raise InputError(
            f"device {name} with several processes would put them all on one GPU; use --device cuda or auto"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{{device}} {name} asked for, but CUDA is not available here; use {{device}} cpu or auto",
                {"device": "device"},
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"{{device}} {name} does not exist: {torch.cuda.device_count()} CUDA device(s)", {"device": "device"}
            )
    return dev
