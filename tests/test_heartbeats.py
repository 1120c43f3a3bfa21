"""The worker's heartbeat before a job's answer: jobs that end together share a beat, and none is missed."""

from __future__ import annotations

import threading
import time

from worker.monitor import Monitor


class CountedMonitor(Monitor):
    """The monitor's own `beat`, with a heartbeat write that counts itself and takes a while."""

    def __init__(self) -> None:  # no Redis, engine or thread: only what `beat` uses
        self._beating = threading.Lock()
        self._beat_began = float("-inf")
        self.written: list[float] = []
        self.release = threading.Event()

    def _beat(self) -> None:
        self.written.append(time.monotonic())
        self.release.wait(10)


def test_jobs_that_end_together_share_one_heartbeat_written_after_each_asked() -> None:
    monitor = CountedMonitor()
    first = threading.Thread(target=monitor.beat)
    first.start()
    while not monitor.written:  # the first beat is being written
        time.sleep(0.001)
    asked_at: list[float] = []

    def ask() -> None:
        asked_at.append(time.monotonic())
        monitor.beat()

    waiting = [threading.Thread(target=ask) for _ in range(7)]
    for thread in waiting:
        thread.start()
    while len(asked_at) < 7:
        time.sleep(0.001)
    monitor.release.set()
    for thread in [first, *waiting]:
        thread.join(10)
    # The seven asked while the first beat was being written (it may have looked before they ended):
    # one more beat covers all of them, begun after each asked.
    assert len(monitor.written) == 2
    assert all(monitor.written[1] > asked for asked in asked_at)
    monitor.beat()  # asked after every beat began: written again
    assert len(monitor.written) == 3
