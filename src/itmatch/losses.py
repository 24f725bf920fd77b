"""Training objectives shared by the models: the bidirectional triplet ranking loss on a batch's
image x caption score matrix, and the context a model's `training_losses` reads.

With `train.global_negatives` under torchrun, a batch's in-batch losses see the global batch (every
process's items, in rank order): `batch_scores` gathers the other processes' caption encodings,
scores this process's images against all of them and gathers the strips, with gradients flowing
back to each process's own part; `TrainingContext.gather` does the same for any per-item tensor
a model's own loss needs (labels, embeddings). Every process then computes the same global loss,
and DistributedDataParallel's gradient average equals the gradient of one process with the
whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from itmatch.config import LossConfig, hardest_k
from itmatch.distributed import gather_shards, gather_with_grad, max_over_processes, pad_axis
from itmatch.models.base import Encoded, Matcher
from itmatch.scoring import score_grid


@dataclass(frozen=True)
class TrainingContext:
    """What a model's loss terms may depend on besides the batch: the loss settings, the epoch
    (0-based; warm-ups and schedules read it) and whether in-batch losses see the global batch
    of all processes (`train.global_negatives` under torchrun)."""

    loss: LossConfig
    epoch: int = 0
    global_batch: bool = False

    def gather(self, part: Tensor) -> Tensor:
        """A per-item tensor of this process's batch, extended to the global batch (gradients flow
        back to this process's items; integer tensors such as labels carry none); unchanged
        without global negatives."""
        if not self.global_batch:
            return part
        return gather_with_grad(part) if part.is_floating_point() else gather_shards(part)

    def gather_encoded(self, encoded: Encoded) -> Encoded:
        """Encodings of the global batch: padded word axes are padded to the longest caption of
        all processes first, so that every process's part has the same shape."""
        if not self.global_batch:
            return encoded
        tensors = encoded.tensors
        if encoded.padded:
            some = tensors[next(iter(encoded.padded))]
            length = max_over_processes(some.shape[1], some.device)
            tensors = {k: pad_axis(v, 1, length) if k in encoded.padded else v for k, v in tensors.items()}
            tensors = {k: pad_axis(v, 2, length) if k in encoded.square else v for k, v in tensors.items()}
        gathered = {key: self.gather(value) for key, value in tensors.items()}
        return Encoded(gathered, encoded.padded, encoded.square)

    @property
    def negatives(self) -> str:
        """The triplet negatives of this epoch: "sum" during the warm-up epochs."""
        return "sum" if self.epoch < self.loss.warmup_epochs else self.loss.negatives


def batch_scores(model: Matcher, images: Encoded, texts: Encoded, context: TrainingContext) -> Tensor:
    """The (images, captions) score matrix of a training batch, of the global batch under global
    negatives: this process's images are scored against every process's captions and the strips
    gathered (scoring work is split, not repeated)."""
    if not context.global_batch:
        return score_grid(model, images, texts)
    return context.gather(score_grid(model, images, context.gather_encoded(texts)))


def triplet_term(scores: Tensor, batch: Mapping[str, Tensor], context: TrainingContext) -> Tensor:
    """The triplet ranking loss of a batch whose caption j belongs to image j (pair (j, j)); the
    scores of the global batch under global negatives (`batch_scores`)."""
    image_ids = context.gather(batch["image_index"].to(scores.device)) if context.loss.exclude_same_image else None
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
