"""The arrays of a search index on disk: raw files of fixed-size rows, appended in chunks and read
through memory maps, so that neither building nor serving holds the gallery in memory.

A file may hold more rows than the index's manifest counts (an append killed before its manifest
was renamed into place): readers see only the counted rows, and the next append writes over the
rest. Nothing here unpickles: rows are plain numbers, strings are UTF-8 bytes with end offsets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from itmatch.errors import DataError
from itmatch.models.base import Encoded

STORAGE_TYPES = {"float16": np.float16, "float32": np.float32}
PLAIN_TYPES = ("bool", "uint8", "int32", "int64", "float16", "float32")


class AppendArray:
    """Rows of one dtype and shape in `path`; `rows` of them are committed."""

    def __init__(self, path: Path, dtype: str, tail: tuple[int, ...], rows: int):
        if dtype not in PLAIN_TYPES or any(not isinstance(size, int) or size < 0 for size in tail):
            raise DataError(path, f"has an unsupported layout in the manifest ({dtype}, {list(tail)})")
        self.path, self.dtype, self.tail, self.rows = Path(path), np.dtype(dtype), tuple(tail), rows
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.tail, dtype=np.int64))
        self._view: np.ndarray | None = None

    def check(self) -> None:
        """The file holds at least the committed rows (else the index is damaged)."""
        size = self.path.stat().st_size if self.path.is_file() else -1
        if self.rows and size < self.rows * self.row_bytes:
            found = "is missing" if size < 0 else f"holds {size:,} bytes"
            raise DataError(self.path, f"{found}; the manifest counts {self.rows:,} rows of {self.row_bytes} bytes")

    @property
    def view(self) -> np.ndarray:
        """The committed rows, memory-mapped read-only (nothing is read until used)."""
        if self._view is None:
            shape = (self.rows, *self.tail)
            empty = self.rows == 0 or self.row_bytes == 0
            self._view = np.zeros(shape, self.dtype) if empty else np.memmap(self.path, self.dtype, "r", shape=shape)
        return self._view

    def append(self, values: np.ndarray) -> None:
        """Writes `values` after the committed rows and syncs them; the caller commits the count."""
        if tuple(values.shape[1:]) != self.tail:
            raise DataError(self.path, f"rows of shape {list(values.shape[1:])} cannot join rows of {list(self.tail)}")
        data = np.ascontiguousarray(values, dtype=self.dtype)
        with open(self.path, "r+b" if self.path.exists() else "w+b") as file:
            file.seek(self.rows * self.row_bytes)
            file.write(data.tobytes())
            file.truncate()
            file.flush()
            os.fsync(file.fileno())
        self.rows += len(values)
        self._view = None


class StringTable:
    """Strings in `{name}.txt` (UTF-8, back to back) with their end offsets in `{name}.end`."""

    def __init__(self, folder: Path, name: str, rows: int):
        self.text = AppendArray(folder / f"{name}.txt", "uint8", (), 0)
        self.ends = AppendArray(folder / f"{name}.end", "int64", (), rows)  # `check` counts the text

    def check(self) -> None:
        self.ends.check()
        self.text.rows = int(self.ends.view[-1]) if self.ends.rows else 0
        self.text.check()

    def __len__(self) -> int:
        return self.ends.rows

    def __getitem__(self, row: int) -> str:
        start = int(self.ends.view[row - 1]) if row else 0
        return bytes(self.text.view[start : int(self.ends.view[row])]).decode("utf-8")

    def all(self) -> list[str]:
        """Every string (for a look-up by value: ids to remove, ids already indexed)."""
        text, ends = bytes(self.text.view), self.ends.view.tolist()
        return [text[start:end].decode("utf-8") for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def append(self, strings: list[str]) -> None:
        encoded = [value.encode("utf-8") for value in strings]
        self.text.append(np.frombuffer(b"".join(encoded), dtype=np.uint8))
        self.ends.append(self.text.rows - sum(map(len, encoded)) + np.cumsum([len(b) for b in encoded], dtype=np.int64))


class EncodedStore:
    """An `Encoded` on disk. Per-item keys are rows (items, ...); keys padded along the word axis
    keep only the real words, one row per word (words, ...), with each item's word count and end;
    word-by-word keys (`Encoded.square`) keep each item's L x L real cells, one row per cell, with
    each item's end among the cells."""

    def __init__(self, folder: Path, side: str, schema: dict, items: int, words: int):
        self.side, self.padded = side, frozenset(schema["padded"])
        self.square = frozenset(schema.get("square", ()))
        self.word_ends = AppendArray(folder / f"{side}.word_end.bin", "int64", (), items if self.padded else 0)
        self.cell_ends = AppendArray(folder / f"{side}.cell_end.bin", "int64", (), items if self.square else 0)
        cells = int(self.cell_ends.view[-1]) if self.square and items else 0
        self.keys = {
            key: AppendArray(
                folder / f"{side}.{key}.bin",
                layout["dtype"],
                tuple(layout["shape"]),
                cells if key in self.square else words if key in self.padded else items,
            )
            for key, layout in schema["keys"].items()
        }

    @staticmethod
    def schema(encoded: Encoded, storage: str) -> dict:
        """The stored layout of encodings like `encoded`: floats in `storage`, word axes dropped."""
        keys = {}
        for key, value in encoded.tensors.items():
            dtype = storage if value.is_floating_point() else str(value.dtype).removeprefix("torch.")
            word_axes = 2 if key in encoded.square else 1 if key in encoded.padded else 0
            keys[key] = {"dtype": dtype, "shape": list(value.shape[1 + word_axes :])}
        return {"keys": keys, "padded": sorted(encoded.padded), "square": sorted(encoded.square)}

    def check(self) -> None:
        for array in (*self.keys.values(), self.word_ends, self.cell_ends):
            array.check()

    def __len__(self) -> int:
        return self.word_ends.rows if self.padded else max((array.rows for array in self.keys.values()), default=0)

    def item_bytes(self) -> int:
        """Bytes of one item read into memory (float32; padded keys at twice the mean word count)."""
        words = 2 * max(1, self.words // max(1, len(self)))
        rows = {key: words**2 if key in self.square else words if key in self.padded else 1 for key in self.keys}
        return max(1, sum(4 * int(np.prod(array.tail)) * rows[key] for key, array in self.keys.items()))

    @property
    def words(self) -> int:
        return int(self.word_ends.view[-1]) if self.padded and len(self) else 0

    def append(self, encoded: Encoded) -> None:
        """Appends the items of `encoded` (float keys rounded to the storage type, checked finite)."""
        real = encoded["mask"].cpu().bool() if self.padded else None
        for key, array in self.keys.items():
            value = encoded[key].detach().cpu()
            if key in self.square:
                value = value[real[:, :, None] & real[:, None, :]]
            elif key in self.padded:
                value = value[real]
            rows = value.numpy().astype(array.dtype)
            if rows.dtype.kind == "f" and not np.isfinite(rows).all():
                raise DataError(array.path, f"would hold values beyond {array.dtype} (store the index in float32)")
            array.append(rows)
        if self.padded:
            lengths = real.sum(1).numpy().astype(np.int64)
            if self.square:
                cells = int(self.cell_ends.view[-1]) if len(self) else 0
                self.cell_ends.append(cells + np.cumsum(lengths**2))
            self.word_ends.append(self.words + np.cumsum(lengths))

    def column(self, key: str, rows: slice | np.ndarray) -> np.ndarray:
        """One per-item key of some items, as float32 numpy (first-stage vectors)."""
        return np.array(self.keys[key].view[rows], dtype=np.float32)  # a copy: faiss and torch write

    def select(self, rows: slice | np.ndarray, device: torch.device | None = None) -> Encoded:
        """Items `rows` (a slice, or indices) read from disk into an `Encoded` on `device`, floats
        as float32 and padded keys padded to the longest of these items."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        tensors = {}
        if self.padded:
            lengths = _lengths(self.word_ends.view, rows)
            real = np.arange(max(int(lengths.max(initial=0)), 1))[None, :] < lengths[:, None]
            picks = {"words": (real, _word_rows(self.word_ends.view[rows], lengths))}
            if self.square:
                cells = _word_rows(self.cell_ends.view[rows], lengths**2)
                picks["cells"] = (real[:, :, None] & real[:, None, :], cells)
        for key, array in self.keys.items():
            if key in self.padded:
                where, source = picks["cells" if key in self.square else "words"]
                value = np.zeros((*where.shape, *array.tail), dtype=array.dtype)
                value[where] = array.view[source]
            else:
                value = np.asarray(array.view[rows])
            tensor = torch.from_numpy(np.ascontiguousarray(value))
            tensors[key] = (tensor.float() if tensor.is_floating_point() else tensor).to(device)
        return Encoded(tensors, self.padded, self.square)


def _lengths(ends: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The word counts of items `rows` from the items' word ends."""
    return ends[rows] - (ends[rows - 1] * (rows > 0))


def _word_rows(ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The word rows of items ending at `ends` with `lengths` words, item after item."""
    starts = ends - lengths
    offsets = np.cumsum(lengths) - lengths  # where each item's words begin in the result
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
