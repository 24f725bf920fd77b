"""CMCAN: Cross-Modal Confidence-Aware Network (Zhang et al., AAAI 2022).

Region-word similarity vectors are weighted by a matching confidence: how much of a region's
visual context the whole sentence describes, judged against how well the whole image matches the
whole sentence. Every place where the official code differs from the paper is a config field; the
presets `cmcan-paper` and `cmcan-official` set them (see ../shared/notes/cmcan.md).

Per-image work (region embeddings, the global image vector, the context vectors) and per-caption
work (word vectors, the global caption vector) happen once in `encode_images` / `encode_texts`;
`score_pairs` then scores a whole tile of images x captions with batched tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.data.inputs import Inputs
from itmatch.errors import InputError
from itmatch.models.base import CrossAttentionMatcher, Encoded
from itmatch.models.layers import (
    AttentionPool,
    CrossAttentionConfig,
    GraphReasoning,
    SimilarityVector,
    SimilarityVectorConfig,
    attend,
    attention_weights,
    float32_linear,
    l2norm,
    xavier_init,
)
from itmatch.models.registry import official_parts, register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class ContextConfig:
    """The visual context of a region: its neighbours in the directional region graph."""

    # Nearest regions linked in each of the 4 directions (official file selfadj4: 1; paper: 3).
    per_direction: int = 1
    self_loops: bool = True
    # Official `num_partial = 5`: the neighbourhood is topk(adjacency row, slots) and slots whose
    # entry is not 1 are filled with the region itself (counted again). None: the graph's edges.
    slots: int | None = 5
    # "renormalized": softmax of the raw attention logits within the neighbourhood (official);
    # "global": the image-level attention weights w_k reused as they are (paper).
    weights: Literal["renormalized", "global"] = "renormalized"
    # Divide the neighbourhood sum by the norm of the unnormalised global image vector (official)
    # or by its own norm.
    norm: Literal["global", "own"] = "global"


@dataclass
class ConfidenceConfig:
    # eps_i = w_n (s_glo * s_neig_i) (+ bias in the official Linear(P, 1)).
    bias: bool = True
    # The official LayerNorm(36) has a gain and bias per region slot (region order matters).
    slot_affine: bool = True


@dataclass
class HeadConfig:
    # Order of the two reasoned global nodes fed to the final Linear(2P, 1).
    order: Literal["text_first", "visual_first"] = "text_first"
    bias: bool = True


@dataclass
class CMCANConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    n_regions: int = 36  # set from the data; the BatchNorm and LayerNorm over region slots need it
    embed_size: int = 1024
    sim_dim: int = 256
    image_norm: bool = True
    text: TextConfig = field(default_factory=lambda: TextConfig(dropout=0.4))
    # Dropout inside the global attention pooling of both modalities.
    pool_dropout: float = 0.4
    # The official visual pooling applies BatchNorm1d over region slots and over the mean vector.
    visual_pool_batchnorm: bool = True
    attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    sim_vector: SimilarityVectorConfig = field(default_factory=SimilarityVectorConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    reasoning_layers: int = 3
    head: HeadConfig = field(default_factory=HeadConfig)


def neighbour_slots(adjacency: Tensor, n_slots: int) -> Tensor:
    """The official neighbourhood slots (n, R, n_slots): topk of each adjacency row, with every
    slot whose entry is not 1 replaced by the region itself."""
    values, index = torch.topk(adjacency, n_slots, dim=-1)
    own = torch.arange(adjacency.shape[-1], device=adjacency.device)[:, None].expand_as(index)
    return torch.where(values == 1, index, own)


def neighbour_counts(adjacency: Tensor, n_slots: int | None) -> Tensor:
    """How many times region j counts in region i's neighbourhood: (n, R, R)."""
    if n_slots is None:
        return (adjacency > 0).to(torch.float32)
    slots = neighbour_slots(adjacency, n_slots)
    counts = torch.zeros(adjacency.shape, dtype=torch.float32, device=adjacency.device)
    return counts.scatter_add_(-1, slots, torch.ones_like(slots, dtype=torch.float32))


