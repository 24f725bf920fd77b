"""A search index: the images of one or more splits (precomp features, photos with captions, or a
folder of photos alone), and their captions, encoded once by one model, with faiss first-stage
indexes and the pictures the web page shows. Photos are read as the model reads them
(itmatch.photo_reader): by its own backbone, or through the extraction its training features came
from.

An index folder holds `model.pt` (a copy of the checkpoint), `index.pt` (the encodings, region
boxes, faiss indexes, captions and where each image came from) and `pictures/{n}.jpg`. `index.pt`
is rewritten atomically as a whole, so an interrupted `itmatch index` leaves the previous index
intact; running it again on a grown data folder, or on another split, encodes only the images that
are not in the index yet (an image is known by its data folder, split and id).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmatch.checkpoint import model_from_payload, read_checkpoint
from itmatch.data.pictures import picture_reader
from itmatch.data.precomp import PrecompSplit, read_captions
from itmatch.data.raw import RawImageSplit
from itmatch.data.sources import default_split, holds_photos, open_split
from itmatch.device import default_device
from itmatch.errors import CheckpointError, DataError, InputError
from itmatch.evaluation.runner import encode_captions, encode_split
from itmatch.files import LOCK_FILE, atomic_write, folder_lock, remove_leftover_temps, sha256
from itmatch.models.base import Encoded, Matcher
from itmatch.photo_reader import PhotoReader
from itmatch.retrieval import embeddings, encode_queries
from itmatch.safe_pickle import load_error
from itmatch.service.render import blank_picture, picture_size, read_photo, save_picture

FORMAT = "itmatch-index"
VERSION = 1
INDEX_FILE = "index.pt"
MODEL_FILE = "model.pt"
PICTURES = "pictures"
# Optional file beside a split: one photo path per image (relative to the data folder, or absolute).
PHOTO_PATHS = "{split}_paths.txt"
INDEX_KEYS = ("checkpoint_sha256", "sources", "images", "captions", "caption_image", "boxes")
INDEX_KEYS += ("encoded_images", "encoded_texts", "first_stage")
# Images without a sizes file are drawn at this (w, h).
DEFAULT_SIZE = (640, 480)


@dataclass
class Gallery:
    """Images and their captions, encoded, with where each image came from."""

    images: list[dict]  # per image: {"source": number in SearchIndex.sources, "id", "path": photo or None}
    captions: list[str]
    caption_image: Tensor  # (n_captions,) the image each caption was written for
    boxes: Tensor  # (n_images, regions, 4) x1, y1, x2, y2 as fractions of the image; NaN: unknown
    encoded_images: Encoded
    encoded_texts: Encoded

    def __add__(self, other: Gallery) -> Gallery:
        return Gallery(
            self.images + other.images,
            self.captions + other.captions,
            torch.cat([self.caption_image, other.caption_image + len(self.images)]),
            torch.cat([self.boxes, other.boxes]),
            Encoded.cat([self.encoded_images, other.encoded_images]),
            Encoded.cat([self.encoded_texts, other.encoded_texts]),
        )


@dataclass
class SearchIndex:
    """An index folder opened: its model, its gallery and the first-stage indexes."""

    folder: Path
    model: Matcher
    checkpoint_sha256: str
    sources: list[dict]  # {"data": absolute data folder, "split"}
    gallery: Gallery | None  # None only while a new index receives its first images
    # faiss indexes of the model's embeddings, "images" and "captions"; empty for models without.
    first_stage: dict[str, faiss.Index]
    # How photos become features for a model that reads features: the checkpoint's extraction
    # record, with the weights file last used (itmatch.extract.RECORD_KEYS); None otherwise.
    extraction: dict | None = None

    @property
    def n_images(self) -> int:
        return 0 if self.gallery is None else len(self.gallery.images)

    def picture_path(self, image: int) -> Path:
        return self.folder / PICTURES / f"{image}.jpg"

    @classmethod
    def open(cls, folder: str | Path, device: torch.device | str | None = None) -> SearchIndex:
        """The index in `folder`, its model on `device` (default: CUDA if present)."""
        folder = Path(folder)
        path = folder / INDEX_FILE
        payload = _read_index_file(path)
        if _sha256(folder / MODEL_FILE) != payload["checkpoint_sha256"]:
            raise DataError(
                folder / MODEL_FILE,
                f"is not the checkpoint this index was built with ({INDEX_FILE} records another hash)",
            )
        model, extraction = _load_model(folder / MODEL_FILE, device)
        try:
            gallery = Gallery(
                payload["images"],
                payload["captions"],
                payload["caption_image"],
                payload["boxes"],
                _decode_encoded(payload["encoded_images"]).to(model.device),
                _decode_encoded(payload["encoded_texts"]).to(model.device),
            )
            first_stage = {name: _faiss_index(data) for name, data in payload["first_stage"].items()}
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as error:
            raise DataError(path, f"is damaged ({type(error).__name__}: {_first_line(error)})") from None
        extraction = payload.get("extraction") or extraction
        return cls(folder, model, payload["checkpoint_sha256"], payload["sources"], gallery, first_stage, extraction)

    def photo_reader(self, weights: str | Path | None = None) -> PhotoReader:
        """How this index's model reads photos (`weights`: the extraction's weights file, when it moved)."""
        return PhotoReader(self.model, self.extraction, self.folder / MODEL_FILE, weights)

    @classmethod
    def create(cls, folder: Path, checkpoint: Path, checksum: str, device=None) -> SearchIndex:
        """A new, empty index of `checkpoint` in `folder` (the checkpoint is copied into it)."""
        model, extraction = _load_model(checkpoint, device)
        try:  # searching needs a model that reads text: find out before indexing anything
            with torch.no_grad():
                encode_queries(model, ["a"])
        except InputError as error:
            raise CheckpointError(checkpoint, f"cannot be searched by text: {error}") from None
        leftovers = {p.name for p in folder.iterdir()} - {MODEL_FILE, PICTURES, LOCK_FILE} if folder.is_dir() else set()
        if leftovers:
            raise DataError(folder, f"is not an itmatch index (no {INDEX_FILE}) and not empty; choose a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        with open(checkpoint, "rb") as source:
            atomic_write(folder / MODEL_FILE, lambda file: shutil.copyfileobj(source, file))
        return cls(folder, model, checksum, [], None, {}, extraction)

    def add(self, source: dict, part: Gallery) -> None:
        """Appends images (and their captions) of `source`; their pictures must be written already."""
        if source not in self.sources:
            self.sources.append(source)
        self.gallery = part if self.gallery is None else self.gallery + part
        if self.model.embedding_key is None:
            return
        for name, encoded in (("images", part.encoded_images), ("captions", part.encoded_texts)):
            vectors = embeddings(self.model, encoded).numpy()
            self.first_stage.setdefault(name, faiss.IndexFlatIP(vectors.shape[1])).add(vectors)

    def save(self) -> None:
        gallery = self.gallery
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "checkpoint_sha256": self.checkpoint_sha256,
            "sources": self.sources,
            "images": gallery.images,
            "captions": gallery.captions,
            "caption_image": gallery.caption_image,
            "boxes": gallery.boxes,
            "encoded_images": _encode_encoded(gallery.encoded_images),
            "encoded_texts": _encode_encoded(gallery.encoded_texts),
            "first_stage": {
                name: torch.from_numpy(faiss.serialize_index(index)) for name, index in self.first_stage.items()
            },
            "extraction": self.extraction,
        }
        atomic_write(self.folder / INDEX_FILE, lambda file: torch.save(payload, file))


def build_index(
    checkpoint: str | Path,
    data_dir: str | Path,
    split_name: str | None,
    folder: str | Path,
    batch_size: int = 128,
    progress: bool = True,
    device: torch.device | str | None = None,
    weights: str | Path | None = None,
) -> tuple[SearchIndex, int]:
    """Adds the images of `data_dir`'s split (default: test, or the only one) that `folder`'s index
    lacks (creating the index); returns the index and the number of images added. `weights`: the
    extraction's weights file, for a model trained on extracted features whose file moved."""
    split_name = split_name or default_split(data_dir)
    photos = holds_photos(data_dir)
    split = (
        open_split(data_dir, split_name, progress=progress, captionless=True)
        if photos
        else PrecompSplit(data_dir, split_name)
    )
    folder = Path(folder)
    with folder_lock(folder, "index folder"):
        for temps in (folder, folder / PICTURES):
            remove_leftover_temps(temps)
        index = _open_or_create(folder, Path(checkpoint), device)
        source = {"data": str(Path(data_dir).resolve()), "split": split_name}
        if photos:
            return index, _add_photos(index, split, source, batch_size, progress, weights)
        return index, _add_features(index, split, source, batch_size, progress)


