"""Photos without captions: a plain folder of photos (a gallery to index and search), or photo
files given one by one (a query).

Every image file under a photo folder, found by its suffix (subfolders included, hidden files and
folders not), is a photo of the folder's one split `all`, in the sorted order of its path relative
to the folder, which is also its id. Photos that cannot be decoded are left out and listed in
`RawImageSplit.skipped`, as the captioned sources do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from itmatch.data.precomp import list_splits
from itmatch.data.raw import RawImageSplit, Skipped, check_images, source_file
from itmatch.errors import DataError

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT = "all"


def is_photo_folder(path: str | Path) -> bool:
    """A folder of photos with neither captions nor precomputed features."""
    path = Path(path)
    if not path.is_dir() or list_splits(path) or source_file(path) is not None:
        return False
    return next(_photo_files(path), None) is not None


def open_photo_folder(folder: str | Path, split: str = SPLIT, progress: bool = True) -> RawImageSplit:
    """The photos of `folder` (every one decoded once; unreadable ones are left out)."""
    folder = Path(folder)
    if split != SPLIT:
        raise DataError(folder, f"has no split {split!r}: a folder of photos without captions is one split, {SPLIT!r}")
    paths = sorted(_photo_files(folder), key=lambda path: path.relative_to(folder).as_posix())
    sizes, reasons = check_images(paths, progress)
    if all(reasons):
        raise DataError(folder, f"has no readable photos ({len(paths)} left out, e.g. {reasons[0]})")
    return _photo_split(folder, [path.relative_to(folder).as_posix() for path in paths], paths, sizes, reasons)


def open_photos(paths: list[Path]) -> RawImageSplit:
    """Photo files as a split of their own (ids: the paths as given); an unreadable one is an error."""
    paths = [Path(path) for path in paths]
    sizes, reasons = check_images(paths, progress=False)
    problem = next((reason for reason in reasons if reason), None)
    if problem:
        raise DataError(None, problem)
    return _photo_split(paths[0].parent, [str(path) for path in paths], paths, sizes, reasons)


def _photo_split(folder: Path, ids: list[str], paths: list[Path], sizes: list, reasons: list) -> RawImageSplit:
    usable = [row for row, reason in enumerate(reasons) if reason is None]
    return RawImageSplit(
        source=folder,
        captions_path=folder,
        split=SPLIT,
        ids=[ids[row] for row in usable],
        image_paths=[paths[row] for row in usable],
        captions=[],
        captions_per_image=0,
        image_sizes=np.array([sizes[row] for row in usable], dtype=np.int64).reshape(-1, 2),
        skipped=[Skipped(ids[row], reason) for row, reason in enumerate(reasons) if reason is not None],
    )


def _photo_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.suffix.lower() in PHOTO_SUFFIXES and not hidden and path.is_file():
            yield path
