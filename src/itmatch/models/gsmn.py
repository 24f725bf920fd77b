"""GSMN: Graph Structured Matching Network (Liu et al., CVPR 2020), dense and sparse.

A pair's score is the sum of two graph scores (official code github.com/CrossmodalGroup/GSMN,
graph_model.py and layers.py; ../shared/notes/zoo2.md):

- node-level matching: every region attends to the caption's words and every word to the regions
  (SCAN's clipped-l2norm attention, inverse temperature `attention.temperature`, the official
  lambda_softmax); a node's matching vector holds the cosines of `blocks` equal slices of the node
  and its attended vector (multi-block cosine);
- visual graph (i2t): the polar pseudo-coordinates (rho, theta) between box centres (boxes divided
  by the image size) weigh each neighbour j of region i under `kernels` learnable Gaussians,
  normalised over the kernels; per kernel a Linear(blocks -> hidden/kernels), the outputs
  concatenated, then the weight-normalised head Linear, tanh, Linear(-> 1), averaged over regions;
- textual graph (t2i): the words' affinity softmax(lambda w_i . w_j) (dense), or that affinity on
  the dependency arcs plus self loops, l2-normalised (sparse, `sparse`); times `kernels` learnable
  scalars and normalised over the neighbours; the same convolution and head, averaged over words.

Where the released code differs from the paper (config fields; presets gsmn-official-* and
gsmn-paper-*):
- `neighbours`: the released code builds the neighbour tensor by repeating each node's own
  matching vector, so neighbour j contributes m_i ("node_itself": the output is
  concat_k W_k (m_i sum_j w_ijk), and the textual graph's structure has no effect at all); the
  paper aggregates the neighbours' vectors m_j ("neighbours").
- `box_divisions`: the released data loader divides the stored boxes by the image size in place
  on every visit, so the boxes seen depend on how often the image was read (the published test
  scores saw them divided 6 times, see the README); the paper divides once.
In both modes the textual kernels' scalars cancel in the normalisation over neighbours (as in the
released code).

Per-image work (region embeddings, the Gaussian kernel weights) happens once in `encode_images`,
per-caption work (word vectors, the textual kernel weights) once in `encode_texts`; `pair_scores`
scores a tile of images x captions at once. The multi-block cosine is computed from block dot
products of regions and words (one large product for a whole tile) and the attended vectors'
block norms from per-item Gram matrices, so no pair ever holds an attended D-vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from itmatch.data.dependencies import split_dependencies
from itmatch.data.inputs import Inputs, text_input
from itmatch.errors import ConfigError, InputError
from itmatch.models.base import CrossAttentionMatcher, Encoded
from itmatch.models.layers import CrossAttentionConfig, attention_weights, l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class GSMNConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 1024
    image_norm: bool = True  # official --no_imgnorm off
    text: TextConfig = field(default_factory=TextConfig)  # official --bi_gru: directions averaged
    # --is_sparse: the textual graph keeps only dependency arcs (and self loops).
    sparse: bool = False
    # --num_block (= --feat_dim): slices of the embedding compared by the multi-block cosine.
    blocks: int = 16
    kernels: int = 8  # n_kernels of both graph convolutions
    hidden_dim: int = 32  # --hid_dim: the convolution's output, the head's width
    # inter_relations: LeakyReLU(0.1), l2norm over the queries, softmax(lambda x); the attended
    # vector is not normalised. lambda is --lambda_softmax (F30K 20, COCO 10).
    attention: CrossAttentionConfig = field(
        default_factory=lambda: CrossAttentionConfig(temperature=20.0, normalize_output=False)
    )
    # intra_relations' lambda (the official code reuses --lambda_softmax).
    affinity_temperature: float = 20.0
    # "node_itself": the released code's neighbour vectors (node i's own); "neighbours": the paper's.
    neighbours: Literal["node_itself", "neighbours"] = "neighbours"
    # How many times the image size divides the box coordinates (paper: once).
    box_divisions: int = 1
    # The official visual kernels' Linear layers have no bias, the textual ones have one (an
    # argument meant as coordinate_dim lands in `bias`).
    visual_kernel_bias: bool = False
    text_kernel_bias: bool = True

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.embed_size % self.blocks:
            raise ConfigError(f"model.blocks ({self.blocks}) must divide model.embed_size ({self.embed_size})")
        if self.kernels < 1 or self.hidden_dim % self.kernels:
            raise ConfigError(f"model.kernels ({self.kernels}) must divide model.hidden_dim ({self.hidden_dim})")
        if self.box_divisions < 1:
            raise ConfigError(f"model.box_divisions must be >= 1, got {self.box_divisions}")


class PolarKernels(nn.Module):
    """ImageQueryGraphConvolution's Gaussian kernels on (rho, theta), normalised over kernels."""

    def __init__(self, n_kernels: int):
        super().__init__()
        self.mean_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))
        self.mean_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(-math.pi, math.pi))
        self.precision_rho = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))
        self.precision_theta = nn.Parameter(torch.empty(n_kernels, 1).uniform_(0.0, 1.0))

    def forward(self, coordinates: Tensor) -> Tensor:
        """(..., 2) pseudo-coordinates -> (..., kernels) weights."""
        rho, theta = coordinates[..., :1], coordinates[..., 1:]
        rho_weights = torch.exp(-0.5 * (rho - self.mean_rho.view(-1)) ** 2 / (1e-14 + self.precision_rho.view(-1) ** 2))
        first = (theta - self.mean_theta.view(-1)).abs()
        angle = torch.minimum(first, (2 * math.pi - first).abs())  # the angular difference, wrapped
        theta_weights = torch.exp(-0.5 * angle**2 / (1e-14 + self.precision_theta.view(-1) ** 2))
        weights = rho_weights * theta_weights
        weights = torch.where(torch.isnan(weights), 0.0, weights)  # as the official code, before normalising
        return weights / weights.sum(-1, keepdim=True)


