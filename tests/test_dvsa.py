"""DVSA: the batched score equals the paper's formula computed one pair at a time, the BRNN
follows its equations caption by caption whatever the padding, and short training learns."""

from __future__ import annotations

import pytest
import torch
from conftest import CHANCE_RSUM, short_training_metrics

from itmatch import build_run_config, create_model
from itmatch.config import merge
from itmatch.models.abilities import Explains
from itmatch.scoring import ScoringOptions, score_grid, score_pairs

SIZES = {"vocab_size": 30, "img_dim": 20, "embed_size": 16, "text": {"word_dim": 8}}


def dvsa(**changes):
    torch.manual_seed(0)
    return create_model("dvsa", build_run_config("dvsa", {"model": merge(SIZES, changes)}).model).eval()


def batch(n_images=4, n_regions=6, lengths=(1, 9, 4, 12, 2)):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(n_images, n_regions, 20, generator=generator)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(4, 30, (len(lengths), 14), generator=generator)
    return features, tokens * (torch.arange(14) < lengths[:, None]), lengths


def paper_brnn(model, tokens: torch.Tensor) -> torch.Tensor:
    """s_t of one unpadded caption, the paper's equations written out."""
    encoder = model.text_encoder
    relu = torch.relu
    e = relu(encoder.input(encoder.embed(tokens)))
    forward, backward = [], []
    h = torch.zeros(e.shape[1])
    for t in range(len(tokens)):
        h = relu(e[t] + encoder.forward_step.weight @ h + encoder.forward_step.bias)
        forward.append(h)
    h = torch.zeros(e.shape[1])
    for t in reversed(range(len(tokens))):
        h = relu(e[t] + encoder.backward_step.weight @ h + encoder.backward_step.bias)
        backward.insert(0, h)
    return relu(encoder.output(torch.stack(forward) + torch.stack(backward)))


def paper_score(fragments: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """S_kl = sum_t max_i v_i . s_t, by loops."""
    total = torch.zeros(())
    for s in words:
        total = total + max(torch.dot(v, s) for v in fragments)
    return total


@pytest.mark.parametrize("whole_image", [True, False])
def test_batched_scores_equal_the_paper_formula_pair_by_pair(whole_image):
    model = dvsa(whole_image=whole_image)
    features, tokens, lengths = batch()
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        grid = score_grid(model, images, texts)
        tiny_tiles = score_grid(model, images, texts, ScoringOptions(memory_budget=1))
        expected = torch.zeros(len(features), len(lengths))
        for k, image in enumerate(features):
            fragments = torch.cat([image, image.mean(0, keepdim=True)]) if whole_image else image
            fragments = model.image_proj(fragments)
            for t, (caption, length) in enumerate(zip(tokens, lengths, strict=True)):
                expected[k, t] = paper_score(fragments, paper_brnn(model, caption[:length]))
        pairs = score_pairs(model, images, texts, torch.tensor([3, 0, 2]), torch.tensor([1, 4, 0]))
    assert images["regions"].shape == (4, 7 if whole_image else 6, 16)
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_tiles, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pairs, expected[[3, 0, 2], [1, 4, 0]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("whole_image", [True, False])
def test_explanations_are_the_alignment_the_score_sums(whole_image):
    model = dvsa(whole_image=whole_image)
    features, tokens, lengths = batch()
    pairs = torch.tensor([3, 0, 2]), torch.tensor([1, 4, 3])
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        picked_images, picked_texts = images.select(pairs[0]), texts.select(pairs[1])
        explained = model.explain(picked_images, picked_texts)
        scores = score_pairs(model, images, texts, *pairs)
    assert isinstance(model, Explains)
    torch.testing.assert_close(explained["score"], scores)
    attention, n_regions = explained["word_attention"], features.shape[1]
    assert attention.shape == (3, 12, n_regions)  # boxes only: the whole-image fragment has none
    for p, (fragments, words, mask) in enumerate(
        zip(picked_images["regions"], picked_texts["words"], picked_texts["mask"], strict=True)
    ):
        for t, word in enumerate(words):
            best = max(range(len(fragments)), key=lambda i: torch.dot(fragments[i], word).item())
            expected = torch.zeros(n_regions)
            if mask[t] and best < n_regions:
                expected[best] = 1
            elif mask[t]:
                expected += 1 / n_regions
            torch.testing.assert_close(attention[p, t], expected)
    torch.testing.assert_close(explained["region_confidence"].sum(-1), torch.ones(3))


def test_word_vectors_do_not_depend_on_padding_and_are_zero_on_it():
    model = dvsa()
    features, tokens, lengths = batch()
    with torch.no_grad():
        short = model.encode_texts(tokens[:, :12], lengths)
        long = model.encode_texts(torch.nn.functional.pad(tokens, (0, 6)), lengths)
    torch.testing.assert_close(short["words"], long["words"][:, :12])
    assert (long["words"][~long["mask"]] == 0).all()


def test_the_preset_has_the_papers_loss():
    config = build_run_config("dvsa")
    assert (config.loss.margin, config.loss.negatives, config.loss.reduction) == (1.0, "sum", "sum")
    assert config.model.whole_image and config.model.embed_size == 1000


def test_short_training_beats_chance_by_a_wide_margin(small_scenes, tmp_path):
    sizes = {"model": {"embed_size": 64, "text": {"word_dim": 32}}}
    metrics = short_training_metrics("dvsa", sizes, small_scenes, tmp_path)
    assert metrics["rsum"] > 3 * CHANCE_RSUM, metrics
