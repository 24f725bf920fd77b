"""Bidirectional retrieval metrics: ranks, R@K, medr, meanr, rSum, and the COCO 1K fold protocol.

`sims` is an (n_images, n_captions) score matrix, higher = more similar; caption c belongs to
image c // captions_per_image.

Tie rule: an item with the same score as the target and a smaller index ranks before it, as in
a stable descending sort (`argsort(-row, kind="stable")`, the official evaluation code). So
rank = #(scores strictly greater) + #(scores equal with a smaller index), 0-based.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from itmatch.errors import InputError

# Peak temporary memory per chunk: a 5,000 x 25,000 matrix is processed ~670 rows at a time.
DEFAULT_CHUNK_BYTES = 64 * 2**20
# Boolean temporaries per cell in a chunk: `>`, `==`, the index mask, and their `&`.
_BYTES_PER_CELL = 4

_KEYS = ("r1", "r5", "r10", "medr", "meanr")
_RECALLS = ("r1", "r5", "r10")
_ROW_LABELS = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "medr": "medr", "meanr": "meanr"}


def _to_numpy(sims: Any) -> np.ndarray:
    if isinstance(sims, torch.Tensor):
        sims = sims.detach().cpu()
        # numpy has no bfloat16; widening to float32 is exact, so ties are kept.
        if sims.is_floating_point():
            sims = sims.to(torch.float64 if sims.dtype == torch.float64 else torch.float32)
        sims = sims.numpy()
    return np.asarray(sims)


def _row_slices(n_rows: int, n_cols: int, chunk_bytes: int) -> Iterator[slice]:
    step = max(1, chunk_bytes // (max(n_cols, 1) * _BYTES_PER_CELL))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _check_captions_per_image(cpi: int) -> None:
    if isinstance(cpi, bool) or not isinstance(cpi, (int, np.integer)):
        raise InputError(f"captions_per_image must be an int, got {cpi!r}")
    if cpi < 1:
        raise InputError(f"captions_per_image must be >= 1, got {cpi}")


def _check_shape(sims: np.ndarray, captions_per_image: int) -> None:
    _check_captions_per_image(captions_per_image)
    if sims.ndim != 2:
        raise InputError(f"sims must be 2-D (n_images, n_captions), got shape {sims.shape}")
    if sims.dtype.kind not in "iuf":
        raise InputError(f"sims must hold real numbers, got dtype {sims.dtype}")
    n_images, n_captions = sims.shape
    if n_images == 0:
        raise InputError(f"sims has no images (shape {sims.shape})")
    if n_captions != n_images * captions_per_image:
        raise InputError(
            f"sims has {n_captions} captions for {n_images} images; expected "
            f"{n_images * captions_per_image} ({captions_per_image} per image)"
        )


def _check_finite(sims: np.ndarray, chunk_bytes: int) -> None:
    if sims.dtype.kind != "f":
        return
    # Chunked so that the check itself stays within the memory budget.
    for rows in _row_slices(sims.shape[0], sims.shape[1], chunk_bytes):
        if not np.isfinite(sims[rows]).all():
            raise InputError("sims contains NaN or inf")


def _validated(sims: Any, captions_per_image: int, chunk_bytes: int) -> np.ndarray:
    sims = _to_numpy(sims)
    _check_shape(sims, captions_per_image)
    _check_finite(sims, chunk_bytes)
    return sims


def _i2t(sims: np.ndarray, cpi: int, chunk_bytes: int) -> np.ndarray:
    n_images, n_captions = sims.shape
    own = sims.reshape(n_images, n_images, cpi)[np.arange(n_images), np.arange(n_images)]
    # The image's best caption in a stable descending sort is its highest-scoring one, the
    # first among equals; its position is the minimum over the image's captions.
    best = np.arange(n_images) * cpi + own.argmax(axis=1)
    target = own.max(axis=1)
    cols = np.arange(n_captions)
    ranks = np.empty(n_images, dtype=np.int64)
    for rows in _row_slices(n_images, n_captions, chunk_bytes):
        chunk, t = sims[rows], target[rows, None]
        ties_before = (chunk == t) & (cols < best[rows, None])
        ranks[rows] = np.count_nonzero(chunk > t, axis=1) + np.count_nonzero(ties_before, axis=1)
    return ranks


def _t2i(sims: np.ndarray, cpi: int, chunk_bytes: int) -> np.ndarray:
    n_images, n_captions = sims.shape
    image_of = np.arange(n_captions) // cpi
    target = sims[image_of, np.arange(n_captions)]
    ranks = np.zeros(n_captions, dtype=np.int64)
    # Row chunks keep memory access contiguous; each chunk adds its counts to every caption.
    for rows in _row_slices(n_images, n_captions, chunk_bytes):
        chunk = sims[rows]
        image_idx = np.arange(rows.start, rows.stop)[:, None]
        ties_before = (chunk == target) & (image_idx < image_of)
        ranks += np.count_nonzero(chunk > target, axis=0) + np.count_nonzero(ties_before, axis=0)
    return ranks


def i2t_ranks(sims: Any, captions_per_image: int = 5, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """Image-to-text ranks, shape (n_images,): 0-based rank of the best of each image's captions.

    Ties: an equal score with a smaller caption index ranks before (stable descending sort), so
    rank = #(strictly greater) + #(equal with a smaller index). Rows are processed in chunks of
    about `chunk_bytes` of temporaries.
    """
    sims = _validated(sims, captions_per_image, chunk_bytes)
    return _i2t(sims, captions_per_image, chunk_bytes)


def t2i_ranks(sims: Any, captions_per_image: int = 5, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """Text-to-image ranks, shape (n_captions,): 0-based rank of each caption's image.

    Ties: an equal score with a smaller image index ranks before (stable descending sort), so
    rank = #(strictly greater) + #(equal with a smaller index). Rows are processed in chunks of
    about `chunk_bytes` of temporaries.
    """
    sims = _validated(sims, captions_per_image, chunk_bytes)
    return _t2i(sims, captions_per_image, chunk_bytes)


def recall_summary(ranks: Any) -> dict[str, float]:
    """R@1/5/10 (percent of ranks < K), medr = floor(median) + 1, meanr = mean + 1 (1-based)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise InputError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    return {
        "r1": float(100.0 * np.mean(ranks < 1)),
        "r5": float(100.0 * np.mean(ranks < 5)),
        "r10": float(100.0 * np.mean(ranks < 10)),
        "medr": float(np.floor(np.median(ranks)) + 1),
        "meanr": float(np.mean(ranks) + 1),
    }


