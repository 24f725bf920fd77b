"""Scoring many image-caption pairs with any model: the engine that evaluation, retrieval, the
service, training and the benchmarks share.

A model only encodes and scores broadcast pairs (`Matcher.pair_scores`; embedding models score by
a dot product of their vectors); this module decides how many pairs run at once, in which
precision, compiled or not. Its options travel as one `ScoringOptions` object, so callers never
thread loose parameters through their signatures.

- `score_grid`: every image with every caption, tiled so that working memory stays within a
  budget (texts sorted by length share tiles with texts of about their length: little padding).
- `score_pairs`: a list of (image, caption) pairs, in chunks of the same budget.

Under torchrun, `ScoringOptions(across_processes=True)` splits the captions (or the pairs) into
one contiguous share per process and gathers the scores, so that every process returns the whole
result having scored 1/N of it.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmatch.distributed import gather_shards, shard, world_size
from itmatch.errors import InputError
from itmatch.models.base import Encoded, Matcher
from itmatch.models.layers import parameter_signature
from itmatch.precision import AUTO, check_precision, precision_dtype, resolve

# Working memory of one tile by default: small tiles stay in the CPU's cache, while a GPU needs
# large tiles to be busy (measured: 64 MiB is the fastest here on CPU and 12-16x too small on an
# H100).
DEFAULT_MEMORY_BUDGET = {"cpu": 64 << 20, "cuda": 2 << 30}


@dataclass(frozen=True)
class ScoringOptions:
    """How to score many pairs.

    memory_budget: bytes of working memory per tile (None: the device's default);
    precision: "fp32", "bf16", "fp16" or "auto", the fastest that this machine runs well
    (`itmatch.precision`; scores are always returned in float32);
    compile: run the pair scorer through torch.compile (fused kernels; compiling costs tens of
    seconds once, so it pays on large evaluations); progress: a progress bar over tiles;
    across_processes: every process of a torchrun job scores a share and receives the whole
    (each must call with the same arguments).
    """

    memory_budget: int | None = None
    precision: str = AUTO
    compile: bool = False
    progress: bool = False
    across_processes: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.memory_budget is not None and self.memory_budget < 1:
            raise InputError(f"memory_budget must be at least 1 byte, got {self.memory_budget}")

    @property
    def dtype(self) -> torch.dtype | None:
        return precision_dtype(self.precision)

    def on(self, device: torch.device) -> ScoringOptions:
        """These options with "auto" resolved to this device's precision; fp32 while gradients
        are recorded (a copy of the model cast to another type would carry none: training takes
        bf16 through autocast, `train.precision`)."""
        if self.precision == AUTO and torch.is_grad_enabled():
            return replace(self, precision="fp32")
        return replace(self, precision=resolve(self.precision, device))


DEFAULT = ScoringOptions()


def score_grid(model: Matcher, images: Encoded, texts: Encoded, options: ScoringOptions = DEFAULT) -> Tensor:
    """Scores of every image with every text: (n_images, n_texts), float32."""
    options = options.on(model.device)
    if options.across_processes and world_size() > 1:
        return gather_shards(_score_grid(model, images, texts.select(shard(len(texts))), options), dim=1)
    return _score_grid(model, images, texts, options)


def _score_grid(model: Matcher, images: Encoded, texts: Encoded, options: ScoringOptions) -> Tensor:
    if model.scores_by_dot_product:
        key, dtype = model.embedding_key, options.dtype
        return (images[key].to(dtype=dtype) @ texts[key].to(dtype=dtype).T).float()
    scorer = pair_scorer(model, options)
    image_tile, text_tile = _tile_shape(model, images, texts, options)
    lengths = texts["mask"].sum(1)
    # BatchNorm statistics updated per caption keep the caption order when tiles span all images.
    order = torch.arange(len(texts), device=lengths.device) if model.tile_spans_all_images else lengths.argsort()
    scores = torch.empty(len(images), len(texts), device=model.device)  # the only copy of the result
    tiles = range(0, len(images), image_tile)
    for i in tqdm(tiles, desc="score pairs", disable=not options.progress, leave=False):
        # Each tile picks (and casts) its own items, so that memory stays within the budget
        # instead of growing with a sorted or cast copy of the whole set.
        image_part = images.select(slice(i, i + image_tile)).to(dtype=options.dtype)
        for j in range(0, len(texts), text_tile):
            text_part = texts.select(order[j : j + text_tile]).to(dtype=options.dtype)
            tile = scorer(*grid_view(image_part, text_part))
            scores[i : i + image_tile, order[j : j + text_tile]] = tile.T.float()
    return scores


def score_pairs(
    model: Matcher,
    images: Encoded,
    texts: Encoded,
    image_index: Tensor,
    text_index: Tensor,
    options: ScoringOptions = DEFAULT,
) -> Tensor:
    """Scores of the pairs (images[image_index[p]], texts[text_index[p]]): (n_pairs,), float32."""
    options = options.on(model.device)
    if options.across_processes and world_size() > 1:
        share = shard(len(image_index))
        return gather_shards(_score_pairs(model, images, texts, image_index[share], text_index[share], options))
    return _score_pairs(model, images, texts, image_index, text_index, options)


def _score_pairs(model, images, texts, image_index: Tensor, text_index: Tensor, options: ScoringOptions) -> Tensor:
    image_index, text_index = image_index.to(model.device), text_index.to(model.device)
    dtype = options.dtype
    if model.scores_by_dot_product:
        key = model.embedding_key
        pairs = images[key][image_index].to(dtype=dtype) * texts[key][text_index].to(dtype=dtype)
        return pairs.sum(-1).float()
    scorer = pair_scorer(model, options)
    chunk = _pairs_per_tile(model, images, texts, options)
    order = texts["mask"].sum(1)[text_index].argsort()  # chunks of pairs with texts of similar length
    image_index, text_index = image_index[order], text_index[order]
    parts = [
        scorer(
            images.select(image_index[p : p + chunk]).to(dtype=dtype).tensors,
            texts.select(text_index[p : p + chunk]).to(dtype=dtype).tensors,
        )
        for p in range(0, len(image_index), chunk)
    ]
    scores = torch.cat(parts).float() if parts else torch.zeros(0, device=model.device)
    return scores[order.argsort()]


def grid_view(images: Encoded, texts: Encoded) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The pair-axis view of every image with every text, text-major: images (1, n_i, ...), texts
    (n_t, 1, ...), so `pair_scores` gives (n_t, n_i). Text-major because the batched products that
    attend a caption's words for every region then write their (texts, images, regions, D) result
    in place, where image-major order made a copy of it (regions outnumber words)."""
    return (
        {key: value.unsqueeze(0) for key, value in images.tensors.items()},
        {key: value.unsqueeze(1) for key, value in texts.tensors.items()},
    )


# Pair scorers of each model in each (precision, compile): kept beside the model, not in it, so
# that copying a model (deepcopy, state_dict) never copies them.
_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pair_scorer(model: Matcher, options: ScoringOptions = DEFAULT):
    """`model.pair_scores` in the options' precision (on a copy of the model in that type, cached
    and remade when the weights change), optionally compiled."""
    options = options.on(model.device)
    dtype, key = options.dtype, (options.precision, options.compile)
    weights = () if dtype is None else parameter_signature(model.parameters())
    cache = _SCORERS.setdefault(model, {})
    if key not in cache or cache[key][0] != weights:
        module = model if dtype is None else copy.deepcopy(model).to(dtype).eval()
        function = torch.compile(module.pair_scores, dynamic=True) if options.compile else module.pair_scores
        cache[key] = (weights, function)
    return cache[key][1]


def _tile_shape(model: Matcher, images: Encoded, texts: Encoded, options: ScoringOptions) -> tuple[int, int]:
    pairs = _pairs_per_tile(model, images, texts, options)
    if model.tile_spans_all_images:  # scores depend on the other images of the tile
        return max(1, len(images)), max(1, pairs // max(1, len(images)))
    image_tile = max(1, min(len(images), math.isqrt(pairs)))
    return image_tile, max(1, min(len(texts), pairs // image_tile))


def _pairs_per_tile(model: Matcher, images: Encoded, texts: Encoded, options: ScoringOptions) -> int:
    budget = options.memory_budget or DEFAULT_MEMORY_BUDGET.get(model.device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    per_pair = model.bytes_per_pair(images["regions"].shape[1], texts["mask"].shape[1])
    if options.precision != "fp32":  # the estimate counts 4-byte floats
        per_pair //= 2
    return max(1, budget // per_pair)
