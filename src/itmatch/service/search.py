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
from itmatch.retrieval import embeddings, encode_queries, rerank, search_images, search_texts
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
    model, images = index.model, index.gallery.encoded_images
    if rerank_k is None:
        scores, found = search_images(model, images, [query], k)
    else:
        texts = encode_queries(model, [query])
        candidates = _first_stage(index, "images", embeddings(model, texts), rerank_k)
        scores, found = rerank(model, images, texts, candidates, k)
    results = [
        {"rank": rank, "image": image, "id": index.gallery.images[image]["id"], "score": round(score, 4)}
        for rank, (score, image) in enumerate(zip(scores[0].tolist(), found[0].tolist(), strict=True), start=1)
    ]
    return {"query": query, "k": k, "rerank_k": rerank_k, "results": results}


@torch.no_grad()
def search_by_image(index: SearchIndex, image: int, k: int = 10, rerank_k: int | None = None) -> dict:
    """The k indexed captions that best describe an indexed image."""
    _check_k(k, rerank_k)
    _check_image(index, image)
    query = index.gallery.encoded_images.select(slice(image, image + 1))
    results = _best_captions(index, query, k, rerank_k)
    return {"image": image, "id": index.gallery.images[image]["id"], "k": k, "rerank_k": rerank_k, "results": results}


@torch.no_grad()
def search_by_photo(
    index: SearchIndex, photo: str | Path, k: int = 10, rerank_k: int | None = None, weights: str | Path | None = None
) -> dict:
    """The k indexed captions that best describe a photo file, read as the indexed photos were."""
    _check_k(k, rerank_k)
    _check_has_captions(index)
    query = index.photo_reader(weights).encode(open_photos([Path(photo)]), [0], progress=False)
    return {"photo": str(photo), "k": k, "rerank_k": rerank_k, "results": _best_captions(index, query, k, rerank_k)}


def _best_captions(index: SearchIndex, query: Encoded, k: int, rerank_k: int | None) -> list[dict]:
    _check_has_captions(index)
    model, gallery = index.model, index.gallery
    if rerank_k is None:
        scores, found = search_texts(model, query, gallery.encoded_texts, k)
    else:
        candidates = _first_stage(index, "captions", embeddings(model, query), rerank_k)
        scores, found = rerank(model, query, gallery.encoded_texts, candidates, k, queries="images")
    return [
        {
            "rank": rank,
            "caption": caption,
            "text": gallery.captions[caption],
            "image": int(gallery.caption_image[caption]),
            "score": round(score, 4),
        }
        for rank, (score, caption) in enumerate(zip(scores[0].tolist(), found[0].tolist(), strict=True), start=1)
    ]


def describe_image(index: SearchIndex, image: int) -> dict:
    """An indexed image's id, its photo's file name (else the id) and the captions written for it."""
    _check_image(index, image)
    entry, gallery = index.gallery.images[image], index.gallery
    own = (gallery.caption_image == image).nonzero().flatten().tolist()
    name = Path(entry["path"]).name if entry["path"] else entry["id"]
    return {"image": image, "id": entry["id"], "name": name, "captions": [gallery.captions[c] for c in own]}


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
    explained = model.explain(index.gallery.encoded_images.select(slice(image, image + 1)), texts)
    words = tokenize(text)
    # The vocabulary encodes <start> + words + <end>: rows 1..len(words) are the sentence's words.
    attention = explained["word_attention"][0, 1 : len(words) + 1].cpu()
    return {
        "image": image,
        "id": index.gallery.images[image]["id"],
        "text": text,
        "score": round(float(explained["score"][0]), 4),
        "regions": [
            {"box": _box(box), "confidence": round(float(confidence), 4)}
            for box, confidence in zip(index.gallery.boxes[image], explained["region_confidence"][0].cpu(), strict=True)
        ],
        "words": [
            {"word": word, "known": model.vocab.word_to_id(word) != UNK, "attention": _rounded(weights)}
            for word, weights in zip(words, attention, strict=True)
        ],
    }


def _first_stage(index: SearchIndex, name: str, vectors: Tensor, rerank_k: int) -> Tensor:
    """Indices (n_queries, rerank_k) of the best items of the faiss index `name` for each vector."""
    if name not in index.first_stage:
        model = index.model
        raise NotSupported(f"{model.architecture} has no embedding for a first stage: search without rerank_k")
    faiss_index = index.first_stage[name]
    _, found = faiss_index.search(np.ascontiguousarray(vectors.numpy()), min(rerank_k, faiss_index.ntotal))
    return torch.from_numpy(found)


def _check_k(k: int, rerank_k: int | None) -> None:
    if k < 1 or (rerank_k is not None and rerank_k < 1):
        raise InputError(f"k and rerank_k must be at least 1, got k={k}, rerank_k={rerank_k}")


def _check_has_captions(index: SearchIndex) -> None:
    if not index.gallery.captions:
        raise NotSupported(f"{index.folder} indexes photos without captions: there are no captions to rank")


def _check_image(index: SearchIndex, image: int) -> None:
    if not 0 <= image < index.n_images:
        raise InputError(f"no image {image} in the index: it has {index.n_images} images, 0..{index.n_images - 1}")


def _box(box: Tensor) -> list[float] | None:
    return None if box.isnan().any() else _rounded(box.clamp(0, 1))


def _rounded(values: Tensor) -> list[float]:
    return [round(value, 4) for value in values.tolist()]
