"""One split of a SCAN/CMCAN "precomp" folder: region features, captions, boxes and image sizes.

Opening a split checks every file cheaply (headers, counts, caption text) and never reads the
features into memory: COCO's train features are 33 GB and stay a memory map.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from itmatch.errors import ConfigError, DataError
from itmatch.files import atomic_write
from itmatch.safe_pickle import load_npy

_FEATURES_SUFFIX = "_ims.npy"


def read_captions(path: str | Path) -> list[str]:
    """The stripped lines of a UTF-8 file; an empty line is an error, a final newline is not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as error:
        raise DataError(path, f"cannot be read ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(path, f"line {line} is not valid UTF-8 ({error.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [line.strip() for line in lines]
    if not lines:
        raise DataError(path, "is empty")
    empty = [number for number, line in enumerate(lines, start=1) if not line]
    if empty:
        more = f" (and {len(empty) - 1:,} more)" if len(empty) > 1 else ""
        raise DataError(path, f"line {empty[0]} is empty{more}")
    return lines


def list_splits(data_dir: str | Path) -> list[str]:
    """The splits of a precomp folder: the names before `_ims.npy`, sorted."""
    return sorted(p.name[: -len(_FEATURES_SUFFIX)] for p in Path(data_dir).glob(f"*{_FEATURES_SUFFIX}"))


def _row_repeat(features: np.ndarray, n_captions: int, repeat: int = 5) -> int:
    """`repeat` when the features hold each image `repeat` times in a row (one row per caption,
    as some SCAN dumps do), else 1. Two groups of rows are compared: cheap on a memory map."""
    rows = features.shape[0]
    if rows != n_captions or rows % repeat or rows < 2 * repeat:
        return 1
    groups = [features[g * repeat : (g + 1) * repeat] for g in range(2)]
    repeated = all(np.array_equal(group[0], group[k]) for group in groups for k in range(1, repeat))
    return repeat if repeated and not np.array_equal(groups[0][0], groups[1][0]) else 1


class CaptionedSplit:
    """Images with `captions_per_image` captions each, caption k describing image k // that: what
    datasets, training and evaluation read of a split (precomputed features or raw images)."""

    captions_path: Path
    captions: list[str]
    captions_per_image: int
    ids: list[str] | None
    n_images: int

    @property
    def n_captions(self) -> int:
        return self.n_images * self.captions_per_image

    def image_of_caption(self, k: int | np.ndarray) -> int | np.ndarray:
        return k // self.captions_per_image

    def truncate_captions(self, max_captions: int) -> None:
        """Keep the first `max_captions` captions and their images (all of them if fewer)."""
        if max_captions <= 0 or max_captions % self.captions_per_image:
            raise ConfigError(
                f"max_captions must be a positive multiple of {self.captions_per_image} "
                f"(captions per image in {self.captions_path}), got {max_captions}"
            )
        self.n_images = min(self.n_images, max_captions // self.captions_per_image)
        self.captions = self.captions[: self.n_captions]
        if self.ids is not None:
            self.ids = self.ids[: self.n_images]


class PrecompSplit(CaptionedSplit):
    """`{split}_ims.npy`, `{split}_caps.txt` and the optional ids, boxes, sizes and graph files."""

    def __init__(self, data_dir: str | Path, split: str, max_captions: int | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        self.features_path = self.data_dir / f"{split}{_FEATURES_SUFFIX}"
        self.captions_path = self.data_dir / f"{split}_caps.txt"
        self.ids_path = self.data_dir / f"{split}_ids.txt"
        self.boxes_path = self.data_dir / f"{split}_ims_bbx.npy"
        self.sizes_path = self.data_dir / f"{split}_ims_size.npy"

        features = self._open_features()
        self.captions = read_captions(self.captions_path)
        # Some dumps store each image once per caption (N_rows == N_captions): read every 5th row.
        self.row_repeat = _row_repeat(features, len(self.captions))
        self._features = features[:: self.row_repeat]
        self.n_images_in_file = self._features.shape[0]
        self.captions_per_image = self._count_captions_per_image()
        self.ids = self._read_ids()
        self.n_images = self.n_images_in_file
        if max_captions is not None:
            self.truncate_captions(max_captions)

    # ---- opening ----

    def _open_features(self) -> np.ndarray:
        features = load_npy(self.features_path, mmap=True)
        if features.ndim != 3:
            raise DataError(
                self.features_path,
                f"has shape {features.shape}: expected 3 axes (images, regions, feature dim)",
            )
        if not np.issubdtype(features.dtype, np.floating):
            raise DataError(self.features_path, f"has dtype {features.dtype}: expected floating point")
        if 0 in features.shape:
            raise DataError(self.features_path, f"has shape {features.shape}: no data")
        return features

    def per_image_rows(self, rows: np.ndarray | list) -> np.ndarray | list:
        """One entry per image of a file that may, like the features, repeat each image."""
        if self.row_repeat > 1 and len(rows) == self.n_images_in_file * self.row_repeat:
            return rows[:: self.row_repeat]
        return rows

    def _count_captions_per_image(self) -> int:
        n_captions, n_images = len(self.captions), self.n_images_in_file
        if n_captions % n_images:
            raise DataError(
                self.captions_path,
                f"has {n_captions:,} captions for {n_images:,} images in {self.features_path.name}: not a multiple",
            )
        return n_captions // n_images

    def _read_ids(self) -> list[str] | None:
        if not self.ids_path.exists():
            return None
        ids = self.per_image_rows(read_captions(self.ids_path))
        if len(ids) != self.n_images_in_file:
            raise DataError(
                self.ids_path,
                f"has {len(ids):,} ids for {self.n_images_in_file:,} images in {self.features_path.name}",
            )
        return ids

    # ---- features and captions ----

    @property
    def features(self) -> np.ndarray:
        """(n_images, R, F) memory map."""
        return self._features[: self.n_images]

    @property
    def n_regions(self) -> int:
        return self._features.shape[1]

    @property
    def feature_dim(self) -> int:
        return self._features.shape[2]

    def check_finite(self, image_index: int) -> None:
        """Raise a DataError if one image's features hold NaN or infinity (cheap: one image)."""
        if not np.isfinite(self._features[image_index]).all():
            raise DataError(self.features_path, f"image {image_index} has NaN or infinite features")

    # ---- boxes and sizes ----

    @property
    def has_boxes(self) -> bool:
        return self.boxes_path.exists() and self.sizes_path.exists()

    @property
    def boxes(self) -> np.ndarray:
        """(n_images, R, 4) float32 x1, y1, x2, y2 in pixels."""
        return self.file_boxes[: self.n_images]

    @property
    def image_sizes(self) -> np.ndarray:
        """(n_images, 2) int64 (w, h) in pixels."""
        return self.file_sizes[: self.n_images]

    @cached_property
    def file_boxes(self) -> np.ndarray:
        raw = load_npy(self.boxes_path)
        try:
            boxes = np.stack(raw.tolist()) if raw.dtype == object else raw
            boxes = self.per_image_rows(boxes.astype(np.float32))
        except (ValueError, TypeError) as error:
            raise DataError(self.boxes_path, f"does not hold numeric boxes ({error})") from None
        expected = (self.n_images_in_file, self.n_regions, 4)
        if boxes.shape != expected:
            raise DataError(
                self.boxes_path,
                f"has shape {boxes.shape}: expected {expected} to match {self.features_path.name}",
            )
        if not np.isfinite(boxes).all():
            bad = int(np.flatnonzero(~np.isfinite(boxes).all(axis=(1, 2)))[0])
            raise DataError(self.boxes_path, f"image {bad} has NaN or infinite box coordinates")
        return boxes

    @cached_property
    def file_sizes(self) -> np.ndarray:
        raw = load_npy(self.sizes_path)
        try:
            if raw.dtype == object:
                # CMCAN's format: one {'image_w', 'image_h'} dict per image.
                raw = np.array([(d["image_w"], d["image_h"]) for d in raw.tolist()], dtype=np.float64)
            sizes = self.per_image_rows(raw.astype(np.float64))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise DataError(
                self.sizes_path,
                f"must hold {{'image_w', 'image_h'}} dicts or (w, h) rows ({type(error).__name__}: {error})",
            ) from None
        expected = (self.n_images_in_file, 2)
        if sizes.shape != expected:
            raise DataError(
                self.sizes_path,
                f"has shape {sizes.shape}: expected {expected} to match {self.features_path.name}",
            )
        valid = np.isfinite(sizes).all(axis=1) & (sizes > 0).all(axis=1)
        if not valid.all():
            bad = int(np.flatnonzero(~valid)[0])
            raise DataError(self.sizes_path, f"image {bad} has size {sizes[bad].tolist()}: must be positive")
        return sizes.astype(np.int64)


def write_split_files(
    data_dir: str | Path,
    split: str,
    ids: list[str],
    boxes: np.ndarray,
    sizes: np.ndarray,
    captions: list[str] | None = None,
    photos: list[Path] | None = None,
) -> None:
    """The files beside `{split}_ims.npy`: ids, boxes (N, R, 4), (w, h) sizes and, when known,
    captions (in image order, the same number per image) and the photos' absolute paths (which
    the search page shows), each written atomically."""
    data_dir = Path(data_dir)

    def lines(items: list[str]):
        return lambda file: file.write("".join(f"{item}\n" for item in items).encode("utf-8"))

    atomic_write(data_dir / f"{split}_ids.txt", lines(ids))
    atomic_write(data_dir / f"{split}_ims_bbx.npy", lambda file: np.save(file, boxes.astype(np.float32)))
    atomic_write(data_dir / f"{split}_ims_size.npy", lambda file: np.save(file, sizes.astype(np.int64)))
    if captions is not None:
        atomic_write(data_dir / f"{split}_caps.txt", lines(captions))
    if photos is not None:
        atomic_write(data_dir / f"{split}_paths.txt", lines([str(photo.resolve()) for photo in photos]))
