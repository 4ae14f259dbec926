"""Stop on request: Ctrl-C (SIGINT) or a scheduler's SIGTERM ends a run at a step boundary.

The first signal only raises a flag: the trainer finishes the step it is in, writes a
checkpoint (rows in flight included, so ``--resume`` continues exactly) and raises
:class:`Interrupted`. A second signal exits at once, without a traceback, losing only the
work since the last checkpoint. Handlers are installed in the main thread only (Python
allows no other), never over a signal the launcher ignores, and the previous ones are
restored on exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint it can resume from."""

    def __init__(self, step: int, run_dir, signum: int) -> None:
        self.step, self.run_dir, self.signum = step, run_dir, signum
        super().__init__(f"interrupted ({signal.Signals(signum).name}): saved step {step} to {run_dir}; "
                         f"continue with `tppo train --resume {run_dir}`")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """A context manager whose ``signum`` is the first stop signal received (None before)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            # a signal the launcher ignores (nohup, a shell's background job) stays ignored
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: quit now, no traceback
            os.write(2, b"\ntppo: second stop signal: exiting now, without saving\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.announce:
            print(f"\ntppo: {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  f"(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
