"""Removing images from an index, and the approximate first stages (faiss IVF and HNSW): removed
images never come back, in any search; an approximate first stage searching everything finds what
the exact one finds; changing the first stage rebuilds it from the stored vectors."""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from service_setup import make_checkpoint, make_gallery

from itmatch.cli import main
from itmatch.service.app import create_app
from itmatch.service.index import SearchIndex
from itmatch.service.search import search_by_image, search_by_text

QUERY = "a red horse to the left of a blue car"
EVERYTHING = {"ivf": ["--nlist", "4", "--nprobe", "4"], "hnsw": ["--hnsw-m", "8", "--ef-search", "64"]}


def itmatch(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("data"), images=24, extra_split=12)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    return make_checkpoint(data, "vsepp", tmp_path_factory.mktemp("checkpoints") / "vsepp.pt")


@pytest.fixture(scope="module")
def built(data, checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "index"
    assert itmatch("index", checkpoint, "--data", data, "--out", folder, "--quiet") == 0
    return folder


@pytest.fixture
def index_copy(built, tmp_path):
    return shutil.copytree(built, tmp_path / "index")


def _images(found: dict) -> list[int]:
    return [hit["image"] for hit in found["results"]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_removed_images_never_come_back(kind, index_copy, data, checkpoint, capsys):
    if kind != "flat":
        assert itmatch("index", "--out", index_copy, "--first-stage-index", kind, *EVERYTHING[kind]) == 0
    assert itmatch("index", "--out", index_copy, "--remove", "3,5") == 0
    assert "removed 2 images" in capsys.readouterr().out
    index = SearchIndex.open(index_copy, "cpu")
    for rerank_k in (None, 24, 5):
        found = _images(search_by_text(index, QUERY, 24, rerank_k))
        assert not {3, 5} & set(found) and len(found) == min(22, rerank_k or 22)
        by_image = search_by_image(index, 0, 120, rerank_k)["results"]
        assert not {3, 5} & {hit["image"] for hit in by_image} and len(by_image) == min(110, rerank_k or 110)
    with pytest.raises(Exception, match="image 3 was removed from the index"):
        search_by_image(index, 3)
    client = TestClient(create_app(index))
    assert client.get("/api/images/5/thumbnail").status_code == 404
    assert client.get("/api/info").json()["removed"] == 2
    # indexing the same data again adds nothing back
    assert itmatch("index", checkpoint, "--data", data, "--out", index_copy, "--quiet") == 0
    assert "added 0 images" in capsys.readouterr().out
    assert not {3, 5} & set(_images(search_by_text(SearchIndex.open(index_copy, "cpu"), QUERY, 24)))


def test_removing_unknown_ids_is_one_line_and_removes_nothing(index_copy, tmp_path, capsys):
    assert itmatch("index", "--out", index_copy, "--remove", "3,nope,other") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("manifest.json: has no image with id nope, other; nothing was removed")
    assert "\n" not in error and len(SearchIndex.open(index_copy, "cpu").removed) == 0
    (tmp_path / "ids.txt").write_text("7\n8\n")
    assert itmatch("index", "--out", index_copy, "--remove", f"@{tmp_path / 'ids.txt'}") == 0
    assert SearchIndex.open(index_copy, "cpu").removed.tolist() == [7, 8]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_first_stage_searching_everything_finds_what_the_exact_one_finds(
    kind, index_copy, data, checkpoint
):
    exact = SearchIndex.open(index_copy, "cpu")
    expected = {rerank_k: search_by_text(exact, QUERY, 8, rerank_k) for rerank_k in (8, 24)}
    assert itmatch("index", "--out", index_copy, "--first-stage-index", kind, *EVERYTHING[kind]) == 0
    approximate = SearchIndex.open(index_copy, "cpu")
    assert approximate.spec.kind == kind and approximate.faiss["images"].ntotal == 24
    assert approximate.faiss["captions"].ntotal == 120
    for rerank_k, found in expected.items():
        assert search_by_text(approximate, QUERY, 8, rerank_k) == found
    # growing the index extends the faiss indexes; going back to flat deletes them
    assert itmatch("index", checkpoint, "--data", data, "--split", "dev", "--out", index_copy, "--quiet") == 0
    grown = SearchIndex.open(index_copy, "cpu")
    assert grown.faiss["images"].ntotal == 36 and len(list(index_copy.glob("first_stage.*.faiss"))) == 2
    assert itmatch("index", "--out", index_copy, "--first-stage-index", "flat") == 0
    assert not list(index_copy.glob("first_stage.*.faiss")) and SearchIndex.open(index_copy, "cpu").faiss == {}


def test_ivf_trains_on_a_sample_and_searches_nprobe_clusters(index_copy):
    assert (
        itmatch(
            "index",
            "--out",
            index_copy,
            "--first-stage-index",
            "ivf",
            "--nlist",
            "8",
            "--nprobe",
            "1",
            "--train-sample",
            "10",
            "--ivf-codes",
            "SQ8",
        )
        == 0
    )
    index = SearchIndex.open(index_copy, "cpu")
    assert index.spec.train_sample == 10 and index.faiss["images"].nlist == 8
    probed = index.nearest("images", torch.ones(1, index.images.keys["vector"].tail[0]), 24)
    assert 0 < (probed >= 0).sum() < 24  # one cluster of eight


def test_bad_first_stage_settings_and_files_are_one_line(index_copy, capsys):
    assert itmatch("index", "--out", index_copy, "--first-stage-index", "ivf", "--ivf-codes", "XX") == 2
    assert "IVF codes must be Flat, SQ8 or PQm" in capsys.readouterr().err
    assert itmatch("index", "--out", index_copy) == 2
    assert "give --data (and a checkpoint)" in capsys.readouterr().err
    assert itmatch("index", "--out", index_copy, "--first-stage-index", "hnsw") == 0
    next(index_copy.glob("first_stage.images.*.faiss")).write_bytes(b"not faiss")
    assert itmatch("search", index_copy, QUERY) == 2
    assert "is not a readable faiss index" in capsys.readouterr().err
