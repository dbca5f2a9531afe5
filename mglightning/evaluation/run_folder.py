"""The run folder of an evaluation, which holds hours of work: where it is, who writes it, what replaces it.

- **One place decides it**: `choose_run_folder` (a new `version_<n>` under the runs' root, or the folder to
  resume, `last` being the newest that holds a run description).
- **One writer at a time**: `RunLock` takes an exclusive lock on `<run_dir>/.lock` for the whole run. A second
  process on the same folder is refused at once, with the holder's host and process id. The lock is an OS file
  lock, released when its process ends however it ends, so a lock left by a dead process is simply taken over.
- **Nothing lost by `--overwrite`**: `move_aside` moves a folder's records, grid samples, stored maps, added
  metrics, results, figures, description and logs into `<run_dir>/replaced-<UTC time>/` (called only after the new
  evaluation has been checked).
- **A refused command changes nothing**: `evaluate.py` takes the lock before it writes anything (a busy folder is
  refused before the classifier is even loaded), and a command that fails or is refused removes only what it
  created itself: the new `version_<n>` folder it reserved (`discard_unstarted`, so that `--resume last` cannot
  pick an empty run), or, in a `--resume` folder, its own lock and logger files. Never an earlier run's files.
- **One run's hold on it**: `RunFolder` takes a run from the lock to the description written (checking that the
  folder holds nothing of another evaluation, reading which samples it already recorded) and releases it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mglightning.evaluation.description import RunDescription, RunDescriptionError
from mglightning.evaluation.records import recorded_indices

__all__ = ["RunFolder", "RunFolderBusyError", "RunLock", "choose_run_folder",
           "discard_logger_events", "discard_unstarted", "locked_by_command", "move_aside"]

# What a run writes into its folder (the lock file aside); what --overwrite moves aside and an unstarted run removes.
RUN_CONTENTS = ("records", "grid", "maps", "added", "run.json", "config.yaml", "results.*", "*.png",
                "events.out.tfevents.*", "hparams.yaml")


def locked_by_command(run_dir: str | Path) -> bool:
    """Whether the command running this process holds `run_dir`'s lock, as its `.lock` file says: this process
    (`evaluate.py` takes the lock before the evaluator runs), or the process that started it (a `ddp_spawn` rank).
    The evaluator then takes no lock of its own. Only the holder writes the file, and removes it on release."""
    try:
        holder = json.loads((Path(run_dir) / ".lock").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(holder, dict) and holder.get("host") == socket.gethostname() and holder.get("pid") in (
        os.getpid(), os.getppid())


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's lock."""


