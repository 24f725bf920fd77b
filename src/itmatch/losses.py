"""Bidirectional triplet ranking loss on a batch's image x caption score matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from itmatch.config import LossConfig, hardest_k


def triplet_ranking_loss(
    scores: Tensor,
    config: LossConfig,
    image_ids: Tensor | None = None,
    negatives: str | None = None,
) -> Tensor:
    """Hinge loss of every negative against the matching pair (the diagonal of `scores`).

    Row i is image i, column j caption j, and pair (i, i) matches. Both directions count: captions
    ranked for an image and images ranked for a caption. "hardest" keeps each query's hardest
    negative, "k:N" its N hardest, "sum" all of them; `negatives` overrides the config's (the
    trainer passes "sum" during the warm-up epochs). With `image_ids`, other captions of the same
    image in the batch are not treated as negatives.
    """
    negatives = negatives or config.negatives
    positive = scores.diagonal()
    caption_cost = (config.margin + scores - positive[:, None]).clamp(min=0)  # for each image (row)
    image_cost = (config.margin + scores - positive[None, :]).clamp(min=0)  # for each caption (column)
    not_negative = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        not_negative = not_negative | (image_ids[:, None] == image_ids[None, :])
    caption_cost = caption_cost.masked_fill(not_negative, 0)
    image_cost = image_cost.masked_fill(not_negative, 0)
    k = hardest_k(negatives)
    if k is not None:
        k = min(k, len(scores))
        caption_cost, image_cost = caption_cost.topk(k, dim=1).values, image_cost.topk(k, dim=0).values
    total = caption_cost.sum() + image_cost.sum()
    return total if config.reduction == "sum" else total / len(scores)
