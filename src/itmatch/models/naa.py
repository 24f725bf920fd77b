"""NAA: "A Neighbor-aware Approach for Image-text Matching" (Liu, Mao, Zang and Wang, ICASSP 2019),
an INTERPRETATION: no code was released and the paper's loss could not be read here (only its
title, abstract-level description and reported numbers are known, ../shared/notes/zoo2.md sec. 7).

- intra-attention in each modality: regions and BiGRU word states are each pooled by a
  self-attention that scores every item against the mean of its own modality
  (`layers.AttentionPool`, the dual-attention form), then projected to the joint space;
- the neighbour-aware ranking loss, read as the bidirectional hinge loss in which an item's
  semantic neighbours (the other captions of its image, in P x K batches) count as positives too:
  * "ranking": every caption of an image must outscore, for that image, each caption of another
    image by `loss.margin`, and its image must outscore the other images for each caption;
  * "neighbour": inside the text modality, every caption must be closer to the other captions of
    its image than to captions of other images, by `model.neighbour_margin`, weighted by
    `model.neighbour_weight` (the within-modality constraint of Wang et al. 2016's
    structure-preserving embedding, which the title's "neighbor-aware" suggests).
  `loss.negatives` ("hardest", "k:N", "sum") picks the negatives of every positive pair.
- score: the cosine of the two vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itmatch.config import hardest_k
from itmatch.losses import TrainingContext
from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import AttentionPool, l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class NAAConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 1024  # not known from the paper
    attention_dropout: float = 0.0
    # The within-text neighbour term (an interpretation, see the module docstring).
    neighbour_margin: float = 0.2
    neighbour_weight: float = 1.0
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=True, normalize=False))


@register
class NAA(EmbeddingMatcher):
    architecture = "naa"
    config_class = NAAConfig

    def __init__(self, config: NAAConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)
        self.image_attention = AttentionPool(config.embed_size, config.attention_dropout)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        self.text_attention = AttentionPool(config.embed_size, config.attention_dropout)
        for layer in (self.image_proj, self.image_attention, self.text_attention):
            xavier_init(layer)

    def encode_images(self, features: Tensor) -> Encoded:
        regions = self.image_proj(self._check_features(features, self.config.img_dim, None))
        return Encoded({"vector": l2norm(self.image_attention(regions))})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        return Encoded({"vector": l2norm(self.text_attention(words, mask))})

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        # the global batch's vectors and labels under global negatives
        images = context.gather(self.encode_image_batch(batch)["vector"])
        texts = context.gather(self.encode_text_batch(batch)["vector"])
        groups = context.gather(batch["image_index"].to(images.device))
        loss, scores = context.loss, images @ texts.T
        ranking = neighbour_ranking_loss(scores, groups, loss.margin, context.negatives)
        ranking = ranking + neighbour_ranking_loss(scores.T, groups, loss.margin, context.negatives)
        neighbour = neighbour_ranking_loss(
            texts @ texts.T, groups, self.config.neighbour_margin, context.negatives, exclude_self=True
        )
        scale = 1.0 if loss.reduction == "sum" else 1.0 / len(groups)
        return {"ranking": scale * ranking, "neighbour": scale * self.config.neighbour_weight * neighbour}


def neighbour_ranking_loss(
    scores: Tensor, groups: Tensor, margin: float, negatives: str, exclude_self: bool = False
) -> Tensor:
    """Sum over anchors (rows) and their positives (columns of the anchor's group; not the anchor's
    own column with `exclude_self`, when rows and columns are the same items) of the hinge
    [margin + s(a, n) - s(a, p)]_+ over the negatives n (columns of other groups): all of them
    ("sum"), or the k hardest ("hardest", "k:N"). `groups` labels both rows and columns."""
    same = groups[:, None] == groups[None, :]
    positive = same & ~torch.eye(len(groups), dtype=torch.bool, device=scores.device) if exclude_self else same
    # cost[a, p, n] for every anchor, positive and negative (batch^3 entries: small batches)
    cost = (margin + scores[:, None, :] - scores[:, :, None]).clamp(min=0)
    cost = cost.masked_fill(same[:, None, :], 0)
    k = hardest_k(negatives)
    if k is not None:
        cost = cost.topk(min(k, cost.shape[2]), dim=2).values
    return (cost.sum(2) * positive).sum()
