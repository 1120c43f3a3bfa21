"""The prefix disk tier's record of its files (worker/prefix_disk.py): each model identity's files by key,
and the lengths of its tails and whole states, which a lookup tries longest first. It holds no lock of its
own: the tier holds its lock around every call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from worker.prefix_files import KeptFile, group


class KeptFiles:
    def __init__(self) -> None:
        self._files: dict[str, dict[str, KeptFile]] = {}
        """identity -> key -> its file."""
        self._lengths: dict[str, dict[str, Counter[int]]] = {}
        """identity -> group ("s" for whole states, a block's name for the tails after it) -> each length's
        files (counted, so that forgetting one file never looks through the others)."""

    def of(self, identity: str) -> dict[str, KeptFile]:
        """`identity`'s files by key (not to be changed: `add` and `pop` keep the lengths with them)."""
        return self._files.get(identity, {})

    def lengths(self, identity: str, grouped: str) -> list[int]:
        """The lengths of `identity`'s tails after the block named `grouped`, or of its whole states ("s"),
        longest first."""
        return sorted(self._lengths.get(identity, {}).get(grouped, ()), reverse=True)

    def every(self) -> Iterator[tuple[str, str, KeptFile]]:
        """Each file, with its identity and key."""
        return ((identity, key, f) for identity, files in self._files.items() for key, f in files.items())

    @property
    def nbytes(self) -> int:
        return sum(f.size for _, _, f in self.every())

    def add(self, identity: str, key: str, kept: KeptFile) -> None:
        files = self._files.setdefault(identity, {})
        grouped = group(key)
        if grouped is not None and key not in files:
            self._lengths.setdefault(identity, {}).setdefault(grouped[0], Counter())[grouped[1]] += 1
        files[key] = kept

    def pop(self, identity: str, key: str) -> KeptFile | None:
        entry = self._files.get(identity, {}).pop(key, None)
        grouped = group(key)
        lengths = self._lengths.get(identity, {}).get(grouped[0]) if grouped is not None else None
        if entry is not None and grouped is not None and lengths is not None:
            lengths[grouped[1]] -= 1
            if lengths[grouped[1]] <= 0:
                del lengths[grouped[1]]
        return entry
