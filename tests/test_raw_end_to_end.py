"""Real photos end to end: a few dozen Flickr8k images from ../shared, in their own layout, through
`itmatch extract` -> train -> evaluate, and through end-to-end training of the image encoder on the
raw photos -> evaluate. Sizes are tiny: this checks the plumbing on real JPEGs, not accuracy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from resnet_weights import torchvision_state_dict

from itmatch.cli import main

FLICKR8K = SHARED / "data" / "flickr8k"
N_TRAIN, N_DEV = 40, 10
SMALL = ["model.embed_size=32", "model.text.word_dim=16", "train.batch_size=20", "loss.negatives=sum"]

pytestmark = pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"{FLICKR8K} is absent (set ITMATCH_SHARED)")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The first train and dev photos of the official splits, with their captions, Flickr8k layout."""
    folder = tmp_path_factory.mktemp("flickr8k")
    splits = {
        name: (FLICKR8K / "splits" / f"{name}.txt").read_text().split()[:count]
        for name, count in (("train", N_TRAIN), ("dev", N_DEV))
    }
    (folder / "splits").mkdir()
    (folder / "images").mkdir()
    for name, images in splits.items():
        (folder / "splits" / f"{name}.txt").write_text("\n".join(images) + "\n")
        for image in images:
            shutil.copy(FLICKR8K / "images" / image, folder / "images" / image)
    wanted = set(splits["train"] + splits["dev"])
    with open(FLICKR8K / "captions.csv", newline="", encoding="utf-8") as file:
        rows = [row for row in csv.reader(file) if row[0] == "image" or row[0] in wanted]
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return folder


def run(*args: str) -> None:
    assert main([*args, "--quiet"]) == 0


def settings(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_extract_train_evaluate_and_end_to_end_training_on_real_photos(photos, tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision_state_dict("resnet18"), weights)  # no pretrained weights here: random ones
    precomp = tmp_path / "precomp"
    run("extract", "--images", str(photos), "--out", str(precomp), "--backbone", "resnet18", "--weights", str(weights))
    vsepp = tmp_path / "vsepp"
    run("train", "--model", "vsepp", "--data", str(precomp), "--out", str(vsepp), "--epochs", "2", *settings(*SMALL))
    metrics = tmp_path / "vsepp.json"
    run("evaluate", str(vsepp / "best.pt"), "--data", str(precomp), "--split", "dev", "--json", str(metrics))
    result = json.loads(metrics.read_text())
    assert (result["n_images"], result["n_captions"]) == (N_DEV, 5 * N_DEV) and 0 <= result["rsum"] <= 600

    raw_run = tmp_path / "cmcan"
    tiny = settings(*SMALL, "model.sim_dim=8", "backbone.image_size=48", "backbone.width=8")
    run("train", "--model", "cmcan-official", "--data", str(photos), "--out", str(raw_run), "--epochs", "1", *tiny)
    config = json.loads((raw_run / "config.json").read_text())
    assert config["backbone"]["name"] == "convnet" and config["model"]["n_regions"] == 9  # 48 px / 16: 3 x 3
    metrics = tmp_path / "cmcan.json"
    run("evaluate", str(raw_run / "best.pt"), "--data", str(photos), "--split", "dev", "--json", str(metrics))
    assert json.loads(metrics.read_text())["n_images"] == N_DEV
    capsys.readouterr()
    assert main(["evaluate", str(vsepp / "best.pt"), "--data", str(photos), "--split", "dev"]) == 2
    assert "holds raw images, but this vsepp model reads region features" in capsys.readouterr().err
