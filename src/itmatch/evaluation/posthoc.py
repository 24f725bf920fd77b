"""Post-hoc similarity stages: what runs between the image x caption score matrices and the ranking.

Every stage here is training-free and transductive: it reads the whole score matrix of the queries
and the gallery at hand (one fold under COCO's 1K protocol, the batch of queries in batch
retrieval), and nothing else; in particular never which captions belong to which image.

A stage maps a `Views` pair to another: `i2t` ranks the captions of each image (rows), `t2i` the
images of each caption (columns). They start as the same matrix and part when a stage treats the
two directions differently (inverted softmax normalises over the queries of each direction).

- Fusion of several models' matrices: the plain mean (the field's "ensemble" rows), or adaptive
  metric fusion (`amf_fuse`: each model weighted per query by its cross-modal reciprocal
  consistency and by its query-replacement gap; a reading of Niu, Huang and Wang 2020, see there).
- Hub reduction: inverted softmax (Smith et al. 2017) and CSLS (Conneau et al. 2018).
- Cross-modal reciprocal re-ranking: each query's top K re-sorted by the rank the query gets back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itmatch.errors import InputError

FUSIONS = ("mean", "amf")


@dataclass(frozen=True)
class Views:
    """Scores ranking captions for each image (`i2t`) and images for each caption (`t2i`), both
    (n_images, n_captions)."""

    i2t: Tensor
    t2i: Tensor

    @classmethod
    def of(cls, sims: Tensor) -> Views:
        return cls(sims, sims)


def inverted_softmax(views: Views, temperature: float) -> Views:
    """Each gallery item's scores softmax-normalised over the queries: captions (the i2t gallery)
    over the images, images (the t2i gallery) over the captions. An item close to every query (a
    hub) is shared out among them instead of topping every list."""
    i2t, t2i = views.i2t.double() / temperature, views.t2i.double() / temperature
    return Views(torch.softmax(i2t, dim=0), torch.softmax(t2i, dim=1))


def csls(views: Views, k: int) -> Views:
    """Cross-domain similarity local scaling: 2 s(i, c) - r(i) - r(c), with r(i) the mean of image
    i's k best caption scores and r(c) the mean of caption c's k best image scores (k is capped at
    the number of items; MUSE uses 10)."""
    return Views(*(_local_scaling(sims.double(), k) for sims in (views.i2t, views.t2i)))


def _local_scaling(sims: Tensor, k: int) -> Tensor:
    image_density = sims.topk(min(k, sims.shape[1]), dim=1).values.mean(1, keepdim=True)
    caption_density = sims.topk(min(k, sims.shape[0]), dim=0).values.mean(0, keepdim=True)
    return 2 * sims - image_density - caption_density


def ranks(sims: Tensor, dim: int) -> Tensor:
    """0-based position of each entry in its row (dim=1) or column (dim=0), best score first; ties
    in index order (a stable sort, as the metrics)."""
    order = torch.sort(sims, dim=dim, descending=True, stable=True).indices
    positions = torch.arange(sims.shape[dim]).view((-1, 1) if dim == 0 else (1, -1)).expand_as(sims)
    return torch.empty_like(order).scatter_(dim, order, positions)


def reciprocal_rerank(views: Views, k: int) -> Views:
    """Each query's top k re-sorted by the rank the query gets back in the candidate's own list
    (an image among a caption's images, a caption among an image's captions), the forward rank
    breaking ties; the rest of each list keeps its order below them. Only the two score matrices
    are read: a caption's siblings (the other captions of its image) are not known here."""
    i2t = _rerank_queries(views.i2t.double(), ranks(views.t2i, dim=0), k)
    t2i = _rerank_queries(views.t2i.double().T, ranks(views.i2t, dim=1).T, k).T
    return Views(i2t, t2i)


def _rerank_queries(sims: Tensor, back_ranks: Tensor, k: int) -> Tensor:
    """Rows are queries. `back_ranks[q, g]` is the rank of query q in gallery item g's list."""
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices  # forward order, best first
    back = back_ranks.gather(1, top)
    # Sort key: reverse rank first, forward position second (exact in float64 for any size here).
    key = back.double() * k + torch.arange(k, dtype=torch.float64)
    new_order = top.gather(1, key.argsort(dim=1))
    # The re-sorted top k score above the row's maximum, in their new order; the rest keep theirs.
    ladder = torch.arange(k, 0, -1, dtype=sims.dtype)
    reranked = sims.clone()
    reranked.scatter_(1, new_order, sims.amax(1, keepdim=True) + ladder)
    return reranked


# -- fusion ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmfSettings:
    """Adaptive metric fusion. `k`: the neighbourhood size of both consistency measures.
    `gap_weight`: how much the query-replacement agreement counts beside the reciprocal
    consistency (1 = as much). `floor` (> 0): the least weight a model keeps for a query, so a
    model no neighbourhood agrees with is damped, not dropped."""

    k: int = 10
    gap_weight: float = 1.0
    floor: float = 0.05


def mean_fuse(matrices: list[Tensor]) -> Views:
    """The plain average of the models' score matrices (the papers' ensembles)."""
    return Views.of(sum(matrices) / len(matrices))


