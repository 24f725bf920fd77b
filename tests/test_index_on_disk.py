"""The index on disk: memory-mapped encodings appended a chunk at a time, the same answers as the
previous in-memory format, a build killed mid-way, the memory of serving a growing gallery."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from service_setup import make_checkpoint, make_gallery

import itmatch.service.index as index_module
from itmatch.data.precomp import PrecompSplit
from itmatch.evaluation.runner import encode_split
from itmatch.retrieval import search_images, search_texts
from itmatch.service.index import Gallery, IndexSettings, SearchIndex, build_index
from itmatch.service.search import search_by_image, search_by_text

QUERIES = ["a red horse to the left of a blue car", "a green dog", "a small yellow bird above a tree"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("data"), images=24)


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {preset: make_checkpoint(data, preset, folder / f"{preset}.pt") for preset in ("cmcan-official", "vsepp")}


def _build(checkpoint, data, folder, **settings) -> SearchIndex:
    build_index(checkpoint, data, "test", folder, IndexSettings(progress=False, **settings), device="cpu")
    return SearchIndex.open(folder, "cpu")


def _hits(found: dict, key: str) -> list[tuple]:
    return [(hit[key], hit["score"]) for hit in found["results"]]


@pytest.mark.parametrize("preset", ["cmcan-official", "vsepp"])
@torch.no_grad()
def test_answers_equal_the_previous_in_memory_format(preset, data, checkpoints, tmp_path):
    """The previous format held the whole split's encodings in memory and searched them with
    itmatch.retrieval: float32 storage gives its answers exactly, float16 the same images."""
    exact = _build(checkpoints[preset], data, tmp_path / "f32", storage="float32", batch_size=12, memory_mb=0.01)
    rounded = _build(checkpoints[preset], data, tmp_path / "f16")
    model = exact.model
    images, texts = encode_split(model, PrecompSplit(data, "test"), progress=False)
    for query in QUERIES:
        previous = _rounded(*search_images(model, images, [query], k=6))
        assert _hits(search_by_text(exact, query, 6), "image") == previous
        assert [image for image, _ in _hits(search_by_text(rounded, query, 6), "image")] == [i for i, _ in previous]
        previous = _rounded(*search_images(model, images, [query], k=4, rerank_k=10))
        assert _hits(search_by_text(exact, query, 4, rerank_k=10), "image") == previous
    expected = sorted(_rounded(*search_texts(model, images.select(slice(7, 8)), texts, k=5)))
    assert sorted(_hits(search_by_image(exact, 7, 5), "caption")) == expected


def _rounded(scores, found) -> list[tuple]:
    """The first query's (item, score rounded as the service rounds)."""
    return [(item, round(score, 4)) for item, score in zip(found[0].tolist(), scores[0].tolist(), strict=True)]