class NodeGraph(nn.Module):
    """One graph's convolution and head: per kernel k a Linear(blocks -> hidden/kernels) of the
    kernel-weighted neighbour vectors, concatenated, then out_2(tanh(out_1(.))) per node."""

    def __init__(self, blocks: int, hidden_dim: int, n_kernels: int, bias: bool):
        super().__init__()
        self.conv_weights = nn.ModuleList(
            nn.Linear(blocks, hidden_dim // n_kernels, bias=bias) for _ in range(n_kernels)
        )
        self.out_1 = weight_norm(nn.Linear(hidden_dim, hidden_dim))
        self.out_2 = weight_norm(nn.Linear(hidden_dim, 1))

    def forward(self, per_kernel: Tensor, node_mask: Tensor | None) -> Tensor:
        """per_kernel (..., nodes, kernels, blocks) -> (...,) the mean node score over real nodes."""
        weight = torch.stack([layer.weight for layer in self.conv_weights])  # (kernels, out, blocks)
        hidden = torch.einsum("...nkb,kob->...nko", per_kernel, weight.to(per_kernel.dtype))
        if self.conv_weights[0].bias is not None:
            hidden = hidden + torch.stack([layer.bias for layer in self.conv_weights]).to(hidden.dtype)
        node_scores = self.out_2(torch.tanh(self.out_1(hidden.flatten(-2)))).squeeze(-1).float()
        if node_mask is None:
            return node_scores.mean(-1)
        mask = node_mask.to(node_scores.dtype)
        return (node_scores * mask).sum(-1) / mask.sum(-1)


def block_view(x: Tensor, blocks: int) -> Tensor:
    """(..., D) -> (..., blocks, D / blocks): the official torch.split into equal slices."""
    return x.unflatten(-1, (blocks, x.shape[-1] // blocks))


def block_gram(x: Tensor, blocks: int) -> Tensor:
    """(n, N, D) -> (n, N, N, blocks): dot products of every two items' slices."""
    sliced = block_view(x, blocks)
    return torch.einsum("nibd,njbd->nijb", sliced, sliced)


def polar_coordinates(boxes: Tensor, image_size: Tensor, divisions: int) -> Tensor:
    """(n, R, R, 2) (rho, theta) of centre_i - centre_j, boxes (n, R, 4) x1 y1 x2 y2 in pixels and
    sizes (n, 2) (w, h); theta = atan2(dx, dy) as in the official code."""
    scale = image_size.to(boxes.dtype).repeat(1, 2)[:, None, :]
    for _ in range(divisions):  # the released loader divides in place on every visit
        boxes = boxes / scale
    centres = boxes[..., :2] + 0.5 * (boxes[..., 2:] - boxes[..., :2])
    offset = centres[:, :, None, :] - centres[:, None, :, :]
    rho = torch.sqrt(offset[..., 0] ** 2 + offset[..., 1] ** 2)
    return torch.stack([rho, torch.atan2(offset[..., 0], offset[..., 1])], dim=-1)


def dependency_adjacency(arcs: Tensor, lengths: Tensor, n_words: int) -> Tensor:
    """(n, L, L) symmetric adjacency of dependency arcs (n, P, 2) (token positions), plus self
    loops, as build_sparse_graph: arcs reaching past the caption are dropped. Arcs from position 0
    are padding (the reader drops the ROOT arcs, the only ones with governor 0)."""
    n = len(arcs)
    adjacency = torch.zeros(n, n_words, n_words, device=arcs.device)
    governor, dependent = arcs[..., 0], arcs[..., 1]
    valid = (governor > 0) & (dependent >= 0) & (governor < lengths[:, None]) & (dependent < lengths[:, None])
    caption = torch.arange(n, device=arcs.device)[:, None].expand_as(governor)[valid]
    governor, dependent = governor[valid], dependent[valid]
    adjacency[caption, governor, dependent] = 1
    adjacency[caption, dependent, governor] = 1
    return adjacency + torch.eye(n_words, device=arcs.device)


def chain_arcs(lengths: Tensor) -> Tensor:
    """Arcs t -> t + 1 between the words of each caption (positions 1 .. length - 2, between
    <start> and <end>): the graph of a caption without a parse."""
    longest = max(int(lengths.max()) - 2, 1) if len(lengths) else 1
    position = torch.arange(1, longest, device=lengths.device)
    arcs = torch.stack([position, position + 1], dim=-1).expand(len(lengths), -1, -1)
    return arcs * (position + 1 < lengths[:, None] - 1)[..., None]


@text_input("dependencies")
def _dependency_reader(split, tokenizer):
    """Each caption's dependency arcs as token positions (P, 2), the ROOT arcs (governor 0) left
    out: the input of the sparse textual graph."""
    arcs = split_dependencies(split)

    def read(caption: int) -> Tensor:
        kept = [arc for arc in arcs[caption] if arc[0] != 0]
        return torch.tensor(kept, dtype=torch.int64).reshape(-1, 2)

    return read


def _is_official_gsmn(payload: dict) -> bool:
    parts = payload.get("model")
    return (
        isinstance(parts, list)
        and len(parts) == 4
        and "opt" in payload
        and isinstance(parts[2], dict)
        and any(str(key).startswith("graph_convolution_1.") for key in parts[2])
    )


@register(converter="itmatch.convert.gsmn:convert_official_gsmn", recognizes=_is_official_gsmn)
class GSMN(CrossAttentionMatcher):
    architecture = "gsmn"
    config_class = GSMNConfig

    def __init__(self, config: GSMNConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)
        xavier_init(self.image_proj)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        self.visual_kernels = PolarKernels(config.kernels)
        self.visual_graph = NodeGraph(config.blocks, config.hidden_dim, config.kernels, config.visual_kernel_bias)
        # TextQueryGraphConvolution.params: one scalar per kernel, U(-1, 1).
        self.text_kernels = nn.Parameter(torch.empty(config.kernels, 1).uniform_(-1.0, 1.0))
        self.text_graph = NodeGraph(config.blocks, config.hidden_dim, config.kernels, config.text_kernel_bias)

    def inputs(self) -> Inputs:
        text = ("tokens", "dependencies") if self.config.sparse else ("tokens",)
        return Inputs(image=("features", "boxes", "image_size"), text=text)

    @property
    def _own_node(self) -> bool:
        return self.config.neighbours == "node_itself"

    # -- per image -----------------------------------------------------------------------------
    def encode_images(self, features: Tensor, boxes: Tensor | None = None, image_size: Tensor | None = None) -> Encoded:
        config = self.config
        features = self._check_features(features, config.img_dim, None)
        n, n_regions = features.shape[:2]
        if boxes is None or image_size is None or boxes.shape != (n, n_regions, 4) or image_size.shape != (n, 2):
            raise InputError(
                f"the model needs boxes ({n}, {n_regions}, 4) and image_size ({n}, 2), got "
                f"{None if boxes is None else tuple(boxes.shape)} and "
                f"{None if image_size is None else tuple(image_size.shape)}"
            )
        regions = self.image_proj(features)
        if config.image_norm:
            regions = l2norm(regions)
        coordinates = polar_coordinates(
            boxes.to(regions.device, torch.float32), image_size.to(regions.device), config.box_divisions
        )
        weights = self.visual_kernels(coordinates)  # (n, R, R, kernels)
        graph = {"kernel_sums": weights.sum(2)} if self._own_node else {"kernel_weights": weights}
        return Encoded({"regions": regions, "gram": block_gram(regions, config.blocks), **graph})

    # -- per caption ---------------------------------------------------------------------------
    def encode_texts(self, tokens: Tensor, lengths: Tensor, dependencies: Tensor | None = None) -> Encoded:
        """Word vectors and the textual graph's kernel weights; `dependencies` (n, P, 2) are arcs
        between token positions (sparse only; None: the chain graph of `chain_arcs`)."""
        config = self.config
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        weights, multiplicity = self._text_kernel_weights(words, mask, lengths, dependencies)
        if self._own_node:  # the released neighbour tensor: adjacency * m_i (dense: m_i)
            graph = {"kernel_sums": (weights * multiplicity[..., None]).sum(2)}
        else:
            graph = {"kernel_weights": weights}
        tensors = {"words": words, "mask": mask, "gram": block_gram(words, config.blocks), **graph}
        padded = frozenset(tensors)
        return Encoded(tensors, padded, frozenset({"gram", "kernel_weights"}) & padded)

    def _text_kernel_weights(
        self, words: Tensor, mask: Tensor, lengths: Tensor, dependencies: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(n, L, L, kernels): the word affinity (sparse: on the arcs), times each kernel's scalar,
        normalised over the neighbours (TextQueryGraphConvolution.compute_weights); and the
        adjacency (n, L, L) (dense: all ones)."""
        logits = self.config.affinity_temperature * words @ words.transpose(1, 2)
        affinity = torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
        adjacency = torch.ones_like(affinity)
        if self.config.sparse:
            arcs = chain_arcs(lengths) if dependencies is None else dependencies.to(words.device, torch.int64)
            adjacency = dependency_adjacency(arcs, lengths.to(words.device), words.shape[1])
            affinity = l2norm(adjacency * affinity)
        weights = affinity[..., None] * self.text_kernels.view(-1)
        # Padding rows have nothing to normalise (their sums may be 0): divided by 1 instead.
        sums = weights.sum(2, keepdim=True).masked_fill(~mask[:, :, None, None], 1.0)
        return weights / sums, adjacency

    # -- per pair ------------------------------------------------------------------------------
    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        blocks, kernels = self.config.blocks, self.config.kernels
        floats = 6 * n_regions * n_words * blocks + 2 * (n_regions + n_words) * kernels * blocks
        return 4 * floats

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        return self.pair_stages(images, texts)["scores"]

    def pair_stages(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every intermediate of the pair scoring, the pair axes first (a grid tile gives
        text-major (n_texts, n_images, ...) tensors)."""
        blocks, attention, mask = self.config.blocks, self.config.attention, texts["mask"]
        # Block dot products of every region with every word: their sum is the plain cosine.
        block_dots = torch.einsum(
            "...rbd,...lbd->...rlb", block_view(images["regions"], blocks), block_view(texts["words"], blocks)
        )
        cosines = block_dots.sum(-1)
        region_weights = attention_weights(cosines, attention, key_mask=mask[..., None, :])  # (.., R, L)
        word_weights = attention_weights(cosines.transpose(-1, -2), attention, query_mask=mask[..., :, None])
        region_match = _block_cosine(region_weights, block_dots, images["regions"], texts["gram"], blocks)
        word_match = _block_cosine(word_weights, block_dots.transpose(-2, -3), texts["words"], images["gram"], blocks)
        visual = self.visual_graph(self._neighbourhood(region_match, images), None)
        textual = self.text_graph(self._neighbourhood(word_match, texts), mask)
        return {
            "region_weights": region_weights,
            "word_weights": word_weights,
            "region_match": region_match,
            "word_match": word_match * mask[..., None],
            "visual_scores": visual,
            "text_scores": textual,
            "scores": visual + textual,
        }

    def _neighbourhood(self, match: Tensor, side: dict[str, Tensor]) -> Tensor:
        """(..., nodes, kernels, blocks): sum_j w_ijk m_j (paper) or m_i sum_j w_ijk (released)."""
        if self._own_node:
            return side["kernel_sums"].to(match.dtype)[..., None] * match[..., None, :]
        return torch.einsum("...ijk,...jb->...ikb", side["kernel_weights"].to(match.dtype), match)

    @torch.no_grad()
    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]:
        """Why images[p] and texts[p] match, for each pair p: `score` (pairs,), `word_attention`
        (pairs, L, R), each word's attention over the regions, and as `region_confidence` (pairs,
        R) each region's node-level match: the mean of its multi-block cosines with the words it
        attends to (in [-1, 1])."""
        if len(images) != len(texts):
            raise InputError(f"explain takes pairs: {len(images)} images but {len(texts)} texts")
        stages = self.pair_stages(images.tensors, texts.tensors)
        return {
            "score": stages["scores"],
            "region_confidence": stages["region_match"].mean(-1),
            "word_attention": stages["word_weights"] * texts["mask"][..., None],
        }


def _block_cosine(weights: Tensor, block_dots: Tensor, queries: Tensor, key_gram: Tensor, blocks: int) -> Tensor:
    """Multi-block cosine of each query q and its attended vector a = sum_k w_k x_k:
    <q_b, a_b> / max(|q_b| |a_b|, 1e-8) per slice b, from the block dot products (.., Q, K, B)
    and the keys' block Gram matrix (.., K, K, B), without forming a."""
    numerator = torch.einsum("...qk,...qkb->...qb", weights, block_dots)
    mixed = torch.einsum("...qk,...kmb->...qmb", weights, key_gram.to(weights.dtype))
    attended_norm = torch.einsum("...qm,...qmb->...qb", weights, mixed).clamp(min=0).sqrt()
    query_norm = torch.linalg.vector_norm(block_view(queries, blocks), dim=-1)
    # In float32: the official eps (1e-8) is 0 in fp16, and padding words would give 0 / 0.
    return (numerator.float() / (query_norm.float() * attended_norm.float()).clamp(min=1e-8)).to(weights.dtype)
