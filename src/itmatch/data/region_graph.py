"""The directional region graph, one data provider among others: built from a split's boxes and
image sizes as CMCAN's official `context_extractor/adj.py` builds it, read from the official
files when present, and cached beside the features.

For every region i, the plane around its box centre is split into four sectors (below, right,
above, left) and i is linked to its `per_direction` nearest regions in each sector.
`adjacency[n, i, j] = 1` means region j is a neighbour of region i in image n (row i; the graph is
directed). The official files are `*_ims_dir_selfadj4.npy`: one neighbour per direction plus a
self loop on the diagonal.

Ties in distance are broken by the lowest region index (a stable sort); the official code uses
`torch.topk`, whose order among equal values is unspecified. Real detector boxes have no ties.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path

import numpy as np

from itmatch.errors import DataError, InputError
from itmatch.files import atomic_write
from itmatch.safe_pickle import load_npy

# Sector edges on theta = atan2(y_i - y_j, x_j - x_i): [-3pi/4, -pi/4) below, [-pi/4, pi/4) right,
# [pi/4, 3pi/4) above, the rest left. searchsorted(side="right") yields 0..4; 0 and 4 are "left".
_EDGES = np.array([-3 * np.pi / 4, -np.pi / 4, np.pi / 4, 3 * np.pi / 4])
_SECTOR_OF_BIN = np.array([3, 0, 1, 2, 3])
_NO_SECTOR = -1  # the diagonal: a region is never its own directional neighbour

# Images per block when checking a graph file's values (bounded memory on 113k images).
_CHECK_CHUNK = 4096
# About 60 KB of float64 temporaries per image: 1,024 images keep memory near 100 MB.
_CHUNK = 1024


def adjacency_file_name(split: str, per_direction: int = 1, self_loops: bool = True) -> str:
    """The official file names: `{split}_ims_dir_selfadj{4k}.npy`; `..._adj{4k}.npy` without loops."""
    kind = "selfadj" if self_loops else "adj"
    return f"{split}_ims_dir_{kind}{4 * per_direction}.npy"


def directional_adjacency(
    boxes: np.ndarray,
    image_sizes: np.ndarray,
    per_direction: int = 1,
    self_loops: bool = True,
) -> np.ndarray:
    """(N, R, R) float32 0/1 graph from boxes (N, R, 4) x1, y1, x2, y2 and sizes (N, 2) (w, h)."""
    boxes = np.asarray(boxes)
    image_sizes = np.asarray(image_sizes)
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise InputError(f"boxes must have shape (N, R, 4), got {boxes.shape}")
    if image_sizes.shape != (boxes.shape[0], 2):
        raise InputError(f"image_sizes must have shape ({boxes.shape[0]}, 2), got {image_sizes.shape}")
    if per_direction < 1:
        raise InputError(f"per_direction must be at least 1, got {per_direction}")
    n_images, n_regions = boxes.shape[:2]
    adjacency = np.zeros((n_images, n_regions, n_regions), dtype=np.float32)
    for start in range(0, n_images, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        adjacency[chunk] = _chunk_adjacency(boxes[chunk], image_sizes[chunk], per_direction)
    if self_loops:
        adjacency[:, np.arange(n_regions), np.arange(n_regions)] = 1
    return adjacency


def _chunk_adjacency(boxes: np.ndarray, image_sizes: np.ndarray, per_direction: int) -> np.ndarray:
    """Boolean (n, R, R) neighbour mask of a chunk of images, without self loops."""
    sizes = image_sizes.astype(np.float64)
    scale = np.concatenate([sizes, sizes], axis=1)[:, None, :]  # (w, h, w, h)
    normalised = boxes.astype(np.float64) / scale
    centres = normalised[..., :2] + 0.5 * (normalised[..., 2:] - normalised[..., :2])
    x, y = centres[..., 0], centres[..., 1]
    # Same expressions as the official code, so that coincident centres get dx = -0.0 and thus
    # theta = atan2(0, -0) = pi ("left"), as there.
    dx = -(x[:, :, None] - x[:, None, :])
    dy = y[:, :, None] - y[:, None, :]
    rho = np.sqrt(dx**2 + dy**2)
    sector = _SECTOR_OF_BIN[np.searchsorted(_EDGES, np.arctan2(dy, dx), side="right")]
    n_regions = boxes.shape[1]
    sector[:, np.arange(n_regions), np.arange(n_regions)] = _NO_SECTOR

    neighbours = np.zeros(rho.shape, dtype=bool)
    positions = np.broadcast_to(np.arange(n_regions), rho.shape)
    for s in range(4):
        in_sector = sector == s
        # Rank every j by distance inside sector s (stable: ties go to the lower index).
        order = np.argsort(np.where(in_sector, rho, np.inf), axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, positions, axis=-1)
        neighbours |= in_sector & (rank < per_direction)
    return neighbours


# The graphs of each open split, by (per_direction, self_loops): memory maps, opened once.
_OPENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_region_graph(split, per_direction: int = 1, self_loops: bool = True) -> np.ndarray:
    """(n_images, R, R) directional region graph of a precomp split, a memory map.

    Uses `{data_dir}/{adjacency_file_name(...)}` when present, else the copy in
    `graph_cache_dir(split)`; a file older than the boxes or sizes is ignored. Otherwise the graph
    is built from boxes and sizes and saved in the data folder if writable (replacing a stale
    file), else in the cache folder.
    """
    opened = _OPENED.setdefault(split, {})
    key = (per_direction, self_loops)
    if key not in opened:
        opened[key] = _load_or_build(split, per_direction, self_loops)
    return opened[key][: split.n_images]


def cache_root() -> Path:
    """itmatch's cache folder: $ITMATCH_CACHE, else ~/.cache/itmatch."""
    return Path(os.environ.get("ITMATCH_CACHE") or Path.home() / ".cache" / "itmatch")


