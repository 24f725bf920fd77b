"""Retrieval metrics: vectorised ranks against the official loop, hand examples, COCO 1K folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from itmatch.errors import InputError
from itmatch.evaluation.metrics import (
    fold_metrics,
    format_results,
    i2t_ranks,
    recall_summary,
    retrieval_metrics,
    t2i_ranks,
)


def ref_i2t(sims: np.ndarray, cpi: int) -> np.ndarray:
    """The official loop: stable descending sort, best position among the image's captions."""
    ranks = np.zeros(sims.shape[0], dtype=np.int64)
    for i in range(sims.shape[0]):
        inds = np.argsort(-sims[i], kind="stable")
        ranks[i] = min(np.where(inds == c)[0][0] for c in range(cpi * i, cpi * (i + 1)))
    return ranks


def ref_t2i(sims: np.ndarray, cpi: int) -> np.ndarray:
    ranks = np.zeros(sims.shape[1], dtype=np.int64)
    for c in range(sims.shape[1]):
        inds = np.argsort(-sims[:, c], kind="stable")
        ranks[c] = np.where(inds == c // cpi)[0][0]
    return ranks


@st.composite
def score_matrices(draw: st.DrawFn, floats: bool) -> tuple[np.ndarray, int]:
    cpi = draw(st.sampled_from([1, 5]))
    n_images = draw(st.integers(1, 12 if cpi == 5 else 30))
    shape = (n_images, n_images * cpi)
    if floats:
        elements = st.floats(-10, 10, allow_nan=False, width=32)
        return draw(arrays(np.float32, shape, elements=elements)), cpi
    # A small integer range makes ties frequent, in both directions.
    return draw(arrays(np.int64, shape, elements=st.integers(0, 3))), cpi


@settings(max_examples=150, deadline=None)
@given(
    data=st.one_of(score_matrices(floats=False), score_matrices(floats=True)),
    chunk_bytes=st.sampled_from([1, 200, 10**9]),
)
def test_ranks_match_official_loop(data: tuple[np.ndarray, int], chunk_bytes: int) -> None:
    sims, cpi = data
    np.testing.assert_array_equal(i2t_ranks(sims, cpi, chunk_bytes=chunk_bytes), ref_i2t(sims, cpi))
    np.testing.assert_array_equal(t2i_ranks(sims, cpi, chunk_bytes=chunk_bytes), ref_t2i(sims, cpi))


def test_all_ties_rank_by_index() -> None:
    sims = np.zeros((4, 20))
    np.testing.assert_array_equal(i2t_ranks(sims), [0, 5, 10, 15])
    np.testing.assert_array_equal(t2i_ranks(sims), np.repeat(np.arange(4), 5))


def test_hand_ranks_with_ties() -> None:
    # Two captions per image: captions 0, 1 -> image 0; captions 2, 3 -> image 1.
    sims = np.array([[1.0, 3.0, 3.0, 5.0], [5.0, 5.0, 5.0, 5.0]])
    # Image 0: best own caption 1 (3.0), beaten by caption 3 (5.0); caption 2 ties but comes later.
    # Image 1: own captions all tie with captions 0, 1, which have smaller indices.
    np.testing.assert_array_equal(i2t_ranks(sims, 2), [1, 2])
    # Caption 0, 1: image 1 scores higher. Caption 2: image 1 wins. Caption 3: tie, image 0 first.
    np.testing.assert_array_equal(t2i_ranks(sims, 2), [1, 1, 0, 1])


def test_recall_summary_hand_values() -> None:
    m = recall_summary(np.array([0, 1, 4, 5, 9, 10, 20]))
    assert m == pytest.approx({"r1": 100 / 7, "r5": 300 / 7, "r10": 500 / 7, "medr": 6.0, "meanr": 8.0})
    # Even count: median 1.5 is floored before the +1.
    m = recall_summary([0, 1, 2, 3])
    assert m == {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.5}
    assert all(type(v) is float for v in m.values())


def test_retrieval_metrics_small_example() -> None:
    sims = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.1], [0.3, 0.4, 0.7]])
    m = retrieval_metrics(sims, captions_per_image=1)
    # i2t ranks [0, 1, 0]; t2i ranks [0, 1, 0].
    expected = {"r1": 200 / 3, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 4 / 3}
    assert m["i2t"] == pytest.approx(expected)
    assert m["t2i"] == pytest.approx(expected)
    assert m["rsum"] == pytest.approx(2 * (200 / 3 + 200))
    assert (m["n_images"], m["n_captions"]) == (3, 3)