def _versions(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("version_*"):
        suffix = path.name.split("_", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def choose_run_folder(root: str | Path, resume: str | None = None, reserve: bool = True) -> Path:
    """The run folder of an evaluation: `--resume`'s folder (`last`: the newest under `root` with a run.json),
    or else a new `version_<n>` under `root`, reserved by creating it (two runs started at once get two); with
    `reserve=False` (a process other than rank 0), the next free name, created by no one."""
    root = Path(root)
    if resume == "last":
        runs = [path for _, path in _versions(root) if (path / "run.json").is_file()]
        if not runs:
            raise ValueError(f"--resume last: no evaluation run under {root} yet.")
        return max(runs, key=lambda path: (path / "run.json").stat().st_mtime)
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "run.json").is_file():
            raise ValueError(
                f"--resume {resume}: not an evaluation run folder (no run.json); pass the folder a previous run "
                "printed, or leave --resume out to start a new run."
            )
        return run_dir
    number = max((version for version, _ in _versions(root)), default=-1) + 1
    if not reserve:
        return root / f"version_{number}"
    root.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = root / f"version_{number}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


class RunLock:
    """An exclusive lock on a run folder for one process (`<run_dir>/.lock`, holding the holder's host and pid).

    Example:
        >>> lock = RunLock(run_dir).acquire()      # doctest: +SKIP
        >>> ...                                     # the run
        >>> lock.release()                          # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._handle = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RunFolderBusyError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                raise RunFolderBusyError(
                    f"{self.path.parent} is being evaluated by another process ({holder}); two runs in one folder "
                    "would evaluate the same samples twice. Wait for it to finish, stop it, or evaluate into another "
                    "folder."
                ) from None
            # A holder that released (and removed the file) between our open and our lock: lock the new file.
            if self.path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Release the lock and remove its file (the OS releases the lock, not the file, when a process dies)."""
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"host {info['host']}, PID {info['pid']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _contents(run_dir: Path) -> list[Path]:
    found: list[Path] = []
    for pattern in RUN_CONTENTS:
        found.extend(sorted(run_dir.glob(pattern)))
    return found


def move_aside(run_dir: str | Path) -> Path | None:
    """Move what a run wrote into `<run_dir>/replaced-<UTC time>/`; returns that folder (None if there was
    nothing to move)."""
    run_dir = Path(run_dir)
    contents = _contents(run_dir)
    if not contents:
        return None
    aside = run_dir / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
        suffix += 1
    aside.mkdir()
    for path in contents:
        shutil.move(str(path), aside / path.name)
    return aside


def discard_unstarted(run_dir: str | Path, lock: RunLock) -> bool:
    """Remove a run folder that this command created (`choose_run_folder`) when its run failed before its first
    record, so that `--resume last` cannot pick it; returns whether it did.

    `lock` is the folder's lock, held by this process since the folder was created, so everything in the folder
    is this command's own. Never call it on a folder that the command did not create: a refused `--resume`
    leaves its folder as it was. A folder holding records is left as it is (the lock stays held).
    """
    run_dir = Path(run_dir)
    if not lock.held or lock.path.parent != run_dir:
        raise ValueError(f"discard_unstarted({run_dir}) needs that folder's lock, held by this process.")
    if not run_dir.is_dir() or any((run_dir / "records").glob("*.parquet")):
        return False
    for path in _contents(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    lock.release()
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
    return True


class RunFolder:
    """One run's hold on its folder: the lock, the checks against what the folder already holds, the description
    written, and the release.

    Every process of the run calls `open` in step (`barrier` between the steps, e.g. the Lightning strategy's);
    rank 0 takes the lock (unless the `evaluate.py` command running it already holds it), moves an old run aside
    and writes the description. A refused run (the folder busy, another evaluation in it, its records damaged)
    changes nothing in the folder: the lock is released before the error propagates; the caller removes the files
    its process created before the checks (`discard_logger_events`).

    Args:
        path: the run folder (the same on every process).
        rank_zero: whether this process is rank 0, the one that locks and writes.
    """

    def __init__(self, path: Path, rank_zero: bool) -> None:
        self.path = path
        self.rank_zero = rank_zero
        self._lock: RunLock | None = None
        self.checked = False  # whether the folder was accepted (a refused run changed nothing in it)

    def open(self, description: RunDescription, overwrite: bool, barrier: Callable[[str], Any]) -> set[int]:
        """Lock the folder, check it can take this evaluation, move an old one aside (with `overwrite`) and write
        the description; returns the dataset indices whose records the folder already holds complete.

        Raises:
            RunFolderBusyError: another live process holds the folder.
            ValueError: the folder holds an evaluation with other settings, or the same one with other stored
                maps, and `overwrite` is off; or (`DamagedFileError`) a records file of the folder cannot be read.
        """
        if self.rank_zero and not locked_by_command(self.path):
            self._lock = RunLock(self.path).acquire()
        barrier("run folder locked")
        replacing = (self.path / "run.json").is_file() and overwrite
        try:
            refusal = None if overwrite else _refusal(self.path, description)
            if refusal is not None:
                raise ValueError(refusal)
            barrier("run folder checked")
            expected = {row.method: list(row.surrogates) for row in description.rows}
            # Read before anything is written: a damaged records file refuses the run, the folder as it was.
            done = set() if replacing else recorded_indices(self.path, expected, description.metric_columns)
        except ValueError:
            self.release()
            raise
        barrier("records read")
        self.checked = True
        if self.rank_zero:
            if replacing:
                aside = move_aside(self.path)
                print(f"--overwrite: the previous run in {self.path} was moved to {aside}.")
            description.save(self.path)
        barrier("run described")
        return done

    def release(self) -> None:
        """Release the lock now (a process that ends releases it anyway)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _refusal(run_dir: Path, description: RunDescription) -> str | None:
    """Why `run_dir` cannot be resumed with `description` (None: it can, or it holds no run yet): it holds an
    evaluation with other settings (or an unreadable run.json), or this one with other stored maps."""
    if not (run_dir / "run.json").is_file():
        return None
    try:
        existing = RunDescription.load(run_dir)
    except RunDescriptionError:
        changed = ["unreadable"]
    else:
        if existing.fingerprint == description.fingerprint:
            if (existing.keep_maps, existing.keep_inputs) == (description.keep_maps, description.keep_inputs):
                return None
            return (
                f"{run_dir} was started with keep_maps={existing.keep_maps}, keep_inputs={existing.keep_inputs}; "
                f"resuming it with keep_maps={description.keep_maps}, keep_inputs={description.keep_inputs} would "
                "leave some of its samples without stored maps (or inputs). Nothing in it was changed. Resume with "
                "the run's settings, evaluate into a new folder, or pass --overwrite true to start it afresh."
            )
        changed = existing.differences(description)
    return (
        f"{run_dir} holds an evaluation with other settings (differing: {', '.join(changed) or 'unknown'}), "
        "so its records cannot be resumed; nothing in it was changed. Evaluate into a new folder "
        "(evaluate.py makes one unless --resume is given), or pass --overwrite true to move the old run "
        "aside and start afresh."
    )


def discard_logger_events(logger: Any) -> None:
    """Close and remove the events file that a Lightning TensorBoard `logger` opened in the run folder at set-up,
    before the folder was checked (never an earlier run's file); nothing for another logger or none."""
    experiment = getattr(logger, "_experiment", None) if logger is not None else None
    path = getattr(getattr(getattr(experiment, "file_writer", None), "event_writer", None), "_file_name", None)
    if path:
        experiment.close()
        Path(path).unlink(missing_ok=True)
        logger._experiment = None
