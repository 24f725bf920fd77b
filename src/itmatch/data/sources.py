"""What `--data` may be: a precomp folder of region features, a raw-image source (photos and
captions, itmatch.data.raw), or a folder of photos without captions (itmatch.data.photos: for
indexing only). Training, evaluation, indexing and the vocabulary open splits through here.

A folder with `{split}_ims.npy` files is a precomp folder even if it also holds a caption CSV; a
path that is neither reads as a precomp folder, whose errors name the files it lacks.
"""

from __future__ import annotations

from pathlib import Path

from itmatch.data.photos import SPLIT as PHOTO_SPLIT
from itmatch.data.photos import is_photo_folder, open_photo_folder
from itmatch.data.precomp import PrecompSplit, list_splits, read_captions
from itmatch.data.raw import RawImageSplit, RawSource, source_file
from itmatch.data.shards import ShardSource, is_shard_source
from itmatch.errors import DataError, InputError


def is_raw(data: str | Path) -> bool:
    """Photos with captions: a caption file's source, or tar shards (whose captions may be absent)."""
    data = Path(data)
    return not (data.is_dir() and list_splits(data)) and (source_file(data) is not None or is_shard_source(data))


def photo_source(data: str | Path) -> RawSource | ShardSource:
    """The photo source of `data`, with `split_names()` and `open(split, verify_images, progress)`."""
    return ShardSource(data) if source_file(Path(data)) is None and is_shard_source(data) else RawSource(data)


def holds_photos(data: str | Path) -> bool:
    """Photos, with or without captions (else: a precomp folder, or nothing usable)."""
    return is_raw(data) or is_photo_folder(data)


def split_names(data: str | Path) -> list[str]:
    if is_photo_folder(data):
        return [PHOTO_SPLIT]
    return photo_source(data).split_names() if is_raw(data) else list_splits(data)


def default_split(data: str | Path) -> str:
    """`test` when `data` has it, else its only split (what indexing takes by default)."""
    names = split_names(data)
    if "test" in names or not names:
        return "test"  # a folder without it names the files it lacks when opened
    if len(names) > 1:
        raise DataError(data, f"has no split 'test'; choose one of {', '.join(names)} with --split")
    return names[0]


def open_split(
    data: str | Path, split: str, max_captions: int | None = None, progress: bool = True, captionless: bool = False
) -> PrecompSplit | RawImageSplit:
    """A split of region features or of raw images (every image checked; see `skipped`); with
    `captionless`, a folder of photos without captions too (what an index can take)."""
    if is_photo_folder(data):
        if not captionless:
            raise _no_captions(data)
        return open_photo_folder(data, split, progress)
    if not is_raw(data):
        return PrecompSplit(data, split, max_captions=max_captions)
    opened = photo_source(data).open(split, progress=progress)
    if not opened.captions_per_image and not captionless:
        raise _no_captions(data)
    if max_captions is not None:
        opened.truncate_captions(max_captions)
    return opened


def split_captions(data: str | Path, split: str) -> list[str]:
    """A split's captions, without opening its features or images (for the vocabulary)."""
    if is_photo_folder(data):
        raise _no_captions(data)
    if is_raw(data):
        return photo_source(data).open(split, verify_images=False).captions
    return read_captions(Path(data) / f"{split}_caps.txt")


def _no_captions(data: str | Path) -> DataError:
    return DataError(
        data,
        "holds photos without captions (no captions.csv, dataset_*.json or captions in its shards): "
        "nothing to train or evaluate on",
    )


def check_image_input(split: PrecompSplit | RawImageSplit, model) -> None:
    """Raw images need a model with a backbone (it reads pixels), region features one without."""
    if isinstance(split, RawImageSplit) and model.backbone is None:
        raise InputError(
            f"{split.source} holds raw images, but this {model.architecture} model reads region features: "
            "extract them first (`itmatch extract`), or train a model on the raw images"
        )
    if isinstance(split, PrecompSplit) and model.backbone is not None:
        raise InputError(
            f"{split.data_dir} holds region features, but this model reads pixels through its "
            f"{model.backbone.config.name} backbone (train without backbone.*, or --set backbone=null)"
        )
