from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_models import batch_extras, inputs, small_model

from itmatch import losses
from itmatch.config import LossConfig, build_run_config, hardest_k
from itmatch.losses import TrainingContext, triplet_active_pairs, triplet_ranking_loss


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
    from itmatch.errors import ConfigError

    for bad in ("k:0", "k:", "k:x", "hardest3", "3"):
        with pytest.raises(ConfigError, match="k:N"):
            LossConfig(negatives=bad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    negatives=st.sampled_from(["hardest", "k:2", "k:20", "sum"]),
    with_ids=st.booleans(),
)
def test_the_loss_reads_no_pair_outside_the_active_ones(n, seed, negatives, with_ids):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 3, (n,), generator=generator) if with_ids else None
    config = LossConfig(margin=0.5, negatives=negatives)
    triplet_ranking_loss(scores, config, ids).backward()
    active = triplet_active_pairs(scores.detach(), config, ids)
    assert not scores.grad[~active].any()
    if negatives != "sum":
        assert active.sum() <= n * (2 * min(hardest_k(negatives), n) + 1)


@pytest.mark.parametrize("negatives", ["hardest", "k:2", "sum"])
def test_a_nan_score_is_always_among_the_active_pairs(negatives):
    scores = torch.eye(5)  # every negative satisfies the margin
    scores[1, 3] = float("nan")
    assert triplet_active_pairs(scores, LossConfig(margin=0.2, negatives=negatives))[1, 3]


# One preset of each architecture that scores pairs with a network (SGRAF's SAF normalises over
# the tile's images in training, so the rescoring leaves it out).
PER_PAIR_NETWORKS = ["scan-t2i-ave", "cmcan-official", "gsmn-official-dense", "sgraf-sgr", "dvsa", "sm-lstm"]


def training_pass(model, batch, context, scored: list[int]) -> tuple[float, dict, int]:
    """The loss, the gradients and how many pairs were scored with gradients (`scored` collects
    them from the counting `pair_scores`)."""
    scored.clear()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks
    loss = sum(model.training_losses(batch, context).values())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(scored)


def counting_pairs_scored_with_gradients(model, monkeypatch) -> list[int]:
    """Makes the model's class count the pairs it scores with gradients, into the list returned."""
    scored, original = [], type(model).pair_scores

    def counting(self, images, texts):
        scores = original(self, images, texts)
        scored.append(scores.numel() if torch.is_grad_enabled() else 0)
        return scores

    monkeypatch.setattr(type(model), "pair_scores", counting)
    return scored


def training_batch(n: int) -> dict:
    features, tokens, lengths, adjacency = inputs(n_images=n, n_captions=n, seed=1)
    batch = {"features": features, "tokens": tokens, "lengths": lengths, **batch_extras(adjacency)}
    batch["image_index"] = torch.arange(n) // 2  # two captions of each image
    return batch


@pytest.mark.parametrize("preset", PER_PAIR_NETWORKS)
@pytest.mark.parametrize(("negatives", "exclude_same_image"), [("hardest", False), ("k:2", True), ("sum", True)])
def test_rescoring_the_active_pairs_gives_the_loss_and_gradients_of_scoring_every_pair(
    preset, negatives, exclude_same_image, monkeypatch
):
    n = 12
    model = small_model(preset).train()
    scored = counting_pairs_scored_with_gradients(model, monkeypatch)
    monkeypatch.setattr(losses, "ACTIVE_SHARE_LIMIT", 1.0)  # a random model violates with most pairs
    batch = training_batch(n)
    loss = replace(build_run_config(preset).loss, negatives=negatives, exclude_same_image=exclude_same_image)
    every = TrainingContext(loss, active_pairs=False)
    every_loss, every_grads, every_pairs = training_pass(model, batch, every, scored)
    active_loss, active_grads, active_pairs = training_pass(model, batch, TrainingContext(loss), scored)
    most = n * n - n if negatives == "sum" else n * (2 * hardest_k(negatives) + 1)  # "sum": same-image pairs not
    assert every_pairs == n * n and 0 < active_pairs <= most
    assert active_loss == pytest.approx(every_loss, rel=1e-5)
    assert active_grads.keys() == every_grads.keys()
    assert_close_gradients(active_grads, every_grads)


def assert_close_gradients(actual: dict, expected: dict) -> None:
    """Equal up to rounding, which differs between the two ways of scoring: each element within
    1e-3 of itself plus 5e-4 of the largest gradient. (Under "sum" a random small model's
    gradients are sums of about 2 n^2 terms that nearly cancel; one of 12 x 12 pairs left out
    would move them by about 1e-2 of the largest.)"""
    scale = max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-3, atol=5e-4 * scale, msg=name)


def test_every_pair_is_scored_with_gradients_where_most_pairs_are_active(monkeypatch):
    model = small_model("scan-t2i-ave").train()
    scored = counting_pairs_scored_with_gradients(model, monkeypatch)
    loss = replace(build_run_config("scan-t2i-ave").loss, negatives="sum", margin=10.0)  # all violate
    context, scoring_calls = TrainingContext(loss), []
    for _ in range(losses.PROBE_EVERY + 1):
        training_pass(model, training_batch(12), context, scored)
        assert sum(scored) == 12 * 12
        scoring_calls.append(len(scored))
    # the pass without gradients (and its calls) again only every PROBE_EVERY batches
    assert scoring_calls[0] > scoring_calls[1] == scoring_calls[-2] < scoring_calls[-1] == scoring_calls[0]


def test_a_compiled_pair_scorer_trains_to_the_same_loss_and_gradients():
    model = small_model("cmcan-official").train()
    scored = []
    n = 8
    features, tokens, lengths, adjacency = inputs(n_images=n, n_captions=n, seed=2)
    batch = {"features": features, "tokens": tokens, "lengths": lengths, **batch_extras(adjacency)}
    batch["image_index"] = torch.arange(n)
    loss = build_run_config("cmcan-official").loss
    eager_loss, eager_grads, _ = training_pass(model, batch, TrainingContext(loss), scored)
    compiled_loss, compiled_grads, _ = training_pass(model, batch, TrainingContext(loss, compile=True), scored)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert_close_gradients(compiled_grads, eager_grads)
