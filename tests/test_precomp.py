"""Precomp splits: counts, truncation, the region-graph cache, and a clear DataError for every bad file."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from itmatch.data import region_graph
from itmatch.data.precomp import PrecompSplit, list_splits, read_captions
from itmatch.data.region_graph import directional_adjacency, graph_cache_dir, split_region_graph
from itmatch.errors import ConfigError, DataError

N_IMAGES, N_REGIONS, DIM = 4, 6, 8


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never write into the real ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ITMATCH_CACHE", str(cache))
    return cache


def make_split(folder: Path, split: str = "test", n_images: int = N_IMAGES, cpi: int = 5) -> Path:
    """A small precomp split with CMCAN's extra files (sizes as an object array of dicts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / f"{split}_ims.npy", rng.random((n_images, N_REGIONS, DIM), dtype=np.float32))
    captions = [f"Caption {k} of image {k // cpi} ." for k in range(n_images * cpi)]
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    (folder / f"{split}_ids.txt").write_text("".join(f"{100 + i}\n" for i in range(n_images)))
    corner = rng.random((n_images, N_REGIONS, 2)) * 300
    boxes = np.concatenate([corner, corner + 20 + rng.random((n_images, N_REGIONS, 2)) * 100], axis=-1)
    np.save(folder / f"{split}_ims_bbx.npy", boxes.astype(np.float32))
    sizes = np.array([{"image_h": 450 + i, "image_w": 500 - i} for i in range(n_images)], dtype=object)
    np.save(folder / f"{split}_ims_size.npy", sizes, allow_pickle=True)
    return folder


