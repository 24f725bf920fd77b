"""VSE-infinity: GPO against a per-item reference, size augmentation of regions and captions, the
embedding invariants, and a short training run on synthetic scenes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.errors import ConfigError
from itmatch.evaluation.runner import evaluate_split
from itmatch.models.vse_infinity import GPO, GPOConfig, positional_encoding
from itmatch.training import train

PRESET = "vse-infty-bigru"
SMALL = {"vocab_size": 40, "img_dim": 20, "embed_size": 24, "text": {"word_dim": 16}}


def small_model(seed: int = 0, **model):
    torch.manual_seed(seed)
    config = build_run_config(PRESET, {"model": merge(SMALL, model)})
    return create_model(config.architecture, config.model)


def reference_encoding(length: int, dim: int) -> torch.Tensor:
    """pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(p / 10000^(2i/dim)), one by one."""
    table = torch.zeros(length, dim)
    for p in range(length):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            table[p, 2 * i], table[p, 2 * i + 1] = math.sin(angle), math.cos(angle)
    return table


def reference_gpo(gpo: GPO, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One item at a time: its real vectors, each dimension sorted largest first, weighted by a
    softmax over the BiGRU's scores of the positional encodings of 0..n-1 (no padding anywhere)."""
    pooled, all_weights = [], []
    for item, real in zip(items, mask, strict=True):
        values = item[real]  # (n, D)
        n = len(values)
        output, _ = gpo.rnn(reference_encoding(n, gpo.config.pe_dim)[None])
        hidden = (output[0, :, : gpo.config.hidden] + output[0, :, gpo.config.hidden :]) / 2
        weights = torch.softmax(gpo.score(hidden)[:, 0] / gpo.config.temperature, dim=0)
        ordered = values.sort(dim=0, descending=True).values
        pooled.append((weights[:, None] * ordered).sum(0))
        all_weights.append(weights)
    return torch.stack(pooled), all_weights


def test_positional_encoding_is_the_sine_cosine_table():
    torch.testing.assert_close(positional_encoding(13, 32), reference_encoding(13, 32), atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 11), min_size=1, max_size=6), st.integers(0, 10_000), st.booleans())
def test_gpo_matches_a_per_item_reference(lengths, seed, scattered):
    """Variable lengths in one batch; real items either first (captions) or anywhere (kept regions)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gpo = GPO(GPOConfig(pe_dim=8, hidden=6, temperature=0.5))
    width = max(lengths) + 2
    items = torch.randn(len(lengths), width, 5, generator=generator) * 3
    if scattered:
        ranks = torch.rand(len(lengths), width, generator=generator).argsort(1).argsort(1)
        mask = ranks < torch.tensor(lengths)[:, None]
    else:
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        pooled, weights = gpo(items, mask)
        expected, expected_weights = reference_gpo(gpo, items, mask)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    for row, n, reference in zip(weights, lengths, expected_weights, strict=True):
        torch.testing.assert_close(row[:n], reference, atol=1e-6, rtol=1e-5)
        assert row[n:].eq(0).all()


def test_gpo_weights_sum_to_one_and_pool_between_min_and_max():
    """The weights belong to sorted positions and are shared by every dimension, so for each
    dimension they sum to 1 over an item's positions: the pooled value is a convex combination."""
    torch.manual_seed(0)
    gpo = GPO(GPOConfig())
    lengths = torch.tensor([1, 4, 9, 36, 17])
    mask = torch.arange(36)[None] < lengths[:, None]
    items = torch.randn(5, 36, 7)
    with torch.no_grad():
        pooled, weights = gpo(items, mask)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    assert (weights >= 0).all() and weights[~mask].eq(0).all()
    real_min = items.masked_fill(~mask[..., None], math.inf).amin(1)
    real_max = items.masked_fill(~mask[..., None], -math.inf).amax(1)
    assert (pooled >= real_min - 1e-5).all() and (pooled <= real_max + 1e-5).all()
    torch.testing.assert_close(pooled[0], items[0, 0])  # one item: the item itself


def test_image_vector_ignores_the_order_of_regions():
    model = small_model().eval()
    features = torch.rand(5, 9, 20)
    order = torch.randperm(9)
    with torch.no_grad():
        reference = model.encode_images(features)["vector"]
        shuffled = model.encode_images(features[:, order])["vector"]
    torch.testing.assert_close(shuffled, reference, atol=1e-6, rtol=0)


