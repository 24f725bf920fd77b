"""evaluate_split: one model, ensembles (averaged score matrices), inverted softmax, folds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itmatch import build_run_config
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import build_vocab_for_dir
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.evaluation.runner import encode_split, evaluate_split
from itmatch.models.registry import build_model
from itmatch.scoring import score_grid

SIZES = {"embed_size": 16, "text": {"word_dim": 8}}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    spec = SyntheticSpec(n_regions=6, feature_dim=12)
    data = make_synthetic(tmp_path_factory.mktemp("data"), {"train": 10, "dev": 10, "test": 20}, seed=4, spec=spec)
    return PrecompSplit(data, "test")


def untrained(preset: str, split: PrecompSplit, seed: int):
    torch.manual_seed(seed)
    vocab = build_vocab_for_dir(split.data_dir, threshold=1)
    sizes = {
        **SIZES,
        "vocab_size": len(vocab),
        "img_dim": split.feature_dim,
        "sim_dim": 8,
        "n_regions": split.n_regions,
    }
    fields = {f.name for f in dataclasses.fields(build_run_config(preset).model)}
    model = build_model(build_run_config(preset, {"model": {k: v for k, v in sizes.items() if k in fields}}))
    model.vocab = vocab
    return model.eval()


def full_scores(model, split) -> torch.Tensor:
    images, texts = encode_split(model, split, progress=False)
    with torch.no_grad():
        return score_grid(model, images, texts).float()


def test_single_model_matches_metrics_of_its_score_matrix(split):
    model = untrained("cmcan-official", split, 0)
    result = evaluate_split(model, split, progress=False)
    expected = retrieval_metrics(full_scores(model, split).numpy())
    assert result["rsum"] == pytest.approx(expected["rsum"]) and result["t2i"] == expected["t2i"]


def test_ensemble_averages_the_score_matrices(split):
    first, second = untrained("cmcan-official", split, 1), untrained("vsepp", split, 2)
    average = (full_scores(first, split) + full_scores(second, split)) / 2
    result = evaluate_split([first, second], split, progress=False)
    expected = retrieval_metrics(average.numpy())
    assert result["i2t"] == pytest.approx(expected["i2t"]) and result["t2i"] == pytest.approx(expected["t2i"])


def test_folds_and_inverted_softmax_together(split):
    model = untrained("vsepp", split, 3)
    result = evaluate_split([model, model], split, protocol="coco-5fold", progress=False, inverted_softmax=0.1)
    assert result["n_folds"] == 5 and result["inverted_softmax"] == 0.1 and len(result["folds"]) == 5


@pytest.mark.parametrize("candidates", ["top-k", "margin"])
def test_reranking_everything_equals_exhaustive_scoring(split, candidates):
    model = untrained("cmcan-official", split, 5)
    exhaustive = evaluate_split(model, split, progress=False)
    reranked = evaluate_split(model, split, progress=False, rerank_k=split.n_captions, candidates=candidates)
    assert reranked["candidates"] == candidates
    assert reranked["pairs_scored"] == exhaustive["pairs_scored"] == split.n_images * split.n_captions
    assert reranked["i2t"] == exhaustive["i2t"] and reranked["t2i"] == exhaustive["t2i"]


def test_margin_reranking_spends_its_budget_in_every_fold(split):
    model = untrained("cmcan-official", split, 11)
    result = evaluate_split(model, split, "coco-5fold", progress=False, rerank_k=3, candidates="margin")
    fold_images, fold_captions = split.n_images // 5, split.n_captions // 5
    assert result["n_folds"] == 5 and result["pairs_scored"] == 5 * 3 * max(fold_images, fold_captions)


def test_reranked_candidates_rank_first_in_full_model_order(split):
    from itmatch.retrieval import embeddings, nearest, two_stage_scores

    model = untrained("cmcan-official", split, 6)
    images, texts = encode_split(model, split, progress=False)
    first_images, first_texts = embeddings(model, images), embeddings(model, texts)
    scores, pairs = two_stage_scores(model, images, texts, first_images, first_texts, k=3)
    full, first = full_scores(model, split), first_images @ first_texts.T
    # scored: each caption's top 3 images and each image's top 3 captions, in both directions
    scored = torch.zeros_like(full, dtype=torch.bool)
    scored.scatter_(0, nearest(first_images, first_texts, 3).T, True)
    scored.scatter_(1, nearest(first_texts, first_images, 3), True)
    assert pairs == scored.sum() <= 3 * (split.n_images + split.n_captions)
    for caption in range(split.n_captions):
        assert_ranked(scores[:, caption], scored[:, caption], full[:, caption], first[:, caption])
    for image in range(split.n_images):
        assert_ranked(scores[image], scored[image], full[image], first[image])


@settings(max_examples=40, deadline=None)
@given(
    n_images=st.integers(1, 7),
    n_texts=st.integers(1, 9),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    levels=st.sampled_from([3, 1000]),  # 3: many tied scores
)
def test_margin_candidates_are_the_pairs_closest_to_a_best_score_brute_force(n_images, n_texts, k, seed, levels):
    from itmatch.retrieval import candidate_pairs

    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(levels, (n_images, n_texts), generator=generator).float() / levels
    pairs = candidate_pairs(first, k, "margin", torch.empty(n_images, 1), torch.empty(n_texts, 1))
    assert len(pairs) == len(set(pairs.tolist())) == min(k * max(n_images, n_texts), n_images * n_texts)
    # each pair's shortfall below the best score of its caption or of its image, whichever is less
    shortfall = {
        i * n_texts + t: min(
            max(first[j, t].item() for j in range(n_images)) - first[i, t].item(),
            max(first[i, u].item() for u in range(n_texts)) - first[i, t].item(),
        )
        for i in range(n_images)
        for t in range(n_texts)
    }
    chosen = set(pairs.tolist())
    worst_chosen = max(shortfall[p] for p in chosen)
    assert all(shortfall[p] >= worst_chosen for p in shortfall if p not in chosen)


def test_margin_candidates_give_an_ambiguous_caption_more_images():
    from itmatch.retrieval import candidate_pairs

    first = torch.eye(6) * 0.9  # captions 1-5: one clear best image each
    first[:, 0] = torch.linspace(0.50, 0.55, 6)  # caption 0: six close contenders
    pairs = candidate_pairs(first, 2, "margin", torch.empty(6, 1), torch.empty(6, 1))
    per_caption = torch.bincount(pairs % 6, minlength=6)
    assert len(pairs) == 12 and per_caption[0] == 6 and (per_caption[1:] <= 2).all()


def assert_ranked(scores, scored, full, first):
    """One query's ranking: its scored items first in full-model order, then the rest in
    first-stage order."""
    order = scores.argsort(descending=True)
    n_scored = int(scored.sum())
    assert scored[order[:n_scored]].all()
    top, rest = order[:n_scored], order[n_scored:]
    assert (full[top][:-1] >= full[top][1:] - 1e-6).all()  # (the lift above first-stage scores rounds)
    assert (first[rest][:-1] >= first[rest][1:]).all()


def test_companion_first_stage_and_models_without_embeddings(split):
    from itmatch.errors import InputError

    scan, companion = untrained("scan-t2i-ave", split, 7), untrained("vsepp", split, 8)
    with pytest.raises(InputError, match="no embedding for a first stage"):
        evaluate_split(scan, split, progress=False, rerank_k=5)
    result = evaluate_split(scan, split, progress=False, rerank_k=5, first_stage=companion)
    assert 0 < result["pairs_scored"] <= 5 * (split.n_images + split.n_captions)
    with pytest.raises(InputError, match="only used with rerank_k"):
        evaluate_split(scan, split, progress=False, first_stage=companion)


def test_bad_reranking_options_are_refused_before_any_work(split):
    from itmatch.errors import InputError
    from itmatch.retrieval import search_images

    model = untrained("cmcan-official", split, 10)
    with pytest.raises(InputError, match="rerank_k must be at least 1, got 0"):
        evaluate_split(model, split, progress=False, rerank_k=0)
    with pytest.raises(InputError, match="unknown candidates 'best'; choose one of top-k, margin"):
        evaluate_split(model, split, progress=False, rerank_k=5, candidates="best")
    images, _ = encode_split(model, split, progress=False)
    with pytest.raises(InputError, match="rerank_k must be at least 1, got -3"):
        search_images(model, images, ["a red dog"], rerank_k=-3)


def test_search_images_with_reranking_everything_matches_exhaustive(split):
    from itmatch.retrieval import search_images

    model = untrained("sgraf-sgr", split, 9)
    images, _ = encode_split(model, split, progress=False)
    queries = split.captions[:4]
    exact_scores, exact_top = search_images(model, images, queries, k=5)
    scores, top = search_images(model, images, queries, k=5, rerank_k=split.n_images)
    assert torch.equal(top, exact_top)
    torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)