def _new_rows(index: SearchIndex, source: dict, ids: list[str]) -> tuple[int, list[int]]:
    """The number of `source` in the index, and the rows of the split whose ids it lacks."""
    number = index.sources.index(source) if source in index.sources else len(index.sources)
    known = {image["id"] for image in (index.gallery.images if index.gallery else []) if image["source"] == number}
    return number, [row for row, image_id in enumerate(ids) if image_id not in known]


def _check_regions(index: SearchIndex, n_regions: int, where: Path) -> None:
    if index.gallery is not None and index.gallery.boxes.shape[1] != n_regions:
        raise DataError(where, f"has {n_regions} regions per image, the indexed images {index.gallery.boxes.shape[1]}")


def _add_features(index: SearchIndex, split: PrecompSplit, source: dict, batch_size, progress) -> int:
    _check_regions(index, split.n_regions, split.features_path)
    number, rows = _new_rows(index, source, _image_ids(split))
    if rows:
        photos, pictures = _photo_paths(split), picture_reader(split)  # checked before the long work
        part = _encode_gallery(index.model, split, rows, number, photos, batch_size, progress)
        sizes = split.image_sizes if split.sizes_path.exists() else None
        _write_pictures(part, index, progress, lambda offset: _fallback_picture(rows[offset], pictures, sizes))
        index.add(source, part)
        index.save()
    return len(rows)