def amf_fuse(matrices: list[Tensor], settings: AmfSettings = AmfSettings()) -> Views:
    """Adaptive metric fusion, after Niu, Huang and Wang, "Re-ranking image-text matching by
    adaptive metric fusion" (Pattern Recognition 2020), as far as its abstract can be read.

    Each model's matrix is standardised (its scale says nothing about its quality), then each query
    mixes the models with weights that say how trustworthy each model is *for that query*:
    - cross-modal reciprocal encoding (CRE, from the paper): the share of the query's top k whose
      own top k, in the reverse direction, hold the query;
    - query-replacement agreement (our reading of the paper's second module, "Query ...", which
      alleviates the gap between the visual and textual spaces): the query replaced by its best
      candidate, the share of the query's top k that are also the replacement's k nearest
      same-modality items, by the cosine of their score profiles under the same model.
    Image queries (i2t) and caption queries (t2i) get their own weights.
    """
    check_amf(settings)
    standard = [(m.double() - m.double().mean()) / m.double().std().clamp_min(1e-12) for m in matrices]
    image_weights = torch.stack([_query_trust(m, settings) for m in standard])  # (models, n_images)
    caption_weights = torch.stack([_query_trust(m.T, settings) for m in standard])  # (models, n_captions)
    image_weights = image_weights / image_weights.sum(0)
    caption_weights = caption_weights / caption_weights.sum(0)
    i2t = sum(w[:, None] * m for w, m in zip(image_weights, standard, strict=True))
    t2i = sum(w[None, :] * m for w, m in zip(caption_weights, standard, strict=True))
    return Views(i2t, t2i)


def _query_trust(sims: Tensor, settings: AmfSettings) -> Tensor:
    """Per query (row) of one model's matrix: floor + reciprocal consistency + gap_weight x
    query-replacement agreement."""
    k_forward, k_back = min(settings.k, sims.shape[1]), min(settings.k, sims.shape[0])
    top_scores, top = sims.topk(k_forward, dim=1)  # (queries, k)
    # The query is in a candidate's own top k when it scores at least the candidate's k-th best.
    kth_best = sims.topk(k_back, dim=0).values[-1]
    reciprocal = (top_scores >= kth_best[top]).double().mean(1)
    # Query replacement: the best candidate stands in for the query inside its own modality.
    profiles = torch.nn.functional.normalize(sims, dim=0)  # candidates described by their query scores
    best = top[:, 0]
    if sims.shape[0] <= sims.shape[1]:  # the cheaper product of the two equal ones
        similarity = profiles[:, best].T @ profiles
    else:
        similarity = (profiles.T @ profiles)[best]
    neighbours = similarity.topk(k_forward, dim=1).indices
    agreement = (top[:, :, None] == neighbours[:, None, :]).any(2).double().mean(1)
    return settings.floor + reciprocal + settings.gap_weight * agreement


# -- the configured pipeline ---------------------------------------------------------------------


@dataclass(frozen=True)
class PostHoc:
    """The post-hoc stages to apply, in this order: fusion of the models' matrices, inverted
    softmax (temperature), CSLS (k), reciprocal re-ranking (k). None leaves a stage out."""

    fuse: str = "mean"
    inverted_softmax: float | None = None
    csls: int | None = None
    reciprocal: int | None = None
    amf: AmfSettings = AmfSettings()

    def __post_init__(self):
        if self.fuse not in FUSIONS:
            raise InputError(f"unknown fusion {self.fuse!r}; choose one of {', '.join(FUSIONS)}")
        temperature = self.inverted_softmax
        if temperature is not None and not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise InputError(f"inverted softmax temperature must be a finite number > 0, got {temperature!r}")
        for name in ("csls", "reciprocal"):
            _check_k(name, getattr(self, name))
        check_amf(self.amf)

    @property
    def active(self) -> bool:
        """Whether anything but the plain mean runs."""
        return self.fuse != "mean" or any(v is not None for v in (self.inverted_softmax, self.csls, self.reciprocal))

    def describe(self) -> str:
        """'amf fusion, csls 10', or '' for none."""
        parts = [f"{self.fuse} fusion"] if self.fuse != "mean" else []
        parts += [
            f"{label} {value:g}"
            for label, value in (
                ("inverted softmax", self.inverted_softmax),
                ("csls", self.csls),
                ("reciprocal", self.reciprocal),
            )
            if value is not None
        ]
        return ", ".join(parts)

    def check_models(self, n_models: int) -> None:
        if self.fuse == "amf" and n_models < 2:
            raise InputError(f"amf fusion weighs several models' scores: give at least 2 models, got {n_models}")

    def fused(self, matrices: list[Tensor]) -> Views:
        self.check_models(len(matrices))
        return amf_fuse(matrices, self.amf) if self.fuse == "amf" else mean_fuse(matrices)

    def refine(self, views: Views) -> Views:
        """The stages after fusion."""
        if self.inverted_softmax is not None:
            views = inverted_softmax(views, self.inverted_softmax)
        if self.csls is not None:
            views = csls(views, self.csls)
        if self.reciprocal is not None:
            views = reciprocal_rerank(views, self.reciprocal)
        return views

    def __call__(self, matrices: list[Tensor]) -> Views:
        """Ranking scores of the models' (n_images, n_captions) matrices of one fold."""
        return self.refine(self.fused([m.detach().cpu() for m in matrices]))


def _check_k(name: str, k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"{name} takes a neighbourhood size k >= 1, got {k!r}")


def check_amf(settings: AmfSettings) -> None:
    _check_k("amf", settings.k)
    for name, least in (("gap_weight", 0.0), ("floor", math.ulp(0.0))):
        value = getattr(settings, name)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= least):
            relation = ">= 0" if least == 0 else "> 0"
            raise InputError(f"amf {name} must be a finite number {relation}, got {value!r}")
