"""Photos and captions in webdataset-style tar shards: the same photos give the same index, the
same extracted features and train as a folder source does; shards without captions are a gallery
to index; a compressed shard is one line."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from resnet_weights import torchvision_state_dict
from service_setup import FLICKR8K, flickr_layout, make_photo_checkpoint

from itmatch.cli import main
from itmatch.data.raw import RawSource
from itmatch.data.shards import ShardPhoto, photo_at
from itmatch.service.index import SearchIndex
from itmatch.service.render import read_photo
from itmatch.service.search import search_by_text

pytestmark = pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"{FLICKR8K} is absent (set ITMATCH_SHARED)")
TINY = ["model.embed_size=32", "model.text.word_dim=16", "train.batch_size=4", "backbone.image_size=32"]


def itmatch(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    names = (FLICKR8K / "splits" / "train.txt").read_text().split()[:8]
    return flickr_layout(tmp_path_factory.mktemp("folder"), names, "train")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def write_shards(folder: Path, out: Path, captions: bool = True, prefix: str = "train-") -> Path:
    """The folder source's photos and kept captions as two shards (5 + 3 samples), in its order."""
    split = RawSource(folder).open("train", progress=False)
    out.mkdir()
    per_image = split.captions_per_image
    for number, rows in enumerate([range(0, 5), range(5, 8)]):
        with tarfile.open(out / f"{prefix}{number:06d}.tar", "w") as tar:
            for row in rows:
                key = Path(split.ids[row]).stem
                if captions:  # the captions first: a sample's files may come in any order
                    text = "\n".join(split.captions[row * per_image : (row + 1) * per_image])
                    _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.jpg", split.image_paths[row].read_bytes())
    return out


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    return write_shards(folder, tmp_path_factory.mktemp("shards") / "shards")


def test_shards_index_like_the_folder_of_the_same_photos(folder, shards, tmp_path, capsys):
    checkpoint = make_photo_checkpoint(folder, "train", tmp_path / "vsepp.pt")
    for name, data in (("from-folder", folder), ("from-shards", shards)):
        command = ("index", checkpoint, "--data", data, "--split", "train", "--out", tmp_path / name, "--quiet")
        assert itmatch(*command, "--storage", "float32") == 0
    from_folder, from_shards = (SearchIndex.open(tmp_path / name, "cpu") for name in ("from-folder", "from-shards"))
    assert from_shards.ids.all() == [Path(image_id).stem for image_id in from_folder.ids.all()]
    assert from_shards.captions.all() == from_folder.captions.all() and from_shards.n_captions == 40
    for key, value in from_folder.images.select(slice(None)).tensors.items():
        assert np.array_equal(from_shards.images.select(slice(None))[key].numpy(), value.numpy()), key
    for query in ("a dog runs on the grass", "a child in a pink dress"):
        assert search_by_text(from_shards, query, 8)["results"] == [
            {**hit, "id": Path(hit["id"]).stem} for hit in search_by_text(from_folder, query, 8)["results"]
        ]
    photo = photo_at(from_shards.image(6)["path"])
    assert isinstance(photo, ShardPhoto) and photo.shard.name == "train-000001.tar"
    assert photo.open().read() == Path(from_folder.image(6)["path"]).read_bytes()
    assert (from_shards.picture_path(6)).read_bytes() == (from_folder.picture_path(6)).read_bytes()


def test_shards_extract_and_train_like_the_folder(folder, shards, tmp_path):
    torch.save(torchvision_state_dict("resnet18"), tmp_path / "resnet18.pth")  # one network for both
    extraction = ["--backbone", "resnet18", "--image-size", "64", "--weights", tmp_path / "resnet18.pth", "--quiet"]
    for name, data in (("folder", folder), ("shards", shards)):
        assert itmatch("extract", "--images", data, "--out", tmp_path / name, *extraction) == 0
    extracted = {name: np.load(tmp_path / name / "train_ims.npy") for name in ("folder", "shards")}
    np.testing.assert_array_equal(extracted["shards"], extracted["folder"])
    for name in ("train_caps.txt", "train_ims_size.npy"):
        assert (tmp_path / "shards" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes()
    first = (tmp_path / "shards" / "train_paths.txt").read_text().splitlines()[0]
    assert (
        read_photo(photo_at(first)).size
        == read_photo(photo_at(str(folder / "images" / Path(first).name.split("#")[-1]))).size
    )

    settings = [item for pair in zip(["--set"] * len(TINY), TINY, strict=True) for item in pair]
    run = ("train", "--model", "vsepp", "--data", shards, "--out", tmp_path / "run", "--epochs", "1", "--quiet")
    assert itmatch(*run, "--set", "backbone.width=8", *settings) == 0
    assert (tmp_path / "run" / "best.pt").is_file()


def test_shards_without_captions_are_a_gallery_to_index(folder, tmp_path, capsys):
    plain = write_shards(folder, tmp_path / "plain", captions=False)
    checkpoint = make_photo_checkpoint(folder, "train", tmp_path / "vsepp.pt")
    assert itmatch("index", checkpoint, "--data", plain, "--out", tmp_path / "index", "--quiet") == 0
    index = SearchIndex.open(tmp_path / "index", "cpu")
    assert index.n_images == 8 and index.n_captions == 0 and index.sources[0]["split"] == "train"
    assert itmatch("train", "--model", "vsepp", "--data", plain, "--out", tmp_path / "run") == 2
    assert "holds photos without captions" in capsys.readouterr().err


def test_a_compressed_shard_is_one_line(folder, shards, tmp_path, capsys):
    (tmp_path / "gz").mkdir()
    compressed = tmp_path / "gz" / "train-000000.tar"
    compressed.write_bytes(gzip.compress((shards / "train-000000.tar").read_bytes()))
    checkpoint = make_photo_checkpoint(folder, "train", tmp_path / "vsepp.pt")
    assert itmatch("index", checkpoint, "--data", compressed.parent, "--out", tmp_path / "index", "--quiet") == 2
    error = capsys.readouterr().err
    assert f"{compressed}: is not an uncompressed tar shard" in error and error.count("\n") == 1