def test_region_drop_only_while_training_keeps_one_and_matches_the_rate():
    model = small_model()
    features = torch.zeros(4000, 36, 20)
    model.train()
    torch.manual_seed(1)
    kept = model.region_keep_mask(features)
    assert abs((1 - kept.float().mean().item()) - 0.2) < 0.005
    model.eval()
    assert model.region_keep_mask(features).all()
    nearly_all = small_model(region_drop=0.95).train()
    torch.manual_seed(2)
    kept = nearly_all.region_keep_mask(torch.zeros(3000, 3, 20))
    assert kept.any(1).all()  # 0.95^3: ~86% of these images lost every region to the draw
    assert abs(kept.sum(1).float().mean().item() - (3 * 0.05 + 0.95**3)) < 0.03


def test_training_pools_only_the_kept_regions_and_evaluation_is_deterministic():
    # Without the MLP's BatchNorm, training and evaluation differ only by the dropped regions.
    model = small_model(residual_mlp=False, word_augment=0.0)
    features = torch.rand(6, 9, 20)
    model.train()
    torch.manual_seed(3)
    kept = model.region_keep_mask(features)
    torch.manual_seed(3)
    with torch.no_grad():
        trained = model.encode_images(features)["vector"]
    assert not kept.all()
    model.eval()
    with torch.no_grad():
        for i in range(6):
            alone = model.encode_images(features[i : i + 1, kept[i]])["vector"][0]
            torch.testing.assert_close(trained[i], alone, atol=1e-6, rtol=0)
        first, second = model.encode_images(features)["vector"], model.encode_images(features)["vector"]
    assert torch.equal(first, second)


def test_the_official_batchnorm_counts_dropped_regions_as_zero_rows():
    model = small_model().train()
    features = torch.rand(8, 9, 20) + 1
    torch.manual_seed(4)
    kept = model.region_keep_mask(features)
    torch.manual_seed(4)
    model.encode_images(features)
    hidden = model.image_mlp.linears[0](features * kept[..., None]).flatten(0, 1)
    expected = 0.1 * hidden.mean(0).detach()  # the running mean after one step from 0, momentum 0.1
    torch.testing.assert_close(model.image_mlp.norms[0].running_mean, expected, atol=1e-6, rtol=1e-5)

    other = small_model(batchnorm_counts_dropped=False).train()
    torch.manual_seed(4)
    other.encode_images(features)
    hidden = other.image_mlp.linears[0](features)[kept]
    torch.testing.assert_close(other.image_mlp.norms[0].running_mean, 0.1 * hidden.mean(0).detach())


def test_caption_augmentation_rates_order_and_padding():
    model = small_model(vocab_size=100_000).train()
    n, length = 3000, 20
    tokens = torch.arange(1, length + 1).repeat(n, 1)
    lengths = torch.full((n,), length)
    torch.manual_seed(5)
    out, new_lengths = model.augment_words(tokens, lengths)
    assert new_lengths.min() >= 1 and out.shape == tokens.shape
    real = torch.arange(length)[None] < new_lengths[:, None]
    assert out[~real].eq(0).all()
    total = n * length
    assert abs(1 - new_lengths.sum().item() / total - 0.2 * 0.4) < 0.005  # deleted
    assert abs(out.eq(100_000).sum().item() / total - 0.2 * 0.5) < 0.005  # <mask>
    original = real & (out >= 1) & (out <= length)
    assert abs(1 - original.sum().item() / total - 0.2) < 0.006  # all picked words changed or gone
    for row, keep in zip(out[:200], original[:200], strict=True):
        assert torch.all(row[keep].diff() > 0)  # the untouched words keep their order
    model.eval()
    tokens = torch.randint(1, 100, (4, 9))
    with torch.no_grad():
        assert model.encode_texts(tokens, torch.full((4,), 9)) is not None
    assert model.config.vocab_size == 100_000 and model.text_encoder.embed.num_embeddings == 100_001


def test_caption_augmentation_never_deletes_a_whole_caption():
    model = small_model(word_augment=0.99, word_mask_share=0.0, word_random_share=0.0).train()
    torch.manual_seed(6)
    tokens, lengths = model.augment_words(torch.tensor([[5, 6, 0], [7, 0, 0]] * 500), torch.tensor([2, 1] * 500))
    assert lengths.min() == 1
    whole = lengths == torch.tensor([2, 1] * 500)
    assert torch.equal(tokens[whole], torch.tensor([[5, 6, 0], [7, 0, 0]] * 500)[whole])


