"""Small galleries and untrained models for the service tests: scoring quality does not matter
there, only that every endpoint answers with the model's own numbers."""

from __future__ import annotations

from pathlib import Path

import torch

from itmatch import build_run_config
from itmatch.checkpoint import save_checkpoint
from itmatch.data.precomp import read_captions
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import Vocabulary
from itmatch.models.registry import build_model

REGIONS, FEATURE_DIM = 8, 16
SIZES = {
    "cmcan-official": {"embed_size": 32, "sim_dim": 8, "n_regions": REGIONS},
    "vsepp": {"embed_size": 32},
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
