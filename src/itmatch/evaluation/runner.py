"""Evaluating a matcher on a precomp split with the field's protocols."""

from __future__ import annotations

import time

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from itmatch.data.datasets import CaptionDataset, ImageDataset, make_loader
from itmatch.data.inputs import Readers, readers_for, text_readers
from itmatch.data.precomp import PrecompSplit
from itmatch.data.raw import RawImageSplit
from itmatch.errors import InputError
from itmatch.evaluation.metrics import aggregate_folds, retrieval_metrics
from itmatch.evaluation.posthoc import PostHoc
from itmatch.models.base import Encoded, Matcher
from itmatch.retrieval import check_rerank, embeddings, encode_queries, two_stage_scores
from itmatch.scoring import ScoringOptions, score_grid

# "1k": the whole split at once (Flickr30K's 1K test, Flickr8k, synthetic sets);
# "coco-5fold": COCO 1K, five consecutive folds of the 5K split averaged; "coco-5k": all 5,000.
PROTOCOLS = ("1k", "coco-5fold", "coco-5k")


@torch.no_grad()
def encode_split(
    model: Matcher,
    split: PrecompSplit | RawImageSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: bool = True,
    rows: list[int] | None = None,
) -> tuple[Encoded, Encoded]:
    """Every image and every caption of the split encoded once, in order; with `rows`, only those
    images and their captions."""
    readers = readers_for(model, split)  # a model that cannot read the split fails before any work
    images = encode_images(model, split, batch_size, workers, progress, rows, readers)
    return images, encode_captions(model, split, batch_size, workers, progress, rows, readers)


@torch.no_grad()
def encode_images(
    model: Matcher,
    split: PrecompSplit | RawImageSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: bool = True,
    rows: list[int] | None = None,
    readers: Readers | None = None,
) -> Encoded:
    """The split's images (with `rows`, those images) encoded, in order."""
    image_set = ImageDataset(split, (readers or readers_for(model, split)).image)
    image_set = image_set if rows is None else Subset(image_set, rows)
    return _encode_all(model.encode_image_batch, image_set, batch_size, workers, progress, "encode images")


@torch.no_grad()
def encode_captions(
    model: Matcher,
    split: PrecompSplit | RawImageSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: bool = True,
    rows: list[int] | None = None,
    readers: Readers | None = None,
) -> Encoded:
    """The split's captions encoded (with `rows`, those of these images); a split without captions
    (photos alone) gives an empty encoding."""
    captions = CaptionDataset(split, readers.text if readers else text_readers(model, split))
    if rows is not None:
        per_image = split.captions_per_image
        captions = Subset(captions, [row * per_image + j for row in rows for j in range(per_image)])
    if not len(captions):
        return encode_queries(model, ["a"]).select(slice(0, 0))
    return _encode_all(model.encode_text_batch, captions, batch_size, workers, progress, "encode captions")


def _encode_all(encode, items, batch_size: int, workers: int, progress: bool, desc: str) -> Encoded:
    """`encode` of every batch of `items`, concatenated in order."""
    batches = tqdm(make_loader(items, batch_size, workers), desc=desc, disable=not progress, leave=False)
    return Encoded.cat([encode(batch) for batch in batches])


