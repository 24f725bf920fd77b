from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import evaluate_split
from itmatch.training import train

# ../shared beside the project root (CI has it there too); ITMATCH_SHARED overrides.
SHARED = Path(os.environ.get("ITMATCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

# precision="auto" picks bf16 on some CPUs and fp32 on others: the suite pins it to fp32 so that its
# results do not depend on the machine (test_precision.py tests "auto" itself).
os.environ.setdefault("ITMATCH_PRECISION", "fp32")

# Two cores here: keep test timings stable and comparable with the official measurements.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for running `python -m itmatch.cli` from the source tree."""
    source = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# -- short training runs on synthetic scenes (a method's "learns" test) ------------------------------
SHORT_RUN_TEST_IMAGES = 50
# The chance rSum of the test split (6 recalls of about 5.5 / images % each): about 66.
CHANCE_RSUM = 6 * 100 * 5.5 / SHORT_RUN_TEST_IMAGES


@pytest.fixture(scope="session")
def small_scenes(tmp_path_factory) -> Path:
    """Synthetic scenes for short training runs: 300 train, 30 dev, 50 test images of 8 regions."""
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    splits = {"train": 300, "dev": 30, "test": SHORT_RUN_TEST_IMAGES}
    return make_synthetic(tmp_path_factory.mktemp("scenes"), splits, seed=5, spec=spec)


SHORT_RUN = {
    "train": {"epochs": 4, "batch_size": 32, "learning_rate": 2e-3, "checkpoint_every": 0, "dev_max_captions": None},
    "loss": {"exclude_same_image": True},
}


def short_training_metrics(preset: str, changes: dict, data: Path, out: Path) -> dict:
    """Trains `preset` with SHORT_RUN's schedule and `changes` on `data` from seed 0 and evaluates
    its best checkpoint on the test split."""
    torch.manual_seed(0)
    config = build_run_config(preset, merge(SHORT_RUN, changes))
    train(config, data, out, progress=False, log=lambda *_: None)
    model = load_checkpoint(out / "best.pt", device="cpu")
    return evaluate_split(model, PrecompSplit(data, "test"), progress=False)
