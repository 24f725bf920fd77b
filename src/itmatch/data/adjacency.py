"""CMCAN's directional region graph, as the official `context_extractor/adj.py` builds it.

For every region i, the plane around its box centre is split into four sectors (below, right,
above, left) and i is linked to its `per_direction` nearest regions in each sector.
`adjacency[n, i, j] = 1` means region j is a neighbour of region i in image n (row i; the graph is
directed). The official files are `*_ims_dir_selfadj4.npy`: one neighbour per direction plus a
self loop on the diagonal.

Ties in distance are broken by the lowest region index (a stable sort); the official code uses
`torch.topk`, whose order among equal values is unspecified. Real detector boxes have no ties.
"""

from __future__ import annotations

import numpy as np

from itmatch.errors import InputError

# Sector edges on theta = atan2(y_i - y_j, x_j - x_i): [-3pi/4, -pi/4) below, [-pi/4, pi/4) right,
# [pi/4, 3pi/4) above, the rest left. searchsorted(side="right") yields 0..4; 0 and 4 are "left".
_EDGES = np.array([-3 * np.pi / 4, -np.pi / 4, np.pi / 4, 3 * np.pi / 4])
_SECTOR_OF_BIN = np.array([3, 0, 1, 2, 3])
_NO_SECTOR = -1  # the diagonal: a region is never its own directional neighbour

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