@torch.no_grad()
def evaluate_split(
    models: Matcher | list[Matcher],
    split: PrecompSplit | RawImageSplit,
    protocol: str = "1k",
    batch_size: int = 128,
    workers: int = 0,
    progress: bool = True,
    inverted_softmax: float | None = None,
    *,
    scoring: ScoringOptions | None = None,
    rerank_k: int | None = None,
    first_stage: Matcher | None = None,
    candidates: str = "top-k",
    csls: int | None = None,
    reciprocal: int | None = None,
    fuse: str = "mean",
    transductive: bool = False,
) -> dict:
    """Bidirectional retrieval metrics on `split` (models are put in eval mode).

    Several models form an ensemble: their score matrices are averaged, as the field's "ensemble"
    rows do, or weighted per query with `fuse="amf"`. Post-hoc stages then run on each fold's
    matrix (`itmatch.evaluation.posthoc`): `inverted_softmax` (a temperature) and `csls` (k)
    counter hubs (items close to every query), `reciprocal` (k) re-sorts each query's top k by
    the rank the query gets back. `rerank_k` scores only each query's top k by embedding (the
    model's own, or those of the `first_stage` model) with the full model; `candidates="margin"`
    shares the same budget of pairs out by the first stage's confidence instead
    (`itmatch.retrieval.candidate_pairs`). `transductive` scores each fold by the models'
    gallery-dependent score (`Matcher.transductive_scores`) instead of their pair scores.
    `scoring` says how pairs are scored (memory budget, precision, compile; see `itmatch.scoring`).
    The result records the pairs scored and the seconds spent scoring.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    n_folds = 5 if protocol == "coco-5fold" else 1
    if split.n_images % n_folds:
        raise InputError(f"{protocol} needs a number of images divisible by 5; the split has {split.n_images}")
    models = models if isinstance(models, list) else [models]
    posthoc = PostHoc(fuse, inverted_softmax, csls, reciprocal)
    posthoc.check_models(len(models))
    if rerank_k is not None and (len(models) > 1 or posthoc.active):
        raise InputError("reranking (rerank_k) takes one model, without post-hoc stages or fusion")
    if transductive and rerank_k is not None:
        raise InputError("transductive scores take the whole fold: not with rerank_k")
    if first_stage is not None and rerank_k is None:
        raise InputError("a first-stage model is only used with rerank_k")
    check_rerank(rerank_k, candidates)
    scoring = scoring or ScoringOptions(progress=progress)
    encodings = []
    for model in models + ([first_stage] if first_stage is not None else []):
        model.eval()
        encodings.append(encode_split(model, split, batch_size, workers, progress))
    per_image = split.captions_per_image
    fold_images = split.n_images // n_folds
    folds, pairs_scored, started = [], 0, time.perf_counter()
    for fold in range(n_folds):
        images = slice(fold * fold_images, (fold + 1) * fold_images)
        texts = slice(images.start * per_image, images.stop * per_image)
        fold_codes = [(image_codes.select(images), text_codes.select(texts)) for image_codes, text_codes in encodings]
        rerank = None if rerank_k is None else (rerank_k, first_stage, candidates)
        i2t_sims, t2i_sims, pairs = _fold_rankings(models, fold_codes, posthoc, scoring, rerank, transductive)
        pairs_scored += pairs
        folds.append(retrieval_metrics(i2t_sims, per_image, t2i_sims=t2i_sims))
    result = aggregate_folds(folds) if n_folds > 1 else folds[0]
    return {
        **result,
        "protocol": protocol,
        "inverted_softmax": inverted_softmax,
        "csls": csls,
        "reciprocal": reciprocal,
        "fuse": fuse,
        "transductive": transductive,
        "precision": scoring.on(models[0].device).precision,
        "rerank_k": rerank_k,
        "candidates": candidates if rerank_k is not None else None,
        "pairs_scored": pairs_scored,
        "scoring_seconds": round(time.perf_counter() - started, 3),
    }


def _transductive_scores(model: Matcher, images: Encoded, texts: Encoded, scoring: ScoringOptions):
    return model.transductive_scores(images, texts)


def _fold_rankings(models, fold_codes, posthoc: PostHoc, scoring: ScoringOptions, rerank, transductive) -> tuple:
    """(scores ranking captions for each image, scores ranking images for each caption or None
    when the same, pairs scored) of one fold: every pair by every model (their transductive
    scores with `transductive`), fused and put through the post-hoc stages; or with
    `rerank` = (k, first-stage model, candidate rule), two stages."""
    if rerank is None:
        score = _transductive_scores if transductive else score_grid
        matrices = [score(model, *codes, scoring).cpu() for model, codes in zip(models, fold_codes, strict=False)]
        views = posthoc(matrices)
        t2i_sims = None if views.t2i is views.i2t else views.t2i.numpy()
        return views.i2t.numpy(), t2i_sims, sum(sims.numel() for sims in matrices)
    rerank_k, first_stage, candidates = rerank
    stage_model, stage_codes = (first_stage, fold_codes[1]) if first_stage is not None else (models[0], fold_codes[0])
    first_images, first_texts = (embeddings(stage_model, codes) for codes in stage_codes)
    sims, pairs = two_stage_scores(models[0], *fold_codes[0], first_images, first_texts, rerank_k, scoring, candidates)
    return sims.numpy(), None, pairs
