"""VSE++ (Faghri et al., BMVC 2018): one vector per image and per sentence, scored by a dot
product, trained with the hardest negative in the batch. On region features the image vector is
the pooled projection of the regions (the field's re-implementation on bottom-up features)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class VSEPPConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 1024
    image_pooling: Literal["mean", "max"] = "mean"
    # "last": the GRU's final hidden state (VSE++); "mean": the mean of the word vectors.
    text_pooling: Literal["last", "mean"] = "last"
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=False, normalize=False))


@register
class VSEPP(EmbeddingMatcher):
    architecture = "vsepp"
    config_class = VSEPPConfig

    def __init__(self, config: VSEPPConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        xavier_init(self.image_proj)

    def encode_images(self, features: Tensor) -> Encoded:
        regions = self.image_proj(self._check_features(features, self.config.img_dim, None))
        pooled = regions.mean(1) if self.config.image_pooling == "mean" else regions.amax(1)
        return Encoded({"vector": l2norm(pooled)})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, last = self.text_encoder(tokens, lengths)
        if self.config.text_pooling == "mean":
            last = (words * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return Encoded({"vector": l2norm(last)})
