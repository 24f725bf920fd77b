"""sm-LSTM: selective multimodal LSTM (Huang, Wang and Wang, CVPR 2017, arXiv 1611.05588, Sec. 3).

No official code exists (../shared/notes/zoo2.md), so this follows the paper's description; what it
leaves open is a config field or named here and in the README ("sm-LSTM: what the paper leaves
open"):

- instance candidates: the image's are its feature rows projected to D, a_i = W_v f_i + b_v (the
  paper: the 14 x 14 cells of VGG-19 conv5_4; `instances` says whether the rows are such a grid or
  detected regions); the sentence's are the word states w_j of a bidirectional LSTM (directions
  averaged, as the library's recurrent text encoder does); both optionally l2-normalised
  (`image_norm`, `text.normalize`: not in the paper);
- global contexts: the image's is the mean feature row through its own projection, x = W_x mean_i f_i
  (the paper: fc7 of the whole image; the mean of a ResNet grid is that network's own pooled
  vector), the sentence's the BLSTM's final states y;
- T steps (`steps`), each attending on both sides with the contexts and the previous state:
    p_t,i = softmax_i  u_v . tanh(U_v a_i + C_v c + H_v h_t-1 + b)
    q_t,j = softmax_j  u_w . tanh(U_w w_j + C_w c + H_w h_t-1 + b')   (over the real words)
  where c holds the contexts `context` names (both modalities', each side's own, or none: the
  paper's attention-only ablation); the selected instances a'_t = sum_i p_t,i a_i and
  w'_t = sum_j q_t,j w_j are compared (`fusion`: element-wise product, or side by side) and fed to
  an LSTM cell (h_0 = c_0 = 0);
- score: a two-layer perceptron (ReLU) on the last hidden state h_T.

Per-image and per-caption terms (U a_i + b plus the own context, and the context term each side
gives the other) are computed once in `encode_images` / `encode_texts`; `pair_scores` runs the T
steps for a whole tile of pairs at once, the LSTM cell on the flattened pair axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.errors import ConfigError, InputError
from itmatch.models.base import CrossAttentionMatcher, Encoded
from itmatch.models.layers import float32_linear, l2norm
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class SMLSTMConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    # One width D for the instances, the attention's hidden layer, the LSTM state and the score
    # perceptron (the paper's sizes are not known here).
    embed_size: int = 512
    # "grid": the feature rows are the cells of a square feature map (the paper's conv5_4 cells,
    # `itmatch extract`, or a backbone's); checked when images are encoded. "regions": any rows.
    instances: Literal["grid", "regions"] = "regions"
    # l2-normalise each image instance a_i (not in the paper; with the word states l2-normalised
    # too, short synthetic runs learn faster).
    image_norm: bool = False
    # T, the attention steps.
    steps: int = 3
    # Global contexts in each side's attention: "multimodal" both the image's and the sentence's,
    # "own" the side's own modality, "none" no context (the paper's attention-only variant).
    context: Literal["multimodal", "own", "none"] = "multimodal"
    # The LSTM's input from the selected pair: "product" a'_t * w'_t, "concat" [a'_t; w'_t].
    fusion: Literal["product", "concat"] = "product"
    # The paper's BLSTM over word embeddings.
    text: TextConfig = field(default_factory=lambda: TextConfig(cell="lstm"))

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"model.steps must be >= 1, got {self.steps}")


class ContextModulatedAttention(nn.Module):
    """One side's saliency map over its instances: softmax of u . tanh(U x_i + b + contexts + H h)."""

    def __init__(self, dim: int, context: str):
        super().__init__()
        self.instance = nn.Linear(dim, dim)  # U, b
        # C's blocks: the side's own modality's context and the other modality's.
        self.own_context = nn.Linear(dim, dim, bias=False) if context != "none" else None
        self.other_context = nn.Linear(dim, dim, bias=False) if context == "multimodal" else None
        self.state = nn.Linear(dim, dim, bias=False)  # H
        self.saliency = nn.Linear(dim, 1, bias=False)  # u

    def keys(self, instances: Tensor, own_context: Tensor) -> Tensor:
        """U x_i + b (+ C_own g) of one item's instances (n, N, D): computed once per item."""
        keys = self.instance(instances)
        return keys if self.own_context is None else keys + self.own_context(own_context)[:, None]

    def from_other_side(self, context: Tensor) -> Tensor | None:
        """The term the other modality's context adds to this side's logits (n, D), if any."""
        return None if self.other_context is None else self.other_context(context)

    def forward(self, keys: Tensor, state: Tensor, other: Tensor | None, mask: Tensor | None = None) -> Tensor:
        """Weights (pairs..., N) from keys (pairs..., N, D), the LSTM state (pairs..., D) and the
        other side's context term (pairs..., D) or None; `mask` (pairs..., N) marks real items."""
        query = self.state(state) if other is None else self.state(state) + other
        logits = self.saliency(torch.tanh(keys + query[..., None, :])).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=-1)


