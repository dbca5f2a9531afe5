"""A disk that fills up half-way through a write, for the tests of what a full disk leaves behind.

`fill_the_disk(monkeypatch)` makes every file that `mglightning.evaluation.files` opens (its atomic writer, which
every file of a run goes through) store half of each write and then fail with ENOSPC, as a real full disk does.
"""

from __future__ import annotations

import builtins
import errno

import mglightning.evaluation.files as files_module


class FullDisk:
    """A file handle whose every write stores half its data, then raises `OSError(ENOSPC)`."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_the_disk(monkeypatch) -> None:
    """From now on, until the test ends or `empty_the_disk`, the atomic writer's files are on a full disk."""
    monkeypatch.setattr(files_module, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)


def empty_the_disk(monkeypatch) -> None:
    monkeypatch.delattr(files_module, "open", raising=False)