@pytest.mark.parametrize("cpi", [1, 5])
def test_perfect_scores(cpi: int) -> None:
    rng = np.random.default_rng(0)
    sims = rng.random((20, 20 * cpi))
    sims[np.arange(20 * cpi) // cpi, np.arange(20 * cpi)] += 2.0
    m = retrieval_metrics(sims, cpi)
    for d in ("i2t", "t2i"):
        assert m[d] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert m["rsum"] == 600.0


def _fold_block(p: int, m: int = 10) -> np.ndarray:
    """Diagonal 1 for the first p images, else 0: ranks are [0] * p + [p, ..., m - 1] both ways."""
    block = np.zeros((m, m))
    block[np.arange(p), np.arange(p)] = 1.0
    return block


def _coco_like_folds() -> np.ndarray:
    blocks = [_fold_block(p) for p in (10, 8, 5, 2)]
    # Last fold: caption 0 scores 2 for every image, so i2t ranks are [0, 1, ..., 1], t2i all 0.
    last = np.eye(10)
    last[:, 0] = 2.0
    blocks.append(last)
    sims = np.full((50, 50), 100.0)  # off-diagonal blocks would win everything if they were read
    for k, block in enumerate(blocks):
        sims[10 * k : 10 * (k + 1), 10 * k : 10 * (k + 1)] = block
    return sims


def test_fold_metrics_average_every_metric() -> None:
    m = fold_metrics(_coco_like_folds(), n_folds=5, captions_per_image=1)
    # Per fold i2t (r1, r5, medr, meanr): (100,100,1,1) (80,80,1,2.7) (50,50,3,4.5) (20,50,5,5.4)
    # (10,100,2,1.9); t2i the same except the last fold (100,100,1,1); r10 always 100.
    i2t = {"r1": 52.0, "r5": 76.0, "r10": 100.0, "medr": 2.4, "meanr": 3.1}
    t2i = {"r1": 70.0, "r5": 76.0, "r10": 100.0, "medr": 2.2, "meanr": 2.92}
    assert m["i2t"] == pytest.approx(i2t)
    assert m["t2i"] == pytest.approx(t2i)
    assert m["rsum"] == pytest.approx(474.0)
    assert (m["n_images"], m["n_captions"], m["n_folds"]) == (10, 10, 5)
    assert len(m["folds"]) == 5
    assert m["folds"][1]["i2t"]["meanr"] == pytest.approx(2.7)


def test_fold_metrics_ignores_off_diagonal_blocks() -> None:
    sims = _coco_like_folds()
    reference = fold_metrics(sims, 5, 1)
    for fill in (-100.0, np.nan):
        other = sims.copy()
        mask = np.kron(np.eye(5), np.ones((10, 10))) == 0
        other[mask] = fill
        assert fold_metrics(other, 5, 1) == reference
    # Whole-matrix scoring does read them.
    assert retrieval_metrics(sims, 1)["rsum"] == 0.0


def test_fold_metrics_captions_per_image_5() -> None:
    rng = np.random.default_rng(1)
    sims = rng.random((30, 150)).astype(np.float32)
    m = fold_metrics(sims, n_folds=3, captions_per_image=5)
    blocks = [retrieval_metrics(sims[10 * k : 10 * k + 10, 50 * k : 50 * k + 50]) for k in range(3)]
    assert m["folds"] == blocks
    assert m["t2i"]["meanr"] == pytest.approx(np.mean([b["t2i"]["meanr"] for b in blocks]))
    whole, single_fold = retrieval_metrics(sims), fold_metrics(sims, 1, 5)
    assert {k: single_fold[k] for k in whole} == whole


def test_chunking_gives_same_ranks() -> None:
    rng = np.random.default_rng(2)
    sims = rng.integers(0, 5, size=(200, 1000)).astype(np.float32)
    i2t, t2i = i2t_ranks(sims), t2i_ranks(sims)
    for budget in (1, 4 * 1000 * 7, 4 * 1000 * 64):  # 1, 7 and 64 rows per chunk
        np.testing.assert_array_equal(i2t_ranks(sims, chunk_bytes=budget), i2t)
        np.testing.assert_array_equal(t2i_ranks(sims, chunk_bytes=budget), t2i)
    np.testing.assert_array_equal(i2t, ref_i2t(sims, 5))
    np.testing.assert_array_equal(t2i, ref_t2i(sims, 5))


def test_torch_input() -> None:
    sims = torch.tensor([[1.0, 3.0, 3.0, 5.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.bfloat16)
    np.testing.assert_array_equal(i2t_ranks(sims, 2), [1, 2])
    np.testing.assert_array_equal(t2i_ranks(sims.float().requires_grad_(), 2), [1, 1, 0, 1])


@pytest.mark.parametrize(
    "sims, cpi, match",
    [
        (np.zeros(5), 5, "2-D"),
        (np.zeros((2, 10, 1)), 5, "2-D"),
        (np.zeros((2, 9)), 5, "expected 10"),
        (np.zeros((2, 10)), 1, "expected 2"),
        (np.zeros((0, 0)), 5, "no images"),
        (np.zeros((2, 10)), 0, "captions_per_image"),
        (np.array([[np.nan, 0.0]]), 2, "NaN"),
        (np.array([[np.inf, 0.0]]), 2, "NaN or inf"),
        (np.array([[-np.inf, 0.0]], dtype=np.float16), 2, "NaN or inf"),
        (np.array([["a", "b"]]), 2, "dtype"),
    ],
)
def test_bad_inputs(sims: np.ndarray, cpi: int, match: str) -> None:
    for fn in (i2t_ranks, t2i_ranks, retrieval_metrics):
        with pytest.raises(InputError, match=match):
            fn(sims, cpi)


def test_bad_fold_inputs() -> None:
    with pytest.raises(InputError, match="equal folds"):
        fold_metrics(np.zeros((12, 60)), n_folds=5)
    with pytest.raises(InputError, match="n_folds"):
        fold_metrics(np.zeros((10, 50)), n_folds=0)
    with pytest.raises(InputError, match="expected 50"):
        fold_metrics(np.zeros((10, 10)), n_folds=5)
    with pytest.raises(InputError, match="NaN"):
        fold_metrics(np.full((10, 50), np.nan), n_folds=5)


def test_bad_ranks() -> None:
    with pytest.raises(InputError):
        recall_summary(np.array([], dtype=np.int64))
    with pytest.raises(InputError):
        recall_summary(np.zeros((2, 2)))


def test_format_results() -> None:
    perfect = np.eye(4)
    one = retrieval_metrics(perfect, 1)
    folds = fold_metrics(_coco_like_folds(), 5, 1)
    table = format_results({"CMCAN": one, "VSE++": folds}, "COCO 1K")
    lines = table.splitlines()
    assert lines[0] == "COCO 1K"
    assert lines[1].split() == ["CMCAN", "VSE++"]
    assert len(lines) == 2 + 11
    assert lines[2].split() == ["i2t", "R@1", "100.0", "52.0"]
    assert lines[-1].split() == ["rSum", "600.0", "474.0"]
    assert lines[-3].split() == ["t2i", "medr", "1.0", "2.2"]
    single = format_results({"only": one}).splitlines()
    assert single[0].split() == ["only"] and len(single) == 12
    with pytest.raises(InputError):
        format_results({})
