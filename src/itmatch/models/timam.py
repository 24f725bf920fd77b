"""TIMAM: Text-Image Modality Adversarial Matching (Sarafianos, Xu and Kakadiaris, ICCV 2019).

No official code exists, so this follows the paper (Sec. 3) and names each choice as a field:

- image tower: the backbone's pooled features through a fully connected layer (the paper: ResNet-101,
  global average pooling, FC); here the mean of the region features (of a backbone's grid cells on
  raw images) through an FC;
- text tower: word embeddings through a bidirectional RNN, then an FC (the paper: BERT word
  embeddings, a BiLSTM, an FC); here the library's text encoders (a BiGRU over trained word
  embeddings by default, or a BERT-family folder / `minilm` via `model.text.encoder`);
- losses: the identity loss (norm-softmax over one class per image, shared by both modalities)
  and CMPM, both shared terms (`loss.terms`, itmatch.losses), plus the adversarial term against
  a modality discriminator of two fully connected layers (hidden size not given: a field), which
  a second optimizer trains in alternation to tell image vectors (label 1) from caption vectors;
- score: the cosine of the two vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.losses import TrainingContext
from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class TIMAMConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 512  # not given by the summary we could read; CMPM's feature_size
    # The discriminator's hidden layer (the paper: two FC layers reducing the embedding to a scalar).
    discriminator_hidden: int = 256
    # How the encoders fool it: "flipped" minimises the discriminator's loss with the modality
    # labels swapped (the usual non-saturating GAN step); "minimax" maximises its loss as written.
    adversarial: Literal["flipped", "minimax"] = "flipped"
    # What the discriminator reads: the unit vectors that are scored ("vector"), or the FC outputs
    # ("unnormalized"), whose norms tell the modalities apart: fooling it then outweighed CMPM and
    # the identity loss in our synthetic runs (test rSum at chance instead of twice it).
    discriminator_input: Literal["vector", "unnormalized"] = "vector"
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=True, normalize=False))


@register
class TIMAM(EmbeddingMatcher):
    architecture = "timam"
    config_class = TIMAMConfig

    def __init__(self, config: TIMAMConfig):
        super().__init__(config)
        self.image_fc = nn.Linear(config.img_dim, config.embed_size)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        self.text_fc = nn.Linear(config.embed_size, config.embed_size)
        self.discriminator = nn.Sequential(
            nn.Linear(config.embed_size, config.discriminator_hidden),
            nn.ReLU(),
            nn.Linear(config.discriminator_hidden, 1),
        )
        for layer in (self.image_fc, self.text_fc, self.discriminator):  # not a pretrained text model
            xavier_init(layer)

    def encode_images(self, features: Tensor) -> Encoded:
        features = self._check_features(features, self.config.img_dim, None)
        return _vectors(self.image_fc(features.mean(1)))

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        _, _, sentence = self.text_encoder(tokens, lengths)
        return _vectors(self.text_fc(sentence))

    def adversary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        images, texts = self.encode_image_batch(batch), self.encode_text_batch(batch)
        fooled = self.modality_loss(images, texts, swapped=self.config.adversarial == "flipped")
        adversarial = fooled if self.config.adversarial == "flipped" else -fooled
        return self.shared_terms(images, texts, batch, context) | {"adversarial": adversarial}

    def adversary_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        with torch.no_grad():  # the discriminator's step leaves the encoders alone
            images, texts = self.encode_image_batch(batch), self.encode_text_batch(batch)
        return {"discriminator": self.modality_loss(images, texts)}

    def modality_loss(self, images: Encoded, texts: Encoded, swapped: bool = False) -> Tensor:
        """The discriminator's binary cross-entropy, images labelled 1 and captions 0 (the other
        way round when `swapped`), the mean over each modality summed."""
        image_logits = self.discriminator(images[self.config.discriminator_input]).squeeze(-1)
        text_logits = self.discriminator(texts[self.config.discriminator_input]).squeeze(-1)
        image_label, text_label = (0.0, 1.0) if swapped else (1.0, 0.0)
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(image_logits, torch.full_like(image_logits, image_label)) + bce(
            text_logits, torch.full_like(text_logits, text_label)
        )


def _vectors(unnormalized: Tensor) -> Encoded:
    """The unit vector that scores pairs and the unnormalised one CMPM and the identity loss read."""
    return Encoded({"vector": l2norm(unnormalized), "unnormalized": unnormalized})
