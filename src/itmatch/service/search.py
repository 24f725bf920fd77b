"""Queries on a search index: images for a sentence, captions for an indexed image or a photo
file, and why an image and a sentence match. The results are plain dicts: what `itmatch search --json` prints and
what the web service returns.

Without `rerank_k` the model scores every indexed item; with it, the index's faiss first stage
picks each query's `rerank_k` best items by embedding and the model scores only those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itmatch.data.photos import open_photos
from itmatch.data.tokenizer import tokenize
from itmatch.data.vocab import UNK
from itmatch.errors import InputError, ItmatchError
from itmatch.models.abilities import Explains
from itmatch.models.base import Encoded
from itmatch.retrieval import embeddings, encode_queries, rerank
from itmatch.scoring import score_grid
from itmatch.service.index import SearchIndex


class NotSupported(ItmatchError):
    """The index's model cannot do what was asked (explain its scores, or a first stage)."""


def can_explain(index: SearchIndex) -> bool:
    """Whether the model explains a match (region confidences, attention of the words of its
    vocabulary over the regions): the `Explains` ability, with a word vocabulary."""
    return isinstance(index.model, Explains) and index.model.vocab is not None


@torch.no_grad()
def search_by_text(index: SearchIndex, query: str, k: int = 10, rerank_k: int | None = None) -> dict:
    """The k indexed images that best match a sentence."""
    _check_k(k, rerank_k)
    model = index.model
    texts = encode_queries(model, [query])
    if rerank_k is None:
        scores, found = _exhaustive(index, "images", lambda images: score_grid(model, images, texts)[:, 0], k)
    else:
        rows = _first_stage(index, "images", embeddings(model, texts), rerank_k)
        candidates = index.images.select(rows, model.device)
        scores, order = rerank(model, candidates, texts, torch.arange(len(rows))[None], k)
        scores, found = scores[0], torch.from_numpy(rows)[order[0]]
    results = [
        {"rank": rank, "image": image, "id": index.ids[image], "score": round(score, 4)}
        for rank, (score, image) in enumerate(zip(scores.tolist(), found.tolist(), strict=True), start=1)
    ]
    return {"query": query, "k": k, "rerank_k": rerank_k, "results": results}


@torch.no_grad()
def search_by_image(index: SearchIndex, image: int, k: int = 10, rerank_k: int | None = None) -> dict:
    """The k indexed captions that best describe an indexed image."""
    _check_k(k, rerank_k)
    _check_image(index, image)
    query = index.images.select([image], index.model.device)
    results = _best_captions(index, query, k, rerank_k)
    return {"image": image, "id": index.ids[image], "k": k, "rerank_k": rerank_k, "results": results}


@torch.no_grad()
def search_by_photo(
    index: SearchIndex, photo: str | Path, k: int = 10, rerank_k: int | None = None, weights: str | Path | None = None
) -> dict:
    """The k indexed captions that best describe a photo file, read as the indexed photos were."""
    _check_k(k, rerank_k)
    _check_has_captions(index)
    query = index.as_stored(index.photo_reader(weights).encode(open_photos([Path(photo)]), [0], progress=False))
    return {"photo": str(photo), "k": k, "rerank_k": rerank_k, "results": _best_captions(index, query, k, rerank_k)}


def _best_captions(index: SearchIndex, query: Encoded, k: int, rerank_k: int | None) -> list[dict]:
    _check_has_captions(index)
    model = index.model
    if rerank_k is None:
        scores, found = _exhaustive(index, "captions", lambda texts: score_grid(model, query, texts)[0], k)
    else:
        rows = _first_stage(index, "captions", embeddings(model, query), rerank_k)
        candidates = index.texts.select(rows, model.device)
        scores, order = rerank(model, query, candidates, torch.arange(len(rows))[None], k, queries="images")
        scores, found = scores[0], torch.from_numpy(rows)[order[0]]
    images = index.caption_images(found.numpy())
    return [
        {
            "rank": rank,
            "caption": caption,
            "text": index.captions[caption],
            "image": int(image),
            "score": round(score, 4),
        }
        for rank, (score, caption, image) in enumerate(
            zip(scores.tolist(), found.tolist(), images.tolist(), strict=True), start=1
        )
    ]


