"""The short training run that tests of the pooled-embedding methods (TIMAM, NAA, cm-SSFT) share:
small synthetic scenes, 12 epochs of batches of 8 images x 4 captions, the best dev checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.config import merge
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.training import train

N_TEST = 50
CHANCE_RSUM = 6 * 100 * 5.5 / N_TEST  # the six recalls of a random ranking, about 66
SETTINGS = {
    "model": {"embed_size": 64, "text": {"word_dim": 32}},
    "train": {
        "epochs": 12,
        "batch_size": 32,
        "captions_per_image": 4,
        "learning_rate": 2e-3,
        "checkpoint_every": 0,
        "dev_max_captions": None,
    },
}


def make_scenes(folder: Path) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(folder, {"train": 300, "dev": 30, "test": N_TEST}, seed=5, spec=spec)


def train_briefly(preset: str, scenes: Path, run_dir: Path, changes: dict | None = None):
    """(the best checkpoint's model, the run's final state) of `preset` trained on `scenes`."""
    torch.manual_seed(0)
    config = build_run_config(preset, merge(SETTINGS, changes or {}))
    state = train(config, scenes, run_dir, progress=False, log=lambda *_: None)
    return load_checkpoint(run_dir / "best.pt", device="cpu"), state
