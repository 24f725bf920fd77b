"""Training objectives shared by the models: the bidirectional triplet ranking loss on a batch's
image x caption score matrix, and the context a model's `training_losses` reads.

With `train.global_negatives` under torchrun, a batch's in-batch losses see the global batch (every
process's items, in rank order): `batch_scores` gathers the other processes' caption encodings,
scores this process's images against all of them and gathers the strips, with gradients flowing
back to each process's own part; `TrainingContext.gather` does the same for any per-item tensor
a model's own loss needs (labels, embeddings). Every process then computes the same global loss,
and DistributedDataParallel's gradient average equals the gradient of one process with the
whole batch.

Shared terms (`loss.terms` lists those a model trains with; "cmpm" and "identity" need an
embedding model):
- "triplet": the bidirectional triplet ranking loss on the batch's image x caption scores;
- "cmpm": cross-modal projection matching (Zhang and Lu, ECCV 2018), on one vector per item;
- "identity": norm-softmax cross-entropy over identity classes, one class per training image
  (TIMAM, Sarafianos et al. 2019), with one classifier shared by both modalities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itmatch.config import LossConfig, hardest_k
from itmatch.distributed import gather_shards, gather_with_grad, max_over_processes, pad_axis, rank, world_size
from itmatch.errors import ConfigError
from itmatch.models.base import Encoded, Matcher
from itmatch.scoring import ScoringOptions, score_grid, score_pairs

# The shared terms computed on one vector per item.
VECTOR_TERMS = ("cmpm", "identity")


class Probing:
    """Whether the next batch tries active-pair rescoring. Under "sum" most pairs violate the margin
    for the first hundreds of steps: after a batch where more than `ACTIVE_SHARE_LIMIT` of them
    did, the next `PROBE_EVERY - 1` batches score every pair with gradients at once, without the
    pass that would find that out again (the same share on every process: the decisions agree)."""

    def __init__(self) -> None:
        self.skip = 0

    def due(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True


PROBE_EVERY = 10


@dataclass(frozen=True)
class TrainingContext:
    """What a model's loss terms may depend on besides the batch: the loss settings, the epoch
    (0-based; warm-ups and schedules read it) and whether in-batch losses see the global batch
    of all processes (`train.global_negatives` under torchrun)."""

    loss: LossConfig
    epoch: int = 0
    global_batch: bool = False
    # Back-propagate through the pairs the triplet loss reads only (`train.backward_pairs`).
    active_pairs: bool = True
    # Run the pair scorer through torch.compile (`train.compile`).
    compile: bool = False
    probing: Probing = field(default_factory=Probing, compare=False, repr=False)

    @property
    def scoring(self) -> ScoringOptions:
        """How training scores pairs: with the model as it is (under autocast where training runs
        so), never a copy cast to another precision."""
        return ScoringOptions(precision="fp32", compile=self.compile)

    def gather(self, part: Tensor) -> Tensor:
        """A per-item tensor of this process's batch, extended to the global batch (gradients flow
        back to this process's items; integer tensors such as labels carry none); unchanged
        without global negatives."""
        if not self.global_batch:
            return part
        return gather_with_grad(part) if part.is_floating_point() else gather_shards(part)

    def gather_encoded(self, encoded: Encoded) -> Encoded:
        """Encodings of the global batch: padded word axes are padded to the longest caption of
        all processes first, so that every process's part has the same shape."""
        if not self.global_batch:
            return encoded
        tensors = encoded.tensors
        if encoded.padded:
            some = tensors[next(iter(encoded.padded))]
            length = max_over_processes(some.shape[1], some.device)
            tensors = {k: pad_axis(v, 1, length) if k in encoded.padded else v for k, v in tensors.items()}
            tensors = {k: pad_axis(v, 2, length) if k in encoded.square else v for k, v in tensors.items()}
        gathered = {key: self.gather(value) for key, value in tensors.items()}
        return Encoded(gathered, encoded.padded, encoded.square)

    @property
    def negatives(self) -> str:
        """The triplet negatives of this epoch: "sum" during the warm-up epochs."""
        return "sum" if self.epoch < self.loss.warmup_epochs else self.loss.negatives


def batch_scores(model: Matcher, images: Encoded, texts: Encoded, context: TrainingContext) -> Tensor:
    """The (images, captions) score matrix of a training batch, of the global batch under global
    negatives: this process's images are scored against every process's captions and the strips
    gathered (scoring work is split, not repeated)."""
    if not context.global_batch:
        return score_grid(model, images, texts, context.scoring)
    return context.gather(score_grid(model, images, context.gather_encoded(texts), context.scoring))


def batch_triplet_term(
    model: Matcher, images: Encoded, texts: Encoded, batch: Mapping[str, Tensor], context: TrainingContext
) -> Tensor:
    """The triplet ranking loss of a batch's encodings (caption j's image is image j), of the
    global batch under global negatives; through `active_pair_scores` where that pays."""
    image_ids = _image_ids(batch, context)
    scores = None
    if _may_rescore_active_pairs(model, context, len(images)) and context.probing.due():
        scores = active_pair_scores(model, images, texts, image_ids, context)
        if scores is None:
            context.probing.skip = PROBE_EVERY - 1
    if scores is None:
        scores = batch_scores(model, images, texts, context)
    return triplet_ranking_loss(scores, context.loss, image_ids, context.negatives)