def test_five_captions_per_image(tmp_path: Path) -> None:
    split = PrecompSplit(make_split(tmp_path / "data"), "test")
    assert (split.n_images, split.n_captions, split.captions_per_image) == (4, 20, 5)
    assert (split.n_regions, split.feature_dim) == (N_REGIONS, DIM)
    assert isinstance(split.features, np.memmap) and split.features.shape == (4, N_REGIONS, DIM)
    assert split.captions[7] == "Caption 7 of image 1 ."
    assert split.image_of_caption(7) == 1
    np.testing.assert_array_equal(split.image_of_caption(np.arange(10)), np.arange(10) // 5)
    assert split.ids == ["100", "101", "102", "103"]
    assert split.has_boxes
    assert split.boxes.dtype == np.float32 and split.boxes.shape == (4, N_REGIONS, 4)
    assert split.image_sizes.dtype == np.int64
    assert split.image_sizes.tolist() == [[500, 450], [499, 451], [498, 452], [497, 453]]


def test_one_row_per_caption(tmp_path: Path) -> None:
    split = PrecompSplit(make_split(tmp_path / "data", n_images=10, cpi=1), "test")
    assert (split.n_images, split.n_captions, split.captions_per_image) == (10, 10, 1)
    assert split.image_of_caption(7) == 7


def test_dump_with_each_image_repeated_once_per_caption(tmp_path: Path) -> None:
    """SCAN-style dumps where N_rows == N_captions and every image fills 5 consecutive rows."""
    folder = make_split(tmp_path / "data")
    repeated = {
        name: np.repeat(np.load(folder / name, allow_pickle=True), 5, axis=0)
        for name in ("test_ims.npy", "test_ims_bbx.npy", "test_ims_size.npy")
    }
    for name, array in repeated.items():
        np.save(folder / name, array, allow_pickle=True)
    split = PrecompSplit(folder, "test")
    assert (split.row_repeat, split.n_images, split.n_captions, split.captions_per_image) == (5, 4, 20, 5)
    np.testing.assert_array_equal(split.features, repeated["test_ims.npy"][::5])
    assert split.boxes.shape == (4, N_REGIONS, 4) and split.image_sizes.shape == (4, 2)
    assert split_region_graph(split).shape == (4, N_REGIONS, N_REGIONS)


def test_truncation(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data")
    split = PrecompSplit(folder, "test", max_captions=10)
    assert (split.n_images, split.n_captions) == (2, 10)
    assert len(split.captions) == 10 and split.ids == ["100", "101"]
    assert split.features.shape[0] == split.boxes.shape[0] == split.image_sizes.shape[0] == 2
    assert split_region_graph(split).shape == (2, N_REGIONS, N_REGIONS)
    # The cached graph covers the whole split, whatever was truncated.
    assert np.load(folder / "test_ims_dir_selfadj4.npy").shape[0] == N_IMAGES

    split = PrecompSplit(folder, "test")
    split.truncate_captions(1000)
    assert split.n_images == N_IMAGES
    with pytest.raises(ConfigError, match="multiple of 5"):
        split.truncate_captions(12)


def test_read_captions_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "caps.txt"
    path.write_bytes(b"  A dog .\r\nA cat\r\n")
    assert read_captions(path) == ["A dog .", "A cat"]
    path.write_bytes(b"A dog .\nA cat")  # no final newline
    assert read_captions(path) == ["A dog .", "A cat"]


def test_list_splits(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data", "test")
    make_split(folder, "dev")
    split_region_graph(PrecompSplit(folder, "dev"))
    assert list_splits(folder) == ["dev", "test"]


def test_adjacency_is_computed_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_split(tmp_path / "data")
    split = PrecompSplit(folder, "test")
    expected = directional_adjacency(split.boxes, split.image_sizes)
    np.testing.assert_array_equal(split_region_graph(split), expected)
    assert (folder / "test_ims_dir_selfadj4.npy").exists()
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())

    paper = split_region_graph(split, per_direction=3, self_loops=False)
    np.testing.assert_array_equal(paper, directional_adjacency(split.boxes, split.image_sizes, 3, False))
    assert (folder / "test_ims_dir_adj12.npy").exists()

    def fail(*args: object) -> None:
        raise AssertionError("recomputed a cached graph")

    monkeypatch.setattr(region_graph, "directional_adjacency", fail)
    again = split_region_graph(PrecompSplit(folder, "test"))
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, expected)


def test_given_adjacency_file_is_used_unless_stale(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data")
    given = np.ones((N_IMAGES, N_REGIONS, N_REGIONS), dtype=np.float32)
    np.save(folder / "test_ims_dir_selfadj4.npy", given)
    np.testing.assert_array_equal(split_region_graph(PrecompSplit(folder, "test")), given)

    # Older than the boxes it derives from: rebuilt.
    boxes_time = (folder / "test_ims_bbx.npy").stat().st_mtime
    os.utime(folder / "test_ims_dir_selfadj4.npy", (boxes_time - 100, boxes_time - 100))
    split = PrecompSplit(folder, "test")
    np.testing.assert_array_equal(split_region_graph(split), directional_adjacency(split.boxes, split.image_sizes))


def test_given_adjacency_without_boxes(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data")
    (folder / "test_ims_bbx.npy").unlink()
    with pytest.raises(DataError, match="test_ims_bbx.npy: file not found"):
        split_region_graph(PrecompSplit(folder, "test"))
    given = np.eye(N_REGIONS, dtype=np.float32)[None].repeat(N_IMAGES, axis=0)
    np.save(folder / "test_ims_dir_selfadj4.npy", given)
    np.testing.assert_array_equal(split_region_graph(PrecompSplit(folder, "test")), given)


def test_read_only_data_dir_uses_the_cache(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_split(tmp_path / "data")
    if os.geteuid() == 0:  # root writes anywhere: judge by the permission bits, as another user would
        monkeypatch.setattr(region_graph, "_is_writable", lambda d: bool(os.stat(d).st_mode & stat.S_IWUSR))
    folder.chmod(0o555)
    try:
        split = PrecompSplit(folder, "test")
        graph = split_region_graph(split)
        cached = graph_cache_dir(split) / "test_ims_dir_selfadj4.npy"
        assert cached.exists() and cached.parent.parent == cache_dir
        assert not (folder / "test_ims_dir_selfadj4.npy").exists()
        np.testing.assert_array_equal(graph, directional_adjacency(split.boxes, split.image_sizes))

        monkeypatch.setattr(region_graph, "directional_adjacency", lambda *a: pytest.fail("recomputed"))
        np.testing.assert_array_equal(split_region_graph(PrecompSplit(folder, "test")), graph)
    finally:
        folder.chmod(0o755)


def test_check_finite(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data")
    features = np.load(folder / "test_ims.npy")
    features[2, 3, 1] = np.nan
    np.save(folder / "test_ims.npy", features)
    split = PrecompSplit(folder, "test")
    split.check_finite(1)
    with pytest.raises(DataError, match=r"test_ims.npy: image 2 has NaN"):
        split.check_finite(2)


def _save(name: str, array: object) -> Callable[[Path], None]:
    return lambda folder: np.save(folder / name, array, allow_pickle=True)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _truncate(name: str) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return cut


CAPTIONS = [f"caption {k}" for k in range(20)]
SIZE_DICTS = [{"image_w": 500, "image_h": 400}] * N_IMAGES
BAD_INPUTS = {
    "missing features": (lambda f: (f / "test_ims.npy").unlink(), "test_ims.npy", "file not found"),
    "corrupt features": (_write("test_ims.npy", b"not a numpy file at all"), "test_ims.npy", "not a .npy file"),
    "truncated features": (_truncate("test_ims.npy"), "test_ims.npy", "is truncated or corrupt"),
    "2-D features": (_save("test_ims.npy", np.zeros((4, 8), np.float32)), "test_ims.npy", "expected 3 axes"),
    "integer features": (_save("test_ims.npy", np.zeros((4, 6, 8), np.int32)), "test_ims.npy", "floating point"),
    "caption count": (
        _write("test_caps.txt", "\n".join(CAPTIONS[:19]).encode()),
        "test_caps.txt",
        "has 19 captions for 4 images in test_ims.npy: not a multiple",
    ),
    "empty caption": (_write("test_caps.txt", b"a\nb\n\nc\n"), "test_caps.txt", "line 3 is empty"),
    "blank caption": (_write("test_caps.txt", b"a\n   \nc\n"), "test_caps.txt", "line 2 is empty"),
    "invalid UTF-8": (
        _write("test_caps.txt", b"a dog\nna\xefve caf\xe9\n"),
        "test_caps.txt",
        "line 2 is not valid UTF-8",
    ),
    "no captions": (_write("test_caps.txt", b""), "test_caps.txt", "is empty"),
    "missing captions": (lambda f: (f / "test_caps.txt").unlink(), "test_caps.txt", "file not found"),
    "ids count": (_write("test_ids.txt", b"1\n2\n3\n"), "test_ids.txt", "has 3 ids for 4 images"),
}
BAD_LAZY_INPUTS = {
    "boxes shape": (_save("test_ims_bbx.npy", np.zeros((4, 6, 3))), "boxes", "test_ims_bbx.npy", "has shape (4, 6, 3)"),
    "boxes count": (_save("test_ims_bbx.npy", np.zeros((3, 6, 4))), "boxes", "test_ims_bbx.npy", "expected (4, 6, 4)"),
    "boxes NaN": (
        _save("test_ims_bbx.npy", np.where(np.arange(4)[:, None, None] == 1, np.nan, np.ones((4, 6, 4)))),
        "boxes",
        "test_ims_bbx.npy",
        "image 1 has NaN",
    ),
    "corrupt boxes": (
        _write("test_ims_bbx.npy", b"\x93NUMPY garbage"),
        "boxes",
        "test_ims_bbx.npy",
        "truncated or corrupt",
    ),
    "sizes count": (_save("test_ims_size.npy", np.array(SIZE_DICTS[:3])), "image_sizes", "test_ims_size.npy", "(3, 2)"),
    "sizes key": (
        _save("test_ims_size.npy", np.array([{"w": 1, "h": 2}] * 4)),
        "image_sizes",
        "test_ims_size.npy",
        "image_w",
    ),
    "sizes zero": (
        _save("test_ims_size.npy", np.array([[500, 400], [500, 0], [1, 1], [1, 1]])),
        "image_sizes",
        "test_ims_size.npy",
        "image 1 has size",
    ),
    "adjacency shape": (
        _save("test_ims_dir_selfadj4.npy", np.zeros((4, 6, 5), np.float32)),
        "region graph",
        "test_ims_dir_selfadj4.npy",
        "has shape (4, 6, 5)",
    ),
    "adjacency values": (
        _save("test_ims_dir_selfadj4.npy", np.full((4, 6, 6), 0.5, np.float32)),
        "region graph",
        "test_ims_dir_selfadj4.npy",
        "other than 0 and 1",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_files_fail_on_open(tmp_path: Path, case: str) -> None:
    damage, file_name, problem = BAD_INPUTS[case]
    folder = make_split(tmp_path / "data")
    damage(folder)
    with pytest.raises(DataError, match=re.escape(problem)) as caught:
        PrecompSplit(folder, "test")
    assert caught.value.path == folder / file_name and file_name in str(caught.value)


@pytest.mark.parametrize("case", BAD_LAZY_INPUTS)
def test_bad_extra_files_fail_on_use(tmp_path: Path, case: str) -> None:
    damage, attribute, file_name, problem = BAD_LAZY_INPUTS[case]
    folder = make_split(tmp_path / "data")
    damage(folder)
    split = PrecompSplit(folder, "test")  # the extra files are read only when used
    with pytest.raises(DataError, match=re.escape(problem)) as caught:
        split_region_graph(split) if attribute == "region graph" else getattr(split, attribute)
    assert caught.value.path == folder / file_name and file_name in str(caught.value)


def test_numeric_sizes_accepted(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "data")
    np.save(folder / "test_ims_size.npy", np.array([[500, 450]] * N_IMAGES, dtype=np.float32))
    assert PrecompSplit(folder, "test").image_sizes.tolist() == [[500, 450]] * N_IMAGES
