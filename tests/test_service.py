"""The search index, `itmatch index` / `itmatch search`, the explanations (CMCAN, DVSA, sm-LSTM),
and the web service's endpoints through FastAPI's in-process client: answers, limits and bad
requests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from service_setup import make_checkpoint, make_gallery

import itmatch.service.index as index_module
from itmatch.cli import main
from itmatch.data.scene_pictures import COLOUR_RGB
from itmatch.data.tokenizer import tokenize
from itmatch.scoring import score_grid, score_pairs
from itmatch.service.app import MAX_K, MAX_RERANK_K, MAX_TEXT_LENGTH, create_app
from itmatch.service.index import SearchIndex
from itmatch.service.search import explain_match, search_by_image, search_by_text

QUERY = "a red horse to the left of a blue car"


def itmatch(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("data"), images=24, extra_split=12)


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {preset: make_checkpoint(data, preset, folder / f"{preset}.pt") for preset in ("cmcan-official", "vsepp")}


@pytest.fixture(scope="module")
def cmcan_index(data, checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "cmcan"
    assert itmatch("index", checkpoints["cmcan-official"], "--data", data, "--out", folder, "--quiet") == 0
    return SearchIndex.open(folder, "cpu")


@pytest.fixture(scope="module")
def client(cmcan_index):
    return TestClient(create_app(cmcan_index))


@pytest.fixture(scope="module")
def vsepp_client(data, checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "vsepp"
    assert itmatch("index", checkpoints["vsepp"], "--data", data, "--out", folder, "--quiet") == 0
    return TestClient(create_app(SearchIndex.open(folder, "cpu")))


# -- the index ---------------------------------------------------------------------------------


def test_index_holds_encodings_captions_first_stage_and_pictures(cmcan_index, data):
    index = cmcan_index
    assert index.n_images == 24 and index.n_captions == 120
    assert index.captions.all()[:5] == (data / "test_caps.txt").read_text().splitlines()[:5]
    assert index.caption_images(np.arange(120)).tolist() == [i // 5 for i in range(120)]
    assert len(index.images) == 24 and len(index.texts) == 120
    assert index.spec.kind == "flat" and index.faiss == {}  # exact first stage over the stored vectors
    boxes = np.asarray(index.boxes.view)
    assert boxes.shape == (24, 8, 4) and 0 <= boxes.min() and boxes.max() <= 1
    assert all(cmcan_index.picture_path(i).is_file() for i in range(24))


def test_scene_pictures_show_each_object_in_its_colour(cmcan_index, data):
    scene = json.loads((data / "test_scenes.jsonl").read_text().splitlines()[5])["objects"]
    picture = Image.open(cmcan_index.picture_path(5))
    assert max(picture.size) == 384
    for obj in scene:
        x1, y1, x2, y2 = obj["box"]
        # near the bottom of the box: inside every shape, below the label
        point = ((x1 + x2) / 2 * picture.width, (y1 + 0.8 * (y2 - y1)) * picture.height)
        pixel = np.array(picture.getpixel(point), dtype=int)
        assert np.abs(pixel - COLOUR_RGB[obj["colour"]]).max() < 48, obj


def _copy_first_images(source, target, n):
    """The test split's first n images, as a smaller version of the same data folder."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("test_ims.npy", "test_ims_bbx.npy", "test_ims_size.npy"):
        np.save(target / name, np.load(source / name, allow_pickle=True)[:n], allow_pickle=True)
    for name, per_image in (("test_caps.txt", 5), ("test_ids.txt", 1), ("test_scenes.jsonl", 1)):
        lines = (source / name).read_text().splitlines()[: n * per_image]
        (target / name).write_text("\n".join(lines) + "\n")


def test_reindexing_encodes_only_the_new_images(data, checkpoints, tmp_path, monkeypatch, capsys):
    encoded_rows = []
    encode_split = index_module.encode_split

    def counting(model, split, *args, rows=None, **options):
        encoded_rows.append(list(rows))
        return encode_split(model, split, *args, rows=rows, **options)

    monkeypatch.setattr(index_module, "encode_split", counting)
    gallery, folder = tmp_path / "gallery", tmp_path / "index"
    _copy_first_images(data, gallery, 10)
    command = ("index", checkpoints["cmcan-official"], "--data", gallery, "--out", folder, "--quiet")
    assert itmatch(*command) == 0
    first = SearchIndex.open(folder, "cpu")
    shutil.rmtree(gallery)
    shutil.copytree(data, gallery)  # the gallery grew to 24 images
    assert itmatch(*command) == 0
    assert itmatch(*command) == 0  # nothing new
    assert itmatch(*command[:-3], "--split", "dev", "--out", folder, "--quiet") == 0  # another split
    assert encoded_rows == [list(range(10)), list(range(10, 24)), list(range(12))]
    assert "added 0 images" in capsys.readouterr().out
    grown = SearchIndex.open(folder, "cpu")
    assert grown.n_images == 36 and len(grown.sources) == 2
    assert torch.equal(grown.images.select(slice(0, 10))["regions"], first.images.select(slice(None))["regions"])
    assert grown.ids.all()[8:12] == ["8", "9", "10", "11"]
    assert grown.caption_images(np.array([179])).tolist() == [35]


