"""Stopping a run on request and losing nothing: Ctrl-C (a notebook's "interrupt kernel" sends the
same SIGINT) and SIGTERM (how Kaggle ends a session and a cluster's scheduler a job) set a flag
instead of killing the process; the loop sees it after the step in progress, writes a checkpoint
of that step and raises one RunStopped line saying how to resume. A second Ctrl-C stops at once.
Floor "training": uses only the ground and helpers.parallel.
"""
from __future__ import annotations

import signal
import threading

from helpers.errors import RunStopped
from helpers.parallel import Processes, any_process

CAUGHT = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Within `with StopRequests() as stop:`, SIGINT and SIGTERM only record that a stop was asked
    (`stop.signum`); the handlers that were there before come back on exit. Signals can only be
    caught in the main thread: elsewhere (a training thread) nothing changes."""

    def __init__(self):
        self.signum: int | None = None
        self._before: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in CAUGHT:
                self._before[s] = signal.signal(s, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def _catch(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # pressed twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, procs: Processes, device) -> bool:
        """Whether to stop after this step: under torchrun, as soon as any process was asked, so
        that all of them stop at the same step (each takes part in writing the checkpoint)."""
        asked = self.signum is not None
        if procs.ddp:
            asked = any_process(asked, device)
        return asked


def stopped(signum: int | None, step: int, checkpoint, out_dir) -> RunStopped:
    """The one line a stopped run ends with."""
    name = signal.Signals(signum).name if signum else "a signal on another process"
    return RunStopped(f"stopped by {name} at step {step}; its checkpoint is {checkpoint}: continue with "
                      f"init=resume out_dir={out_dir}", signum or signal.SIGTERM)
