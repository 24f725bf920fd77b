"""Evaluating a matcher on a precomp split with the field's protocols."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from itmatch.data.datasets import CaptionDataset, ImageDataset, make_loader
from itmatch.data.precomp import PrecompSplit
from itmatch.errors import InputError
from itmatch.evaluation.metrics import aggregate_folds, retrieval_metrics
from itmatch.models.base import Encoded, Matcher

# "1k": the whole split at once (Flickr30K's 1K test, Flickr8k, synthetic sets);
# "coco-5fold": COCO 1K, five consecutive folds of the 5K split averaged; "coco-5k": all 5,000.
PROTOCOLS = ("1k", "coco-5fold", "coco-5k")


@torch.no_grad()
def encode_split(
    model: Matcher, split: PrecompSplit, batch_size: int = 128, workers: int = 0, progress: bool = True
) -> tuple[Encoded, Encoded]:
    """Every image and every caption of the split encoded once, in order."""
    if model.vocab is None:
        raise InputError("the model has no vocabulary: load it from an itmatch checkpoint that has one")
    adjacency = split.adjacency(*model.adjacency_spec()) if model.needs_adjacency else None
    images = [
        model.encode_images(batch["features"], batch.get("adjacency"))
        for batch in tqdm(
            make_loader(ImageDataset(split, adjacency), batch_size, workers),
            desc="encode images",
            disable=not progress,
            leave=False,
        )
    ]
    texts = [
        model.encode_texts(batch["tokens"], batch["lengths"])
        for batch in tqdm(
            make_loader(CaptionDataset(split, model.vocab), batch_size, workers),
            desc="encode captions",
            disable=not progress,
            leave=False,
        )
    ]
    return Encoded.cat(images), Encoded.cat(texts)


@torch.no_grad()
def evaluate_split(
    model: Matcher,
    split: PrecompSplit,
    protocol: str = "1k",
    batch_size: int = 128,
    memory_budget: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Bidirectional retrieval metrics of `model` on `split` (model put in eval mode)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    n_folds = 5 if protocol == "coco-5fold" else 1
    if split.n_images % n_folds:
        raise InputError(f"{protocol} needs a number of images divisible by 5; the split has {split.n_images}")
    model.eval()
    images, texts = encode_split(model, split, batch_size, workers, progress)
    per_image = split.captions_per_image
    fold_images = split.n_images // n_folds
    folds = []
    for fold in range(n_folds):
        image_part = images.select(slice(fold * fold_images, (fold + 1) * fold_images))
        text_part = texts.select(slice(fold * fold_images * per_image, (fold + 1) * fold_images * per_image))
        sims = model.score(image_part, text_part, memory_budget=memory_budget, progress=progress)
        folds.append(retrieval_metrics(sims.float().cpu().numpy(), per_image))
    result = aggregate_folds(folds) if n_folds > 1 else folds[0]
    return {**result, "protocol": protocol}