@register(converter="itmatch.convert.cmcan:convert_official_cmcan", recognizes=official_parts(5))
class CMCAN(CrossAttentionMatcher):
    architecture = "cmcan"
    config_class = CMCANConfig
    # The attention-pooled global vectors (unit length) serve as a first retrieval stage.
    embedding_key = "global"

    def __init__(self, config: CMCANConfig):
        super().__init__(config)
        dim, sim_dim, n_regions = config.embed_size, config.sim_dim, config.n_regions
        self.image_proj = nn.Linear(config.img_dim, dim)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, dim)
        self.image_pool = AttentionPool(dim, config.pool_dropout, n_regions if config.visual_pool_batchnorm else None)
        self.text_pool = AttentionPool(dim, config.pool_dropout)
        self.word_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        self.region_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        self.context_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        self.global_align = SimilarityVector(dim, sim_dim, config.sim_vector)
        self.confidence = nn.Linear(sim_dim, 1, bias=config.confidence.bias)
        self.confidence_norm = nn.LayerNorm(n_regions, elementwise_affine=config.confidence.slot_affine)
        self.text_reasoning = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(config.reasoning_layers))
        self.visual_reasoning = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(config.reasoning_layers))
        self.head = nn.Linear(2 * sim_dim, 1, bias=config.head.bias)
        for module in self.children():
            if module is not self.text_encoder:
                xavier_init(module)

    def inputs(self) -> Inputs:
        context = self.config.context
        graph = {"per_direction": context.per_direction, "self_loops": context.self_loops}
        return Inputs(image=("features", "region_graph"), options={"region_graph": graph})

    # -- per image -----------------------------------------------------------------------------
    def encode_images(self, features: Tensor, region_graph: Tensor | None = None) -> Encoded:
        config = self.config
        features = self._check_features(features, config.img_dim, config.n_regions)
        adjacency = region_graph
        if adjacency is None or tuple(adjacency.shape) != (*features.shape[:2], features.shape[1]):
            raise InputError(
                f"the model needs a region_graph of shape {(*features.shape[:2], features.shape[1])}, "
                f"got {None if adjacency is None else tuple(adjacency.shape)}"
            )
        regions = self.image_proj(features)
        if config.image_norm:
            regions = l2norm(regions)
        logits = self.image_pool.logits(regions)
        pooled = (torch.softmax(logits, dim=-1)[..., None] * regions).sum(1)
        global_norm = pooled.norm(dim=-1, keepdim=True) + 1e-8
        context = self._context(regions, logits, global_norm, adjacency.to(regions.device, torch.float32))
        return Encoded(
            {
                "regions": regions,
                "global": pooled / global_norm,
                "context": context,
                "pool_logits": logits,
                "global_norm": global_norm.squeeze(-1),
            }
        )

    def _context(self, regions: Tensor, logits: Tensor, global_norm: Tensor, adjacency: Tensor) -> Tensor:
        """Each region's neighbourhood vector v_i^neig (n, R, D)."""
        config = self.config.context
        counts = neighbour_counts(adjacency, config.slots)
        if config.weights == "renormalized":
            # softmax over the slots, a region counted c times weighing c * exp(logit)
            weights = torch.softmax(logits[:, None, :] + counts.log(), dim=-1)
        else:
            weights = counts * torch.softmax(logits, dim=-1)[:, None, :]
        context = weights @ regions
        return context / global_norm[:, None, :] if config.norm == "global" else l2norm(context)

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
        dim, sim_dim = self.config.embed_size, self.config.sim_dim
        floats = 3 * (n_regions + n_words) * dim + 6 * (2 * n_regions + n_words) * sim_dim
        floats += 4 * n_regions * n_words + (n_regions + 1) ** 2 + (n_words + 1) ** 2
        return 4 * floats

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        return self.pair_stages(images, texts)["scores"]

    def pair_stages(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every intermediate of the pair scoring, the pair axes first (see `pair_scores`): a grid
        tile gives text-major (n_texts, n_images, ...) tensors."""
        regions, words, mask = images["regions"], texts["words"], texts["mask"]
        attention = self.config.attention

        # Word-region cosines, shared by both directions: each word attends to the regions, each
        # region to the words (padding masked out).
        cosines = torch.einsum("...ld,...rd->...lr", words, regions)
        word_weights = attention_weights(cosines, attention, query_mask=mask[..., :, None])
        region_weights = attention_weights(cosines.transpose(-1, -2), attention, key_mask=mask[..., None, :])
        attended_regions = attend(word_weights, regions, attention.normalize_output)
        attended_words = attend(region_weights, words, attention.normalize_output)

        word_align = self.word_align(attended_regions, words) * mask[..., None]
        region_align = self.region_align(attended_words, regions)
        global_align = self.global_align(images["global"], texts["global"])
        context_align = self.context_align(images["context"], texts["global"][..., None, :])

        confidence = self.confidence(global_align[..., None, :] * context_align).squeeze(-1)
        confidence = torch.sigmoid(self.confidence_norm(confidence))

        visual_nodes = torch.cat([global_align[..., None, :], confidence[..., None] * region_align], dim=-2)
        text_nodes = torch.cat([global_align[..., None, :], word_align], dim=-2)
        text_node_mask = torch.cat([mask[..., :1], mask], dim=-1)  # node 0 (global) is always real

        text_out = self._reason(self.text_reasoning, text_nodes, text_node_mask)
        visual_out = self._reason(self.visual_reasoning, visual_nodes, None)
        ordered = [text_out, visual_out] if self.config.head.order == "text_first" else [visual_out, text_out]
        logits = float32_linear(self.head, torch.cat(ordered, dim=-1)).squeeze(-1)
        return {
            "word_weights": word_weights,
            "region_weights": region_weights,
            "word_align": word_align,
            "global_align": global_align,
            "region_confidence": confidence,
            "visual_nodes": visual_nodes,
            "text_graph_out": text_out,
            "visual_graph_out": visual_out,
            "logits": logits,
            "scores": torch.sigmoid(logits),
        }

    @torch.no_grad()
    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]:
        """Why images[p] and texts[p] match, for each pair p: `score` (pairs,), each region's
        matching confidence `region_confidence` (pairs, R), and `word_attention` (pairs, L, R),
        each word's attention weights over the regions (rows of padding positions are 0)."""
        if len(images) != len(texts):
            raise InputError(f"explain takes pairs: {len(images)} images but {len(texts)} texts")
        stages = self.pair_stages(images.tensors, texts.tensors)
        return {
            "score": stages["scores"],
            "region_confidence": stages["region_confidence"],
            "word_attention": stages["word_weights"] * texts["mask"][..., None],
        }

    @staticmethod
    def _reason(layers: nn.ModuleList, nodes: Tensor, node_mask: Tensor | None) -> Tensor:
        """The reasoning layers over every pair's node set; returns node 0 (pair axes..., P).
        Only node 0 is read after the last layer, so that layer computes node 0 alone."""
        pair_shape, (n_nodes, dim) = nodes.shape[:-2], nodes.shape[-2:]
        flat = nodes.reshape(-1, n_nodes, dim)
        flat_mask = None if node_mask is None else node_mask.expand(*pair_shape, n_nodes).reshape(-1, n_nodes)
        for index, layer in enumerate(layers):
            flat = layer(flat, flat_mask, first_only=index == len(layers) - 1)
        return flat[:, 0].reshape(*pair_shape, dim)
