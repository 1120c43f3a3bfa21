"""The disk tier's writes, off the engine thread: a bounded queue and a thread of their own.

The engine thread hands over arrays already computed and goes on; it never waits on
the disk. Past `QUEUED_WRITES` the newest writes are dropped (the caller counts them),
and each is offered again the next time its prefix is kept. A write the disk refuses
(full, over quota) is the caller's to act on (worker/prefix_disk.py turns writing off).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import mlx.core as mx

from worker.prefix_files import PendingWrite

logger = logging.getLogger(__name__)

QUEUED_WRITES = 4096
"""Files waiting for the writer thread; past this the newest are not written (the engine never waits), and are
offered again the next time their prefix is kept. A block is a file: an agent's first turn of 6,000 tokens is
94 of them, two sessions finishing together twice that, and 64 dropped most of a second session's start. The
arrays they slice are the kept caches' own (no copy); a long backlog keeps an evicted one alive until written."""


class PrefixWriter:
    """Carries out `write` for each write submitted, in order, on a thread started with the first; an OSError
    from it goes to `refused`."""

    def __init__(self, write: Callable[[PendingWrite], None], refused: Callable[[OSError], None]) -> None:
        self._write = write
        self._refused = refused
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[PendingWrite] = queue.Queue(QUEUED_WRITES)
        self._thread: threading.Thread | None = None

    def pending(self, identity: str, key: str) -> bool:
        """Whether that file is on its way to disk (until its write has ended, the file's record made)."""
        with self._lock:
            return (identity, key) in self._pending

    def submit(self, write: PendingWrite) -> bool:
        """Queue `write`; False when the queue is full and it was dropped."""
        with self._lock:
            self._pending.add((write.identity, write.key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_all, name="prefix-disk", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            with self._lock:
                self._pending.discard((write.identity, write.key))
            return False
        return True

    @property
    def queued(self) -> int:
        """Writes submitted and not yet ended (the one being written included)."""
        return self._queue.unfinished_tasks

    def flush(self) -> None:
        """Wait for the writes queued so far (tests, and a worker that stops)."""
        self._queue.join()

    def _write_all(self) -> None:
        # MLX's streams are its threads' own: this one slices and saves on a stream of its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while True:
            write = self._queue.get()
            try:
                self._write(write)
            except OSError as exc:
                self._refused(exc)
            except Exception:
                logger.exception("could not write a kept prefix to disk")
            finally:
                with self._lock:
                    self._pending.discard((write.identity, write.key))
                self._queue.task_done()