def _rsum(i2t: dict[str, float], t2i: dict[str, float]) -> float:
    return float(sum(i2t[k] + t2i[k] for k in _RECALLS))


def retrieval_metrics(
    sims: Any,
    captions_per_image: int = 5,
    *,
    t2i_sims: Any | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Both directions on the whole matrix (Flickr30K 1K, COCO 5K): i2t, t2i, rsum, sizes.

    `t2i_sims`, when given, ranks images for captions instead of `sims` (which then ranks
    captions for images): inverted softmax normalises the two directions differently.
    """
    sims = _validated(sims, captions_per_image, chunk_bytes)
    t2i_sims = sims if t2i_sims is None else _validated(t2i_sims, captions_per_image, chunk_bytes)
    if t2i_sims.shape != sims.shape:
        raise InputError(f"t2i_sims has shape {t2i_sims.shape}, sims {sims.shape}")
    i2t = recall_summary(_i2t(sims, captions_per_image, chunk_bytes))
    t2i = recall_summary(_t2i(t2i_sims, captions_per_image, chunk_bytes))
    return {
        "i2t": i2t,
        "t2i": t2i,
        "rsum": _rsum(i2t, t2i),
        "n_images": int(sims.shape[0]),
        "n_captions": int(sims.shape[1]),
    }


def fold_metrics(
    sims: Any,
    n_folds: int = 5,
    captions_per_image: int = 5,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """COCO 1K protocol: score each of `n_folds` consecutive diagonal blocks and average.

    Every metric (r1..meanr, both directions) is the mean over folds, and rsum is the sum of the
    six averaged recalls. Off-diagonal blocks are never read, so they may hold anything (NaN
    included). n_images / n_captions are the sizes of one fold; "folds" lists each fold's dict.
    """
    sims = _to_numpy(sims)
    _check_shape(sims, captions_per_image)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise InputError(f"n_folds must be a positive int, got {n_folds!r}")
    if sims.shape[0] % n_folds:
        raise InputError(f"{sims.shape[0]} images cannot be split into {n_folds} equal folds")
    n_img = sims.shape[0] // n_folds
    n_cap = n_img * captions_per_image
    folds = [
        retrieval_metrics(
            sims[k * n_img : (k + 1) * n_img, k * n_cap : (k + 1) * n_cap],
            captions_per_image,
            chunk_bytes=chunk_bytes,
        )
        for k in range(n_folds)
    ]
    return aggregate_folds(folds)


def aggregate_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Averages per-fold `retrieval_metrics` dicts: every metric is the mean over folds and rsum
    the sum of the six averaged recalls. (SCAN, SGRAF and CMCAN print `mean_metrics[10] * 6`:
    six times the mean image-to-text recall, which leaves text-to-image out.)"""
    mean = {d: {k: float(np.mean([f[d][k] for f in folds])) for k in _KEYS} for d in ("i2t", "t2i")}
    return {
        "i2t": mean["i2t"],
        "t2i": mean["t2i"],
        "rsum": _rsum(mean["i2t"], mean["t2i"]),
        "n_images": folds[0]["n_images"],
        "n_captions": folds[0]["n_captions"],
        "n_folds": len(folds),
        "folds": folds,
    }


def format_results(results: dict[str, dict[str, Any]], title: str | None = None) -> str:
    """Plain-text table: one column per named result, rows i2t/t2i R@1..meanr and rSum."""
    if not results:
        raise InputError("format_results needs at least one result")
    labels = [f"{d} {_ROW_LABELS[k]}" for d in ("i2t", "t2i") for k in _KEYS] + ["rSum"]
    columns = [
        [f"{m[d][k]:.1f}" for d in ("i2t", "t2i") for k in _KEYS] + [f"{m['rsum']:.1f}"] for m in results.values()
    ]
    names = list(results)
    label_w = max(len(s) for s in labels)
    widths = [max(len(name), *(len(v) for v in col)) for name, col in zip(names, columns, strict=False)]
    header = "".ljust(label_w) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths, strict=False))
    lines = [title] if title else []
    lines.append(header)
    for i, label in enumerate(labels):
        cells = "".join(f"  {c[i]:>{w}}" for c, w in zip(columns, widths, strict=False))
        lines.append(label.ljust(label_w) + cells)
    return "\n".join(lines)
