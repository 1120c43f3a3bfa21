"""Job functions that misbehave on purpose, for the watchdog tests (the worker imports them by name)."""

from __future__ import annotations

import os
import signal


def kill_worker(*_: object) -> None:
    """Takes the worker process down with it, as a segfault in native code would."""
    os.kill(os.getpid(), signal.SIGKILL)
