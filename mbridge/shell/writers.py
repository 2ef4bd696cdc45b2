"""Megatron-Core's checkpoint-writer processes exit with the training rank that started them.

``dist_checkpointing.save`` (torch_dist) writes through processes of its own: a
``multiprocessing`` Manager, spawned at the first save and kept for the process's life (its
queue collects the writers' results), and writers forked at every save. When a rank is
killed (SIGKILL, OOM killer, a scheduler's preemption) nothing tells them: the Manager (and
the resource tracker it keeps open) waited forever, and a writer could block on a full pipe.
``guard()`` makes each of them ask Linux to kill it when its parent dies
(``PR_SET_PDEATHSIG``): forked writers through an at-fork hook, the Manager through its
initializer, created here before Megatron-Core creates its own (``filesystem_async``'s
module-level queue, which it creates only when unset). Elsewhere than Linux it does nothing.

Light on purpose: the spawned Manager imports this module to run its initializer.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_guarded = False


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent exits; exit now if the parent
    (``parent``, when given) is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def guard() -> None:
    """Make this process's checkpoint writers exit with it (idempotent; before the first
    save)."""
    global _guarded
    if _guarded or not sys.platform.startswith("linux"):
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    os.register_at_fork(after_in_child=die_with_parent)
    if filesystem_async._results_queue is None:  # as its _get_write_results_queue, guarded
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(die_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
    _guarded = True
