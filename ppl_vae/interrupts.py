"""SIGINT and SIGTERM during training: a flag read between steps, and the exception that
reports a clean stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """:func:`fit` stopped by SIGINT or SIGTERM, cleanly, after a whole step.

    Attributes
    ----------
    signal : int
        The signal's number.
    step : int
        Steps done (the checkpoint's step).
    checkpoint : Path or None
        Where the training state was written; None when fit had no ``checkpoint``.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        where = (f"checkpoint written to {checkpoint}" if checkpoint is not None
                 else "no checkpoint written (pass checkpoint=...)")
        super().__init__(f"{signal.Signals(signum).name} after step {step}; {where}")
        self.signal, self.step, self.checkpoint = signum, step, checkpoint


class Signals:
    """SIGINT and SIGTERM become a flag that fit reads between steps.

    A step is never cut in half (a KeyboardInterrupt inside ``adam.step`` would leave
    half-updated parameters). A second signal gets the previous handler at once, so a
    step that hangs can still be stopped.
    """

    NUMBERS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.received: int | None = None
        self._previous: dict = {}
        # Handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for number in self.NUMBERS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        self.received = number
        signal.signal(number, installable(self._previous[number]))

    def __exit__(self, *exc) -> bool:
        for number, handler in self._previous.items():
            signal.signal(number, installable(handler))
        return False


def installable(handler):
    # signal.signal returns None for a handler that was not installed from Python.
    return signal.SIG_DFL if handler is None else handler
