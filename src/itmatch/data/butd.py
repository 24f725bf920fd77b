"""`itmatch import-butd`: bottom-up-attention region features (Anderson et al., CVPR 2018) from the
TSV files its `generate_tsv.py` writes, into the precomp layout.

Each line holds image_id, image_w, image_h, num_boxes, boxes, features, tab-separated, without a
header; boxes (num_boxes x 4: x1, y1, x2, y2 in pixels) and features (num_boxes x F) are base64
float32 arrays, far larger than the csv module's default field limit. The precomp layout needs the
same number of regions R for every image: R is the first valid line's num_boxes unless `regions`
is given, in which case each image keeps its first R boxes and images with fewer are left out.

Captions come from a raw-image source's split (`captions`: its images matched to image_id by file
name stem, e.g. `1000092795.jpg`, or by the number that ends it, e.g. COCO's
`COCO_val2014_000000391895.jpg`), written in that split's order; without one, the features keep the
TSV's order and `{split}_caps.txt` is left to the user. Damaged lines, repeated image ids and
unmatched images are listed in `{split}_skipped.txt`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from itmatch.data.precomp import write_split_files
from itmatch.data.raw import RawImageSplit, Skipped, write_skip_list
from itmatch.errors import DataError

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class _Line:
    number: int
    image_id: str
    size: tuple[int, int]
    n_boxes: int
    feature_dim: int


def import_butd(
    tsv: str | Path,
    out: str | Path,
    split: str = "train",
    captions: RawImageSplit | None = None,
    regions: int | None = None,
    progress: bool = True,
    log=print,
) -> int:
    """Writes OUT/{split}_ims.npy, _ims_bbx.npy, _ims_size.npy, _ids.txt (and _caps.txt with
    `captions`) from a bottom-up-attention TSV; returns the number of images written."""
    tsv, out = Path(tsv), Path(out)
    if (out / f"{split}_ims.npy").exists():
        raise DataError(out / f"{split}_ims.npy", "exists; choose another --out or --split")
    lines, skipped = _check_lines(tsv, regions, progress)
    n_regions = regions or lines[0].n_boxes
    order, names, texts = _match(lines, captions, skipped, tsv)
    if not order:
        raise DataError(tsv, f"no image to write ({len(skipped)} left out)")
    shape = (len(order), n_regions, lines[0].feature_dim)
    partial = out / f"{split}_ims.npy.partial"
    boxes = _copy_arrays(tsv, [lines[index].number for index in order], shape, partial, progress)
    sizes = np.array([lines[index].size for index in order], dtype=np.int64)
    write_split_files(out, split, names, boxes, sizes, texts)
    os.replace(partial, out / f"{split}_ims.npy")
    if skipped:
        write_skip_list(skipped, out / f"{split}_skipped.txt")
        example = f"{skipped[0].item}: {skipped[0].reason}"
        log(f"left out {len(skipped):,} items (list: {out / split}_skipped.txt), e.g. {example}")
    if captions is None:
        log(f"no captions given: add {out / split}_caps.txt (a fixed number per image, in the order of _ids.txt)")
    log(f"wrote {out / split}_ims.npy: {shape[0]:,} images x {shape[1]} regions x {shape[2]}")
    return len(order)


def _copy_arrays(tsv: Path, numbers: list[int], shape: tuple, partial: Path, progress: bool) -> np.ndarray:
    """Writes the features of the TSV lines `numbers`, in that order, to a .npy of `shape`
    (their first R boxes); returns their boxes."""
    slot = {number: position for position, number in enumerate(numbers)}
    n_regions = shape[1]
    boxes = np.zeros((shape[0], n_regions, 4), dtype=np.float32)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        for number, fields in tqdm(_read(tsv), desc="import", disable=not progress, leave=False):
            if number in slot:
                boxes[slot[number]], features[slot[number]] = (a[:n_regions] for a in _arrays(fields))
        features.flush()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return boxes


def _read(tsv: Path) -> Iterator[tuple[int, list[str]]]:
    csv.field_size_limit(2**31 - 1)  # one field holds an image's whole feature array
    try:
        with open(tsv, encoding="ascii", newline="") as file:
            reader = csv.reader(file, delimiter="\t")
            try:
                for fields in reader:
                    yield reader.line_num, fields
            except (UnicodeDecodeError, csv.Error) as error:
                raise DataError(tsv, f"not base64 TSV text near line {reader.line_num + 1} ({error})") from None
    except OSError as error:
        raise DataError(tsv, f"cannot be read ({error.strerror})") from None


def _arrays(fields: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (num_boxes, 4) boxes and (num_boxes, F) features of a line already checked by `_check_lines`."""
    n_boxes = int(fields[3])
    boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), dtype=np.float32).reshape(n_boxes, 4)
    features = np.frombuffer(base64.b64decode(fields[5], validate=True), dtype=np.float32).reshape(n_boxes, -1)
    return boxes, features


