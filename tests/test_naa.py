"""NAA (an interpretation): the neighbour-aware ranking loss equals its definition written as loops,
the intra-attention pools whatever the padding, and short training learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pooled_training import CHANCE_RSUM, make_scenes, train_briefly

from itmatch import build_run_config, create_model
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.evaluation.runner import evaluate_split
from itmatch.losses import TrainingContext
from itmatch.models.naa import neighbour_ranking_loss


def brute_force(scores, groups, margin, k, exclude_self) -> float:
    n, total = len(groups), 0.0
    for a in range(n):
        for p in range(n):
            if groups[p] != groups[a] or (exclude_self and p == a):
                continue
            costs = [max(0.0, margin + scores[a][c] - scores[a][p]) for c in range(n) if groups[c] != groups[a]]
            total += sum(sorted(costs, reverse=True)[:k]) if k else sum(costs)
    return total


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    negatives=st.sampled_from(["sum", "hardest", "k:2"]),
    exclude_self=st.booleans(),
)
def test_neighbour_ranking_loss_equals_a_loop(n, seed, negatives, exclude_self):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=generator, dtype=torch.float64)
    groups = torch.randint(0, 3, (n,), generator=generator)
    k = None if negatives == "sum" else 1 if negatives == "hardest" else 2
    expected = brute_force(scores.tolist(), groups.tolist(), 0.2, k, exclude_self)
    got = neighbour_ranking_loss(scores, groups, 0.2, negatives, exclude_self)
    assert got.item() == pytest.approx(expected, abs=1e-9)


SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 16, "text": {"word_dim": 8}}


def naa(**changes):
    torch.manual_seed(0)
    return create_model("naa", build_run_config("naa", {"model": merge(SIZES, changes)}).model).eval()


def test_unit_vectors_that_ignore_padding_and_the_loss_terms():
    model = naa()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 7, 2, 5])
    tokens = torch.randint(4, 30, (4, 7), generator=generator) * (torch.arange(7) < lengths[:, None])
    features = torch.randn(2, 6, 20, generator=generator)
    with torch.no_grad():
        texts = model.encode_texts(tokens, lengths)["vector"]
        padded = model.encode_texts(torch.nn.functional.pad(tokens, (0, 5)), lengths)["vector"]
        images = model.encode_images(features)["vector"]
    torch.testing.assert_close(texts, padded)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))
    batch = {"features": features.repeat_interleave(2, 0), "tokens": tokens, "lengths": lengths}
    batch["image_index"] = torch.tensor([0, 0, 1, 1])
    terms = model.train()(batch, TrainingContext(build_run_config("naa").loss))
    assert set(terms) == {"ranking", "neighbour"} and all(torch.isfinite(v) for v in terms.values())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes(tmp_path_factory.mktemp("scenes"))


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path):
    model, _ = train_briefly("naa", scenes, tmp_path, {"loss": {"negatives": "sum"}})
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    assert metrics["rsum"] > 3 * CHANCE_RSUM, metrics
