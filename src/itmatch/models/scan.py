"""SCAN: Stacked Cross Attention Network (Lee et al., ECCV 2018; github.com/kuanghuei/SCAN).

One direction of cross attention per model. t2i: every word attends to the image's regions; i2t:
every region attends to the caption's words. The raw query-key cosines go through the official
`raw_feature_norm` (e.g. clipped_l2norm = LeakyReLU(0.1), then l2-normalised over the query items),
a softmax over the keys with inverse temperature lambda_softmax, and give each query an attended
vector (a weighted sum of the keys, not normalised). The pair's score pools the cosines between
every query and its attended vector: the mean (AVE) or LogSumExp with lambda_lse (LSE).

`pair_scores` scores a tile of images x captions, or a list of pairs, at once. The cosine needs q . a and |a| for the
attended vector a = sum_k w_k c_k; both come without building a: q . a = sum_k w_k (q . c_k) reuses
the attention logits' cosines, and |a|^2 = w^T G w with G the Gram matrix of the keys (regions of
one image, or words of one caption). This is the official value, with a fraction of the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.models.base import CrossAttentionMatcher, Encoded
from itmatch.models.layers import CrossAttentionConfig, attention_weights, l2norm, xavier_init
from itmatch.models.registry import official_parts, register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class SCANConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 1024
    # l2-normalise each projected region (the official default; --no_imgnorm turns it off).
    image_norm: bool = True
    # The README trains with --bi_gru; SCAN's text encoder has no dropout.
    text: TextConfig = field(default_factory=TextConfig)
    # --cross_attn: "t2i" words attend to regions, "i2t" regions attend to words.
    direction: Literal["t2i", "i2t"] = "t2i"
    # temperature = --lambda_softmax; --raw_feature_norm as (activation, normalization) over the
    # query items (see CrossAttentionConfig). The attended vector is not normalised; as SCAN only
    # takes its cosine with the query, normalize_output changes nothing.
    attention: CrossAttentionConfig = field(
        default_factory=lambda: CrossAttentionConfig(temperature=9.0, normalize_output=False)
    )
    # --agg_func over the query items: "mean" (Mean, AVE), "lse" (LogSumExp, LSE), "max", "sum".
    pooling: Literal["mean", "lse", "max", "sum"] = "lse"
    lse_lambda: float = 6.0  # --lambda_lse
    # The official cosine divides by max(|q| |a|, eps).
    cosine_eps: float = 1e-8


@register(converter="itmatch.convert.scan:convert_official_scan", recognizes=official_parts(2))
class SCAN(CrossAttentionMatcher):
    architecture = "scan"
    config_class = SCANConfig

    def __init__(self, config: SCANConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        xavier_init(self.image_proj)

    # -- per image / per caption ---------------------------------------------------------------
    def encode_images(self, features: Tensor) -> Encoded:
        regions = self.image_proj(self._check_features(features, self.config.img_dim, None))
        if self.config.image_norm:
            regions = l2norm(regions)
        # The Gram matrix of the regions gives |attended| in text-to-image attention (see below).
        return Encoded({"regions": regions, "gram": regions @ regions.transpose(1, 2)})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        return Encoded({"words": words, "mask": mask}, padded=frozenset({"words", "mask"}))

    # -- per pair ------------------------------------------------------------------------------
    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        # the cosines, their activation and normalisation, the logits, the weights, w * cosines,
        # w G and w G w (each queries x keys), and a few per-query vectors
        floats = 8 * n_regions * n_words + 6 * max(n_regions, n_words)
        return 4 * floats

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        regions, words, mask = images["regions"], texts["words"], texts["mask"]
        config = self.config
        if config.direction == "t2i":
            # queries: the caption's words, keys: the image's regions; (pairs..., L, R)
            dots = torch.einsum("...ld,...rd->...lr", words, regions)
            weights = attention_weights(dots, config.attention, query_mask=mask[..., :, None])
            weighted_gram = torch.einsum("...lr,...rs->...ls", weights, images["gram"])
            query_norms = torch.linalg.vector_norm(words, dim=-1)
            query_mask = mask
        else:
            # queries: the image's regions, keys: the caption's words; (pairs..., R, L)
            dots = torch.einsum("...rd,...ld->...rl", regions, words)
            weights = attention_weights(dots, config.attention, key_mask=mask[..., None, :])
            words_gram = torch.einsum("...ld,...md->...lm", words, words)
            weighted_gram = torch.einsum("...rl,...lm->...rm", weights, words_gram)
            query_norms = torch.linalg.vector_norm(regions, dim=-1)
            query_mask = None
        query_dot_attended = (weights * dots).sum(-1)
        attended_sq = (weighted_gram * weights).sum(-1)
        # |a| from w^T G w (>= 0 up to rounding); the floor keeps the sqrt's gradient finite.
        attended_norms = attended_sq.clamp(min=torch.finfo(attended_sq.dtype).tiny).sqrt()
        # (in float16, 1e-8 rounds to 0: the floor is at least the type's smallest normal number)
        eps = max(config.cosine_eps, torch.finfo(attended_norms.dtype).tiny)
        cosines = query_dot_attended / (query_norms * attended_norms).clamp(min=eps)
        return self._pool(cosines.float(), query_mask)  # float32: bf16 scores would tie

    def _pool(self, cosines: Tensor, mask: Tensor | None) -> Tensor:
        """Pools (images, texts, queries) over the real query items."""
        pooling = self.config.pooling
        if pooling in ("mean", "sum"):
            if mask is None:
                return cosines.mean(-1) if pooling == "mean" else cosines.sum(-1)
            total = (cosines * mask).sum(-1)  # padded words have cosine 0, masked all the same
            return total / mask.sum(-1) if pooling == "mean" else total
        if mask is not None:
            cosines = cosines.masked_fill(~mask, float("-inf"))
        if pooling == "max":
            return cosines.amax(-1)
        lam = self.config.lse_lambda
        return torch.logsumexp(lam * cosines, dim=-1) / lam
