"""Raw-image sources: photos and their captions, in one of two layouts.

- A caption CSV (`captions.csv` in a folder, or any `.csv` file) with the header columns `image`
  and `caption`, and optionally `split`. Without a split column, `splits/{split}.txt` beside it
  lists each split's image names in order (the Flickr8k layout); without either, the whole file is
  the split `all`.
- Karpathy's JSON (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`, in a
  folder or given as the file): `images[].filename`, `filepath` (COCO), `split` and
  `sentences[].raw`. Its train + restval form the split `train`, val is `dev`, test is `test`.

Image names are resolved against the source's folder, then its `images/` subfolder.

Captions: whitespace is normalised; an empty caption or a repeat of one of its image's captions
is dropped. Each image keeps its first 5 captions, and a split has as many captions per image as
most of its images have (at most 5); images with fewer are left out. Images that are missing,
unreadable or truncated (every image is decoded once when a split is opened) are left out too.
Everything left out is listed in `RawImageSplit.skipped` with the reason, for the caller to write
to a file and summarise; nothing fails later in the middle of a run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from itmatch.data.precomp import CaptionedSplit
from itmatch.errors import DataError

MAX_CAPTIONS_PER_IMAGE = 5
KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val",), "test": ("test",)}
# Splits with more images than this show a progress bar while their images are checked.
_PROGRESS_FROM = 2000


@dataclass(frozen=True)
class Skipped:
    """One thing left out of a split: an image (its name) or a caption (file:line), and why."""

    item: str
    reason: str


@dataclass
class _Image:
    name: str  # as the source names it
    captions: list[str] = field(default_factory=list)


class _Collector:
    """Captions per image name in source order, dropping empty and repeated captions."""

    def __init__(self):
        self.images: dict[str, _Image] = {}
        self.problems: dict[str, list[Skipped]] = {}  # per image name: its dropped captions

    def add(self, name: str, caption: str | None, where: str) -> None:
        image = self.images.setdefault(name, _Image(name))
        caption = " ".join((caption or "").split())
        if not caption:
            self.problems.setdefault(name, []).append(Skipped(where, f"{name}: empty caption"))
        elif caption in image.captions:
            self.problems.setdefault(name, []).append(Skipped(where, f"{name}: repeats an earlier caption"))
        else:
            image.captions.append(caption)


class RawSource:
    """A caption CSV or Karpathy JSON file, parsed: the image names and captions of each split."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = source_file(self.path)
        if self.file is None:
            raise DataError(self.path, "not a raw-image source (captions.csv, a .csv, or a Karpathy dataset_*.json)")
        self.folder = self.file.parent
        self.general: list[Skipped] = []  # problems that belong to no image
        self.collector = _Collector()
        self.splits: dict[str, list[str]] = {}
        self.split_problems: dict[str, list[Skipped]] = {}
        if self.file.suffix == ".json":
            self._read_karpathy()
        else:
            self._read_csv()

    def split_names(self) -> list[str]:
        return sorted(self.splits)

    def open(self, split: str, verify_images: bool = True, progress: bool = True) -> RawImageSplit:
        """The split's images with their captions; `verify_images` decodes every image once and
        leaves out those that are missing or unreadable (else the image files are not looked at:
        for captions alone)."""
        if split not in self.splits:
            raise DataError(self.file, f"has no split {split!r}; its splits: {', '.join(self.split_names()) or 'none'}")
        names = self.splits[split]
        skipped = self.general + self.split_problems.get(split, [])
        skipped += [problem for name in names for problem in self.collector.problems.get(name, [])]
        kept, per_image = _with_enough_captions([self.collector.images[name] for name in names], skipped)
        paths = [self._resolve(image.name) for image in kept]
        sizes, reasons = check_images(paths, progress) if verify_images else (None, [None] * len(kept))
        usable = [i for i, reason in enumerate(reasons) if reason is None]
        skipped += [Skipped(kept[i].name, reasons[i]) for i in range(len(kept)) if reasons[i] is not None]
        if not usable:
            example = f": {skipped[0].item}: {skipped[0].reason}" if skipped else ""
            raise DataError(self.file, f"split {split!r} has no usable images ({len(skipped)} left out{example})")
        return RawImageSplit(
            source=self.path,
            captions_path=self.file,
            split=split,
            ids=[kept[i].name for i in usable],
            image_paths=[paths[i] for i in usable],
            captions=[caption for i in usable for caption in kept[i].captions[:per_image]],
            captions_per_image=per_image,
            image_sizes=None if sizes is None else np.array([sizes[i] for i in usable], dtype=np.int64),
            skipped=skipped,
        )

    def _resolve(self, name: str) -> Path:
        """The image file of a name: beside the source file, else in its images/ folder."""
        direct = self.folder / name
        inside = self.folder / "images" / name
        return inside if not direct.exists() and inside.exists() else direct

    # ---- the layouts ----

    def _read_csv(self) -> None:
        rows = _csv_rows(self.file)
        header = [column.strip().lower() for column in next(rows, (0, []))[1]]
        if "image" not in header or "caption" not in header:
            raise DataError(self.file, f"the header must name the columns image and caption, got {header}")
        image_at, caption_at = header.index("image"), header.index("caption")
        split_at = header.index("split") if "split" in header else None
        split_of: dict[str, str] = {}
        for line, row in rows:
            where = f"{self.file.name}:{line}"
            name = row[image_at].strip() if len(row) > image_at else ""
            if not name:
                self.general.append(Skipped(where, "no image name"))
                continue
            if split_at is not None:
                split = row[split_at].strip() if len(row) > split_at else ""
                if not split or split_of.setdefault(name, split) != split:
                    reason = f"split {split!r} here, {split_of[name]!r} before" if split else "no split"
                    self.general.append(Skipped(where, f"{name}: {reason}"))
                    continue
            self.collector.add(name, row[caption_at] if len(row) > caption_at else None, where)
        if split_at is not None:
            for name, split in split_of.items():
                self.splits.setdefault(split, []).append(name)
        elif (self.folder / "splits").is_dir():
            for path in sorted((self.folder / "splits").glob("*.txt")):
                self._read_split_file(path)
        else:
            self.splits["all"] = list(self.collector.images)

    def _read_split_file(self, path: Path) -> None:
        split, names, seen = path.stem, [], {}
        problems = self.split_problems.setdefault(split, [])
        for line, raw in enumerate(_read_text(path).splitlines(), start=1):
            name = raw.strip()
            if not name:
                continue
            if name in seen:
                problems.append(Skipped(f"{path.name}:{line}", f"{name}: listed again (first on line {seen[name]})"))
                continue
            seen[name] = line
            if name in self.collector.images:
                names.append(name)
            else:
                problems.append(Skipped(name, f"no captions in {self.file.name}"))
        self.splits[split] = names

    def _read_karpathy(self) -> None:
        data = _read_json(self.file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(self.file, "not a Karpathy split file: it needs a list under 'images'")
        ours = {theirs: split for split, names in KARPATHY_SPLITS.items() for theirs in names}
        for index, entry in enumerate(data["images"]):
            where = f"{self.file.name}: images[{index}]"
            if not isinstance(entry, dict) or not entry.get("filename"):
                self.general.append(Skipped(where, "no filename"))
                continue
            name = str(Path(entry.get("filepath") or "") / entry["filename"])
            if name in self.collector.images:
                self.general.append(Skipped(where, f"{name}: listed again"))
                continue
            for sentence in entry.get("sentences") or [{}]:
                self.collector.add(name, _sentence_text(sentence), where)
            split = ours.get(entry.get("split"))
            if split is None:
                self.general.append(Skipped(where, f"{name}: unknown split {entry.get('split')!r}"))
            else:
                self.splits.setdefault(split, []).append(name)


@dataclass
class RawImageSplit(CaptionedSplit):
    """One split of a raw-image source: image files, their (w, h) sizes and captions."""

    source: Path
    captions_path: Path
    split: str
    ids: list[str]  # the image names, as the source gives them
    image_paths: list[Path]
    captions: list[str]
    captions_per_image: int
    image_sizes: np.ndarray | None  # (n_images, 2) (w, h); None when the images were not read
    skipped: list[Skipped]

    def __post_init__(self) -> None:
        self.n_images = len(self.image_paths)

    @property
    def data_dir(self) -> Path:
        return self.source


def source_file(path: Path) -> Path | None:
    """The CSV or JSON file of a raw-image source given as a file or a folder."""
    if path.is_file():
        return path if path.suffix in (".csv", ".json") else None
    if (path / "captions.csv").is_file():
        return path / "captions.csv"
    karpathy = sorted(path.glob("dataset_*.json")) if path.is_dir() else []
    if len(karpathy) > 1:
        raise DataError(path, f"holds several Karpathy files ({', '.join(p.name for p in karpathy)}): pass one")
    return karpathy[0] if karpathy else None


def _with_enough_captions(images: list[_Image], skipped: list[Skipped]) -> tuple[list[_Image], int]:
    """The images with at least the split's captions per image (the count most images have, at
    most MAX_CAPTIONS_PER_IMAGE; ties: the larger), and that count; the others go to `skipped`."""
    counts = Counter(min(len(image.captions), MAX_CAPTIONS_PER_IMAGE) for image in images)
    counts.pop(0, None)
    per_image = max(counts, key=lambda count: (counts[count], count)) if counts else 1
    kept = []
    for image in images:
        if len(image.captions) >= per_image:
            kept.append(image)
        else:
            reason = f"has {len(image.captions)} captions; the split has {per_image} per image"
            skipped.append(Skipped(image.name, reason))
    return kept, per_image


def check_images(paths: list[Path], progress: bool) -> tuple[list, list[str | None]]:
    """Each image decoded once (threads: decoding releases the GIL): (sizes, reasons to skip)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(
            tqdm(
                pool.map(_probe, paths),
                total=len(paths),
                desc="check images",
                disable=not progress or len(paths) < _PROGRESS_FROM,
                leave=False,
            )
        )
    sizes = [result if isinstance(result, tuple) else None for result in results]
    return sizes, [result if isinstance(result, str) else None for result in results]


def photo_file(path):
    """What Pillow opens for a photo: its file, or (a photo inside a tar shard) its bytes."""
    return path if isinstance(path, Path) else path.open()


def _probe(path: Path) -> tuple[int, int] | str:
    """(width, height) of a decodable image, else why it is not one."""
    if isinstance(path, Path) and not path.is_file():
        return f"{path}: file not found (nor in an images/ folder beside it)"
    try:
        with Image.open(photo_file(path)) as image:
            size = image.size
            image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte
            image.load()
    except Exception as error:  # Pillow raises many types for damaged or foreign files
        return f"{path}: not a readable image ({type(error).__name__}: {error})"
    return size


def _read_text(path: Path) -> str:
    """A UTF-8 file's text (a leading byte-order mark dropped); a decoding error names the line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(path, f"cannot be read ({error.strerror})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(path, f"line {line} is not valid UTF-8 ({error.reason})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of a CSV file."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as error:
        raise DataError(path, f"line {reader.line_num}: {error}") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(path, f"is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None


def _sentence_text(sentence) -> str | None:
    """A Karpathy sentence's raw text, else its tokens joined."""
    if not isinstance(sentence, dict):
        return None
    if isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(map(str, tokens)) if isinstance(tokens, list) else None


def write_skip_list(skipped: list[Skipped], path: Path) -> None:
    """One `item<TAB>reason` line per thing left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s.item}\t{s.reason}\n" for s in skipped), encoding="utf-8")


def skip_summary(split: RawImageSplit, listed_in: Path | None = None) -> str:
    """One line: how much of the split was left out, the first reason, and where the list is."""
    where = f" (list: {listed_in})" if listed_in else ""
    first = split.skipped[0]
    return (
        f"{split.source} {split.split}: left out {len(split.skipped):,} items{where}, "
        f"e.g. {first.item}: {first.reason}; kept {split.n_images:,} images, {split.n_captions:,} captions"
    )


class PixelTransform:
    """An image file as a (3, S, S) uint8 tensor: squashed to S x S, or for training a random
    resized crop (area and aspect ratio drawn as torchvision's RandomResizedCrop) and a random
    horizontal flip. Random draws use torch's generator, which training seeds per epoch."""

    def __init__(self, image_size: int, augment=None):
        self.size = image_size
        self.augment = augment  # an AugmentConfig, or None

    def __call__(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(photo_file(path)) as image:
                # JPEG decodes straight at a reduced scale that still covers the crop.
                least = self.size / math.sqrt(self.augment.min_crop_area) if self.augment else self.size
                image.draft("RGB", (math.ceil(least), math.ceil(least)))
                image = image.convert("RGB")
        except Exception as error:  # the file changed since the split was checked
            raise DataError(path, f"cannot be read as an image ({type(error).__name__}: {error})") from None
        box = self._crop_box(*image.size) if self.augment else None
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.augment and self.augment.flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = width * height
        log_aspect = math.log(self.augment.max_aspect)
        for _ in range(10):
            target = area * (self.augment.min_crop_area + (1 - self.augment.min_crop_area) * torch.rand(()).item())
            aspect = math.exp((2 * torch.rand(()).item() - 1) * log_aspect)
            w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if w <= width and h <= height:
                x, y = torch.rand(()).item() * (width - w), torch.rand(()).item() * (height - h)
                return x, y, x + w, y + h
        return 0, 0, width, height  # no draw fitted: the whole image, as torchvision falls back
