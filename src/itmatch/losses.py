"""Training objectives shared by the models: the bidirectional triplet ranking loss on a batch's
image x caption score matrix, and the context a model's `training_losses` reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from itmatch.config import LossConfig, hardest_k


@dataclass(frozen=True)
class TrainingContext:
    """What a model's loss terms may depend on besides the batch: the loss settings and the epoch
    (0-based; warm-ups and schedules read it)."""

    loss: LossConfig
    epoch: int = 0

    @property
    def negatives(self) -> str:
        """The triplet negatives of this epoch: "sum" during the warm-up epochs."""
        return "sum" if self.epoch < self.loss.warmup_epochs else self.loss.negatives


def triplet_term(scores: Tensor, batch: Mapping[str, Tensor], context: TrainingContext) -> Tensor:
    """The triplet ranking loss of a batch whose caption j belongs to image j (pair (j, j))."""
    image_ids = batch["image_index"].to(scores.device) if context.loss.exclude_same_image else None
    return triplet_ranking_loss(scores, context.loss, image_ids, context.negatives)


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
