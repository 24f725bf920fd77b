"""Directional region graph: a brute-force copy of the official adj.py, the official fixture, real boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import SHARED

from itmatch.data import region_graph as adjacency_module
from itmatch.data.region_graph import adjacency_file_name, directional_adjacency
from itmatch.errors import InputError

FIXTURE = SHARED / "fixtures" / "cmcan_official_small_io.npz"
F30K = SHARED / "data" / "f30k_test_text"


def reference_adjacency(boxes, sizes, per_direction: int, self_loops: bool) -> np.ndarray:
    """One image, one region, one candidate at a time, as context_extractor/adj.py describes it."""
    n_images, n_regions = boxes.shape[:2]
    out = np.zeros((n_images, n_regions, n_regions), dtype=np.float32)
    for n in range(n_images):
        w, h = float(sizes[n][0]), float(sizes[n][1])
        centres = []
        for x1, y1, x2, y2 in boxes[n].astype(np.float64):
            x1, y1, x2, y2 = x1 / w, y1 / h, x2 / w, y2 / h
            centres.append((x1 + 0.5 * (x2 - x1), y1 + 0.5 * (y2 - y1)))
        for i, (xi, yi) in enumerate(centres):
            sectors: dict[str, list[tuple[float, int]]] = {"below": [], "right": [], "above": [], "left": []}
            for j, (xj, yj) in enumerate(centres):
                if j == i:
                    continue
                dx, dy = -(xi - xj), yi - yj  # the official sign flip of c_i - c_j
                rho, theta = math.sqrt(dx**2 + dy**2), math.atan2(dy, dx)
                if -3 * math.pi / 4 <= theta < -math.pi / 4:
                    sectors["below"].append((rho, j))
                elif -math.pi / 4 <= theta < math.pi / 4:
                    sectors["right"].append((rho, j))
                elif math.pi / 4 <= theta < 3 * math.pi / 4:
                    sectors["above"].append((rho, j))
                else:
                    sectors["left"].append((rho, j))
            for candidates in sectors.values():
                for _, j in sorted(candidates)[:per_direction]:  # ties: lowest index first
                    out[n, i, j] = 1
            if self_loops:
                out[n, i, i] = 1
    return out


def random_boxes(seed: int, n_images: int, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 800, size=(n_images, 2))
    corner = rng.random((n_images, n_regions, 2)) * sizes[:, None, :] * 0.8
    extent = rng.random((n_images, n_regions, 2)) * sizes[:, None, :] * 0.5 + 1
    boxes = np.concatenate([corner, corner + extent], axis=-1).astype(np.float32)
    return boxes, sizes


@pytest.mark.parametrize("per_direction", [1, 2, 3])
@pytest.mark.parametrize("self_loops", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(per_direction: int, self_loops: bool, seed: int) -> None:
    boxes, sizes = random_boxes(seed, n_images=6, n_regions=[36, 12, 5][seed])
    expected = reference_adjacency(boxes, sizes, per_direction, self_loops)
    got = directional_adjacency(boxes, sizes, per_direction, self_loops)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_ties_go_to_the_lowest_index_and_coincident_centres_are_left() -> None:
    # Region 0 at the centre; 1 and 2 at the same distance to the right; 3 on top of 0.
    boxes = np.array([[[40, 40, 60, 60], [70, 40, 90, 60], [70, 40, 90, 60], [40, 40, 60, 60]]], float)
    got = directional_adjacency(boxes, np.array([[100, 100]]), per_direction=1, self_loops=False)
    # Coincident centres: dx = -(x_i - x_j) = -0.0, so theta = atan2(0, -0.0) = pi, i.e. "left".
    assert got[0, 0].tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(got, reference_adjacency(boxes, [[100, 100]], 1, False))


def test_sector_edges() -> None:
    # A power-of-two image size keeps the normalised centres exact, so the angles below are exact.
    # From region 0: region 1 exactly up-right (theta = pi/4 -> "above"), region 2 farther straight up.
    boxes = np.array([[[0, 80, 10, 90], [20, 60, 30, 70], [0, 0, 10, 10]]], float)
    got = directional_adjacency(boxes, np.array([[128, 128]]), per_direction=1, self_loops=False)
    assert got[0, 0].tolist() == [0, 1, 0]
    # From region 1: region 0 exactly down-left (theta = -3pi/4 -> "below"), region 2 above.
    assert got[0, 1].tolist() == [1, 0, 1]


def test_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    boxes, sizes = random_boxes(7, n_images=10, n_regions=9)
    whole = directional_adjacency(boxes, sizes, 3)
    monkeypatch.setattr(adjacency_module, "_CHUNK", 3)
    np.testing.assert_array_equal(directional_adjacency(boxes, sizes, 3), whole)


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"official CMCAN fixture not found at {FIXTURE}")
def test_reproduces_official_fixture() -> None:
    fixture = np.load(FIXTURE)
    got = directional_adjacency(fixture["boxes"], fixture["image_sizes"])
    np.testing.assert_array_equal(got, fixture["adjacency"])


@pytest.mark.skipif(not F30K.exists(), reason=f"Flickr30K test boxes not found at {F30K}")
def test_real_flickr30k_boxes() -> None:
    boxes = np.load(F30K / "test_ims_bbx.npy", allow_pickle=True)
    sizes = np.array([(d["image_w"], d["image_h"]) for d in np.load(F30K / "test_ims_size.npy", allow_pickle=True)])
    official = directional_adjacency(boxes, sizes)
    assert official.shape == (1000, 36, 36)
    per_row = official.sum(axis=-1)
    assert per_row.min() >= 1 and per_row.max() <= 5
    assert (np.diagonal(official, axis1=1, axis2=2) == 1).all()
    assert not (official == official.transpose(0, 2, 1)).all()

    paper = directional_adjacency(boxes, sizes, per_direction=3, self_loops=False)
    assert (np.diagonal(paper, axis1=1, axis2=2) == 0).all()
    assert paper.sum(axis=-1).max() <= 12
    assert (paper >= official - np.eye(36)).all()  # the 3 nearest include the nearest


def test_file_names() -> None:
    assert adjacency_file_name("test") == "test_ims_dir_selfadj4.npy"
    assert adjacency_file_name("train", 3, True) == "train_ims_dir_selfadj12.npy"
    assert adjacency_file_name("dev", 3, False) == "dev_ims_dir_adj12.npy"


def test_bad_shapes() -> None:
    boxes, sizes = random_boxes(0, 2, 4)
    with pytest.raises(InputError, match="boxes"):
        directional_adjacency(boxes[..., :3], sizes)
    with pytest.raises(InputError, match="image_sizes"):
        directional_adjacency(boxes, sizes[:1])
    with pytest.raises(InputError, match="per_direction"):
        directional_adjacency(boxes, sizes, per_direction=0)