def graph_cache_dir(split) -> Path:
    """Where graphs go when the data folder is read-only: one folder per data folder."""
    digest = hashlib.sha256(str(split.data_dir.resolve()).encode()).hexdigest()[:16]
    return cache_root() / digest


def _load_or_build(split, per_direction: int, self_loops: bool) -> np.ndarray:
    name = adjacency_file_name(split.split, per_direction, self_loops)
    for path in (split.data_dir / name, graph_cache_dir(split) / name):
        if path.exists() and not _is_stale(split, path):
            return _open_graph(split, path)
    if not split.has_boxes:
        missing = split.boxes_path if not split.boxes_path.exists() else split.sizes_path
        raise DataError(missing, f"file not found: it is needed to build {name}")
    graph = directional_adjacency(split.file_boxes, split.file_sizes, per_direction, self_loops)
    folder = split.data_dir if _is_writable(split.data_dir) else graph_cache_dir(split)
    atomic_write(folder / name, lambda file: np.save(file, graph))
    return _open_graph(split, folder / name)


def _is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _is_stale(split, path: Path) -> bool:
    """Older than the boxes or sizes it derives from (when those are present)."""
    sources = [p.stat().st_mtime_ns for p in (split.boxes_path, split.sizes_path) if p.exists()]
    return bool(sources) and path.stat().st_mtime_ns < max(sources)


def _open_graph(split, path: Path) -> np.ndarray:
    graph = split.per_image_rows(load_npy(path, mmap=True))
    expected = (split.n_images_in_file, split.n_regions, split.n_regions)
    if graph.shape != expected:
        raise DataError(path, f"has shape {graph.shape}: expected {expected} to match {split.features_path.name}")
    for start in range(0, expected[0], _CHECK_CHUNK):
        block = graph[start : start + _CHECK_CHUNK]
        if not ((block == 0) | (block == 1)).all():
            raise DataError(path, "holds values other than 0 and 1")
    return graph
