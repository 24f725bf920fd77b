"""Writing files so that a reader, or a run killed mid-write, never sees a partial file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from itmatch.errors import DataError, ItmatchError

LOCK_FILE = ".itmatch.lock"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, flushed to disk, then renamed. A failed
    write (disk full, no permission) is a DataError naming the file; the previous file is intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # mkstemp's 0600 would hide shared data from other users
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from None
        raise


def _write_error(path: Path, error: OSError) -> DataError:
    kept = "the previous version is intact" if path.exists() else "nothing was written"
    return DataError(path, f"cannot be written ({error.strerror or error}); {kept}")


def remove_leftover_temps(folder: Path) -> None:
    """Deletes the temporary files of atomic writes killed mid-way (`.NAME.*.tmp`)."""
    for temp in Path(folder).glob(".*.tmp"):
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (created if needed) while the block runs; another
    process holding it is an ItmatchError. The lock ends with the process, even when killed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a")
    except OSError as error:
        raise DataError(folder, f"cannot be used ({error.strerror or error})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ItmatchError(f"{folder}: another process is using this {what} right now") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ResumableArray:
    """A float32 .npy filled in order, batch by batch, that survives being killed: rows go to
    `{path}.partial` (a memory map) and, once flushed, `{path}.progress` records how many are done
    and for which `key` (what they were computed from). A run with the same key and shape continues
    there; `finish` renames the complete file into place."""

    def __init__(self, path: Path, shape: tuple[int, ...], key: str):
        self.path, self.shape, self.key = Path(path), tuple(shape), key
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.marker = self.path.with_name(self.path.name + ".progress")
        self.done = self._rows_done()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+" if self.done else "w+"
        self.array = np.lib.format.open_memmap(self.partial, mode=mode, dtype=np.float32, shape=self.shape)

    def _rows_done(self) -> int:
        try:
            progress = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return 0
        same = progress.get("key") == self.key and tuple(progress.get("shape", ())) == self.shape
        return int(progress.get("done", 0)) if same and self.partial.exists() else 0

    def append(self, rows: np.ndarray) -> None:
        self.array[self.done : self.done + len(rows)] = rows
        self.array.flush()  # the rows reach the disk before the marker counts them
        self.done += len(rows)
        record = {"done": self.done, "shape": list(self.shape), "key": self.key}
        atomic_write(self.marker, lambda file: file.write(json.dumps(record).encode()))

    def finish(self) -> None:
        if self.done != self.shape[0]:
            raise ValueError(f"{self.path}: {self.done} of {self.shape[0]} rows written")
        self.array.flush()
        del self.array
        os.replace(self.partial, self.path)
        self.marker.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (checkpoints and weights are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