def triplet_term(scores: Tensor, batch: Mapping[str, Tensor], context: TrainingContext) -> Tensor:
    """The triplet ranking loss of a batch whose caption j belongs to image j (pair (j, j)), given
    the scores of the global batch under global negatives (`batch_scores`)."""
    return triplet_ranking_loss(scores, context.loss, _image_ids(batch, context), context.negatives)


def _image_ids(batch: Mapping[str, Tensor], context: TrainingContext) -> Tensor | None:
    if not context.loss.exclude_same_image:
        return None
    return context.gather(batch["image_index"])


# Rescoring the active pairs pays while they are a small share of the batch's pairs: the pass
# without gradients costs about a third of one with them, so the break-even lies near 0.7.
ACTIVE_SHARE_LIMIT = 0.5


def _may_rescore_active_pairs(model: Matcher, context: TrainingContext, local_batch: int) -> bool:
    """Only for models that run a network per pair (a dot product costs nothing to redo) whose
    pair scores do not depend on the other pairs of a tile; under "hardest" or "k:N" negatives
    only where the (2k + 1) pairs per image the loss reads are few enough ("sum" reads the
    violating pairs: known once the batch is scored)."""
    k = hardest_k(context.negatives)
    batch = local_batch * (world_size() if context.global_batch else 1)
    per_pair_network = not model.scores_by_dot_product and not model.tile_spans_all_images
    few_enough = k is None or 2 * k + 1 <= ACTIVE_SHARE_LIMIT * batch
    return context.active_pairs and per_pair_network and few_enough


def active_pair_scores(
    model: Matcher, images: Encoded, texts: Encoded, image_ids: Tensor | None, context: TrainingContext
) -> Tensor | None:
    """The batch's score matrix with gradients at the pairs the triplet loss reads, -inf elsewhere;
    None where those are more than `ACTIVE_SHARE_LIMIT` of the pairs (under "sum", early in
    training): scoring every pair with gradients is then cheaper.

    Every pair is scored without gradients (cheap: no activations kept, and the pair scorer's
    inference rewrites apply); `triplet_active_pairs` then names the pairs the loss reads, and
    those alone are scored again with gradients, in the training's own precision. The loss and
    its gradients equal those of scoring every pair with gradients, up to rounding: a negative
    within rounding of another (the harder of the two) or of the margin (under "sum") may count
    differently. The backward pass runs through (2k + 1) pairs per image instead of the batch
    size, or through the violating pairs under "sum". Under global negatives each process
    rescores the active pairs of its own images.
    """
    texts = context.gather_encoded(texts)
    with torch.no_grad():
        everything = context.gather(score_grid(model, images, texts, context.scoring))
    active = triplet_active_pairs(everything, context.loss, image_ids, context.negatives)
    if active.float().mean() > ACTIVE_SHARE_LIMIT:  # the same on every process: one matrix
        return None
    first = rank() * len(images) if context.global_batch else 0
    own = active[first : first + len(images)]
    image_index, text_index = own.nonzero(as_tuple=True)
    rescored = score_pairs(model, images, texts, image_index, text_index, context.scoring)
    strip = everything[first : first + len(images)].masked_fill(~own, float("-inf"))
    return context.gather(strip.index_put((image_index, text_index), rescored))


def triplet_active_pairs(
    scores: Tensor, config: LossConfig, image_ids: Tensor | None = None, negatives: str | None = None
) -> Tensor:
    """The (images, captions) pairs whose scores `triplet_ranking_loss` reads: the matching pairs
    and, both ways, each query's k hardest negatives ("hardest", "k:N") or every negative that
    violates the margin ("sum")."""
    caption_cost, image_cost = _violations(scores, config, image_ids)
    active = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    k = hardest_k(negatives or config.negatives)
    if k is None:  # (a NaN score counts as read: the loss must turn NaN as it would with every pair)
        return active | ~((caption_cost <= 0) & (image_cost <= 0))
    k = min(k, len(scores))
    active.scatter_(1, caption_cost.topk(k, dim=1).indices, True)
    return active.scatter_(0, image_cost.topk(k, dim=0).indices, True)


