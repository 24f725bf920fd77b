from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itmatch.config import LossConfig
from itmatch.losses import triplet_ranking_loss


def brute_force(scores, margin, k, image_ids=None):
    n = len(scores)
    same = [[i == j or (image_ids is not None and image_ids[i] == image_ids[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        caption_costs = [max(0.0, margin + scores[i][j] - scores[i][i]) for j in range(n) if not same[i][j]]
        image_costs = [max(0.0, margin + scores[j][i] - scores[i][i]) for j in range(n) if not same[j][i]]
        for costs in (caption_costs, image_costs):
            total += sum(sorted(costs, reverse=True)[:k]) if k else sum(costs)
    return total


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    negatives=st.sampled_from(["sum", "hardest", "k:1", "k:2", "k:3", "k:20"]),
    with_ids=st.booleans(),
)
def test_loss_matches_a_loop(n, seed, negatives, with_ids):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 3, (n,), generator=generator) if with_ids else None
    config = LossConfig(margin=0.2, negatives=negatives)
    k = None if negatives == "sum" else 1 if negatives == "hardest" else int(negatives[2:])
    expected = brute_force(scores.tolist(), 0.2, k, None if ids is None else ids.tolist())
    assert abs(triplet_ranking_loss(scores, config, ids).item() - expected) < 1e-9


def test_mean_reduction_divides_by_the_batch_and_override_wins():
    scores = torch.rand(5, 5, dtype=torch.float64)
    summed = triplet_ranking_loss(scores, LossConfig(negatives="hardest"), negatives="sum")
    mean = triplet_ranking_loss(scores, LossConfig(negatives="hardest", reduction="mean"), negatives="sum")
    assert torch.isclose(summed, triplet_ranking_loss(scores, LossConfig(negatives="sum")))
    assert torch.isclose(mean * 5, summed)


def test_separated_batch_has_zero_loss():
    scores = torch.eye(4) * 0.5
    assert triplet_ranking_loss(scores, LossConfig(margin=0.2)).item() == 0.0


def test_k_hardest_is_validated():
    import pytest

    from itmatch.errors import ConfigError

    for bad in ("k:0", "k:", "k:x", "hardest3", "3"):
        with pytest.raises(ConfigError, match="k:N"):
            LossConfig(negatives=bad)