def test_padded_words_change_nothing_while_training_either():
    model = small_model(word_augment=0.0).train()
    tokens = torch.randint(4, 40, (5, 7))
    lengths = torch.tensor([7, 3, 5, 1, 6])
    tokens = tokens * (torch.arange(7) < lengths[:, None])
    padded = torch.nn.functional.pad(tokens, (0, 4), value=0)
    noisy = padded.clone()
    noisy[:, 7:] = 9  # whatever lies beyond a caption's length is never read
    vectors = [model.encode_texts(t, lengths)["vector"] for t in (tokens, padded, noisy)]
    torch.testing.assert_close(vectors[1], vectors[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(vectors[2], vectors[0], atol=1e-6, rtol=0)


def test_embeddings_are_unit_vectors_scored_by_dot_products():
    model = small_model().eval()
    features = torch.rand(4, 9, 20)
    lengths = torch.tensor([3, 8, 5, 2, 6, 1])
    tokens = torch.randint(4, 40, (6, 8)) * (torch.arange(8) < lengths[:, None])
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
        scores = model.similarity(features, tokens, lengths)
    torch.testing.assert_close(images["vector"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(texts["vector"].norm(dim=1), torch.ones(6))
    torch.testing.assert_close(scores, images["vector"] @ texts["vector"].T)
    unnormalised = small_model(normalize_images=False, normalize_texts=False).eval()
    with torch.no_grad():
        assert not torch.allclose(unnormalised.encode_images(features)["vector"].norm(dim=1), torch.ones(4))


def test_preset_encodes_the_official_settings():
    config = build_run_config(PRESET)
    model = config.model
    assert (model.embed_size, model.text.word_dim, model.text.bidirectional, model.text.normalize) == (
        1024,
        300,
        True,
        False,
    )
    assert (model.image_pool.pe_dim, model.image_pool.hidden, model.image_pool.temperature) == (32, 32, 0.1)
    assert (model.region_drop, model.word_augment, model.word_mask_share, model.word_random_share) == (
        0.2,
        0.2,
        0.5,
        0.1,
    )
    train_config, loss = config.train, config.loss
    assert (train_config.epochs, train_config.learning_rate, train_config.lr_decay_epochs) == (25, 5e-4, 15)
    assert (train_config.batch_size, train_config.grad_clip) == (128, 2.0)
    assert (loss.margin, loss.negatives, loss.warmup_epochs, loss.reduction, loss.exclude_same_image) == (
        0.2,
        "hardest",
        1,
        "sum",
        False,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_pool": {"pe_dim": 7}}, "pe_dim"),
        ({"region_drop": 1.0}, "region_drop"),
        ({"word_mask_share": 0.8, "word_random_share": 0.3}, "share"),
        ({"mask_token": False}, "mask_token"),
    ],
)
def test_bad_settings_are_explained(change, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config(PRESET, {"model": change})


N_TEST = 50


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    spec = SyntheticSpec(n_regions=8, feature_dim=32, regions_per_object=(1, 2))
    return make_synthetic(
        tmp_path_factory.mktemp("scenes"), {"train": 400, "dev": 40, "test": N_TEST}, seed=5, spec=spec
    )


def test_short_training_beats_chance_by_a_wide_margin(scenes, tmp_path):
    fast = {
        "model": {"embed_size": 64, "text": {"word_dim": 32}},
        "train": {"epochs": 4, "batch_size": 32, "learning_rate": 2e-3, "checkpoint_every": 0},
        "loss": {"negatives": "sum", "warmup_epochs": 0, "exclude_same_image": True},
    }
    fast["train"]["dev_max_captions"] = None
    torch.manual_seed(0)
    state = train(build_run_config(PRESET, fast), scenes, tmp_path, progress=False, log=lambda *_: None)
    metrics = evaluate_split(load_checkpoint(tmp_path / "best.pt"), PrecompSplit(scenes, "test"), progress=False)
    chance_t2i_r10 = 100 * 10 / N_TEST
    assert metrics["t2i"]["r10"] > 2.5 * chance_t2i_r10, metrics
    assert metrics["rsum"] > 2 * 6 * 100 * 5.5 / N_TEST, metrics  # twice the chance recalls (~66)
    assert state.best_rsum > 0 and len(state.history) == 4