def test_an_index_takes_one_checkpoint_only(cmcan_index, checkpoints, data, capsys):
    assert itmatch("index", checkpoints["vsepp"], "--data", data, "--out", cmcan_index.folder, "--quiet") == 2
    error = capsys.readouterr().err
    assert f"{cmcan_index.folder / 'manifest.json'}: was built with another checkpoint" in error


def test_bad_inputs_name_the_file(checkpoints, data, tmp_path, capsys):
    cmcan = checkpoints["cmcan-official"]
    assert itmatch("index", cmcan, "--data", tmp_path / "nowhere", "--out", tmp_path / "a", "--quiet") == 2
    assert f"{tmp_path / 'nowhere' / 'test_ims.npy'}: file not found" in capsys.readouterr().err

    wide = make_gallery(tmp_path / "wide", images=6)
    np.save(wide / "test_ims.npy", np.zeros((6, 8, 12), dtype=np.float32))
    assert itmatch("index", cmcan, "--data", wide, "--out", tmp_path / "b", "--quiet") == 2
    assert f"{wide / 'test_ims.npy'}: does not fit the model: the model expects 16-d" in capsys.readouterr().err

    (wide / "test_paths.txt").write_text("one.jpg\n")
    assert itmatch("index", checkpoints["vsepp"], "--data", wide, "--out", tmp_path / "c", "--quiet") == 2
    assert f"{wide / 'test_paths.txt'}: has 1 paths for 6 images" in capsys.readouterr().err

    assert itmatch("index", tmp_path / "missing.pt", "--data", data, "--out", tmp_path / "d", "--quiet") == 2
    assert "missing.pt: no such file" in capsys.readouterr().err

    assert itmatch("search", tmp_path / "d", "a dog") == 2
    assert f"{tmp_path / 'd' / 'manifest.json'}: no such file" in capsys.readouterr().err


