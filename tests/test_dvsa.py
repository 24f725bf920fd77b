"""DVSA: the batched score equals the paper's formula computed one pair at a time, the BRNN
follows its equations caption by caption whatever the padding, and short training learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import evaluate_split
from itmatch.scoring import ScoringOptions, score_grid, score_pairs
from itmatch.training import train

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


N_TEST = 50


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 300, "dev": 30, "test": N_TEST}, seed=5, spec=spec
    )


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path):
    settings = {
        "model": {"embed_size": 64, "text": {"word_dim": 32}},
        "train": {
            "epochs": 4,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "checkpoint_every": 0,
            "dev_max_captions": None,
        },
        "loss": {"exclude_same_image": True},
    }
    torch.manual_seed(0)
    train(build_run_config("dvsa", settings), scenes, tmp_path, progress=False, log=lambda *_: None)
    model = load_checkpoint(tmp_path / "best.pt", device="cpu")
    metrics = evaluate_split(model, PrecompSplit(scenes, "test"), progress=False)
    assert metrics["rsum"] > 3 * 6 * 100 * 5.5 / N_TEST, metrics  # three times the chance recalls (~66)
