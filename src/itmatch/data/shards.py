"""Photos and captions in tar shards, the webdataset layout that large image-text collections ship
in: each sample is the files of one key in a tar (`KEY.jpg` or another photo suffix, `KEY.txt`
with its captions, one a line), the shards of a folder read in the sorted order of their names.

A folder of `.tar` files (or one `.tar` file) is a source; a shard named `{split}-{number}.tar`
belongs to the split before the last `-`, any other shard to the split `all`. Shards are read in
place, never extracted: listing a shard reads its headers only (tarfile seeks past the data),
and each photo is read from its offset in the shard when it is decoded, so a split of millions
of photos costs their names and offsets in memory, not their bytes. Compressed shards (`.tar.gz`)
cannot be read at an offset and are refused.

Samples go through the caption rules of the other raw sources (itmatch.data.raw): repeated and
empty captions dropped, the split's usual number of captions per image kept; a split in which no
sample has captions is a gallery of photos without captions (for `itmatch index`). A photo's id is
its key; its path, `SHARD.tar#MEMBER`, is what the index records and reads its picture from.
"""

from __future__ import annotations

import functools
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmatch.data.photos import PHOTO_SUFFIXES
from itmatch.data.raw import RawImageSplit, Skipped, _Collector, _Image, _with_enough_captions, check_images
from itmatch.errors import DataError

SHARD_SUFFIX = ".tar"
CAPTION_SUFFIX = ".txt"
MEMBER_MARK = ".tar#"  # between a shard and a member's name in a photo's path


@dataclass(frozen=True)
class ShardPhoto:
    """A photo inside a tar shard: opened from its offset, without extracting anything."""

    shard: Path
    name: str

    def __str__(self) -> str:
        return f"{self.shard}#{self.name}"

    def resolve(self) -> ShardPhoto:
        return ShardPhoto(self.shard.resolve(), self.name)

    def open(self) -> io.BytesIO:
        """The photo's bytes; a shard that changed since it was listed is a DataError naming it."""
        offset, size = _members(self.shard).get(self.name, (None, None))
        if offset is None:
            raise DataError(self, "no such member in the shard")
        with open(self.shard, "rb") as file:
            file.seek(offset)
            data = file.read(size)
        if len(data) != size:
            raise DataError(self, "the shard is shorter than its header says")
        return io.BytesIO(data)


def photo_at(path: str) -> ShardPhoto | Path:
    """A photo path as the index and `{split}_paths.txt` record it (`SHARD.tar#MEMBER` or a file)."""
    if MEMBER_MARK in path and not Path(path).exists():
        shard, name = path.split(MEMBER_MARK, 1)
        return ShardPhoto(Path(shard + SHARD_SUFFIX), name)
    return Path(path)


def is_shard_source(path: str | Path) -> bool:
    """A `.tar` file, or a folder holding `.tar` files (and no precomp features or caption file)."""
    path = Path(path)
    return path.suffix == SHARD_SUFFIX and path.is_file() or path.is_dir() and bool(_shards(path))


class ShardSource:
    """A folder of tar shards (or one shard), listed: the splits and their shards. Opens splits as
    `RawSource` does (itmatch.data.raw)."""

    def __init__(self, path: str | Path):
        self.path = self.file = Path(path)
        self.shards = _shards(self.path)
        if not self.shards:
            raise DataError(self.path, f"holds no {SHARD_SUFFIX} shards")

    def split_names(self) -> list[str]:
        return sorted({_split_of(shard) for shard in self.shards})

    def open(self, split: str, verify_images: bool = True, progress: bool = True) -> RawImageSplit:
        """The samples of `split`'s shards; `verify_images` decodes every photo once and leaves out
        those that are unusable (else the photos are not read: for captions alone)."""
        shards = [shard for shard in self.shards if _split_of(shard) == split]
        if not shards:
            raise DataError(self.path, f"has no shards of split {split!r}; its splits: {', '.join(self.split_names())}")
        collector, photos, skipped = _Collector(), {}, []
        for shard in shards:
            _read_shard(shard, collector, photos, skipped)
        named = [image for key, image in collector.images.items() if key in photos]
        skipped += [Skipped(key, "no photo in the shards") for key in collector.images if key not in photos]
        per_image = 0
        if any(image.captions for image in named):
            named, per_image = _with_enough_captions(named, skipped)
        paths = [photos[image.name] for image in named]
        sizes, reasons = check_images(paths, progress) if verify_images else (None, [None] * len(named))
        usable = [row for row, reason in enumerate(reasons) if reason is None]
        skipped += [Skipped(named[row].name, reasons[row]) for row in range(len(named)) if reasons[row] is not None]
        if not usable:
            raise DataError(self.path, f"split {split!r} has no usable photos ({len(skipped)} left out)")
        return RawImageSplit(
            source=self.path,
            captions_path=self.path,
            split=split,
            ids=[named[row].name for row in usable],
            image_paths=[paths[row] for row in usable],
            captions=[caption for row in usable for caption in named[row].captions[:per_image]],
            captions_per_image=per_image,
            image_sizes=None
            if sizes is None
            else np.array([sizes[row] for row in usable], dtype=np.int64).reshape(-1, 2),
            skipped=skipped,
        )


def _read_shard(shard: Path, collector: _Collector, photos: dict, skipped: list) -> None:
    """Adds a shard's captions to `collector` and its photos (key -> ShardPhoto) to `photos`."""
    for name in _members(shard):
        key, suffix = _key_and_suffix(name)
        if suffix in PHOTO_SUFFIXES:
            if key in photos:
                skipped.append(Skipped(f"{shard.name}#{name}", f"{key}: a second photo of the key"))
            else:
                photos[key] = ShardPhoto(shard, name)
                collector.images.setdefault(key, _Image(key))
        elif suffix == CAPTION_SUFFIX:
            text = ShardPhoto(shard, name).open().read().decode("utf-8", errors="replace")
            for line, caption in enumerate(text.splitlines(), start=1):
                collector.add(key, caption, f"{shard.name}#{name}:{line}")


def _key_and_suffix(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: the key up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ("." + rest.lower() if dot else "")


@functools.lru_cache(maxsize=64)
def _members(shard: Path) -> dict[str, tuple[int, int]]:
    """Each regular file of a shard: (offset of its data, size), from the headers alone."""
    try:
        with tarfile.open(shard, "r:") as tar:
            return {member.name: (member.offset_data, member.size) for member in tar if member.isfile()}
    except tarfile.ReadError as error:
        raise DataError(shard, f"is not an uncompressed tar shard ({error})") from None
    except OSError as error:
        raise DataError(shard, f"cannot be read ({error.strerror or error})") from None


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == SHARD_SUFFIX else []
    return sorted(shard for shard in path.glob(f"*{SHARD_SUFFIX}") if shard.is_file())


def _split_of(shard: Path) -> str:
    split, dash, _ = shard.stem.rpartition("-")
    return split if dash and split else "all"