def test_photos_listed_in_paths_file_are_shown(checkpoints, data, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    _copy_first_images(data, gallery, 3)
    (gallery / "test_scenes.jsonl").unlink()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for number, colour in enumerate(colours):
        Image.new("RGB", (640, 320), colour).save(gallery / f"photo{number}.png")
    (gallery / "test_paths.txt").write_text("photo0.png\nphoto1.png\nphoto2.png\n")
    folder = tmp_path / "index"
    assert itmatch("index", checkpoints["vsepp"], "--data", gallery, "--out", folder, "--quiet") == 0
    index = SearchIndex.open(folder, "cpu")
    assert index.image(1)["path"] == str((gallery / "photo1.png").resolve())
    for number, colour in enumerate(colours):
        picture = Image.open(index.picture_path(number))
        assert picture.size == (384, 192)
        assert np.abs(np.array(picture.getpixel((100, 100))) - colour).max() < 8

    (gallery / "test_paths.txt").write_text("photo0.png\nmissing.png\nphoto2.png\n")
    assert itmatch("index", checkpoints["vsepp"], "--data", gallery, "--out", tmp_path / "other", "--quiet") == 2
    assert f"{gallery / 'missing.png'}: image file not found" in capsys.readouterr().err


# -- searching ---------------------------------------------------------------------------------


def test_search_command_by_text_and_by_image(cmcan_index, capsys):
    assert itmatch("search", cmcan_index.folder, QUERY, "-k", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'top 3 of 24 images for "{QUERY}"' and len(lines) == 4
    assert itmatch("search", cmcan_index.folder, QUERY, "-k", "3", "--json") == 0
    found = json.loads(capsys.readouterr().out)
    assert found == search_by_text(cmcan_index, QUERY, 3)
    assert f"image {found['results'][0]['image']:5d}" in lines[1]
    assert itmatch("search", cmcan_index.folder, "--image", "4", "-k", "2", "--rerank-k", "30", "--json") == 0
    by_image = json.loads(capsys.readouterr().out)
    assert by_image["image"] == 4 and [r["rank"] for r in by_image["results"]] == [1, 2]
    assert itmatch("search", cmcan_index.folder, "--image", "24") == 2
    assert "no image 24 in the index: it has 24 images" in capsys.readouterr().err


@torch.no_grad()
def test_scores_are_the_model_scores_and_rerank_over_everything_is_exhaustive(cmcan_index):
    model, images = cmcan_index.model, cmcan_index.images.select(slice(None))
    exhaustive = search_by_text(cmcan_index, QUERY, 5)
    tokens, lengths = model.vocab.encode_batch([QUERY])
    expected = score_grid(model, images, model.encode_texts(tokens, lengths))[:, 0]
    assert [r["image"] for r in exhaustive["results"]] == expected.argsort(descending=True)[:5].tolist()
    assert search_by_text(cmcan_index, QUERY, 5, rerank_k=24)["results"] == exhaustive["results"]
    reranked = search_by_text(cmcan_index, QUERY, 5, rerank_k=3)["results"]
    assert len(reranked) == 3 and {r["image"] for r in reranked} <= set(range(24))
    by_image = search_by_image(cmcan_index, 7, 4)["results"]
    assert all(r["text"] == cmcan_index.captions[r["caption"]] for r in by_image)

    def found(results):  # a caption may repeat another: equal scores, in either order
        return sorted((r["rank"], r["text"], r["image"], r["score"]) for r in results)

    assert found(search_by_image(cmcan_index, 7, 4, rerank_k=120)["results"]) == found(by_image)


@torch.no_grad()
def test_cmcan_explains_pairs_with_the_scores_it_gives(cmcan_index):
    model = cmcan_index.model
    images, texts = cmcan_index.images.select(slice(0, 3)), cmcan_index.texts.select(slice(0, 3))
    explained = model.explain(images, texts)
    pairs = torch.arange(3)
    torch.testing.assert_close(explained["score"], score_pairs(model, images, texts, pairs, pairs))
    confidence, attention, mask = explained["region_confidence"], explained["word_attention"], texts["mask"]
    assert confidence.shape == (3, 8) and ((confidence > 0) & (confidence < 1)).all()
    torch.testing.assert_close(attention.sum(-1), mask.float())  # each word's weights sum to 1, padding's to 0
    with pytest.raises(Exception, match="explain takes pairs"):
        model.explain(images, texts.select(slice(0, 2)))


def test_explanation_of_a_match(cmcan_index):
    text = "a red zebra above the horse"
    explained = explain_match(cmcan_index, 3, text)
    assert [w["word"] for w in explained["words"]] == tokenize(text)
    assert [w["known"] for w in explained["words"]] == [w in cmcan_index.model.vocab.words for w in tokenize(text)]
    assert explained["words"][2] == {"word": "zebra", "known": False, "attention": explained["words"][2]["attention"]}
    assert all(len(w["attention"]) == 8 and abs(sum(w["attention"]) - 1) < 1e-3 for w in explained["words"])
    assert len(explained["regions"]) == 8
    box = cmcan_index.boxes.view[3, 0].tolist()
    assert explained["regions"][0]["box"] == pytest.approx(box, abs=1e-4)
    score = search_by_text(cmcan_index, text, 24)["results"]
    assert explained["score"] == pytest.approx(next(r["score"] for r in score if r["image"] == 3), abs=1e-4)


@pytest.mark.parametrize("preset", ["dvsa", "sm-lstm"])
def test_other_explaining_models_explain_a_match_on_the_page(preset, data, tmp_path):
    checkpoint = make_checkpoint(data, preset, tmp_path / f"{preset}.pt")
    assert itmatch("index", checkpoint, "--data", data, "--out", tmp_path / "index", "--quiet") == 0
    index = SearchIndex.open(tmp_path / "index", "cpu")
    explained = explain_match(index, 3, QUERY)
    assert len(explained["regions"]) == 8 and abs(sum(r["confidence"] for r in explained["regions"]) - 1) < 1e-3
    assert all(len(w["attention"]) == 8 and abs(sum(w["attention"]) - 1) < 1e-3 for w in explained["words"])
    score = search_by_text(index, QUERY, 24)["results"]
    assert explained["score"] == pytest.approx(next(r["score"] for r in score if r["image"] == 3), abs=1e-4)


# -- the web service ----------------------------------------------------------------------------


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and 'id="overlay"' in page.text
    info = client.get("/api/info").json()
    assert info == {
        "images": 24,
        "captions": 120,
        "architecture": "cmcan",
        "preset": "cmcan-official",
        "explains": True,
        "first_stage": True,
        "first_stage_index": "flat",
        "removed": 0,
        "default_rerank_k": None,
        "limits": {"max_text_length": MAX_TEXT_LENGTH, "max_k": MAX_K, "max_rerank_k": MAX_RERANK_K},
    }


def test_search_endpoints(client, cmcan_index):
    found = client.get("/api/search/text", params={"q": QUERY, "k": 4})
    assert found.status_code == 200 and found.json() == search_by_text(cmcan_index, QUERY, 4)
    reranked = client.get("/api/search/text", params={"q": QUERY, "k": 4, "rerank_k": 10}).json()
    assert reranked["rerank_k"] == 10 and len(reranked["results"]) == 4
    scores = [r["score"] for r in found.json()["results"]]
    assert scores == sorted(scores, reverse=True)
    by_image = client.get("/api/search/image", params={"image": 5, "k": 3})
    assert by_image.status_code == 200 and by_image.json() == search_by_image(cmcan_index, 5, 3)


def test_explain_endpoint(client, cmcan_index):
    answer = client.get("/api/explain", params={"image": 2, "text": QUERY})
    assert answer.status_code == 200 and answer.json() == explain_match(cmcan_index, 2, QUERY)


def test_an_image_is_described_by_its_id_and_own_captions(client, cmcan_index, data):
    described = client.get("/api/images/3").json()
    captions = (data / "test_caps.txt").read_text().splitlines()[15:20]
    assert described == {
        "image": 3,
        "id": cmcan_index.ids[3],
        "name": described["id"],
        "captions": captions,
    }
    answer = client.get("/api/images/24")
    assert answer.status_code == 400 and answer.json() == {"error": "no image 24 in the index: it has 24 images, 0..23"}


def test_thumbnails_are_the_index_pictures(client, cmcan_index):
    answer = client.get("/api/images/23/thumbnail")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content == cmcan_index.picture_path(23).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/24/thumbnail",
        "/api/images/-1/thumbnail",
        "/api/images/model.pt/thumbnail",
        "/api/images/..%2Fmodel.pt/thumbnail",
        "/api/images/0/..%2F..%2Fmodel.pt",
        "/api/images/%2E%2E/%2E%2E/model.pt",
        "/model.pt",
        "/manifest.json",
        "/images.regions.bin",
        "/pictures/0.jpg",
    ],
)
def test_no_other_file_can_be_fetched(client, path):
    answer = client.get(path)
    assert answer.status_code in (404, 422) and answer.headers["content-type"] == "application/json"
    assert set(answer.json()) == {"error"}


