"""Child processes fsinspect starts (a back-end for the proxy or a rerun) die with it, even by SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: SIGTERM to the child when its parent dies; exits at once if the parent is already gone.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: fork from a thread that lives as
    long as the process (the main thread).  Everything is looked up before the fork, so the child only
    makes two system calls.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    getppid, exit_now, sigterm = os.getppid, os._exit, int(signal.SIGTERM)

    def child() -> None:
        if prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0) != 0:
            exit_now(127)
        if getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
            exit_now(127)
    return child
