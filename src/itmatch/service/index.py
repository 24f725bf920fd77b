"""A search index: the images of one or more splits (precomp features, photos with captions, or a
folder of photos alone), and their captions, encoded once by one model, with a first stage over
the model's embeddings and the pictures the web page shows. Photos are read as the model reads
them (itmatch.photo_reader): by its own backbone, or through the extraction its training features
came from.

An index folder holds `model.pt` (a copy of the checkpoint), `manifest.json` (what the index holds:
counts, layouts, sources, the first stage, the removed images), raw arrays of encodings, boxes and
strings (itmatch.service.store), faiss files of an approximate first stage, and
`pictures/{n}.jpg`. Images are encoded and appended a chunk at a time (as many as `memory_mb`
holds), each chunk committed by renaming a new manifest into place: a run killed mid-way leaves
the last committed index, and running it again continues with the images the index lacks (an
image is known by its data folder, split and id). Opening an index reads its manifest only; the
encodings are memory-mapped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmatch.checkpoint import model_from_payload, read_checkpoint
from itmatch.data.pictures import picture_reader
from itmatch.data.precomp import PrecompSplit, read_captions
from itmatch.data.raw import RawImageSplit
from itmatch.data.shards import photo_at
from itmatch.data.sources import default_split, holds_photos, open_split
from itmatch.device import default_device
from itmatch.errors import CheckpointError, DataError, InputError
from itmatch.evaluation.runner import encode_captions, encode_split
from itmatch.files import LOCK_FILE, atomic_write, folder_lock, remove_leftover_temps, sha256
from itmatch.models.base import Encoded, Matcher
from itmatch.photo_reader import PhotoReader
from itmatch.retrieval import encode_queries
from itmatch.service.first_stage import (
    FirstStageSpec,
    exhaustive_search,
    faiss_search,
    new_faiss_index,
    read_faiss_index,
)
from itmatch.service.render import blank_picture, picture_size, read_photo, save_picture
from itmatch.service.store import STORAGE_TYPES, AppendArray, EncodedStore, StringTable

FORMAT = "itmatch-index"
VERSION = 2
MANIFEST = "manifest.json"
OLD_INDEX_FILE = "index.pt"  # the previous format: one file read whole
MODEL_FILE = "model.pt"
PICTURES = "pictures"
# Optional file beside a split: one photo path per image (relative to the data folder, or absolute).
PHOTO_PATHS = "{split}_paths.txt"
MANIFEST_KEYS = ("checkpoint_sha256", "sources", "extraction", "storage", "counts", "schema", "first_stage")
MANIFEST_KEYS += ("removed", "generation")
# Working memory of a chunk of encodings (building, exhaustive search, exact first stages).
DEFAULT_MEMORY_MB = 256
# Images without a sizes file are drawn at this (w, h).
DEFAULT_SIZE = (640, 480)
SIDES = ("images", "captions")


@dataclass
class Gallery:
    """Images and their captions, encoded, with where each image came from: a part to append."""

    images: list[dict]  # per image: {"source": number in SearchIndex.sources, "id", "path": photo or None}
    captions: list[str]
    caption_image: Tensor  # (n_captions,) the image each caption was written for, in image order
    boxes: Tensor  # (n_images, regions, 4) x1, y1, x2, y2 as fractions of the image; NaN: unknown
    encoded_images: Encoded
    encoded_texts: Encoded

    def bytes_per_image(self) -> int:
        tensors = [*self.encoded_images.tensors.values(), *self.encoded_texts.tensors.values(), self.boxes]
        return max(1, sum(t.numel() * t.element_size() for t in tensors) // max(1, len(self.images)))


class SearchIndex:
    """An index folder opened: its model, its stored gallery (memory-mapped) and its first stage."""

    def __init__(self, folder: Path, model: Matcher, manifest: dict, extraction, memory_mb: float, writable: bool):
        self.folder, self.model, self.memory_mb, self.writable = folder, model, memory_mb, writable
        self.checkpoint_sha256 = manifest["checkpoint_sha256"]
        self.sources: list[dict] = manifest["sources"]  # {"data": absolute data folder, "split"}
        # How photos become features for a model that reads features: the checkpoint's extraction
        # record, with the weights file last used (itmatch.extract.RECORD_KEYS); None otherwise.
        self.extraction: dict | None = manifest["extraction"] or extraction
        self.storage, self.generation = manifest["storage"], int(manifest["generation"])
        self.spec = FirstStageSpec.from_dict(manifest["first_stage"]["spec"], folder / MANIFEST)
        self.schema: dict | None = manifest["schema"]
        self._open_arrays(manifest["counts"])
        self.removed = self._read_removed(manifest["removed"])
        files = manifest["first_stage"]["files"]
        self.faiss = {
            side: read_faiss_index(folder / name, self.spec, writable) for side, name in files.items() if name
        }
        self._stage_files, self._changed = dict(files), set()

    def _open_arrays(self, counts: dict) -> None:
        n_images, n_captions = int(counts["images"]), int(counts["captions"])
        folder, schema = self.folder, self.schema or _EMPTY_SCHEMA
        self.images = EncodedStore(folder, "images", schema["images"], n_images, 0)
        self.texts = EncodedStore(folder, "captions", schema["texts"], n_captions, int(counts["words"]))
        self.boxes = AppendArray(folder / "boxes.bin", "float32", (int(schema["regions"]), 4), n_images)
        self.image_source = AppendArray(folder / "image_source.bin", "int32", (), n_images)
        self.caption_end = AppendArray(folder / "caption_end.bin", "int64", (), n_images)
        self.ids = StringTable(folder, "image_ids", n_images)
        self.paths = StringTable(folder, "image_paths", n_images)
        self.captions = StringTable(folder, "captions", n_captions)
        for part in self._parts():
            part.check()

    def _parts(self) -> tuple:
        return (
            self.images,
            self.texts,
            self.boxes,
            self.image_source,
            self.caption_end,
            self.ids,
            self.paths,
            self.captions,
        )

    def _read_removed(self, removed: dict) -> np.ndarray:
        if not removed["file"]:
            return np.zeros(0, dtype=np.int64)
        stored = AppendArray(self.folder / removed["file"], "int64", (), int(removed["count"]))
        stored.check()
        return np.array(stored.view)

    @property
    def n_images(self) -> int:
        return len(self.ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def picture_path(self, image: int) -> Path:
        return self.folder / PICTURES / f"{image}.jpg"

    def image(self, number: int) -> dict:
        """An indexed image's source number, id and photo path (None: no photo)."""
        return {
            "source": int(self.image_source.view[number]),
            "id": self.ids[number],
            "path": self.paths[number] or None,
        }

    def image_captions(self, number: int) -> range:
        """The numbers of the captions written for an indexed image."""
        ends = self.caption_end.view
        return range(int(ends[number - 1]) if number else 0, int(ends[number]))

    def caption_images(self, captions: np.ndarray) -> np.ndarray:
        """The image each caption was written for."""
        return np.searchsorted(self.caption_end.view, captions, side="right")

    def is_removed(self, number: int) -> bool:
        return bool(np.isin(number, self.removed))

    def removed_rows(self, side: str) -> np.ndarray:
        """The removed images, or (side "captions") the captions written for them."""
        if side == "images" or not len(self.removed):
            return self.removed
        return np.concatenate([np.arange(r.start, r.stop) for r in map(self.image_captions, self.removed)])

    def store(self, side: str) -> EncodedStore:
        return self.images if side == "images" else self.texts

    def chunks(self, side: str):
        """(first row, items read into an `Encoded` on the model's device), as many as the memory budget holds."""
        store = self.store(side)
        size = len(store) if side == "images" and self.model.tile_spans_all_images else self._rows_per_chunk(store)
        for start in range(0, len(store), max(1, size)):
            yield start, store.select(slice(start, start + size), self.model.device)

    def _rows_per_chunk(self, store: EncodedStore) -> int:
        return max(1, _bytes(self.memory_mb) // store.item_bytes())

    def nearest(self, side: str, vectors: Tensor, k: int) -> np.ndarray:
        """The first stage: rows (n_queries, <= k) of the best items by embedding, removed ones left out
        (-1 where fewer remain)."""
        queries, excluded = np.ascontiguousarray(vectors.numpy()), self.removed_rows(side)
        if side in self.faiss:
            return faiss_search(self.faiss[side], self.spec, queries, k, excluded)
        store, key = self.store(side), self.model.embedding_key
        size = self._rows_per_chunk(store)
        columns = ((start, store.column(key, slice(start, start + size))) for start in range(0, len(store), size))
        return exhaustive_search(columns, queries, k, excluded)

    def as_stored(self, encoded: Encoded) -> Encoded:
        """`encoded` rounded as the index stores encodings (a photo query then scores as if indexed)."""
        stored = getattr(torch, self.storage)
        return encoded.to(dtype=stored).to(dtype=torch.float32)

    def photo_reader(self, weights: str | Path | None = None) -> PhotoReader:
        """How this index's model reads photos (`weights`: the extraction's weights file, when it moved)."""
        return PhotoReader(self.model, self.extraction, self.folder / MODEL_FILE, weights)

    @classmethod
    def open(
        cls, folder: str | Path, device=None, *, writable: bool = False, memory_mb: float = DEFAULT_MEMORY_MB
    ) -> SearchIndex:
        """The index in `folder` (its manifest read, its arrays mapped), its model on `device`
        (default: CUDA if present); `writable`: to append to it."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if _sha256(folder / MODEL_FILE) != manifest["checkpoint_sha256"]:
            raise DataError(
                folder / MODEL_FILE,
                f"is not the checkpoint this index was built with ({MANIFEST} records another hash)",
            )
        model, extraction = _load_model(folder / MODEL_FILE, device)
        try:
            return cls(folder, model, manifest, extraction, memory_mb, writable)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise DataError(folder / MANIFEST, f"is damaged ({type(error).__name__}: {_first_line(error)})") from None

    @classmethod
    def create(cls, folder: Path, checkpoint: Path, checksum: str, device=None, **settings) -> SearchIndex:
        """A new, empty index of `checkpoint` in `folder` (the checkpoint is copied into it);
        `settings`: storage ("float16" or "float32"), first_stage (a FirstStageSpec), memory_mb."""
        model, extraction = _load_model(checkpoint, device)
        try:  # searching needs a model that reads text: find out before indexing anything
            with torch.no_grad():
                encode_queries(model, ["a"])
        except InputError as error:
            raise CheckpointError(checkpoint, f"cannot be searched by text: {error}") from None
        leftovers = {p.name for p in folder.iterdir()} - {MODEL_FILE, PICTURES, LOCK_FILE} if folder.is_dir() else set()
        if leftovers:
            raise DataError(folder, f"is not an itmatch index (no {MANIFEST}) and not empty; choose a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        with open(checkpoint, "rb") as source:
            atomic_write(folder / MODEL_FILE, lambda file: shutil.copyfileobj(source, file))
        storage, spec = settings.get("storage") or "float16", settings.get("first_stage") or FirstStageSpec()
        if storage not in STORAGE_TYPES:
            raise InputError(f"storage must be one of {', '.join(STORAGE_TYPES)}, got {storage!r}")
        manifest = _new_manifest(checksum, storage, spec.as_dict())
        index = cls(folder, model, manifest, extraction, settings.get("memory_mb") or DEFAULT_MEMORY_MB, True)
        index.commit()
        return index

    def append(self, source: dict, part: Gallery) -> None:
        """Appends images (and their captions) of `source`, extends the first stage and commits; their
        pictures must be written already."""
        if self.schema is None:
            self._start(part)
        self._check_part(part)
        if source not in self.sources:
            self.sources.append(source)
        self.images.append(part.encoded_images)
        self.texts.append(part.encoded_texts)
        self.boxes.append(part.boxes.numpy())
        self.image_source.append(np.array([image["source"] for image in part.images], dtype=np.int32))
        counts = torch.bincount(part.caption_image, minlength=len(part.images)).numpy()
        self.caption_end.append(self.n_captions + np.cumsum(counts, dtype=np.int64))
        self.ids.append([image["id"] for image in part.images])
        self.paths.append([image["path"] or "" for image in part.images])
        self.captions.append(part.captions)
        self.extend_first_stage()
        self.commit()

    def _start(self, part: Gallery) -> None:
        """The layout of the index, from its first part."""
        self.schema = {
            "images": EncodedStore.schema(part.encoded_images, self.storage),
            "texts": EncodedStore.schema(part.encoded_texts, self.storage),
            "regions": int(part.boxes.shape[1]),
        }
        self._open_arrays({"images": 0, "captions": 0, "words": 0})

    def _check_part(self, part: Gallery) -> None:
        for side, encoded in (("images", part.encoded_images), ("texts", part.encoded_texts)):
            found = EncodedStore.schema(encoded, self.storage)
            if found != self.schema[side]:
                raise DataError(self.folder / MANIFEST, f"holds {side} encoded as {self.schema[side]}, not {found}")

    def extend_first_stage(self) -> None:
        """Adds the rows the faiss indexes lack (training one first once enough rows exist)."""
        key = self.model.embedding_key
        if key is None or self.spec.kind == "flat":
            return
        for side in SIDES:
            store = self.store(side)
            if side not in self.faiss and len(store) >= self.spec.min_rows() and len(store):
                self.faiss[side] = new_faiss_index(self.spec, self._training_sample(store))
            index = self.faiss.get(side)
            if index is None or index.ntotal == len(store):
                continue
            size = self._rows_per_chunk(store)
            for start in range(index.ntotal, len(store), size):
                index.add(store.column(key, slice(start, start + size)))
            self._changed.add(side)

    def _training_sample(self, store: EncodedStore) -> np.ndarray:
        """At most `train_sample` stored vectors, drawn evenly at random (seeded: rebuilds agree)."""
        rows = np.arange(len(store))
        if len(rows) > self.spec.train_sample:
            rows = np.sort(np.random.default_rng(0).choice(rows, self.spec.train_sample, replace=False))
        return store.column(self.model.embedding_key, rows)

    def set_first_stage(self, spec: FirstStageSpec) -> None:
        """Replaces the first stage by `spec`'s, built from the stored vectors, and commits."""
        if spec != self.spec:
            self.spec, self.faiss = spec, {}
            self._changed.update(SIDES)
            self.extend_first_stage()
            self.commit()

    def remove(self, ids: list[str]) -> int:
        """Removes the images with these ids (in every source) from searches and commits; returns how
        many were removed now. An id the index lacks is an error naming it."""
        known = self.ids.all()
        wanted = set(ids)
        rows = np.flatnonzero(np.isin(np.array(known, dtype=object), list(wanted)))
        missing = sorted(wanted - {known[row] for row in rows})
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(self.folder / MANIFEST, f"has no image with id {shown}; nothing was removed")
        added = np.setdiff1d(rows, self.removed)
        self.removed = np.union1d(self.removed, rows).astype(np.int64)
        self.commit()
        return len(added)

    def commit(self) -> None:
        """Writes what changed under new names and renames a new manifest into place: until then,
        readers (and a rerun after a crash) see the previous index whole."""
        self.generation += 1
        for side in self._changed & set(self.faiss):
            name = f"first_stage.{side}.{self.generation}.faiss"
            _write_faiss(self.faiss[side], self.folder / name)
            self._stage_files[side] = name
        self._stage_files = {side: self._stage_files.get(side) if side in self.faiss else None for side in SIDES}
        removed = {"file": None, "count": len(self.removed)}
        if len(self.removed):
            removed["file"] = f"removed.{self.generation}.bin"
            AppendArray(self.folder / removed["file"], "int64", (), 0).append(self.removed)
        manifest = _new_manifest(self.checkpoint_sha256, self.storage, self.spec.as_dict())
        manifest.update(sources=self.sources, extraction=self.extraction, schema=self.schema, removed=removed)
        manifest.update(generation=self.generation, counts=self._counts())
        manifest["first_stage"]["files"] = self._stage_files
        text = json.dumps(manifest, indent=1).encode()
        atomic_write(self.folder / MANIFEST, lambda file: file.write(text))
        self._changed = set()
        _remove_unlisted(self.folder, {*self._stage_files.values(), removed["file"]})

    def _counts(self) -> dict:
        return {"images": self.n_images, "captions": self.n_captions, "words": self.texts.words}


_EMPTY_SCHEMA = {"images": {"keys": {}, "padded": []}, "texts": {"keys": {}, "padded": []}, "regions": 0}


def _new_manifest(checksum: str, storage: str, spec: dict) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint_sha256": checksum,
        "sources": [],
        "extraction": None,
        "storage": storage,
        "counts": {"images": 0, "captions": 0, "words": 0},
        "schema": None,
        "first_stage": {"spec": spec, "files": {side: None for side in SIDES}},
        "removed": {"file": None, "count": 0},
        "generation": 0,
    }


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / OLD_INDEX_FILE).is_file():
            raise DataError(
                folder / OLD_INDEX_FILE,
                "is an index of itmatch's previous format (one file read whole); rebuild it into a new folder: "
                f"itmatch index {folder / MODEL_FILE} --data DATA --out NEW_INDEX",
            )
        raise DataError(path, "no such file: not an itmatch index folder (build one with `itmatch index`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(path, f"is not a readable manifest ({_first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, f"is not an itmatch index (no 'format: {FORMAT}' entry)")
    if manifest.get("version") != VERSION:
        raise DataError(path, f"index format version {manifest.get('version')} is not supported")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(path, f"is damaged: no {', '.join(missing)}")
    return manifest


def _write_faiss(index, path: Path) -> None:
    import faiss

    try:
        faiss.write_index(index, str(path))
        with open(path, "rb+") as file:
            os.fsync(file.fileno())
    except (OSError, RuntimeError) as error:
        raise DataError(path, f"cannot be written ({_first_line(error)})") from None


def _remove_unlisted(folder: Path, listed: set) -> None:
    """Deletes first-stage and removal files of earlier commits (or of a commit killed mid-way)."""
    for path in [*folder.glob("first_stage.*.faiss"), *folder.glob("removed.*.bin")]:
        if path.name not in listed:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class IndexSettings:
    """How `build_index` stores a new index and chunks its work (None: the index's own, or the default)."""

    batch_size: int = 128
    progress: bool = True
    storage: str | None = None  # "float16" or "float32": the encodings on disk (a new index only)
    first_stage: FirstStageSpec | None = None  # replaces an existing index's first stage when it differs
    memory_mb: float = DEFAULT_MEMORY_MB


def build_index(
    checkpoint: str | Path,
    data_dir: str | Path,
    split_name: str | None,
    folder: str | Path,
    settings: IndexSettings = IndexSettings(),
    device: torch.device | str | None = None,
    weights: str | Path | None = None,
) -> tuple[SearchIndex, int]:
    """Adds the images of `data_dir`'s split (default: test, or the only one) that `folder`'s index
    lacks (creating the index); returns the index and the number of images added. `weights`: the
    extraction's weights file, for a model trained on extracted features whose file moved."""
    split_name = split_name or default_split(data_dir)
    photos = holds_photos(data_dir)
    progress = settings.progress
    split = (
        open_split(data_dir, split_name, progress=progress, captionless=True)
        if photos
        else PrecompSplit(data_dir, split_name)
    )
    folder = Path(folder)
    with folder_lock(folder, "index folder"):
        for temps in (folder, folder / PICTURES):
            remove_leftover_temps(temps)
        index = _open_or_create(folder, Path(checkpoint), device, settings)
        source = {"data": str(Path(data_dir).resolve()), "split": split_name}
        if photos:
            return index, _add_photos(index, split, source, settings, weights)
        return index, _add_features(index, split, source, settings)


def edit_index(
    folder: str | Path, remove: list[str] | None = None, first_stage: FirstStageSpec | None = None
) -> tuple[SearchIndex, int]:
    """Removes images by id and/or replaces the first stage of an existing index; returns it and the
    number of images removed now."""
    folder = Path(folder)
    with folder_lock(folder, "index folder"):
        index = SearchIndex.open(folder, "cpu", writable=True)
        if first_stage is not None:
            index.set_first_stage(first_stage)
        return index, index.remove(remove) if remove else 0


def _new_rows(index: SearchIndex, source: dict, ids: list[str]) -> tuple[int, list[int]]:
    """The number of `source` in the index, and the rows of the split whose ids it lacks."""
    number = index.sources.index(source) if source in index.sources else len(index.sources)
    ours = np.flatnonzero(np.asarray(index.image_source.view) == number)
    known = {index.ids[int(row)] for row in ours} if number < len(index.sources) else set()
    return number, [row for row, image_id in enumerate(ids) if image_id not in known]


def _check_regions(index: SearchIndex, n_regions: int, where: Path) -> None:
    if index.schema is not None and index.schema["regions"] != n_regions:
        raise DataError(where, f"has {n_regions} regions per image, the indexed images {index.schema['regions']}")


def _append_in_chunks(index: SearchIndex, source: dict, rows: list[int], encode, settings: IndexSettings) -> None:
    """`encode(rows)` -> Gallery of those rows with pictures written, appended and committed a chunk
    at a time: one batch first, then as many images as `memory_mb` holds."""
    start, size = 0, settings.batch_size
    with tqdm(total=len(rows), desc="index images", disable=not settings.progress, unit="image") as bar:
        while start < len(rows):
            part = encode(rows[start : start + size])
            index.append(source, part)
            bar.update(len(part.images))
            start += size
            size = max(settings.batch_size, _bytes(settings.memory_mb) // part.bytes_per_image())


def _add_features(index: SearchIndex, split: PrecompSplit, source: dict, settings: IndexSettings) -> int:
    _check_regions(index, split.n_regions, split.features_path)
    number, rows = _new_rows(index, source, _image_ids(split))
    if not rows:
        return 0
    photos, pictures = _photo_paths(split), picture_reader(split)  # checked before the long work
    sizes = split.image_sizes if split.sizes_path.exists() else None

    def encode(chunk: list[int]) -> Gallery:
        part = _encode_gallery(index.model, split, chunk, number, photos, settings)
        _write_pictures(
            part, index, settings.progress, lambda offset: _fallback_picture(chunk[offset], pictures, sizes)
        )
        return part

    _append_in_chunks(index, source, rows, encode, settings)
    return len(rows)


def _add_photos(index: SearchIndex, split: RawImageSplit, source: dict, settings: IndexSettings, weights) -> int:
    """Adds photos (with their captions, if any) read as the index's model reads photos."""
    reader = index.photo_reader(weights)
    _check_regions(index, reader.network.n_regions, split.source)
    number, rows = _new_rows(index, source, split.ids)
    if not rows:
        return 0
    index.extraction = reader.record or index.extraction
    batch_size, progress = settings.batch_size, settings.progress

    def encode(chunk: list[int]) -> Gallery:
        try:
            encoded_images = reader.encode(split, chunk, batch_size, progress)
        except InputError as error:  # the features do not fit the model
            raise CheckpointError(index.folder / MODEL_FILE, f"cannot read these photos: {error}") from None
        part = Gallery(
            images=[
                {"source": number, "id": split.ids[row], "path": str(split.image_paths[row].resolve())} for row in chunk
            ],
            captions=_captions_of(split, chunk),
            caption_image=torch.arange(len(chunk)).repeat_interleave(split.captions_per_image),
            boxes=reader.boxes(len(chunk)),
            encoded_images=encoded_images,
            encoded_texts=encode_captions(index.model, split, batch_size, progress=progress, rows=chunk),
        )
        _write_pictures(part, index, progress)
        return part

    _append_in_chunks(index, source, rows, encode, settings)
    return len(rows)


def _captions_of(split: PrecompSplit | RawImageSplit, rows: list[int]) -> list[str]:
    per_image = split.captions_per_image
    return [split.captions[row * per_image + j] for row in rows for j in range(per_image)]


def _load_model(checkpoint: Path, device) -> tuple[Matcher, dict | None]:
    """The checkpoint's model in eval mode on `device`, and its extraction record."""
    payload = read_checkpoint(checkpoint)
    model, _ = model_from_payload(payload, checkpoint)
    return model.to(device or default_device()).eval(), payload.get("extraction")


def _open_or_create(folder: Path, checkpoint: Path, device, settings: IndexSettings) -> SearchIndex:
    """The index in `folder` if it is one (of the same checkpoint), else a new one."""
    checksum = _sha256(checkpoint)
    if not (folder / MANIFEST).exists() and not (folder / OLD_INDEX_FILE).exists():
        options = {"storage": settings.storage, "first_stage": settings.first_stage, "memory_mb": settings.memory_mb}
        return SearchIndex.create(folder, checkpoint, checksum, device, **options)
    index = SearchIndex.open(folder, device, writable=True, memory_mb=settings.memory_mb)
    if index.checkpoint_sha256 != checksum:
        raise DataError(
            folder / MANIFEST, f"was built with another checkpoint than {checkpoint}; index it into a new folder"
        )
    if settings.storage is not None and settings.storage != index.storage:
        raise DataError(folder / MANIFEST, f"stores {index.storage}; --storage applies to a new index only")
    if settings.first_stage is not None:
        index.set_first_stage(settings.first_stage)
    return index


def _encode_gallery(
    model: Matcher, split: PrecompSplit, rows: list[int], source: int, photos: list[Path] | None, settings
) -> Gallery:
    try:
        images, texts = encode_split(model, split, settings.batch_size, progress=settings.progress, rows=rows)
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
        picture = read_photo(photo_at(image["path"])) if image["path"] is not None else fallback(offset)
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


def _bytes(megabytes: float) -> int:
    return int(megabytes * (1 << 20))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
