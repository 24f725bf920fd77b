"""`itmatch extract`: grid region features of raw images from a pretrained ResNet, written in the
precomp layout that every model reads: `{split}_ims.npy` (images, cells, channels),
`{split}_ims_bbx.npy` (each cell's box in the original image's pixels), `{split}_ims_size.npy`,
`{split}_caps.txt`, `{split}_ids.txt`, and `{split}_skipped.txt` for what the source left out.

Images are squashed to image_size x image_size (as end-to-end evaluation does). Features are
written batch by batch into a memory map with a progress marker (itmatch.files.ResumableArray), so
a killed run, started again with the same command, continues where it stopped; `{split}_ims.npy`
appears last, when the split is complete. OUT/extract.json records the settings and the weights
file: a folder is never filled with features of two different extractions, and a model trained on
the folder records the extraction in its checkpoint (`recorded_extraction`), so that photos it has
never seen go through the same network (`rebuild_extractor`) when they are indexed or searched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from itmatch.data.datasets import ImageDataset, make_loader
from itmatch.data.inputs import pixel_reader
from itmatch.data.precomp import write_split_files
from itmatch.data.raw import RawImageSplit, skip_summary, write_skip_list
from itmatch.data.sources import photo_source
from itmatch.device import default_device
from itmatch.errors import CheckpointError, DataError
from itmatch.files import ResumableArray, atomic_write, sha256
from itmatch.models.backbones import RESNET_LAYOUTS, BackboneConfig, GridBackbone, build_backbone, load_weights

SETTINGS_FILE = "extract.json"
# What a checkpoint records of the extraction that made its training features.
RECORD_KEYS = ("backbone", "image_size", "weights_sha256", "weights")


def extract(
    source: str | Path,
    out: str | Path,
    backbone: str,
    weights: str | Path | None = None,
    splits: list[str] | None = None,
    batch_size: int = 32,
    image_size: int = 224,
    workers: int = 0,
    progress: bool = True,
    log=print,
) -> dict[str, int]:
    """Extracts every split of `source` (or `splits`) into OUT; returns the images per split."""
    raw, out = photo_source(source), Path(out)
    if weights is None:
        log(f"no --weights: {backbone} is randomly initialised (its features only test the pipeline)")
    network = extractor(backbone, image_size, weights)
    settings = {
        "source": str(raw.file.resolve()),
        "backbone": backbone,
        "image_size": image_size,
        "weights_sha256": None if weights is None else _sha256(Path(weights)),
    }
    _claim(out, settings, weights)
    counts = {}
    for name in splits or raw.split_names():
        if (out / f"{name}_ims.npy").exists():
            log(f"{out / name}_ims.npy: already extracted")
            continue
        split = raw.open(name, progress=progress)
        if split.skipped:
            write_skip_list(split.skipped, out / f"{name}_skipped.txt")
            log(skip_summary(split, out / f"{name}_skipped.txt"))
        _extract_split(network, split, out, json.dumps(settings, sort_keys=True), batch_size, workers, progress, log)
        counts[name] = split.n_images
    return counts


def extractor(backbone: str, image_size: int, weights: str | Path | None) -> GridBackbone:
    """The frozen network of an extraction, on the default device (random without `weights`)."""
    network = build_backbone(BackboneConfig(name=backbone, image_size=image_size))
    if weights is not None:
        load_weights(network, weights)
    return network.to(default_device()).eval()


def _claim(out: Path, settings: dict, weights: str | Path | None) -> None:
    """Records the settings (and where the weights are) in OUT, or checks that OUT was filled with
    the same ones (the weights may have moved: their hash is what counts)."""
    path = out / SETTINGS_FILE
    if path.exists():
        earlier = json.loads(path.read_text())
        changed = ", ".join(k for k in settings if earlier.get(k) != settings[k])
        if changed:
            raise DataError(out, f"holds features extracted with other settings ({changed}); choose another --out")
        return
    record = {**settings, "weights": None if weights is None else str(Path(weights).resolve())}
    atomic_write(path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))


def recorded_extraction(folder: str | Path) -> dict | None:
    """The extraction that made a precomp folder's features (RECORD_KEYS of its extract.json), or
    None when `itmatch extract` did not make them."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"is not a readable extraction record ({error})") from None
    record = {key: settings.get(key) for key in RECORD_KEYS} if isinstance(settings, dict) else None
    if not _is_record(record):
        raise DataError(path, f"is not an extraction record: it needs {', '.join(RECORD_KEYS[:3])}")
    return record


