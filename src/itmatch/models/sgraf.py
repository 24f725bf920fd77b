"""SGRAF: Similarity Graph Reasoning and Attention Filtration (Diao et al., AAAI 2021).

A pair's alignment is described by similarity *vectors*, not scalars: for every word, s = l2norm(W
(a - u)^2 + b) between the word u and the regions it attends to (a), plus one global vector between
the self-attention-pooled image and caption. The L+1 vectors are then either reasoned over as a
fully connected graph (SGR: a few self-attention steps, the global node read out) or filtered
(SAF: sigmoid gates l1-normalised over the nodes weigh their sum), and a Linear + sigmoid scores
the result. Settings follow the official code (github.com/Paranioar/SGRAF, model.py and opts.py);
each of its hard-coded constants is a config field.

Per-image work (region embeddings, the pooled image vector) happens once in `encode_images`,
per-caption work (word vectors, the pooled caption vector) once in `encode_texts`; `pair_scores`
scores a whole tile of images x captions, or a list of pairs, with batched tensor ops where the
official code loops over captions.

Batching and the official per-caption loop: in eval mode the scores are the official ones (to
float rounding). In train mode the only layer whose statistics depend on the batch shape is SAF's
BatchNorm1d(1) on the gate logits: the official loop normalises each caption's logits over (all
images of the batch x that caption's L+1 nodes) and updates the running statistics once per
caption. `_filter_norm` computes exactly these per-caption statistics from the batched tile (padded
nodes left out) and applies the per-caption running-statistics updates in closed form, and in train
mode `score` keeps all of the batch's images in every tile, so SAF trains with the official
statistics; only the order of the per-caption updates follows our caption order (the official
loader sorts captions by length). The VisualSA BatchNorms run once per batch of images in both;
dropout masks are drawn differently (same distribution). Under torchrun every process normalises
over its own share of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.errors import ConfigError
from itmatch.models.base import CrossAttentionMatcher, Encoded
from itmatch.models.layers import (
    AttentionPool,
    CrossAttentionConfig,
    GraphReasoning,
    SimilarityVector,
    SimilarityVectorConfig,
    attention_weights,
    float32_linear,
    l2norm,
    xavier_init,
)
from itmatch.models.registry import official_parts, register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class SGRAFConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    n_regions: int = 36  # set from the data; VisualSA's BatchNorm1d over region slots needs it
    embed_size: int = 1024
    sim_dim: int = 256
    image_norm: bool = True  # official --no_imgnorm off
    # Official EncoderText: BiGRU (directions averaged), Dropout(0.4) on the word embeddings.
    text: TextConfig = field(default_factory=lambda: TextConfig(dropout=0.4))
    # "SGR": graph reasoning over the similarity vectors; "SAF": attention filtration.
    module: Literal["SGR", "SAF"] = "SGR"
    sgr_steps: int = 3  # official --sgr_step
    # Dropout inside VisualSA / TextSA (official 0.4).
    pool_dropout: float = 0.4
    # VisualSA applies BatchNorm1d over region slots and over the mean vector (TextSA has none).
    visual_pool_batchnorm: bool = True
    # SCAN_attention(smooth=9.0): LeakyReLU(0.1), l2norm over the words, softmax(9 x) over the
    # regions, attended vector l2-normalised.
    attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    # Official: l2norm(W (a - b)^2 + bias), with no ReLU (CMCAN adds one).
    sim_vector: SimilarityVectorConfig = field(default_factory=lambda: SimilarityVectorConfig(bias=True, relu=False))
    # SAF's BatchNorm1d(1) on the gate logits before the sigmoid.
    filtration_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.sgr_steps < 0:
            raise ConfigError(f"model.sgr_steps must be >= 0, got {self.sgr_steps}")


@register(converter="itmatch.convert.sgraf:convert_official_sgraf", recognizes=official_parts(3))
class SGRAF(CrossAttentionMatcher):
    architecture = "sgraf"
    config_class = SGRAFConfig
    # The attention-pooled global vectors (unit length) serve as a first retrieval stage.
    embedding_key = "global"

    def __init__(self, config: SGRAFConfig):
        super().__init__(config)
        dim, sim_dim = config.embed_size, config.sim_dim
        self.image_proj = nn.Linear(config.img_dim, dim)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, dim)
        self.image_pool = AttentionPool(
            dim, config.pool_dropout, config.n_regions if config.visual_pool_batchnorm else None
        )
        self.text_pool = AttentionPool(dim, config.pool_dropout)
        self.word_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        self.global_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        if config.module == "SGR":
            self.reasoning = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(config.sgr_steps))
        else:
            self.filter_score = nn.Linear(sim_dim, 1)
            self.filter_norm = nn.BatchNorm1d(1) if config.filtration_batchnorm else None
        self.head = nn.Linear(sim_dim, 1)
        for module in self.children():
            if module is not self.text_encoder:
                xavier_init(module)

    # -- per image -----------------------------------------------------------------------------
    def encode_images(self, features: Tensor) -> Encoded:
        config = self.config
        regions = self.image_proj(self._check_features(features, config.img_dim, config.n_regions))
        if config.image_norm:
            regions = l2norm(regions)
        return Encoded({"regions": regions, "global": l2norm(self.image_pool(regions))})

    # -- per caption ---------------------------------------------------------------------------
    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        return Encoded(
            {"words": words, "mask": mask, "global": l2norm(self.text_pool(words, mask))},
            padded=frozenset({"words", "mask"}),
        )

    # -- per pair ------------------------------------------------------------------------------
    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        config = self.config
        dim, sim_dim, nodes = config.embed_size, config.sim_dim, n_words + 1
        floats = 4 * n_words * n_regions + 4 * n_words * dim + 2 * dim + 4 * nodes * sim_dim
        steps = config.sgr_steps if config.module == "SGR" else 1
        floats += steps * (4 * nodes * sim_dim + 2 * nodes * nodes)
        return 4 * floats

    @property
    def tile_spans_all_images(self) -> bool:
        # Training SAF: every tile holds all of the batch's images, so that each caption's
        # BatchNorm statistics span the whole batch as in the official per-caption loop.
        return self.training and getattr(self, "filter_norm", None) is not None

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        return self.pair_stages(images, texts)["scores"]

    def pair_stages(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every intermediate of the pair scoring, the pair axes first (see `pair_scores`): a grid
        tile gives text-major (n_texts, n_images, ...) tensors."""
        regions, words, mask = images["regions"], texts["words"], texts["mask"]
        attention = self.config.attention

        # Each word attends to the regions (SCAN_attention with the caption's words as queries).
        word_weights = attention_weights(
            torch.einsum("...ld,...rd->...lr", words, regions), attention, query_mask=mask[..., :, None]
        )
        attended = torch.einsum("...lr,...rd->...ld", word_weights, regions)
        if attention.normalize_output:
            attended = l2norm(attended)
        word_align = self.word_align(attended, words) * mask[..., None]
        global_align = self.global_align(images["global"], texts["global"])

        # Nodes: [global; words], padded words masked out of every later step.
        nodes = torch.cat([global_align[..., None, :], word_align], dim=-2)
        node_mask = torch.cat([mask[..., :1], mask], dim=-1).expand(nodes.shape[:-1])
        stages = {"word_weights": word_weights, "word_align": word_align, "global_align": global_align}
        if self.config.module == "SGR":
            vector = self._reason(nodes, node_mask)
        else:
            vector, gates = self._filter(nodes, node_mask)
            stages["node_weights"] = gates
        logits = float32_linear(self.head, vector).squeeze(-1)
        return {**stages, "vector": vector, "logits": logits, "scores": torch.sigmoid(logits)}

    def _reason(self, nodes: Tensor, node_mask: Tensor) -> Tensor:
        """SGR: the graph reasoning steps over each pair's nodes; returns node 0 (pair axes..., P).
        Only node 0 is read after the last step, so that step computes node 0 alone."""
        pair_shape, (n_nodes, dim) = nodes.shape[:-2], nodes.shape[-2:]
        flat, flat_mask = nodes.reshape(-1, n_nodes, dim), node_mask.reshape(-1, n_nodes)
        for index, layer in enumerate(self.reasoning):
            flat = layer(flat, flat_mask, first_only=index == len(self.reasoning) - 1)
        return flat[:, 0].reshape(*pair_shape, dim)

    def _filter(self, nodes: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor]:
        """SAF: l2norm(sum_n g_n s_n) with g = l1norm(sigmoid(BN(w . s_n + b))) over real nodes."""
        logits = self.filter_score(nodes).squeeze(-1)
        if self.filter_norm is not None:
            logits = self._filter_norm(logits, node_mask)
        gates = torch.sigmoid(logits) * node_mask
        gates = gates / (gates.abs().sum(-1, keepdim=True) + 1e-8)
        return l2norm(torch.einsum("...n,...np->...p", gates, nodes)), gates

    def _filter_norm(self, logits: Tensor, node_mask: Tensor) -> Tensor:
        """SAF's BatchNorm1d(1) as the official per-caption loop applies it. Eval: any pair axes;
        train: a grid tile (n_t, n_i, nodes), as `score` makes in training.

        Eval: the running statistics. Train: each caption's own statistics over the tile's images
        and its real nodes, and one running-statistics update per caption, in caption order.
        """
        norm = self.filter_norm
        if not (norm.training or norm.running_mean is None):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            return (logits - norm.running_mean) * scale + norm.bias
        weight = node_mask.to(logits.dtype)
        count = weight.sum((1, 2))
        mean = (logits * weight).sum((1, 2)) / count
        centered = logits - mean[:, None, None]
        variance = (centered.pow(2) * weight).sum((1, 2)) / count
        out = centered / torch.sqrt(variance[:, None, None] + norm.eps) * norm.weight + norm.bias
        if norm.track_running_stats and norm.running_mean is not None:
            with torch.no_grad():
                # n sequential updates r <- (1 - m) r + m x_j, in closed form.
                n, momentum = len(count), norm.momentum
                decay = (1 - momentum) ** torch.arange(n - 1, -1, -1, device=logits.device, dtype=logits.dtype)
                unbiased = variance * count / (count - 1).clamp(min=1)
                norm.running_mean.mul_((1 - momentum) ** n).add_(momentum * (decay * mean).sum())
                norm.running_var.mul_((1 - momentum) ** n).add_(momentum * (decay * unbiased).sum())
                norm.num_batches_tracked.add_(n)
        return out
