"""SIGTERM and SIGINT during a run: the first asks the loop to stop after the current step (the trainer
saves and raises :class:`TrainingInterrupted`), a second one leaves at once.

    signals = StopSignals()          # installs the handlers (main thread only)
    signals.received                 # 0, or the number of the first signal
    signals.restore()                # the previous handlers back
"""

from __future__ import annotations

import os
import signal
import threading
import time


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a whole step and a checkpoint; ``exit_status`` is the
    shell's convention (128 + the signal number: 143, 130). Running the same command resumes."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, message: str):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + signum


class StopSignals:
    """SIGTERM/SIGINT handlers for the run: the first asks the loop to stop after the current step (and
    save), a second one (later than SAME_REQUEST_S) leaves at once (status 128 + signal, no
    checkpoint). Only the main thread can install handlers; elsewhere the signals keep their
    behaviour. ``restore()`` puts back the previous ones."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # A repeat within this many seconds is the same request: Ctrl-C under torchrun reaches a worker
    # twice at once (from the terminal to the whole process group, and forwarded by torchrun).
    SAME_REQUEST_S = 0.5

    def __init__(self):
        self.received, self._first = 0, 0.0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received and time.monotonic() - self._first < self.SAME_REQUEST_S:
            return
        if self.received:
            os.write(
                2, f"\nfastclip: second {signal.Signals(signum).name}: exiting now, no checkpoint\n".encode()
            )
            os._exit(128 + signum)
        self.received, self._first = signum, time.monotonic()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
