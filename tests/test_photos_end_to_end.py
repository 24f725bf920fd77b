"""From a folder of photos to a search index, for both kinds of model (issue 19), on a few real
Flickr8k photos from ../shared at tiny sizes: this checks the journey, not accuracy.

- A model with a backbone trains end to end on photos without a dev split, indexes them (and a
  plain folder of photos without captions), and is searched by text and by a photo file.
- A model trained on `itmatch extract` features records the extraction in its checkpoint and
  indexes other photos through it: the encodings equal those of the folder `itmatch extract`
  writes for the same photos; a missing, moved or different weights file is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from resnet_weights import torchvision_state_dict
from service_setup import FLICKR8K, flickr_layout

from itmatch import build_run_config
from itmatch.checkpoint import read_checkpoint, save_checkpoint
from itmatch.cli import main
from itmatch.models.registry import build_model
from itmatch.service.index import SearchIndex

SMALL = ["model.embed_size=32", "model.text.word_dim=16", "train.batch_size=20", "loss.negatives=sum"]
EXTRACTION = ["--backbone", "resnet18", "--image-size", "96"]  # 3 x 3 grid cells of 512-d

pytestmark = pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"{FLICKR8K} is absent (set ITMATCH_SHARED)")


@pytest.fixture(scope="module")
def names() -> dict[str, list[str]]:
    dev = (FLICKR8K / "splits" / "dev.txt").read_text().split()
    return {"train": (FLICKR8K / "splits" / "train.txt").read_text().split()[:20], "other": dev[:5], "plain": dev[5:9]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, names) -> Path:
    """20 photos with captions and a train split only (no dev split)."""
    return flickr_layout(tmp_path_factory.mktemp("photos"), names["train"], "train")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, names) -> Path:
    """4 photos without captions, one in a subfolder, beside a text file and a hidden photo."""
    folder = tmp_path_factory.mktemp("plain")
    (folder / "more").mkdir()
    for number, name in enumerate(names["plain"]):
        shutil.copy(FLICKR8K / "images" / name, folder / ("more" if number == 0 else ".") / name)
    shutil.copy(FLICKR8K / "images" / names["other"][0], folder / ".hidden.jpg")
    (folder / "notes.txt").write_text("not a photo\n")
    return folder


def run(*args: str) -> str:
    """Runs the CLI; its printed output."""
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert main([*map(str, args)]) == 0
    return out.getvalue()


def fails(capsys, *args: str) -> str:
    """Runs a command that must fail with one line on stderr; that line."""
    capsys.readouterr()
    assert main([*map(str, args)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def settings(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def search(*args) -> dict:
    return json.loads(run("search", *args, "--json"))


def test_end_to_end_model_trains_indexes_and_searches_photos(photos, plain, names, tmp_path, capsys):
    runs = tmp_path / "vsepp"
    tiny = settings(*SMALL, "backbone.image_size=32", "backbone.width=8")
    trained = run("train", "--model", "vsepp", "--data", photos, "--out", runs, "--epochs", "1", "--quiet", *tiny)
    assert "no dev split" in trained and (runs / "best.pt").is_file()

    index = tmp_path / "index"
    assert "added 20 images" in run("index", runs / "best.pt", "--data", photos, "--out", index, "--quiet")
    found = search(index, "a dog runs on the grass", "-k", "5")
    assert len(found["results"]) == 5 and {hit["id"] for hit in found["results"]} <= set(names["train"])

    # A photo file is read as the indexed photos were: the same captions, the same scores.
    photo = photos / "images" / names["train"][3]
    by_photo, by_number = search(index, "--image", photo, "-k", "7"), search(index, "--image", "3", "-k", "7")
    assert by_photo["results"] == by_number["results"] and by_photo["photo"] == str(photo)

    # A plain folder of photos (no captions) joins the index; running again adds nothing.
    assert "added 4 images" in run("index", runs / "best.pt", "--data", plain, "--out", index, "--quiet")
    assert "added 0 images" in run("index", runs / "best.pt", "--data", plain, "--out", index, "--quiet")
    opened = SearchIndex.open(index, "cpu")
    added = opened.ids.all()[20:]
    assert added == sorted(["more/" + names["plain"][0], *names["plain"][1:]])
    assert opened.n_captions == 100 and all(opened.picture_path(n).is_file() for n in range(24))
    assert {hit["image"] for hit in search(index, "a dog", "-k", "24")["results"]} == set(range(24))

    alone = tmp_path / "plain-index"
    run("index", runs / "best.pt", "--data", plain, "--out", alone, "--quiet")
    assert "no captions to rank" in fails(capsys, "search", alone, "--image", photo)
    assert "neither a photo file nor" in fails(capsys, "search", index, "--image", tmp_path / "absent.jpg")
    assert "photos without captions" in fails(
        capsys, "train", "--model", "vsepp", "--data", plain, "--out", tmp_path / "r"
    )
    assert "one split, 'all'" in fails(
        capsys, "index", runs / "best.pt", "--data", plain, "--split", "test", "--out", alone
    )


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory, photos) -> dict:
    """Features of a ResNet state dict made here, and a model trained on them (no dev split)."""
    folder = tmp_path_factory.mktemp("features")
    weights = folder / "resnet18.pth"
    torch.save(torchvision_state_dict("resnet18"), weights)
    features = folder / "precomp"
    run("extract", "--images", photos, "--out", features, *EXTRACTION, "--weights", weights, "--quiet")
    runs = folder / "vsepp"
    run("train", "--model", "vsepp", "--data", features, "--out", runs, "--epochs", "1", "--quiet", *settings(*SMALL))
    return {"weights": weights, "features": features, "checkpoint": runs / "best.pt"}


def cmcan_checkpoint(feature_run: dict, path: Path) -> Path:
    """An untrained CMCAN on the same features (it reads the region graph), with their record."""
    trained = read_checkpoint(feature_run["checkpoint"])
    sizes = {"vocab_size": len(trained["vocab"]), "img_dim": 512, "n_regions": 9, "embed_size": 32, "sim_dim": 8}
    config = build_run_config("cmcan-official", {"model": {**sizes, "text": {"word_dim": 16}}})
    torch.manual_seed(0)
    model = build_model(config)
    model.vocab = read_model_vocab(feature_run["checkpoint"])
    save_checkpoint(path, model, config, extraction=trained["extraction"])
    return path


def read_model_vocab(checkpoint: Path):
    from itmatch.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, "cpu").vocab


@pytest.mark.parametrize("model", ["trained vsepp", "cmcan"])
def test_feature_model_indexes_new_photos_through_its_recorded_extraction(feature_run, names, model, tmp_path):
    checkpoint = feature_run["checkpoint"]
    if model == "cmcan":
        checkpoint = cmcan_checkpoint(feature_run, tmp_path / "cmcan.pt")
    record = read_checkpoint(checkpoint)["extraction"]
    assert record == {
        "backbone": "resnet18",
        "image_size": 96,
        "weights_sha256": record["weights_sha256"],
        "weights": str(feature_run["weights"].resolve()),
    }
    other = flickr_layout(tmp_path / "other", names["other"], "test")
    exact = ("--storage", "float32")  # a photo query is encoded in float32: the same scores need the same rounding
    run("index", checkpoint, "--data", other, "--out", tmp_path / "from-photos", "--quiet", *exact)
    extracted = tmp_path / "extracted"
    run("extract", "--images", other, "--out", extracted, *EXTRACTION, "--weights", feature_run["weights"], "--quiet")
    run("index", checkpoint, "--data", extracted, "--out", tmp_path / "from-features", "--quiet", *exact)

    from_photos, from_features = (SearchIndex.open(tmp_path / name, "cpu") for name in ("from-photos", "from-features"))
    assert from_photos.ids.all() == names["other"]
    assert from_photos.captions.all() == from_features.captions.all()
    photo_images, feature_images = (index.images.select(slice(None)) for index in (from_photos, from_features))
    for key, value in feature_images.tensors.items():
        torch.testing.assert_close(photo_images[key], value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_photos.boxes.view, from_features.boxes.view)

    photo = other / "images" / names["other"][2]
    by_photo = search(tmp_path / "from-photos", "--image", photo, "-k", "5")
    assert by_photo["results"] == search(tmp_path / "from-features", "--image", "2", "-k", "5")["results"]


def test_feature_model_refuses_photos_it_cannot_read_as_it_was_trained(feature_run, photos, tmp_path, capsys):
    checkpoint, weights = feature_run["checkpoint"], feature_run["weights"]
    moved = tmp_path / "moved.pth"
    shutil.move(weights, moved)
    try:
        error = fails(capsys, "index", checkpoint, "--data", photos, "--out", tmp_path / "a")
        assert f"{weights}: file not found" in error and "--weights" in error
        run("index", checkpoint, "--data", photos, "--out", tmp_path / "a", "--weights", moved, "--quiet")
        # The index remembers the file it read: searching by photo needs no --weights.
        assert search(
            tmp_path / "a", "--image", photos / "images" / next(iter(sorted((photos / "images").iterdir()))).name
        )
    finally:
        shutil.move(moved, weights)
    different = tmp_path / "other.pth"
    torch.save(torchvision_state_dict("resnet18", seed=1), different)
    error = fails(capsys, "index", checkpoint, "--data", photos, "--out", tmp_path / "b", "--weights", different)
    assert "SHA-256 differs" in error

    unrecorded = tmp_path / "unrecorded.pt"
    payload = read_checkpoint(checkpoint)
    torch.save({**payload, "extraction": None}, unrecorded)
    assert "records no `itmatch extract` run" in fails(
        capsys, "index", unrecorded, "--data", photos, "--out", tmp_path / "c"
    )
    random = tmp_path / "random.pt"
    torch.save({**payload, "extraction": {**payload["extraction"], "weights_sha256": None}}, random)
    assert "randomly initialised resnet18" in fails(capsys, "index", random, "--data", photos, "--out", tmp_path / "d")