def _add_photos(index: SearchIndex, split: RawImageSplit, source: dict, batch_size, progress, weights) -> int:
    """Adds photos (with their captions, if any) read as the index's model reads photos."""
    reader = index.photo_reader(weights)
    _check_regions(index, reader.network.n_regions, split.source)
    number, rows = _new_rows(index, source, split.ids)
    if rows:
        try:
            encoded_images = reader.encode(split, rows, batch_size, progress)
        except InputError as error:  # the features do not fit the model
            raise CheckpointError(index.folder / MODEL_FILE, f"cannot read these photos: {error}") from None
        part = Gallery(
            images=[
                {"source": number, "id": split.ids[row], "path": str(split.image_paths[row].resolve())} for row in rows
            ],
            captions=_captions_of(split, rows),
            caption_image=torch.arange(len(rows)).repeat_interleave(split.captions_per_image),
            boxes=reader.boxes(len(rows)),
            encoded_images=encoded_images,
            encoded_texts=encode_captions(index.model, split, batch_size, progress=progress, rows=rows),
        )
        _write_pictures(part, index, progress)
        index.extraction = reader.record or index.extraction
        index.add(source, part)
        index.save()
    return len(rows)


def _captions_of(split: PrecompSplit | RawImageSplit, rows: list[int]) -> list[str]:
    per_image = split.captions_per_image
    return [split.captions[row * per_image + j] for row in rows for j in range(per_image)]


def _load_model(checkpoint: Path, device) -> tuple[Matcher, dict | None]:
    """The checkpoint's model in eval mode on `device`, and its extraction record."""
    payload = read_checkpoint(checkpoint)
    model, _ = model_from_payload(payload, checkpoint)
    return model.to(device or default_device()).eval(), payload.get("extraction")


