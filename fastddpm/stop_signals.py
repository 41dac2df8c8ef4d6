"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, ``kill``).

The first signal only records that a stop was asked for: the trainer finishes the
step it is in, writes a checkpoint (atomically, as every checkpoint) and returns.
A second signal does not wait: it raises ``SystemExit(128 + signum)`` at once
(a write under way removes its temporary file; the last checkpoint stays whole).
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopOnSignal", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A context manager: inside it, SIGINT and SIGTERM set :attr:`received` (the signal's name)
    instead of ending the process; a second one exits at once.

    Handlers can be installed only in the main thread; elsewhere (and with ``enabled=False``)
    nothing is installed and :attr:`received` stays None.  :attr:`doing` names what the first
    signal lets finish, for its message.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self.doing = "the current step"
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\nfastddpm: second {name}: stopping at once (the last checkpoint written stays whole)",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.received = name
        print(f"\nfastddpm: {name} received: finishing {self.doing} and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