def _is_record(record) -> bool:
    return (
        isinstance(record, dict)
        and record.get("backbone") in RESNET_LAYOUTS
        and isinstance(record.get("image_size"), int)
        and record["image_size"] > 0
        and all(isinstance(record.get(key), str | None) for key in ("weights_sha256", "weights"))
    )


def rebuild_extractor(record: dict | None, checkpoint: Path, weights: str | Path | None = None) -> GridBackbone:
    """The network that extracted the training features of `checkpoint` (whose `record` it is),
    with its weights from their recorded file or `weights`; refused when it cannot be the same."""
    if record is None:
        raise CheckpointError(
            checkpoint,
            "reads region features but records no `itmatch extract` run that made them (trained on features "
            "of another tool or before extractions were recorded): run `itmatch extract` on the photos with "
            "the backbone it was trained on, and index that folder",
        )
    if not _is_record(record):
        raise CheckpointError(checkpoint, "is damaged: its 'extraction' entry is not an extraction record")
    backbone = record["backbone"]
    if record["weights_sha256"] is None:
        raise CheckpointError(
            checkpoint,
            f"was trained on features of a randomly initialised {backbone} (`itmatch extract` without --weights), "
            "which cannot be made again: train on features extracted with --weights",
        )
    weights = weights if weights is not None else record["weights"]
    if weights is None:
        raise CheckpointError(checkpoint, f"records the hash of its {backbone} weights, not their file: pass --weights")
    if not Path(weights).is_file():
        raise DataError(
            weights, f"file not found: the {backbone} weights of {checkpoint}'s features; pass the file with --weights"
        )
    if _sha256(Path(weights)) != record["weights_sha256"]:
        raise DataError(
            weights,
            f"is not the {backbone} file {checkpoint}'s features were extracted with (its SHA-256 differs); "
            "pass that file with --weights",
        )
    return extractor(backbone, record["image_size"], weights)


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise DataError(path, "file not found")
    return sha256(path)


@torch.no_grad()
def _extract_split(
    network: GridBackbone,
    split: RawImageSplit,
    out: Path,
    settings: str,
    batch_size: int,
    workers: int,
    progress: bool,
    log,
) -> None:
    # The images and their order are part of what a partial file was computed from.
    key = hashlib.sha256("\n".join([settings, *split.ids]).encode()).hexdigest()
    shape = (split.n_images, network.n_regions, network.feature_dim)
    features = ResumableArray(out / f"{split.split}_ims.npy", shape, key)
    if features.done:
        log(f"{split.split}: resuming after {features.done:,} of {split.n_images:,} images")
    images = ImageDataset(split, {"pixels": pixel_reader(split, network.config.image_size)})
    loader = make_loader(Subset(images, range(features.done, split.n_images)), batch_size, workers)
    bar = tqdm(total=split.n_images, initial=features.done, desc=f"extract {split.split}", disable=not progress)
    for batch in loader:
        features.append(network(batch["pixels"].to(default_device())).cpu().numpy())
        bar.update(len(batch["pixels"]))
    bar.close()
    sizes = split.image_sizes
    boxes = np.stack([network.grid_boxes(w, h).numpy() for w, h in sizes.tolist()])
    write_split_files(out, split.split, split.ids, boxes, sizes, split.captions, split.image_paths)
    features.finish()
    log(f"wrote {out / split.split}_ims.npy: {shape[0]:,} images x {shape[1]} regions x {shape[2]}")
