"""`itmatch extract`: grid region features of raw images from a pretrained ResNet, written in the
precomp layout that every model reads: `{split}_ims.npy` (images, cells, channels),
`{split}_ims_bbx.npy` (each cell's box in the original image's pixels), `{split}_ims_size.npy`,
`{split}_caps.txt`, `{split}_ids.txt`, and `{split}_skipped.txt` for what the source left out.

Images are squashed to image_size x image_size (as end-to-end evaluation does). Features are
written batch by batch into a memory map with a progress marker (itmatch.files.ResumableArray), so
a killed run, started again with the same command, continues where it stopped; `{split}_ims.npy`
appears last, when the split is complete. OUT/extract.json records the settings: a folder is never
filled with features of two different extractions.
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
from itmatch.data.raw import RawImageSplit, RawSource, skip_summary, write_skip_list
from itmatch.device import default_device
from itmatch.errors import DataError
from itmatch.files import ResumableArray, atomic_write, sha256
from itmatch.models.backbones import BackboneConfig, GridBackbone, build_backbone, load_weights

SETTINGS_FILE = "extract.json"


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
    raw, out = RawSource(source), Path(out)
    network = build_backbone(BackboneConfig(name=backbone, image_size=image_size))
    if weights is None:
        log(f"no --weights: {backbone} is randomly initialised (its features only test the pipeline)")
    else:
        load_weights(network, weights)
    network = network.to(default_device()).eval()
    settings = {
        "source": str(raw.file.resolve()),
        "backbone": backbone,
        "image_size": image_size,
        "weights_sha256": None if weights is None else _sha256(Path(weights)),
    }
    _claim(out, settings)
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


def _claim(out: Path, settings: dict) -> None:
    """Records the settings in OUT, or checks that OUT was filled with the same ones."""
    path = out / SETTINGS_FILE
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            changed = ", ".join(k for k in settings if earlier.get(k) != settings[k])
            raise DataError(out, f"holds features extracted with other settings ({changed}); choose another --out")
        return
    atomic_write(path, lambda file: file.write((json.dumps(settings, indent=2) + "\n").encode()))


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
