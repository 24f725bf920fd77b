"""Shapes, invariants and input checks of every architecture behind the Matcher interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from itmatch import build_run_config, create_model
from itmatch.config import preset_names
from itmatch.errors import InputError
from itmatch.losses import triplet_ranking_loss
from itmatch.models.base import Encoded
from itmatch.models.cmcan import neighbour_counts
from itmatch.scoring import ScoringOptions, score_grid, score_pairs

SMALL = {"vocab_size": 30, "img_dim": 20, "embed_size": 32, "text": {"word_dim": 16}}
N_REGIONS = 9


def small_model(preset: str):
    """The preset at small sizes: every size field its config has is shrunk."""
    config = build_run_config(preset)
    fields = {f.name for f in dataclasses.fields(config.model)}
    shrunk = {**SMALL, "sim_dim": 8, "n_regions": N_REGIONS, "blocks": 4}
    sizes = {key: value for key, value in shrunk.items() if key in fields}
    torch.manual_seed(0)
    return create_model(config.architecture, build_run_config(preset, {"model": sizes}).model)


def inputs(n_images=4, n_captions=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n_images, N_REGIONS, 20, generator=generator)
    lengths = torch.randint(2, 8, (n_captions,), generator=generator)
    tokens = torch.randint(4, 30, (n_captions, 8), generator=generator) * (torch.arange(8) < lengths[:, None])
    adjacency = (torch.rand(n_images, N_REGIONS, N_REGIONS, generator=generator) > 0.7).float()
    return features, tokens, lengths, adjacency


def image_extras(adjacency):
    """The image inputs besides the features that some model reads: the region graph, and boxes
    and image sizes (w, h) in pixels."""
    n = len(adjacency)
    corners = torch.arange(N_REGIONS * 2, dtype=torch.float32).view(1, N_REGIONS, 2).expand(n, -1, -1) * 7 % 50
    boxes = torch.cat([corners, corners + 10 + corners.flip(-1) % 13], dim=-1)
    return {"region_graph": adjacency, "boxes": boxes, "image_sizes": torch.tensor([[80.0, 60.0]] * n)}


def batch_extras(adjacency):
    extras = image_extras(adjacency)
    return {"region_graph": adjacency, "boxes": extras["boxes"], "image_size": extras["image_sizes"]}


@pytest.fixture(params=preset_names())
def model(request):
    return small_model(request.param).eval()


def test_similarity_shape_and_values(model):
    features, tokens, lengths, adjacency = inputs()
    with torch.no_grad():
        sims = model.similarity(features, tokens, lengths, **image_extras(adjacency))
    assert sims.shape == (4, 6) and torch.isfinite(sims).all()


def test_score_equals_pair_by_pair_scoring(model):
    features, tokens, lengths, adjacency = inputs()
    with torch.no_grad():
        images, texts = (
            model.encode_image_batch({"features": features, **batch_extras(adjacency)}),
            model.encode_texts(tokens, lengths),
        )
        batched = score_grid(model, images, texts)
        single = torch.tensor(
            [
                [
                    score_grid(model, images.select(slice(i, i + 1)), texts.select(slice(j, j + 1))).item()
                    for j in range(6)
                ]
                for i in range(4)
            ]
        )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_extra_padding_and_caption_order_change_nothing(model):
    features, tokens, lengths, adjacency = inputs()
    padded = torch.nn.functional.pad(tokens, (0, 5))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.similarity(features, tokens, lengths, **image_extras(adjacency))
        other = model.similarity(features, padded[order], lengths[order], **image_extras(adjacency))
    torch.testing.assert_close(other, reference[:, order], atol=1e-5, rtol=0)


def test_training_gradients_are_finite_with_padded_captions(model):
    model.train()
    features, tokens, lengths, adjacency = inputs(n_images=6, n_captions=6)
    scores = model.similarity(features, tokens, lengths, **image_extras(adjacency))
    triplet_ranking_loss(scores, build_run_config("vsepp").loss).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_embedding_model_scores_by_dot_product():
    model = small_model("vsepp").eval()
    features, tokens, lengths, _ = inputs()
    with torch.no_grad():
        images, texts = model.encode_images(features), model.encode_texts(tokens, lengths)
    torch.testing.assert_close(images["vector"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(score_grid(model, images, texts), images["vector"] @ texts["vector"].T)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, t, n, a: (f[..., :5], t, n, a), "20-d region features"),
        (lambda f, t, n, a: (f.float().masked_fill(torch.rand(f.shape) > 0.9, float("nan")), t, n, a), "NaN"),
        (lambda f, t, n, a: (f, t + 100_000, n, a), "word ids"),  # past a vocabulary or a tokenizer
        (lambda f, t, n, a: (f, t, n + 10, a), "caption lengths"),
        (lambda f, t, n, a: (f, t, n[:3], a), "lengths"),
        (lambda f, t, n, a: (f, t.float(), n, a), "integer tensor"),
    ],
)
def test_bad_inputs_are_explained(model, change, message):
    features, tokens, lengths, adjacency = change(*inputs())
    with pytest.raises(InputError, match=message):
        model.similarity(features, tokens, lengths, **image_extras(adjacency))


def test_cmcan_needs_the_region_graph_or_boxes():
    model = small_model("cmcan-official").eval()
    features, tokens, lengths, _ = inputs()
    with pytest.raises(InputError, match="boxes and image_sizes"):
        model.similarity(features, tokens, lengths)
    with pytest.raises(InputError, match="regions per image"):
        model.similarity(features[:, :5], tokens, lengths, region_graph=torch.ones(4, 5, 5))


def test_cmcan_derives_the_graph_from_boxes():
    model = small_model("cmcan-paper").eval()
    features, tokens, lengths, _ = inputs()
    corners = torch.rand(4, N_REGIONS, 2) * 50
    boxes = torch.cat([corners, corners + 10 + torch.rand(4, N_REGIONS, 2) * 40], dim=-1)
    sizes = torch.tensor([[100, 100]] * 4)
    with torch.no_grad():
        sims = model.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
    assert sims.shape == (4, 6)


def test_official_neighbourhood_counts_fill_empty_slots_with_the_region_itself():
    adjacency = torch.eye(6)[None].clone()
    adjacency[0, 0, 3] = adjacency[0, 0, 5] = 1
    counts = neighbour_counts(adjacency, n_slots=5)
    assert counts.sum(-1).eq(5).all()
    assert counts[0, 0].tolist() == [3, 0, 0, 1, 0, 1]  # two neighbours + itself three times
    assert torch.equal(neighbour_counts(adjacency, None), adjacency)


def test_encoded_cat_pads_and_select_trims_the_word_axis():
    short = Encoded(
        {"words": torch.ones(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.bool)}, frozenset({"words", "mask"})
    )
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, :5] = True
    long = Encoded({"words": torch.ones(1, 5, 4), "mask": mask}, frozenset({"words", "mask"}))
    joined = Encoded.cat([short, long])
    assert joined["words"].shape == (3, 5, 4) and joined["mask"].sum().item() == 11
    assert joined.select(slice(0, 2))["words"].shape == (2, 3, 4)


def test_scoring_a_list_of_pairs_gives_the_grid_entries(model):
    features, tokens, lengths, adjacency = inputs(n_images=5, n_captions=7)
    generator = torch.Generator().manual_seed(3)
    image_index, text_index = (
        torch.randint(0, 5, (40,), generator=generator),
        torch.randint(0, 7, (40,), generator=generator),
    )
    with torch.no_grad():
        images, texts = (
            model.encode_image_batch({"features": features, **batch_extras(adjacency)}),
            model.encode_texts(tokens, lengths),
        )
        grid = score_grid(model, images, texts)
        listed = score_pairs(
            model, images, texts, image_index, text_index, ScoringOptions(memory_budget=1)
        )  # 1 pair a chunk
    torch.testing.assert_close(listed, grid[image_index, text_index], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_scores_stay_close(model, precision):
    features, tokens, lengths, adjacency = inputs()
    with torch.no_grad():
        exact = model.similarity(features, tokens, lengths, **image_extras(adjacency))
        reduced = model.similarity(features, tokens, lengths, **image_extras(adjacency), precision=precision)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, exact, atol=0.05, rtol=0.05)


def test_unknown_precision_is_refused(model):
    features, tokens, lengths, adjacency = inputs()
    with pytest.raises(InputError, match="precision"):
        model.similarity(features, tokens, lengths, **image_extras(adjacency), precision="fp8")


def test_compiled_scoring_equals_eager():
    model = small_model("cmcan-official").eval()  # (compiling costs about a minute here, once)
    features, tokens, lengths, adjacency = inputs(n_images=5, n_captions=7)
    pairs = torch.tensor([0, 4, 2, 2]), torch.tensor([6, 0, 3, 5])
    with torch.no_grad():
        images, texts = (
            model.encode_image_batch({"features": features, **batch_extras(adjacency)}),
            model.encode_texts(tokens, lengths),
        )
        eager = score_grid(model, images, texts, ScoringOptions(memory_budget=1 << 14))  # several tiles
        compiled = score_grid(model, images, texts, ScoringOptions(memory_budget=1 << 14, compile=True))
        listed = score_pairs(model, images, texts, *pairs, ScoringOptions(compile=True))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(listed, eager[pairs], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["cmcan-official", "scan-t2i-lse", "sgraf-sgr"])
def test_low_precision_scores_are_not_rounded_to_the_low_precision_type(preset):
    # A bf16 scoring head would round scores to steps of 2^-9 near 1, tying near-equal candidates.
    model = small_model(preset).eval()
    features, tokens, lengths, adjacency = inputs()
    with torch.no_grad():
        scores = model.similarity(features, tokens, lengths, **image_extras(adjacency), precision="bf16")
    assert (scores != scores.bfloat16().float()).any()