def _open_or_create(folder: Path, checkpoint: Path, device) -> SearchIndex:
    """The index in `folder` if it is one (of the same checkpoint), else a new one."""
    checksum = _sha256(checkpoint)
    if not (folder / INDEX_FILE).exists():
        return SearchIndex.create(folder, checkpoint, checksum, device)
    index = SearchIndex.open(folder, device)
    if index.checkpoint_sha256 != checksum:
        raise DataError(
            folder / INDEX_FILE, f"was built with another checkpoint than {checkpoint}; index it into a new folder"
        )
    return index


def _encode_gallery(
    model: Matcher, split: PrecompSplit, rows: list[int], source: int, photos: list[Path] | None, batch_size, progress
) -> Gallery:
    try:
        images, texts = encode_split(model, split, batch_size, progress=progress, rows=rows)
    except InputError as error:  # the features do not fit the model: name the file
        raise DataError(split.features_path, f"does not fit the model: {error}") from None
    ids = _image_ids(split)
    return Gallery(
        images=[
            {"source": source, "id": ids[row], "path": None if photos is None else str(photos[row])} for row in rows
        ],
        captions=_captions_of(split, rows),
        caption_image=torch.arange(len(rows)).repeat_interleave(split.captions_per_image),
        boxes=_normalised_boxes(split, rows),
        encoded_images=images,
        encoded_texts=texts,
    )


def _write_pictures(part: Gallery, index: SearchIndex, progress, fallback=None) -> None:
    """Each new image's picture: its photo reduced, else `fallback(its number in part)`."""
    first = index.n_images
    for offset, image in enumerate(tqdm(part.images, desc="draw pictures", disable=not progress, leave=False)):
        picture = read_photo(Path(image["path"])) if image["path"] is not None else fallback(offset)
        save_picture(picture, index.picture_path(first + offset))


def _fallback_picture(row: int, pictures, sizes):
    """The data folder's own picture of an image (a drawn scene), else a blank canvas of its size."""
    width, height = DEFAULT_SIZE if sizes is None else (int(v) for v in sizes[row])
    return blank_picture(width, height) if pictures is None else pictures(row, picture_size(width, height))


def _image_ids(split: PrecompSplit) -> list[str]:
    return split.ids if split.ids is not None else [str(row) for row in range(split.n_images)]


def _photo_paths(split: PrecompSplit) -> list[Path] | None:
    path = split.data_dir / PHOTO_PATHS.format(split=split.split)
    if not path.exists():
        return None
    lines = read_captions(path)
    if len(lines) != split.n_images:
        raise DataError(path, f"has {len(lines):,} paths for {split.n_images:,} images in {split.features_path.name}")
    return [split.data_dir.resolve() / line for line in lines]  # an absolute line stays as it is


def _normalised_boxes(split: PrecompSplit, rows: list[int]) -> Tensor:
    if not split.has_boxes:
        return torch.full((len(rows), split.n_regions, 4), float("nan"))
    boxes = split.boxes[rows] / np.tile(split.image_sizes[rows], 2)[:, None, :]
    return torch.from_numpy(boxes.astype(np.float32))


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    return sha256(path)


def _encode_encoded(encoded: Encoded) -> dict:
    tensors = {key: value.cpu() for key, value in encoded.tensors.items()}
    return {"tensors": tensors, "padded": sorted(encoded.padded), "square": sorted(encoded.square)}


def _decode_encoded(stored: dict) -> Encoded:
    return Encoded(stored["tensors"], frozenset(stored["padded"]), frozenset(stored.get("square", ())))


def _faiss_index(data: Tensor) -> faiss.Index:
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("a first-stage index is not a byte tensor")
    return faiss.deserialize_index(data.numpy())  # faiss raises RuntimeError for bad bytes


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _read_index_file(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "no such file: not an itmatch index folder (build one with `itmatch index`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise DataError(path, f"is not a readable index ({load_error(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, f"is not an itmatch index (no 'format: {FORMAT}' entry)")
    if payload.get("version") != VERSION:
        raise DataError(path, f"index format version {payload.get('version')} is not supported")
    missing = [key for key in INDEX_KEYS if key not in payload]
    if missing:
        raise DataError(path, f"is damaged: no {', '.join(missing)}")
    return payload