def _check_lines(tsv: Path, regions: int | None, progress: bool) -> tuple[list[_Line], list[Skipped]]:
    """Every line checked: the usable ones, and why the others are left out."""
    lines, skipped, seen = [], [], {}
    for number, fields in tqdm(_read(tsv), desc="check TSV", disable=not progress, leave=False):
        where = f"{tsv.name}:{number}"
        line = _check_line(fields, number)
        if isinstance(line, str):
            skipped.append(Skipped(where, line))
        elif line.image_id in seen:
            skipped.append(Skipped(where, f"image {line.image_id} again (first on line {seen[line.image_id]})"))
        elif lines and line.feature_dim != lines[0].feature_dim:
            reason = f"{line.feature_dim}-d features; line {lines[0].number} has {lines[0].feature_dim}"
            skipped.append(Skipped(where, reason))
        elif regions is not None and line.n_boxes < regions:
            skipped.append(Skipped(where, f"image {line.image_id} has {line.n_boxes} boxes, fewer than {regions}"))
        elif regions is None and lines and line.n_boxes != lines[0].n_boxes:
            raise DataError(
                tsv,
                f"line {number} has {line.n_boxes} boxes, line {lines[0].number} {lines[0].n_boxes}: the precomp "
                "layout needs the same number per image; pass --regions R to keep the first R of each",
            )
        else:
            seen[line.image_id] = number
            lines.append(line)
    if not lines:
        example = f" (line {skipped[0].item}: {skipped[0].reason})" if skipped else ""
        raise DataError(tsv, f"holds no usable line{example}")
    return lines, skipped


def _check_line(fields: list[str], number: int) -> _Line | str:
    """The line's header values, or why it cannot be used (features decoded and checked)."""
    if len(fields) < len(FIELDS):
        return f"{len(fields)} fields, expected {len(FIELDS)} ({', '.join(FIELDS)})"
    try:
        width, height, n_boxes = int(fields[1]), int(fields[2]), int(fields[3])
    except ValueError:
        return "image_w, image_h and num_boxes must be integers"
    if min(width, height, n_boxes) <= 0:
        return f"image_w {width}, image_h {height}, num_boxes {n_boxes}: must be positive"
    try:
        boxes, features = _arrays(fields)
    except (binascii.Error, ValueError) as error:
        return f"boxes or features are not base64 float32 arrays of {n_boxes} rows ({error})"
    if not (np.isfinite(boxes).all() and np.isfinite(features).all()):
        return "NaN or infinite values"
    return _Line(number, fields[0].strip(), (width, height), n_boxes, features.shape[1])


def _match(
    lines: list[_Line], captions: RawImageSplit | None, skipped: list[Skipped], tsv: Path
) -> tuple[list[int], list[str], list[str] | None]:
    """(indices into `lines` in output order, the ids written, the captions written if any)."""
    if captions is None:
        return list(range(len(lines))), [line.image_id for line in lines], None
    by_id = {line.image_id: index for index, line in enumerate(lines)}
    by_number = {int(line.image_id): index for index, line in enumerate(lines) if line.image_id.isdigit()}
    order, used, names, texts, per_image = [], set(), [], [], captions.captions_per_image
    for image, name in enumerate(captions.ids):
        stem = Path(name).stem
        digits = re.search(r"(\d+)$", stem)
        index = by_id.get(stem, by_number.get(int(digits.group(1))) if digits else None)
        if index is None or index in used:
            skipped.append(Skipped(name, f"no features in {tsv.name}" if index is None else "its image_id again"))
            continue
        order.append(index)
        used.add(index)
        names.append(name)
        texts += captions.captions[image * per_image : (image + 1) * per_image]
    skipped += [
        Skipped(f"{tsv.name}:{line.number}", f"image {line.image_id}: not in the captions' {captions.split} split")
        for index, line in enumerate(lines)
        if index not in used
    ]
    return order, names, texts