@register
class SMLSTM(CrossAttentionMatcher):
    architecture = "sm-lstm"
    config_class = SMLSTMConfig

    def __init__(self, config: SMLSTMConfig):
        super().__init__(config)
        dim = config.embed_size
        self.image_proj = nn.Linear(config.img_dim, dim)  # W_v, b_v
        self.image_context = nn.Linear(config.img_dim, dim)  # W_x
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, dim)
        self.region_attention = ContextModulatedAttention(dim, config.context)
        self.word_attention = ContextModulatedAttention(dim, config.context)
        self.cell = nn.LSTMCell(2 * dim if config.fusion == "concat" else dim, dim)
        self.score_hidden = nn.Linear(dim, dim)
        self.score_out = nn.Linear(dim, 1)

    # -- per image / per caption ---------------------------------------------------------------
    def encode_images(self, features: Tensor) -> Encoded:
        features = self._check_features(features, self.config.img_dim, None)
        if self.config.instances == "grid" and math.isqrt(features.shape[1]) ** 2 != features.shape[1]:
            raise InputError(
                f"model.instances=grid reads a square grid of cells, got {features.shape[1]} feature rows "
                "per image (set model.instances=regions for detected regions)"
            )
        regions, context = self.image_proj(features), self.image_context(features.mean(1))
        if self.config.image_norm:
            regions = l2norm(regions)
        tensors = {"regions": regions, "region_keys": self.region_attention.keys(regions, context)}
        word_context = self.word_attention.from_other_side(context)
        return Encoded(tensors | ({} if word_context is None else {"word_context": word_context}))

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, sentence = self.text_encoder(tokens, lengths)
        tensors = {"words": words, "mask": mask, "word_keys": self.word_attention.keys(words, sentence)}
        region_context = self.region_attention.from_other_side(sentence)
        tensors |= {} if region_context is None else {"region_context": region_context}
        return Encoded(tensors, padded=frozenset({"words", "mask", "word_keys"}))

    # -- per pair ------------------------------------------------------------------------------
    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        # per step (training keeps every step): the tanh inputs and outputs over the instances,
        # the logits and weights, the selected pair, the LSTM's gates and states
        dim = self.config.embed_size
        per_step = 2 * (n_regions + n_words) * dim + 2 * (n_regions + n_words) + 4 * dim + 8 * dim
        return 4 * self.config.steps * per_step

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        return self.pair_stages(images, texts)["scores"]

    def pair_stages(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The scores (pairs...) and each step's saliency maps, `region_weights` (T, pairs..., R)
        and `word_weights` (T, pairs..., L), of pairs whose leading axes broadcast."""
        regions, words, mask = images["regions"], texts["words"], texts["mask"]
        pair_shape = torch.broadcast_shapes(regions.shape[:-2], words.shape[:-2])
        state = regions.new_zeros(*pair_shape, self.config.embed_size)
        memory = state
        region_maps, word_maps = [], []
        for _ in range(self.config.steps):
            p = self.region_attention(images["region_keys"], state, texts.get("region_context"))
            q = self.word_attention(texts["word_keys"], state, images.get("word_context"), mask)
            selected_region = torch.einsum("...r,...rd->...d", p, regions)
            selected_word = torch.einsum("...l,...ld->...d", q, words)
            state, memory = self._lstm_step(self._fuse(selected_region, selected_word), state, memory)
            region_maps.append(p)
            word_maps.append(q)
        hidden = torch.relu(self.score_hidden(state))
        scores = float32_linear(self.score_out, hidden).squeeze(-1)
        return {"scores": scores, "region_weights": torch.stack(region_maps), "word_weights": torch.stack(word_maps)}

    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]:
        """Why images[p] and texts[p] match, for each pair p (the search page's `Explains`): `score`
        (pairs,), `region_confidence` (pairs, R) the image saliency averaged over the steps, and
        `word_attention` (pairs, L, R): for each word, the regions selected at the steps that
        selected it, sum_t q_t,j p_t,i / sum_t q_t,j (rows of padding positions are 0)."""
        if len(images) != len(texts):
            raise InputError(f"explain takes pairs: {len(images)} images but {len(texts)} texts")
        stages = self.pair_stages(images.tensors, texts.tensors)
        regions, words = stages["region_weights"], stages["word_weights"]
        joint = torch.einsum("t...l,t...r->...lr", words, regions)
        word_share = words.sum(0).clamp(min=torch.finfo(words.dtype).tiny)
        return {
            "score": stages["scores"],
            "region_confidence": regions.mean(0),
            "word_attention": joint / word_share[..., None] * texts["mask"][..., None],
        }

    def _fuse(self, region: Tensor, word: Tensor) -> Tensor:
        if self.config.fusion == "product":
            return region * word
        return torch.cat([region, word], dim=-1)

    def _lstm_step(self, inputs: Tensor, state: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """One LSTM step over every pair: the cell runs on the pair axes flattened."""
        dim = state.shape[-1]
        flat = self.cell(inputs.reshape(-1, inputs.shape[-1]), (state.reshape(-1, dim), memory.reshape(-1, dim)))
        return tuple(part.reshape(state.shape) for part in flat)
