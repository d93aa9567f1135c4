"""Ctrl-C and SIGTERM during training: finish the step, save, stop.

The training loop asks :func:`requested` between steps; while :func:`stop_on_signal` is
active, SIGINT and SIGTERM only set a flag, so a step, a validation or a checkpoint write
in progress completes, and the loop then saves ``latest.pt`` (atomically) where a resume
continues the very same run. A second signal stops at once; the checkpoint on disk is kept.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

_received: list[int] = []  # signals seen while stop_on_signal is active; a list so the handler needs no global


class Interrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` at optimiser step ``step``."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, Path(checkpoint), signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}")


def _handler(signum, _frame):
    if _received:  # the second one: stop now, the last checkpoint written stays as it is
        raise KeyboardInterrupt
    _received.append(signum)


@contextlib.contextmanager
def stop_on_signal(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, ``signals`` ask the loop to stop (see :func:`requested`) instead of killing it."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    before = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        _received.clear()


def requested(world: int = 1, device=None) -> int:
    """The signal that asked to stop (0: none). With ``world`` > 1 processes (torchrun) the
    ranks agree, so all stop after the same step even when the signal reached one of them."""
    mine = _received[0] if _received else 0
    if world == 1:
        return mine
    flag = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