@pytest.mark.parametrize(
    ("endpoint", "params", "status", "message"),
    [
        ("/api/search/text", {}, 422, "q: Field required"),
        ("/api/search/text", {"q": ""}, 422, "q: String should have at least 1 character"),
        ("/api/search/text", {"q": "x" * (MAX_TEXT_LENGTH + 1)}, 422, f"at most {MAX_TEXT_LENGTH} characters"),
        ("/api/search/text", {"q": "   "}, 400, "non-empty strings"),
        ("/api/search/text", {"q": QUERY, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ("/api/search/text", {"q": QUERY, "k": MAX_K + 1}, 422, f"k: Input should be less than or equal to {MAX_K}"),
        ("/api/search/text", {"q": QUERY, "k": "ten"}, 422, "k: Input should be a valid integer"),
        ("/api/search/text", {"q": QUERY, "rerank_k": MAX_RERANK_K + 1}, 422, "rerank_k: Input should be less"),
        ("/api/search/image", {"image": 24}, 400, "no image 24 in the index"),
        ("/api/search/image", {"image": -2}, 422, "image: Input should be greater than or equal to 0"),
        ("/api/explain", {"image": 1}, 422, "text: Field required"),
        ("/api/explain", {"image": 99, "text": QUERY}, 400, "no image 99"),
        ("/api/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_4xx_message(client, endpoint, params, status, message):
    answer = client.get(endpoint, params=params)
    assert answer.status_code == status and message in answer.json()["error"]


def test_models_without_explanations_say_so(vsepp_client):
    assert vsepp_client.get("/api/info").json()["explains"] is False
    answer = vsepp_client.get("/api/explain", params={"image": 0, "text": QUERY})
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("vsepp (vsepp) does not explain its scores")
    assert vsepp_client.get("/api/search/text", params={"q": QUERY, "k": 2, "rerank_k": 5}).status_code == 200


def test_openapi_schema_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/info",
        "/api/search/text",
        "/api/search/image",
        "/api/explain",
        "/api/images/{image}",
        "/api/images/{image}/thumbnail",
    }
    text_search = schema["paths"]["/api/search/text"]["get"]
    limits = {p["name"]: p["schema"] for p in text_search["parameters"]}
    assert limits["q"]["maxLength"] == MAX_TEXT_LENGTH and limits["k"]["maximum"] == MAX_K
    assert text_search["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorMessage")