def test_a_build_killed_mid_way_stays_usable_and_resumes(data, checkpoints, tmp_path, monkeypatch):
    checkpoint, folder = checkpoints["cmcan-official"], tmp_path / "index"
    settings = {"batch_size": 4, "memory_mb": 0.001}  # chunks of 4 images: 6 commits
    extend, calls = SearchIndex.extend_first_stage, []

    def killed_on_the_third_chunk(self):
        calls.append(1)
        if len(calls) == 3:  # its arrays are written, its manifest is not
            raise KeyboardInterrupt
        extend(self)

    monkeypatch.setattr(SearchIndex, "extend_first_stage", killed_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        _build(checkpoint, data, folder, **settings)
    monkeypatch.undo()
    interrupted = SearchIndex.open(folder, "cpu")
    assert interrupted.n_images == 8 and interrupted.n_captions == 40
    assert (folder / "images.regions.bin").stat().st_size > 8 * interrupted.images.keys["regions"].row_bytes
    assert len(search_by_text(interrupted, QUERIES[0], 8)["results"]) == 8

    encoded_rows = []
    encode = index_module.encode_split
    monkeypatch.setattr(
        index_module,
        "encode_split",
        lambda m, s, *a, rows, **o: encoded_rows.append(rows) or encode(m, s, *a, rows=rows, **o),
    )
    resumed = _build(checkpoint, data, folder, **settings)
    assert [row for rows in encoded_rows for row in rows] == list(range(8, 24))  # only what was not committed
    clean = _build(checkpoint, data, tmp_path / "clean")  # one chunk
    for query in QUERIES:
        assert search_by_text(resumed, query, 10) == search_by_text(clean, query, 10)
    assert resumed.captions.all() == clean.captions.all() and resumed.ids.all() == clean.ids.all()


MEASURE = textwrap.dedent(
    """
    import sys, threading, time, json
    from itmatch.service.index import SearchIndex
    from itmatch.service.search import search_by_text

    def anonymous():  # resident memory that is not a mapped file: what the index would cost if read
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    peak, running = [0], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.005)

    base = anonymous()
    threading.Thread(target=sample, daemon=True).start()
    index = SearchIndex.open(sys.argv[1], "cpu", memory_mb=2)
    for rerank_k in (None, 50):
        search_by_text(index, "a red horse", 5, rerank_k)
    running[0] = False
    print(json.dumps({"images": index.n_images, "growth": max(peak[0], anonymous()) - base}))
    """
)


def _grown_copy(template: Gallery, n_images: int) -> Gallery:
    """`n_images` images with `template`'s encoding layout (its images repeated, with noise), no captions."""
    repeat = torch.arange(n_images) % len(template.images)
    noisy = {
        key: value[repeat] + 0.01 * torch.randn_like(value[repeat])
        for key, value in template.encoded_images.tensors.items()
    }
    return Gallery(
        images=[{"source": 0, "id": f"synthetic-{n}", "path": None} for n in range(n_images)],
        captions=[],
        caption_image=torch.zeros(0, dtype=torch.long),
        boxes=template.boxes[repeat],
        encoded_images=type(template.encoded_images)(noisy, template.encoded_images.padded),
        encoded_texts=template.encoded_texts.select(slice(0, 0)),
    )


def test_serving_memory_stays_bounded_while_the_gallery_grows(data, checkpoints, tmp_path):
    source = _build(checkpoints["cmcan-official"], data, tmp_path / "source")
    template = Gallery(
        [source.image(n) for n in range(24)],
        [],
        torch.zeros(0, dtype=torch.long),
        torch.from_numpy(np.array(source.boxes.view)),
        source.images.select(slice(None)),
        source.texts.select(slice(0, 0)),
    )
    growth, stored = {}, {}
    for n_images in (5_000, 30_000):
        folder = tmp_path / f"gallery-{n_images}"
        index = SearchIndex.create(folder, checkpoints["cmcan-official"], source.checkpoint_sha256, "cpu")
        for start in range(0, n_images, 20_000):
            index.append({"data": "synthetic", "split": "test"}, _grown_copy(template, min(20_000, n_images - start)))
        stored[n_images] = sum(path.stat().st_size for path in folder.glob("images.*.bin"))
        run = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
        growth[n_images] = json.loads(run.stdout)["growth"]
    in_memory = 2 * stored[30_000]  # float32 copies of the float16 encodings
    assert in_memory > 48 << 20
    assert growth[30_000] - growth[5_000] < in_memory / 8, (growth, stored)


@pytest.mark.parametrize("preset", ["scan-t2i-ave", "gsmn-paper-dense"])
def test_stored_captions_read_back_as_encoded(preset, tmp_path):
    """Word rows (and GSMN's word-by-word cells) are stored without padding and read back (padding
    zeroed), appended in two chunks of different caption lengths: the same scores."""
    from test_models import inputs, small_model

    from itmatch.scoring import score_grid
    from itmatch.service.store import EncodedStore

    model = small_model(preset).eval()
    _, tokens, lengths, _ = inputs(n_captions=7, seed=4)
    with torch.no_grad():
        encoded = model.encode_texts(tokens, lengths)
    first, second = encoded.select(slice(0, 3)), encoded.select(slice(3, 7))
    schema = EncodedStore.schema(first, "float32")
    store = EncodedStore(tmp_path, "captions", schema, 0, 0)
    store.append(first)
    store.append(second)
    reopened = EncodedStore(tmp_path, "captions", schema, 7, store.words)
    back = reopened.select(np.array([5, 0, 6]))
    expected = encoded.select(torch.tensor([5, 0, 6]))
    assert back.square == expected.square and back.tensors.keys() == expected.tensors.keys()
    real = expected["mask"]
    for key, value in expected.tensors.items():
        where = real[:, :, None] & real[:, None, :] if key in expected.square else real
        where = where if key in expected.padded else slice(None)
        torch.testing.assert_close(back[key][where], value[where].to(back[key].dtype), msg=key)
    features = inputs(n_images=3)[0]
    corners = torch.rand(3, features.shape[1], 2) * 100
    image_inputs = {"boxes": torch.cat([corners, corners + 50], -1), "image_size": torch.full((3, 2), 200.0)}
    with torch.no_grad():
        images = model.encode_images(features, **(image_inputs if "boxes" in model.inputs().image else {}))
        torch.testing.assert_close(score_grid(model, images, back), score_grid(model, images, expected))
