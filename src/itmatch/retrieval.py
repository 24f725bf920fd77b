"""Retrieval with any matcher: exhaustive scoring, or two stages.

Two-stage retrieval (the standard remedy for large galleries): a first stage ranks by embedding
dot products, searched with a faiss index, and the full model rescores only each query's top K.
The embeddings are the model's own (`Matcher.embedding_key`, e.g. the global vectors of a
cross-attention model) or those of a companion embedding model trained on the same data.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

from itmatch.errors import InputError
from itmatch.evaluation.posthoc import PostHoc
from itmatch.models.abilities import has_embedding
from itmatch.models.base import Encoded, Matcher
from itmatch.scoring import DEFAULT, ScoringOptions, score_grid, score_pairs


def embeddings(model: Matcher, encoded: Encoded) -> Tensor:
    """The first-stage vectors of encoded items (float32, on the CPU)."""
    if not has_embedding(model):
        raise InputError(
            f"{model.architecture} has no embedding for a first stage: give a companion embedding model "
            "trained on the same data (one that scores by a dot product; see `itmatch models`)"
        )
    return encoded[model.embedding_key].detach().float().cpu()


def nearest(gallery: Tensor, queries: Tensor, k: int) -> Tensor:
    """Indices (n_queries, k) of each query's k best gallery vectors by dot product (faiss)."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.numpy()))
    _, ids = index.search(np.ascontiguousarray(queries.numpy()), min(k, len(gallery)))
    return torch.from_numpy(ids)


CANDIDATES = ("top-k", "margin")


def check_rerank(rerank_k: int | None, candidates: str = "top-k") -> None:
    if rerank_k is not None and rerank_k < 1:
        raise InputError(f"rerank_k must be at least 1, got {rerank_k}")
    if candidates not in CANDIDATES:
        raise InputError(f"unknown candidates {candidates!r}; choose one of {', '.join(CANDIDATES)}")


def two_stage_scores(
    model: Matcher,
    images: Encoded,
    texts: Encoded,
    first_images: Tensor,
    first_texts: Tensor,
    k: int,
    scoring: ScoringOptions = DEFAULT,
    candidates: str = "top-k",
) -> tuple[Tensor, int]:
    """The (n_images, n_texts) score matrix for ranking both ways after the full model rescored
    the first stage's candidates, and the number of pairs it scored.

    Every scored pair ranks above every unscored one, in both directions: a pair scored as a
    caption's candidate also counts for its image, at no extra cost. Unscored pairs keep their
    first-stage order, so the usual metrics (R@K, medr, meanr) apply unchanged. The candidates
    are those of `candidate_pairs`.
    """
    n_texts = len(first_texts)
    first = first_images @ first_texts.T
    pairs = candidate_pairs(first, k, candidates, first_images, first_texts)
    full = score_pairs(model, images, texts, pairs // n_texts, pairs % n_texts, scoring).cpu()
    scores = first.clone()
    scores.view(-1)[pairs] = full + (first.max() - full.min() + 1)  # above every first-stage score
    return scores, len(pairs)


def candidate_pairs(first: Tensor, k: int, candidates: str, first_images: Tensor, first_texts: Tensor) -> Tensor:
    """Flat indices into the (n_images, n_texts) first-stage scores `first` of the pairs to rescore.

    "top-k": each caption's k best images and each image's k best captions (faiss searches); the
    union holds at least k x max(n_images, n_texts) pairs, often a little more.
    "margin": exactly k x max(n_images, n_texts) pairs, shared out by the first stage's
    confidence: the pairs whose score falls least below the best score of their caption or of
    their image. A caption whose best images stand out gets few candidates, one with many close
    contenders (an ambiguous caption, or a first stage unsure of it) gets more.
    """
    check_rerank(k, candidates)
    n_images, n_texts = first.shape
    if candidates == "margin":
        below_best = torch.minimum(first.amax(0), first.amax(1, keepdim=True)).sub_(first)  # one n x n buffer
        budget = min(k * max(n_images, n_texts), first.numel())
        return below_best.flatten().topk(budget, largest=False).indices
    text_candidates = nearest(first_images, first_texts, k)  # images for each caption
    image_candidates = nearest(first_texts, first_images, k)  # captions for each image
    t2i = text_candidates.flatten() * n_texts + torch.arange(n_texts).repeat_interleave(text_candidates.shape[1])
    i2t = torch.arange(n_images).repeat_interleave(image_candidates.shape[1]) * n_texts + image_candidates.flatten()
    return torch.unique(torch.cat([t2i, i2t]))


@torch.no_grad()
def search_images(
    model: Matcher,
    images: Encoded,
    queries: list[str],
    k: int = 10,
    rerank_k: int | None = None,
    first_stage: tuple[Matcher, Encoded] | None = None,
    posthoc: PostHoc | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k images for each text query: (scores, image indices), both (n_queries, k).

    With `rerank_k`, only each query's `rerank_k` best images by embedding (the model's own, or
    `first_stage` = (companion model, its encoding of the same images)) are scored by the model.
    `posthoc` stages (exhaustive scoring only) treat the batch of queries as the query set, and
    the scores returned are theirs.
    """
    check_rerank(rerank_k)
    if posthoc is not None and posthoc.active and rerank_k is not None:
        raise InputError("post-hoc stages need every score: use them without rerank_k")
    texts = encode_queries(model, queries)
    if rerank_k is None:
        scores = score_grid(model, images, texts)
        scores = (posthoc([scores]).t2i if posthoc else scores).T
        return scores.topk(min(k, scores.shape[1]), dim=1)
    stage_model, stage_images = first_stage or (model, images)
    stage_texts = texts if first_stage is None else encode_queries(stage_model, queries)
    candidates = nearest(embeddings(stage_model, stage_images), embeddings(stage_model, stage_texts), rerank_k)
    return rerank(model, images, texts, candidates, k)


@torch.no_grad()
def rerank(
    model: Matcher, images: Encoded, texts: Encoded, candidates: Tensor, k: int, queries: str = "texts"
) -> tuple[Tensor, Tensor]:
    """The k best of each query's candidates by the full model: (scores, gallery indices), (n_queries, k).

    `queries` says which side the queries are: "texts" (row q of `candidates` holds image indices
    for texts[q]) or "images" (text indices for images[q]).
    """
    n_queries, per_query = candidates.shape
    query_index = torch.arange(n_queries).repeat_interleave(per_query)
    pairs = (candidates.flatten(), query_index) if queries == "texts" else (query_index, candidates.flatten())
    scores = score_pairs(model, images, texts, *pairs)
    best, order = scores.view(n_queries, -1).cpu().topk(min(k, per_query), dim=1)
    return best, candidates.gather(1, order)


@torch.no_grad()
def search_texts(
    model: Matcher, images: Encoded, texts: Encoded, k: int = 10, posthoc: PostHoc | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k texts for each image: (scores, text indices), both (n_images, k). `posthoc` stages
    treat the images as the query set, and the scores returned are theirs."""
    scores = score_grid(model, images, texts)
    scores = posthoc([scores]).i2t if posthoc else scores
    return scores.topk(min(k, scores.shape[1]), dim=1)


def encode_queries(model: Matcher, queries: list[str]) -> Encoded:
    """Text queries read with the model's tokenizer (its word vocabulary, or a pretrained text
    encoder's own) and encoded."""
    return model.encode_texts(*model.tokenize(queries))
