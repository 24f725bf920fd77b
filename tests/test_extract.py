"""`itmatch extract` (ResNet grid features, resumable) and `itmatch import-butd` (bottom-up-attention
TSV files written here), both into the precomp layout that PrecompSplit reads."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from resnet_weights import torchvision_state_dict
from test_raw_images import captions_for, write_csv, write_image

from itmatch.cli import main
from itmatch.data.butd import import_butd
from itmatch.data.precomp import PrecompSplit
from itmatch.data.raw import PixelTransform, RawSource
from itmatch.data.region_graph import split_region_graph
from itmatch.errors import DataError
from itmatch.extract import extract
from itmatch.models.backbones import BackboneConfig, ResNet, build_backbone, load_weights

SIZE = 64  # a 2 x 2 grid from a ResNet


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """7 train images of different sizes (one unreadable) and 2 dev images, Flickr8k layout."""
    folder = tmp_path_factory.mktemp("photos")
    names = [f"p{i}.jpg" for i in range(9)]
    for i, name in enumerate(names):
        write_image(folder / "images" / name, size=(50 + 10 * i, 40 + 5 * i), seed=i)
    (folder / "images" / "p3.jpg").write_bytes(b"broken")
    write_csv(folder / "captions.csv", [["image", "caption"]] + [row for n in names for row in captions_for(n)])
    (folder / "splits").mkdir()
    (folder / "splits" / "train.txt").write_text("\n".join(names[:7]))
    (folder / "splits" / "dev.txt").write_text("\n".join(names[7:]))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision_state_dict("resnet18"), path)
    return path


def test_extract_writes_the_precomp_layout_and_resumes_after_a_kill(source, weights, tmp_path, monkeypatch):
    out = tmp_path / "precomp"
    counts = extract(source, out, "resnet18", weights, batch_size=2, image_size=SIZE, progress=False, log=quiet)
    assert counts == {"dev": 2, "train": 6}
    split = PrecompSplit(out, "train")
    assert split.features.shape == (6, 4, 512) and split.captions_per_image == 5
    assert split.ids == ["p0.jpg", "p1.jpg", "p2.jpg", "p4.jpg", "p5.jpg", "p6.jpg"]
    photos = (out / "train_paths.txt").read_text().split()  # for the search page
    assert photos == [str((source / "images" / name).resolve()) for name in split.ids]
    assert split.captions[15] == "caption 0 of p4.jpg"
    assert split.image_sizes[3].tolist() == [90, 60]
    assert split.boxes[3].tolist() == [[0, 0, 45, 30], [45, 0, 90, 30], [0, 30, 45, 60], [45, 30, 90, 60]]
    assert split_region_graph(split).shape == (6, 4, 4)
    assert "p3.jpg\t" in (out / "train_skipped.txt").read_text() and not (out / "dev_skipped.txt").exists()
    network = build_backbone(BackboneConfig(name="resnet18", image_size=SIZE))
    load_weights(network, weights)
    photo = RawSource(source).open("train").image_paths[3]
    with torch.no_grad():
        expected = network.eval()(PixelTransform(SIZE)(photo)[None])[0]
    np.testing.assert_allclose(split.features[3], expected.numpy(), rtol=1e-4, atol=1e-4)  # batched conv order

    # A run killed after two batches continues from its progress marker and ends identical.
    resumed, forward, calls = tmp_path / "resumed", ResNet.forward, []

    def dies_on_third_batch(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(self, pixels)

    monkeypatch.setattr(ResNet, "forward", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(source, resumed, "resnet18", weights, ["train"], 2, SIZE, progress=False, log=quiet)
    assert json.loads((resumed / "train_ims.npy.progress").read_text())["done"] == 4
    assert not (resumed / "train_ims.npy").exists()
    monkeypatch.setattr(ResNet, "forward", forward)
    lines = []
    extract(source, resumed, "resnet18", weights, ["train"], 2, SIZE, progress=False, log=lines.append)
    assert "train: resuming after 4 of 6 images" in lines
    np.testing.assert_array_equal(np.load(resumed / "train_ims.npy"), np.load(out / "train_ims.npy"))
    assert not (resumed / "train_ims.npy.progress").exists() and not (resumed / "train_ims.npy.partial").exists()
    lines.clear()
    assert extract(source, resumed, "resnet18", weights, ["train"], 2, SIZE, progress=False, log=lines.append) == {}
    assert lines[-1].endswith("train_ims.npy: already extracted")
    with pytest.raises(DataError, match=r"holds features extracted with other settings \(image_size\)"):
        extract(source, resumed, "resnet18", weights, ["train"], 2, SIZE * 2, progress=False, log=quiet)


def test_extract_command(source, weights, tmp_path, capsys):
    out = tmp_path / "precomp"
    args = ["extract", "--images", str(source), "--out", str(out), "--backbone", "resnet18", "--quiet"]
    assert main([*args, "--weights", str(weights), "--split", "dev", "--image-size", str(SIZE)]) == 0
    assert "extracted 2 dev" in capsys.readouterr().out
    assert PrecompSplit(out, "dev").features.shape == (2, 4, 512)
    assert main([*args, "--weights", str(tmp_path / "none.pth")]) == 2
    assert "none.pth: file not found" in capsys.readouterr().err


def encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def butd_line(image_id: str, n_boxes: int, seed: int, size=(500, 375), dim=6) -> list[str]:
    rng = np.random.default_rng(seed)
    boxes = np.sort(rng.uniform(0, 300, (n_boxes, 4)), axis=1)
    return [image_id, str(size[0]), str(size[1]), str(n_boxes), encode(boxes), encode(rng.normal(size=(n_boxes, dim)))]


def write_tsv(path: Path, lines: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file, delimiter="\t").writerows(lines)
    return path


def test_import_butd_reads_the_tsv_and_lists_bad_lines(tmp_path):
    good = [butd_line(str(100 + i), 4 + i, seed=i) for i in range(3)]
    broken = [["7", "500", "375"], [*butd_line("8", 4, 8)[:5], "@@not base64@@"], butd_line("101", 5, 9)]
    tsv = write_tsv(tmp_path / "feats.tsv", [good[0], broken[0], good[1], broken[1], good[2], broken[2]])
    with pytest.raises(DataError, match=r"line 3 has 5 boxes, line 1 4: .* pass --regions R"):
        import_butd(tsv, tmp_path / "strict", progress=False, log=quiet)
    out = tmp_path / "precomp"
    assert import_butd(tsv, out, "test", regions=4, progress=False, log=quiet) == 3
    features, boxes = np.load(out / "test_ims.npy"), np.load(out / "test_ims_bbx.npy")
    assert features.shape == (3, 4, 6) and boxes.shape == (3, 4, 4)
    for row, line in enumerate(good):
        expected = np.frombuffer(base64.b64decode(line[5]), dtype=np.float32).reshape(-1, 6)[:4]
        np.testing.assert_array_equal(features[row], expected)
    np.testing.assert_array_equal(boxes[2], np.frombuffer(base64.b64decode(good[2][4]), np.float32).reshape(-1, 4)[:4])
    assert np.load(out / "test_ims_size.npy").tolist() == [[500, 375]] * 3
    assert (out / "test_ids.txt").read_text().split() == ["100", "101", "102"]
    skipped = (out / "test_skipped.txt").read_text()
    assert "feats.tsv:2\t3 fields, expected 6" in skipped
    assert "feats.tsv:4\tboxes or features are not base64 float32 arrays" in skipped
    assert "feats.tsv:6\timage 101 again (first on line 3)" in skipped
    assert not (out / "test_caps.txt").exists()
    with pytest.raises(DataError, match="test_ims.npy: exists"):
        import_butd(tsv, out, "test", regions=4, progress=False, log=quiet)


def test_import_butd_command_takes_captions_in_the_sources_order(tmp_path, capsys):
    lines = [butd_line(image_id, 3, seed=i) for i, image_id in enumerate(["391895", "1000092795", "555"])]
    tsv = write_tsv(tmp_path / "feats.tsv", lines)
    names = ["1000092795.jpg", "COCO_val2014_000000391895.jpg", "unknown.jpg"]
    rows = [["image", "caption", "split"]] + [[n, f"{k} {n}", "test"] for n in names for k in range(2)]
    write_csv(tmp_path / "captions.csv", rows)  # the images themselves are not needed
    out = tmp_path / "precomp"
    assert main(["import-butd", str(tsv), "--out", str(out), "--split", "test", "--captions", str(tmp_path)]) == 0
    split = PrecompSplit(out, "test")
    assert split.ids == names[:2] and split.captions == ["0 1000092795.jpg", "1 1000092795.jpg"] + [
        "0 COCO_val2014_000000391895.jpg",
        "1 COCO_val2014_000000391895.jpg",
    ]
    coco_features = np.frombuffer(base64.b64decode(lines[0][5]), np.float32).reshape(3, 6)
    np.testing.assert_array_equal(split.features[1], coco_features)
    skipped = (out / "test_skipped.txt").read_text()
    assert "unknown.jpg\tno features in feats.tsv" in skipped
    assert "feats.tsv:3\timage 555: not in the captions' test split" in skipped
    assert "left out 2 items" in capsys.readouterr().out
    assert main(["import-butd", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "x")]) == 2
    assert "none.tsv: cannot be read" in capsys.readouterr().err