def _exhaustive(index: SearchIndex, side: str, score, k: int) -> tuple[Tensor, Tensor]:
    """The k best items of `side` by `score(items)` (the model's scores of a chunk of stored items),
    a chunk at a time, removed items left out: (scores, rows), best first."""
    excluded = torch.from_numpy(index.removed_rows(side))
    best, rows = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    for start, items in index.chunks(side):
        scores = score(items).float().cpu()
        kept = excluded[(excluded >= start) & (excluded < start + len(scores))] - start
        scores[kept] = -torch.inf
        best, order = torch.cat([best, scores]).topk(min(k, len(best) + len(scores)))
        rows = torch.cat([rows, torch.arange(start, start + len(scores))])[order]
    real = best > -torch.inf
    return best[real], rows[real]


def describe_image(index: SearchIndex, image: int) -> dict:
    """An indexed image's id, its photo's file name (else the id) and the captions written for it."""
    _check_image(index, image)
    entry = index.image(image)
    name = Path(entry["path"]).name if entry["path"] else entry["id"]
    captions = [index.captions[c] for c in index.image_captions(image)]
    return {"image": image, "id": entry["id"], "name": name, "captions": captions}


@torch.no_grad()
def explain_match(index: SearchIndex, image: int, text: str) -> dict:
    """The score of one image with one sentence, each region's box and matching confidence, and
    for each word of the sentence its attention over the regions."""
    model = index.model
    if not can_explain(index):
        raise NotSupported(
            f"{model.run_config.preset} ({model.architecture}) does not explain its scores: "
            "explanations need a model that explains its scores, reading words of a vocabulary"
        )
    _check_image(index, image)
    texts = encode_queries(model, [text])
    explained = model.explain(index.images.select([image], model.device), texts)
    words, boxes = tokenize(text), torch.from_numpy(np.array(index.boxes.view[image]))
    # The vocabulary encodes <start> + words + <end>: rows 1..len(words) are the sentence's words.
    attention = explained["word_attention"][0, 1 : len(words) + 1].cpu()
    return {
        "image": image,
        "id": index.ids[image],
        "text": text,
        "score": round(float(explained["score"][0]), 4),
        "regions": [
            {"box": _box(box), "confidence": round(float(confidence), 4)}
            for box, confidence in zip(boxes, explained["region_confidence"][0].cpu(), strict=True)
        ],
        "words": [
            {"word": word, "known": model.vocab.word_to_id(word) != UNK, "attention": _rounded(weights)}
            for word, weights in zip(words, attention, strict=True)
        ],
    }


def _first_stage(index: SearchIndex, side: str, vectors: Tensor, rerank_k: int) -> np.ndarray:
    """Rows of the `rerank_k` best items of `side` for one query vector, by the first stage."""
    if index.model.embedding_key is None:
        model = index.model
        raise NotSupported(f"{model.architecture} has no embedding for a first stage: search without rerank_k")
    rows = index.nearest(side, vectors, rerank_k)[0]
    return rows[rows >= 0]


def _check_k(k: int, rerank_k: int | None) -> None:
    if k < 1 or (rerank_k is not None and rerank_k < 1):
        raise InputError(f"k and rerank_k must be at least 1, got k={k}, rerank_k={rerank_k}")


def _check_has_captions(index: SearchIndex) -> None:
    if not index.n_captions:
        raise NotSupported(f"{index.folder} indexes photos without captions: there are no captions to rank")


def _check_image(index: SearchIndex, image: int) -> None:
    if not 0 <= image < index.n_images:
        raise InputError(f"no image {image} in the index: it has {index.n_images} images, 0..{index.n_images - 1}")
    if index.is_removed(image):
        raise InputError(f"image {image} was removed from the index")


def _box(box: Tensor) -> list[float] | None:
    return None if box.isnan().any() else _rounded(box.clamp(0, 1))


def _rounded(values: Tensor) -> list[float]:
    return [round(value, 4) for value in values.tolist()]