def triplet_ranking_loss(
    scores: Tensor,
    config: LossConfig,
    image_ids: Tensor | None = None,
    negatives: str | None = None,
) -> Tensor:
    """Hinge loss of every negative against the matching pair (the diagonal of `scores`).

    Row i is image i, column j caption j, and pair (i, i) matches. Both directions count: captions
    ranked for an image and images ranked for a caption. "hardest" keeps each query's hardest
    negative, "k:N" its N hardest, "sum" all of them; `negatives` overrides the config's (the
    trainer passes "sum" during the warm-up epochs). With `image_ids`, other captions of the same
    image in the batch are not treated as negatives.
    """
    caption_cost, image_cost = _violations(scores, config, image_ids)
    k = hardest_k(negatives or config.negatives)
    if k is not None:
        k = min(k, len(scores))
        caption_cost, image_cost = caption_cost.topk(k, dim=1).values, image_cost.topk(k, dim=0).values
    total = caption_cost.sum() + image_cost.sum()
    return total if config.reduction == "sum" else total / len(scores)


def _violations(scores: Tensor, config: LossConfig, image_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """The hinge of every negative against each image's matching caption (rows) and each
    caption's matching image (columns); 0 where a pair is not a negative."""
    positive = scores.diagonal()
    caption_cost = (config.margin + scores - positive[:, None]).clamp(min=0)
    image_cost = (config.margin + scores - positive[None, :]).clamp(min=0)
    not_negative = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        ids = image_ids.to(scores.device)
        not_negative = not_negative | (ids[:, None] == ids[None, :])
    return caption_cost.masked_fill(not_negative, 0), image_cost.masked_fill(not_negative, 0)


def cmpm_loss(images: Tensor, texts: Tensor, labels: Tensor, epsilon: float = 1e-8) -> Tensor:
    """Cross-modal projection matching: L_i2t + L_t2i on the unnormalised vectors of a batch.

    p_ij = softmax_j(x_i . z_j / |z_j|), the scalar projection of image i on caption j against
    those on every caption of the batch (no temperature: the scale is the vectors' norm);
    q_ij = y_ij / sum_k y_ik with y_ij = 1 when items i and j have the same label;
    L_i2t = mean_i sum_j p_ij log(epsilon + p_ij / (q_ij + epsilon)), and L_t2i likewise with the
    image vectors normalised (the CMPM authors' TensorFlow code, modules.py cmpm_loss_compute).
    """
    same = (labels[:, None] == labels[None, :]).to(images.dtype)
    target = same / same.sum(1, keepdim=True)
    total = images.new_zeros(())
    for source, other in ((images, texts), (texts, images)):
        p = torch.softmax(source @ nn.functional.normalize(other, dim=-1, eps=1e-12).T, dim=1)
        total = total + (p * torch.log(epsilon + p / (target + epsilon))).sum(1).mean()
    return total


class IdentityClassifier(nn.Module):
    """The norm-softmax layer of the identity loss: logits W_c . x + b_c with every class weight
    W_c of unit norm (x unnormalised), shared by images and captions. Xavier-initialised as CMPC's
    `Wfc`; the bias is TIMAM's b (`loss.identity_bias`)."""

    def __init__(self, dim: int, n_classes: int, bias: bool):
        super().__init__()
        bound = math.sqrt(6.0 / (dim + n_classes))
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(n_classes)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, nn.functional.normalize(self.weight, dim=1), self.bias)


def identity_loss(
    classifier: IdentityClassifier, images: Tensor, texts: Tensor, labels: Tensor, smoothing: float = 0.0
) -> Tensor:
    """L_I^V + L_I^T: the mean cross-entropy of each modality's vectors against their identity."""
    return sum(nn.functional.cross_entropy(classifier(x), labels, label_smoothing=smoothing) for x in (images, texts))


def loss_heads(config: LossConfig, embed_size: int | None) -> nn.ModuleDict:
    """The parameters the configured terms own (the identity classifier), for the model to hold."""
    heads = nn.ModuleDict()
    if "identity" in config.terms and config.identity_classes:  # 0 until training reads the data
        if embed_size is None:
            raise ConfigError("loss.terms identity needs a model with model.embed_size")
        heads["identity"] = IdentityClassifier(embed_size, config.identity_classes, config.identity_bias)
    return heads


def embedding_terms(
    images: Encoded, texts: Encoded, key: str, heads: nn.ModuleDict, batch, context: TrainingContext
) -> dict[str, Tensor]:
    """The "cmpm" and "identity" terms of `context.loss.terms` on a batch's image and caption
    vectors (caption j's image is image j): the "unnormalized" vectors when the encodings have
    them, else those under `key` (unit vectors: CMPM's logits then lie in [-1, 1]). Labels are
    the images' indices in the split; the global batch's under global negatives."""
    config = context.loss
    key = "unnormalized" if "unnormalized" in images else key
    image_vectors, text_vectors = context.gather(images[key]), context.gather(texts[key])
    labels = context.gather(batch["image_index"].to(image_vectors.device))
    terms = {}
    if "cmpm" in config.terms:
        terms["cmpm"] = cmpm_loss(image_vectors, text_vectors, labels, config.cmpm_epsilon)
    if "identity" in config.terms:
        if "identity" not in heads:
            raise ConfigError("loss.identity_classes is 0: training sets it to the number of train images")
        classifier = heads["identity"]
        terms["identity"] = identity_loss(classifier, image_vectors, text_vectors, labels, config.label_smoothing)
    return terms
