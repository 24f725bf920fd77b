"""Raw-image sources (Flickr8k layout, Karpathy JSON, plain CSV) and their bad inputs, the pixel
transform, the image backbones (ResNet loader against torchvision-format weights made here) and
models that read pixels through a backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from resnet_weights import LAYOUTS, resnet18_reference, torchvision_shapes, torchvision_state_dict

from itmatch import build_run_config, load_checkpoint
from itmatch.checkpoint import save_checkpoint
from itmatch.config import parse_overrides
from itmatch.data.raw import PixelTransform, RawSource, skip_summary, write_skip_list
from itmatch.data.sources import open_split, split_names
from itmatch.data.vocab import Vocabulary, build_vocab_for_dir
from itmatch.errors import ConfigError, DataError, InputError
from itmatch.models.backbones import AugmentConfig, BackboneConfig, build_backbone, load_weights
from itmatch.models.registry import build_model


def write_image(path: Path, size=(40, 30), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return path


def captions_for(name: str, count: int = 5) -> list[list[str]]:
    return [[name, f"caption {k} of {name}"] for k in range(count)]


@pytest.fixture
def flickr_layout(tmp_path) -> Path:
    """A Flickr8k-layout folder with one of each problem in its train split."""
    good = [f"good{i}.jpg" for i in range(4)]
    for i, name in enumerate(good + ["dup.jpg", "six.jpg", "few.jpg", "empty.jpg"]):
        write_image(tmp_path / "images" / name, size=(40 + i, 30), seed=i)
    truncated = (tmp_path / "images" / "good0.jpg").read_bytes()
    (tmp_path / "images" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "images" / "text.jpg").write_text("not an image")
    rows = [["image", "caption"]]
    for name in good + ["truncated.jpg", "text.jpg", "missing.jpg"]:
        rows += captions_for(name)
    rows += captions_for("dup.jpg", 4) + [["dup.jpg", "caption  0 of dup.jpg "]]  # repeat after normalising
    rows += captions_for("six.jpg", 6) + captions_for("few.jpg", 3)
    rows += captions_for("empty.jpg", 4) + [["empty.jpg", "  "]]
    rows += [["", "no image"], ["good1.jpg"]]  # a row without image, a row without caption
    write_csv(tmp_path / "captions.csv", rows)
    (tmp_path / "splits").mkdir()
    train = ["good0.jpg", "good1.jpg", "six.jpg", "dup.jpg", "few.jpg", "empty.jpg", "truncated.jpg", "text.jpg"]
    (tmp_path / "splits" / "train.txt").write_text("\n".join(train + ["missing.jpg", "nocaps.jpg", "good0.jpg"]))
    (tmp_path / "splits" / "dev.txt").write_text("good2.jpg\ngood3.jpg\n")
    return tmp_path


def test_flickr_layout_keeps_good_images_and_lists_every_problem(flickr_layout, tmp_path):
    assert split_names(flickr_layout) == ["dev", "train"]
    split = open_split(flickr_layout, "train")
    assert split.ids == ["good0.jpg", "good1.jpg", "six.jpg"]
    assert split.captions_per_image == 5 and split.n_captions == 15
    assert split.captions[:5] == [f"caption {k} of good0.jpg" for k in range(5)]
    assert split.captions[10:] == [f"caption {k} of six.jpg" for k in range(5)]  # the first 5 of 6
    assert split.image_sizes.tolist() == [[40, 30], [41, 30], [45, 30]]
    reasons = {item: reason for item, reason in ((s.item, s.reason) for s in split.skipped)}
    assert reasons["dup.jpg"] == "has 4 captions; the split has 5 per image"
    assert reasons["few.jpg"] == "has 3 captions; the split has 5 per image"
    assert reasons["empty.jpg"] == "has 4 captions; the split has 5 per image"
    assert reasons["captions.csv:41"] == "dup.jpg: repeats an earlier caption"
    assert any(r == "empty.jpg: empty caption" for r in reasons.values())
    assert reasons["captions.csv:57"] == "good1.jpg: empty caption"
    assert reasons["captions.csv:56"] == "no image name"
    assert "not a readable image (OSError: image file is truncated" in reasons["truncated.jpg"]
    assert reasons["text.jpg"].startswith(f"{flickr_layout / 'images' / 'text.jpg'}: not a readable image")
    missing = flickr_layout / "missing.jpg"
    assert reasons["missing.jpg"] == f"{missing}: file not found (nor in an images/ folder beside it)"
    assert reasons["nocaps.jpg"] == "no captions in captions.csv"
    assert reasons["train.txt:11"] == "good0.jpg: listed again (first on line 1)"
    write_skip_list(split.skipped, tmp_path / "skipped.txt")
    lines = (tmp_path / "skipped.txt").read_text().splitlines()
    assert len(lines) == len(split.skipped) and "few.jpg\thas 3 captions" in "\n".join(lines)
    assert f"left out {len(split.skipped)} items" in skip_summary(split) and "kept 3 images" in skip_summary(split)
    dev = open_split(flickr_layout, "dev", max_captions=5)
    assert dev.ids == ["good2.jpg"] and dev.n_captions == 5
    vocab = build_vocab_for_dir(flickr_layout, threshold=1)
    assert "caption" in vocab.words and "good3.jpg" in " ".join(vocab.words)


def test_karpathy_json_maps_splits_and_finds_images_under_filepath(tmp_path):
    write_image(tmp_path / "images" / "val2014" / "COCO_val2014_000000000042.jpg")
    write_image(tmp_path / "images" / "train2014" / "a.jpg", seed=1)
    write_image(tmp_path / "restval" / "b.jpg", seed=2)
    sentences = [{"raw": f"A photo number {k}.", "tokens": ["a"]} for k in range(4)] + [{"tokens": ["x", "y"]}]
    coco = "COCO_val2014_000000000042.jpg"
    data = {
        "images": [
            {"filepath": "val2014", "filename": coco, "split": "val", "sentences": sentences},
            {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": sentences},
            {"filepath": "restval", "filename": "b.jpg", "split": "restval", "sentences": sentences},
            {"filepath": "restval", "filename": "b2.jpg", "split": "restval", "sentences": [{"tokens": ["x"]}] * 5},
            {"filename": "c.jpg", "split": "elsewhere", "sentences": sentences},
            {"split": "train"},
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    source = RawSource(tmp_path)
    assert source.split_names() == ["dev", "train"]
    train = source.open("train")
    assert train.ids == ["train2014/a.jpg", "restval/b.jpg"]
    assert train.captions_per_image == 5 and train.captions[3:5] == ["A photo number 3.", "x y"]
    reasons = {s.reason for s in train.skipped}
    assert reasons >= {"no filename", "c.jpg: unknown split 'elsewhere'", "has 1 captions; the split has 5 per image"}
    dev = source.open("dev")
    assert dev.image_paths == [tmp_path / "images" / "val2014" / "COCO_val2014_000000000042.jpg"]
    assert dev.captions_per_image == 5


def test_plain_csv_with_and_without_split_column(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        write_image(tmp_path / "photos" / name)
    rows = [["caption", "image", "split"], ["one", "photos/x.jpg", "train"], ["two", "photos/y.jpg", "test"]]
    rows += [["three", "photos/z.jpg", "train"], ["again", "photos/x.jpg", "test"], ["none", "photos/y.jpg", ""]]
    source = RawSource(write_csv(tmp_path / "pairs.csv", rows))
    assert source.split_names() == ["test", "train"]
    train = source.open("train")
    assert train.ids == ["photos/x.jpg", "photos/z.jpg"] and train.captions == ["one", "three"]
    reasons = {s.reason for s in train.skipped}
    assert reasons == {"photos/x.jpg: split 'test' here, 'train' before", "photos/y.jpg: no split"}
    plain = RawSource(write_csv(tmp_path / "all.csv", [["image", "caption"], ["photos/y.jpg", "a caption"]]))
    assert plain.split_names() == ["all"] and plain.open("all").captions == ["a caption"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"picture,text\na.jpg,hello\n", "the header must name the columns image and caption"),
        (b"image,caption\na.jpg,caf\xe9\n", "line 2 is not valid UTF-8"),
    ],
)
def test_broken_csv_is_an_error_naming_the_file(tmp_path, content, expected):
    (tmp_path / "captions.csv").write_bytes(content)
    with pytest.raises(DataError, match=expected) as error:
        RawSource(tmp_path)
    assert error.value.path == tmp_path / "captions.csv"


def test_broken_sources_are_errors_naming_the_file(tmp_path):
    (tmp_path / "dataset_f30k.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"dataset_f30k.json: is not valid JSON \(line 1, column 13"):
        RawSource(tmp_path)
    with pytest.raises(DataError, match="not a raw-image source"):
        RawSource(tmp_path / "..")
    (tmp_path / "empty").mkdir()  # neither photos nor features (tmp_path/.. holds other tests' photos)
    with pytest.raises(DataError, match="train_ims.npy: file not found"):
        open_split(tmp_path / "empty", "train")
    write_image(tmp_path / "ok" / "a.jpg")
    write_csv(tmp_path / "ok" / "captions.csv", [["image", "caption"], ["a.jpg", "hi"], ["gone.jpg", "hi"]])
    with pytest.raises(DataError, match=r"captions.csv: has no split 'train'; its splits: all"):
        open_split(tmp_path / "ok", "train")
    (tmp_path / "bad").mkdir()
    write_csv(tmp_path / "bad" / "captions.csv", [["image", "caption"], ["gone.jpg", "hi"]])
    with pytest.raises(DataError, match=r"split 'all' has no usable images \(1 left out: gone.jpg: .* file not found"):
        open_split(tmp_path / "bad", "all")


def test_pixel_transform_squashes_or_augments(tmp_path):
    path = write_image(tmp_path / "a.jpg", size=(64, 40))
    pixels = PixelTransform(24)(path)
    assert pixels.shape == (3, 24, 24) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, PixelTransform(24)(path))
    augment = PixelTransform(24, AugmentConfig(min_crop_area=0.3, flip=True))
    torch.manual_seed(0)
    first = augment(path)
    torch.manual_seed(0)
    assert torch.equal(first, augment(path)) and not torch.equal(first, augment(path))
    flipped = PixelTransform(24, AugmentConfig(min_crop_area=1.0, max_aspect=1.0, flip=True))
    draws = {tuple(flipped(path).flatten()[:8].tolist()) for _ in range(12)}
    assert len(draws) == 2  # the whole image, flipped or not
    (tmp_path / "a.jpg").write_bytes(b"gone bad")
    with pytest.raises(DataError, match="a.jpg: cannot be read as an image"):
        PixelTransform(24)(path)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_resnet_has_torchvision_names_and_shapes(name):
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        backbone = build_backbone(BackboneConfig(name=name, image_size=224))
    ours = {key: tuple(value.shape) for key, value in backbone.state_dict().items()}
    theirs = {key: shape for key, shape in torchvision_shapes(name).items() if not key.startswith("fc.")}
    assert ours == theirs
    assert backbone.grid_size == 7 and backbone.feature_dim == (512 if LAYOUTS[name][0] == "basic" else 2048)


def test_resnet18_loads_torchvision_weights_and_computes_torchvisions_features(tmp_path):
    state = torchvision_state_dict("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save({f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    backbone = build_backbone(BackboneConfig(name="resnet18", image_size=64))
    load_weights(backbone, path)  # DataParallel prefixes and files without num_batches_tracked load
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = resnet18_reference(state, pixels)
        features = backbone.eval()(pixels)
    assert expected.shape == (2, 512, 2, 2) and features.shape == (2, 4, 512)
    torch.testing.assert_close(features, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    uint8 = (pixels * 255).round().to(torch.uint8)
    torch.testing.assert_close(backbone(uint8), backbone(uint8.float() / 255))
    boxes = backbone.grid_boxes(200, 100)
    assert boxes.tolist() == [[0, 0, 100, 50], [100, 0, 200, 50], [0, 50, 100, 100], [100, 50, 200, 100]]


def test_wrong_weights_are_refused_with_the_reason(tmp_path):
    resnet34 = build_backbone(BackboneConfig(name="resnet34"))
    torch.save(torchvision_state_dict("resnet18"), tmp_path / "r18.pth")
    with pytest.raises(DataError, match=r"not torchvision resnet34 weights: .* missing .*looks like resnet18 weights"):
        load_weights(resnet34, tmp_path / "r18.pth")
    state = torchvision_state_dict("resnet18")
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, tmp_path / "bent.pth")
    resnet18 = build_backbone(BackboneConfig(name="resnet18"))
    with pytest.raises(DataError, match=r"layer2.0.conv1.weight has shape \(128, 64, 5, 5\), resnet18 needs"):
        load_weights(resnet18, tmp_path / "bent.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pth: not a readable PyTorch state dict"):
        load_weights(resnet18, tmp_path / "junk.pth")
    with pytest.raises(DataError, match="pretrained weights load into ResNets only"):
        load_weights(build_backbone(BackboneConfig()), tmp_path / "r18.pth")


def small_raw_config(preset: str, **backbone):
    overrides = ["model.embed_size=16", "model.text.word_dim=8", "model.vocab_size=20"]
    if preset.startswith("cmcan"):
        overrides += ["model.sim_dim=8"]
    config = build_run_config(preset, parse_overrides(overrides))
    config.backbone = BackboneConfig(width=4, stages=2, image_size=32, **backbone)
    regions = {"img_dim": 16, "n_regions": 16} if preset.startswith("cmcan") else {"img_dim": 16}
    return build_run_config(config.to_dict(), {"model": regions})


@pytest.mark.parametrize("preset", ["vsepp", "cmcan-official"])
def test_models_read_pixels_through_their_backbone_and_keep_it_in_checkpoints(tmp_path, preset):
    model = build_model(small_raw_config(preset))
    model.vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(16)])
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens, lengths = torch.tensor([[4, 5, 6], [7, 8, 0]]), torch.tensor([3, 2])
    model.eval()
    scores = model.similarity(pixels, tokens, lengths)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    torch.testing.assert_close(model.similarity(pixels, tokens, lengths), scores)
    save_checkpoint(tmp_path / "model.pt", model, model.run_config)
    loaded = load_checkpoint(tmp_path / "model.pt", device="cpu")
    assert loaded.backbone is not None and loaded.run_config.backbone == model.run_config.backbone
    torch.testing.assert_close(loaded.similarity(pixels, tokens, lengths), scores)
    with pytest.raises(InputError, match=r"pixels must be a tensor \(n_images, 3, 32, 32\)"):
        model.encode_pixels(torch.zeros(1, 3, 30, 30))


def test_backbone_config_is_checked():
    with pytest.raises(ConfigError, match="backbone.name must be one of"):
        build_run_config("vsepp", parse_overrides(["backbone.name=vgg16"]))
    config = build_run_config("vsepp", parse_overrides(["backbone.augment.flip=false"]))
    assert config.backbone == BackboneConfig(augment=AugmentConfig(flip=False))
    assert build_run_config("vsepp", parse_overrides(["backbone=null"])).backbone is None
