"""Retrieval with any matcher: the best images for sentences, the best sentences for images."""

from __future__ import annotations

import torch
from torch import Tensor

from itmatch.errors import InputError
from itmatch.models.base import Encoded, Matcher


@torch.no_grad()
def search_images(model: Matcher, images: Encoded, queries: list[str], k: int = 10) -> tuple[Tensor, Tensor]:
    """Top-k images for each text query: (scores, image indices), both (n_queries, k)."""
    if model.vocab is None:
        raise InputError("the model has no vocabulary to read text queries with")
    tokens, lengths = model.vocab.encode_batch(queries)
    scores = model.score(images, model.encode_texts(tokens, lengths)).T
    return scores.topk(min(k, scores.shape[1]), dim=1)


@torch.no_grad()
def search_texts(model: Matcher, images: Encoded, texts: Encoded, k: int = 10) -> tuple[Tensor, Tensor]:
    """Top-k texts for each image: (scores, text indices), both (n_images, k)."""
    scores = model.score(images, texts)
    return scores.topk(min(k, scores.shape[1]), dim=1)
