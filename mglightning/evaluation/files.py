"""Writing files whole or none (the package's one atomic writer: run folders, results and study files), a full
disk named as such, and a damaged file named with what it held and how to recover."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["DamagedFileError", "OutOfSpaceError", "atomic_write_bytes", "raise_if_out_of_space"]

# How a run goes on after a full disk: what `OutOfSpaceError` says when a run folder's batch could not be written.
RESUME = (
    "and the finished batches are kept: free some space and run the same command with --resume <run folder> to "
    "continue"
)


class OutOfSpaceError(OSError):
    """The disk holding the run folder is full: what was being written is named, nothing half-written is left."""


class DamagedFileError(ValueError):
    """A file of a run folder cannot be read (truncated, emptied, edited): the message names it, says what it held
    and what in the folder is intact, and how to recover."""


def damaged(path: Path, error: BaseException) -> str:
    """The first words of a `DamagedFileError`: the file and what reading it raised."""
    return f"{path} is damaged ({type(error).__name__}: {error})"


def raise_if_out_of_space(error: BaseException, path: Path, recovery: str = RESUME) -> None:
    """Re-raise `error` as an `OutOfSpaceError` that names the folder, when it is a full disk; `recovery` ends the
    message: what is intact and how to go on."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left on device" in str(error):
        raise OutOfSpaceError(
            errno.ENOSPC,
            f"No space left on the device of {path.parent} while writing {path.name} (check with `df -h "
            f"{path.parent}`). Nothing half-written was left {recovery}.",
        ) from error


def atomic_write_bytes(path: Path, data: bytes, recovery: str = RESUME) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename; a failure (a
    full disk, a killed process) leaves the previous file or none, and never the temporary one. A full disk raises
    `OutOfSpaceError`, its message ending with `recovery`."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise_if_out_of_space(error, path, recovery)
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


