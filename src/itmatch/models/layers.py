"""Building blocks shared by the cross-attention models (CMCAN, and SCAN/SGRAF which use the same
cross attention, similarity vectors and graph reasoning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    # eps is added to the norm (not clamped) as in the official SCAN/SGRAF/CMCAN code, so that
    # all-zero rows (padding) stay zero. vector_norm, unlike pow-sum-sqrt, has a zero gradient
    # at a zero vector instead of 0/0 = NaN: batched padding makes such vectors common. (Norms of
    # bf16/fp16 tensors accumulate in float32; in fp16, eps rounds to 0, so the norm is floored at
    # fp16's smallest normal number.)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps
    if x.dtype == torch.float16:
        norm = norm.clamp(min=torch.finfo(torch.float16).tiny)
    return x / norm


def attend(weights: Tensor, items: Tensor, normalize: bool) -> Tensor:
    """Each query's attended vector sum_k weights[..., q, k] items[..., k, :], l2-normalised as
    `l2norm` does with `normalize`.

    Where the items are shared by several pairs (a grid tile's images or captions), the norm comes
    from their Gram matrix, |sum_k w_k x_k|^2 = w^T G w, and divides the weights instead of the
    result: the (pairs, queries, D) result is then written once and not read again for its norm
    and its division (exact up to rounding). A list of pairs has one item set per pair, whose Gram
    matrix would cost more than it saves."""
    if normalize and items.shape[:-2].numel() < weights.shape[:-2].numel():
        wide_items, wide = items.float(), weights.float()
        gram = wide_items @ wide_items.transpose(-1, -2)
        squared = (torch.einsum("...qk,...kj->...qj", wide, gram) * wide).sum(-1, keepdim=True)
        # w^T G w >= 0 up to rounding; the floor keeps the square root's gradient finite
        norm = squared.clamp(min=torch.finfo(torch.float32).tiny).sqrt() + 1e-8
        return torch.einsum("...qk,...kd->...qd", (wide / norm).to(weights.dtype), items)
    attended = torch.einsum("...qk,...kd->...qd", weights, items)
    return l2norm(attended) if normalize else attended


def float32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """`layer(x)` in float32 whatever the model's type: a scoring head in bf16 would round the
    scores to steps of 2^-9 near 1, enough to tie and swap near-equal candidates."""
    bias = None if layer.bias is None else layer.bias.float()
    return nn.functional.linear(x.float(), layer.weight.float(), bias)


def parameter_signature(parameters) -> tuple:
    """Changes whenever one of the tensors is updated in place, moved or cast: a key for results
    derived from weights (optimizer steps and load_state_dict bump `_version`)."""
    return tuple((p.data_ptr(), p._version) for p in parameters)


def xavier_init(module: nn.Module) -> None:
    """The official code's initialisation: uniform Xavier for Linear layers, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            bound = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


@dataclass
class CrossAttentionConfig:
    """How queries attend to keys from their cosine scores (SCAN's func_attention and relatives).

    SCAN's `raw_feature_norm` options map to (activation, normalization): clipped_l2norm =
    (leaky_relu, l2), l2norm = (none, l2), clipped_l1norm = (leaky_relu, l1), l1norm = (none, l1),
    softmax = (none, softmax), clipped = (leaky_relu, none), no_norm = (none, none).
    """

    # lambda: inverse temperature of the softmax over the attended items.
    temperature: float = 9.0
    activation: Literal["leaky_relu", "relu", "none"] = "leaky_relu"
    leaky_slope: float = 0.1
    normalization: Literal["l2", "l1", "softmax", "none"] = "l2"
    # Which axis the scores are normalised over before the softmax: SCAN's code (and CMCAN's)
    # normalises over the query items, the CMCAN paper over the attended items.
    normalize_over: Literal["queries", "keys"] = "queries"
    # The official CMCAN/SGRAF code l2-normalises the attended vector; SCAN and the CMCAN paper do not.
    normalize_output: bool = True


def attention_weights(
    scores: Tensor,
    config: CrossAttentionConfig,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Softmax weights over keys from cosine scores (..., queries, keys).

    Masks are True at real (not padding) items and broadcast against `scores`. Padding items score
    0 (their embeddings are zero), so they add nothing to an l1 or l2 normalisation; a softmax
    normalisation and the final softmax over keys leave them out explicitly.
    """
    if config.activation == "leaky_relu":
        scores = nn.functional.leaky_relu(scores, config.leaky_slope)
    elif config.activation == "relu":
        scores = scores.clamp(min=0)
    if config.normalization != "none":
        over_queries = config.normalize_over == "queries"
        scores = _normalize(
            scores, config.normalization, -2 if over_queries else -1, query_mask if over_queries else key_mask
        )
    logits = scores * config.temperature
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _normalize(scores: Tensor, kind: str, dim: int, mask: Tensor | None) -> Tensor:
    if kind == "l2":
        return l2norm(scores, dim=dim)
    if kind == "l1":
        return scores / (scores.abs().sum(dim, keepdim=True) + 1e-8)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


@dataclass
class SimilarityVectorConfig:
    # The official code computes l2norm(ReLU(W (a-b)^2 + bias)); the paper W (a-b)^2 / ||.||.
    bias: bool = True
    relu: bool = True


class SimilarityVector(nn.Module):
    """s(a, b) = l2norm(act(W (a - b)^2 + bias)): a P-d vector describing how a and b agree."""

    def __init__(self, in_dim: int, out_dim: int, config: SimilarityVectorConfig):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=config.bias)
        self.relu = config.relu

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = self.proj(squared_difference(a, b))
        return l2norm(out.clamp(min=0) if self.relu else out)


def squared_difference(a: Tensor, b: Tensor) -> Tensor:
    """(a - b)^2, broadcast, in one pass (mse_loss's elementwise kernel): (a - b).pow(2) makes two
    passes and a second tensor of the pairs x regions x D size, twice as slow here in bf16."""
    return nn.functional.mse_loss(*torch.broadcast_tensors(a, b), reduction="none")


class AttentionPool(nn.Module):
    """Self-attention pooling guided by the mean item (CMCAN's VisualSA / TextSA).

    logit_k = w . (tanh(norm(A x_k)) * tanh(norm(B mean(x)))); the pooled vector is the softmax-
    weighted sum of the items. `n_slots` adds the official BatchNorm1d over item slots (which
    fixes the number of items); `batchnorm=False` leaves both norms out (text).
    """

    def __init__(self, dim: int, dropout: float, n_slots: int | None = None):
        super().__init__()
        self.item_proj = nn.Linear(dim, dim)
        self.item_norm = nn.BatchNorm1d(n_slots) if n_slots else nn.Identity()
        self.mean_proj = nn.Linear(dim, dim)
        self.mean_norm = nn.BatchNorm1d(dim) if n_slots else nn.Identity()
        self.score = nn.Linear(dim, 1)
        self.dropout = nn.Dropout(dropout)

    def logits(self, items: Tensor, mask: Tensor | None = None) -> Tensor:
        """Raw attention logits (n, k); padded items get -inf."""
        if mask is None:
            mean = items.mean(1)
        else:
            mean = (items * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        local = self.dropout(torch.tanh(self.item_norm(self.item_proj(items))))
        common = self.dropout(torch.tanh(self.mean_norm(self.mean_proj(mean))))
        logits = self.score(local * common[:, None, :]).squeeze(-1)
        return logits if mask is None else logits.masked_fill(~mask, float("-inf"))

    def forward(self, items: Tensor, mask: Tensor | None = None) -> Tensor:
        """The pooled vector, not normalised."""
        weights = torch.softmax(self.logits(items, mask), dim=-1)
        return (weights[..., None] * items).sum(1)


class GraphReasoning(nn.Module):
    """One layer of self-attention reasoning over similarity nodes (SGRAF's SGR, CMCAN):
    S' = ReLU(W_r softmax((W_q S + b_q)(W_k S + b_k)^T) S + b_r)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.update = nn.Linear(dim, dim)

    def forward(self, nodes: Tensor, node_mask: Tensor | None = None, first_only: bool = False) -> Tensor:
        """nodes (batch, K, P) -> (batch, K, P); with `first_only`, node 0 alone (batch, 1, P)."""
        # (contiguous: a strided 3-d input makes F.linear copy the weight for every pair)
        sources = nodes[:, :1].contiguous() if first_only else nodes
        edges = self.edge_logits(sources, nodes)
        if node_mask is not None:
            edges = edges.masked_fill(~node_mask[..., None, :], float("-inf"))
        return torch.relu(self.update(torch.softmax(edges, dim=-1) @ nodes))

    def edge_logits(self, sources: Tensor, nodes: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            # Training: the plain form, so that every parameter (the key bias too) is in the graph,
            # as DistributedDataParallel requires.
            return self.query(sources) @ self.key(nodes).transpose(-1, -2)
        # Scoring: (S W_q^T W_k + b_q W_k) S^T. The terms left out of the full product are constant
        # along each row and cancel in the softmax, so the key projection is never computed: one
        # P x P product per node instead of two (exact up to rounding).
        weight, bias = self._composed_query_key()
        return nn.functional.linear(sources, weight, bias) @ nodes.transpose(-1, -2)

    def _composed_query_key(self) -> tuple[Tensor, Tensor]:
        """W_k^T W_q and b_q W_k, computed once per set of weights (not once per tile); a compiled
        graph computes them itself (a Python-side cache would break the graph)."""

        def compose() -> tuple[Tensor, Tensor]:
            return self.key.weight.T @ self.query.weight, self.query.bias @ self.key.weight

        if torch.compiler.is_compiling():
            return compose()
        version = parameter_signature([self.query.weight, self.query.bias, self.key.weight])
        if getattr(self, "_composed_version", None) != version:
            self._composed, self._composed_version = compose(), version
        return self._composed
