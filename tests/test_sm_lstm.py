"""sm-LSTM: the batched pair scorer equals the paper's equations written as loops, one pair and one
instance at a time; saliency maps are distributions over the real instances; short training learns."""

from __future__ import annotations

import pytest
import torch
from conftest import CHANCE_RSUM, short_training_metrics

from itmatch import build_run_config, create_model
from itmatch.config import merge
from itmatch.errors import InputError
from itmatch.models.abilities import Explains
from itmatch.scoring import ScoringOptions, grid_view, score_grid, score_pairs

SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 12, "text": {"word_dim": 8}}


def sm_lstm(**changes):
    torch.manual_seed(0)
    model = create_model("sm-lstm", build_run_config("sm-lstm", {"model": merge(SIZES, changes)}).model).eval()
    with torch.no_grad():  # larger weights than the default init, so that the attention is far from uniform
        for parameter in model.parameters():
            parameter.mul_(3)
    return model


def batch(n_images=3, n_regions=9, lengths=(1, 7, 4, 10)):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(n_images, n_regions, 20, generator=generator)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(4, 30, (len(lengths), 12), generator=generator)
    return features, tokens * (torch.arange(12) < lengths[:, None]), lengths


def affine(layer, x):
    return layer.weight @ x + (0 if layer.bias is None else layer.bias)


def saliency(attention, instances, own, other, h):
    """The softmax over instances of u . tanh(U x_i + b + C_own own + C_other other + H h), by loops."""
    logits = []
    for x in instances:
        inner = affine(attention.instance, x) + affine(attention.state, h)
        if attention.own_context is not None:
            inner = inner + affine(attention.own_context, own)
        if attention.other_context is not None:
            inner = inner + affine(attention.other_context, other)
        logits.append(affine(attention.saliency, torch.tanh(inner))[0])
    exps = [torch.exp(value) for value in logits]
    return [value / sum(exps) for value in exps]


def lstm_step(cell, x, h, c):
    """i, f, g, o = W_ih x + b_ih + W_hh h + b_hh; c' = f c + i g; h' = o tanh(c')."""
    i, f, g, o = (cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def paper_score(model, features, tokens):
    """One pair: T steps of both saliency maps, the selected pair into the LSTM, the perceptron."""
    a = [affine(model.image_proj, f) for f in features]
    if model.config.image_norm:
        a = [vector / vector.norm() for vector in a]
    x = affine(model.image_context, features.mean(0))
    words, _, sentence = model.text_encoder(tokens[None], torch.tensor([len(tokens)]))
    w, y = list(words[0]), sentence[0]
    h = c = torch.zeros(model.config.embed_size)
    for _ in range(model.config.steps):
        p = saliency(model.region_attention, a, x, y, h)
        q = saliency(model.word_attention, w, y, x, h)
        selected_a = sum(weight * vector for weight, vector in zip(p, a, strict=True))
        selected_w = sum(weight * vector for weight, vector in zip(q, w, strict=True))
        if model.config.fusion == "product":
            fused = selected_a * selected_w
        else:
            fused = torch.cat([selected_a, selected_w])
        h, c = lstm_step(model.cell, fused, h, c)
    return affine(model.score_out, torch.relu(affine(model.score_hidden, h)))[0]


@pytest.mark.parametrize(
    "context, fusion", [("multimodal", "product"), ("own", "concat"), ("none", "product"), ("multimodal", "concat")]
)
def test_batched_scores_equal_the_papers_equations_pair_by_pair(context, fusion):
    model = sm_lstm(context=context, fusion=fusion)
    features, tokens, lengths = batch()
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        grid = score_grid(model, images, texts)
        tiny_tiles = score_grid(model, images, texts, ScoringOptions(memory_budget=1))
        pairs = score_pairs(model, images, texts, torch.tensor([2, 0, 1, 2]), torch.tensor([1, 3, 0, 0]))
        captions = [caption[:length] for caption, length in zip(tokens, lengths, strict=True)]
        expected = torch.tensor([[paper_score(model, image, text).item() for text in captions] for image in features])
    assert grid.shape == (3, 4) and expected.std() > 1e-3  # scores differ between pairs
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_tiles, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pairs, expected[[2, 0, 1, 2], [1, 3, 0, 0]], atol=1e-5, rtol=1e-5)


def test_saliency_maps_are_distributions_over_the_real_instances():
    model = sm_lstm(steps=4)
    features, tokens, lengths = batch()
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        stages = model.pair_stages(*(part for part in grid_view(images, texts)))
    regions, words = stages["region_weights"], stages["word_weights"]
    assert stages["scores"].shape == (4, 3)  # text-major tile
    assert regions.shape == (4, 4, 3, 9) and words.shape == (4, 4, 3, 12)
    assert images["regions"].shape == (3, 9, 12) and texts["words"].shape == (4, 12, 12)
    torch.testing.assert_close(regions.sum(-1), torch.ones(4, 4, 3))
    torch.testing.assert_close(words.sum(-1), torch.ones(4, 4, 3))
    padding = ~texts["mask"][None, :, None, :].expand_as(words)
    assert (words[padding] == 0).all() and (words[~padding] > 0).all()
    assert not torch.allclose(regions[0], regions[1])  # the state moves the attention between steps


def test_grid_instances_must_form_a_square():
    model = sm_lstm(instances="grid")
    features, tokens, lengths = batch(n_regions=9)
    assert model.encode_images(features)["regions"].shape == (3, 9, 12)
    with pytest.raises(InputError, match="square grid of cells, got 8 feature rows"):
        model.similarity(features[:, :8], tokens, lengths)


def test_short_training_beats_chance_by_a_wide_margin(small_scenes, tmp_path):
    sizes = {"model": {"embed_size": 48, "text": {"word_dim": 32}}}
    metrics = short_training_metrics("sm-lstm", sizes, small_scenes, tmp_path)
    assert metrics["rsum"] > 2.5 * CHANCE_RSUM, metrics


def test_explanations_are_the_saliency_maps_of_the_scored_pairs():
    model = sm_lstm()
    features, tokens, lengths = batch()
    pairs = torch.tensor([2, 0, 1, 1]), torch.tensor([1, 3, 0, 2])
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        explained = model.explain(images.select(pairs[0]), texts.select(pairs[1]))
        scores = score_pairs(model, images, texts, *pairs)
    assert isinstance(model, Explains)
    torch.testing.assert_close(explained["score"], scores)
    torch.testing.assert_close(explained["region_confidence"].sum(-1), torch.ones(4))
    mask = texts.select(pairs[1])["mask"]
    attention = explained["word_attention"]
    assert attention.shape == (4, 10, 9)  # the pairs' longest caption
    torch.testing.assert_close(attention.sum(-1), mask.float())
    with pytest.raises(InputError, match="explain takes pairs"):
        model.explain(images, texts)
