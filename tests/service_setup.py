"""Small galleries and untrained models for the service tests: scoring quality does not matter
there, only that every endpoint answers with the model's own numbers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import torch
from conftest import SHARED

from itmatch import build_run_config
from itmatch.checkpoint import save_checkpoint
from itmatch.data.precomp import read_captions
from itmatch.data.raw import RawSource
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import Vocabulary
from itmatch.models.registry import build_model

REGIONS, FEATURE_DIM = 8, 16
SIZES = {
    "cmcan-official": {"embed_size": 32, "sim_dim": 8, "n_regions": REGIONS},
    "vsepp": {"embed_size": 32},
    "dvsa": {"embed_size": 32},
    "sm-lstm": {"embed_size": 32},
}


def make_gallery(folder: Path, images: int = 24, extra_split: int = 0) -> Path:
    """Synthetic scenes: a test split (and a dev split of `extra_split` images)."""
    splits = {"test": images, **({"dev": extra_split} if extra_split else {})}
    return make_synthetic(folder, splits, seed=3, spec=SyntheticSpec(n_regions=REGIONS, feature_dim=FEATURE_DIM))


def make_checkpoint(data: Path, preset: str, path: Path) -> Path:
    """An untrained model of `preset` at tiny sizes, reading the test split's words."""
    vocab = Vocabulary.build(read_captions(data / "test_caps.txt"), threshold=1)
    sizes = {"vocab_size": len(vocab), "img_dim": FEATURE_DIM, "text": {"word_dim": 16}, **SIZES[preset]}
    config = build_run_config(preset, {"model": sizes})
    torch.manual_seed(0)
    model = build_model(config)
    model.vocab = vocab
    save_checkpoint(path, model, config)
    return path


FLICKR8K = SHARED / "data" / "flickr8k"


def flickr_layout(folder: Path, images: list[str], split: str) -> Path:
    """Flickr8k photos `images` with their captions, in the Flickr8k layout, as the one split `split`."""
    (folder / "images").mkdir(parents=True)
    (folder / "splits").mkdir()
    (folder / "splits" / f"{split}.txt").write_text("\n".join(images) + "\n")
    for image in images:
        shutil.copy(FLICKR8K / "images" / image, folder / "images" / image)
    with open(FLICKR8K / "captions.csv", newline="", encoding="utf-8") as file:
        rows = [row for row in csv.reader(file) if row[0] == "image" or row[0] in set(images)]
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return folder


def make_photo_checkpoint(photos: Path, split: str, path: Path) -> Path:
    """An untrained VSE++ with a small convnet backbone (it reads pixels), knowing the split's words."""
    vocab = Vocabulary.build(RawSource(photos).open(split, verify_images=False).captions, threshold=1)
    sizes = {"embed_size": 32, "vocab_size": len(vocab), "img_dim": 64, "text": {"word_dim": 16}}
    config = build_run_config("vsepp", {"model": sizes, "backbone": {"image_size": 32, "width": 8}})  # 64-d cells
    torch.manual_seed(0)
    model = build_model(config)
    model.vocab = vocab
    save_checkpoint(path, model, config)
    return path
