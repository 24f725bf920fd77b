"""Optional abilities of a model, as small protocols that retrieval and the service ask for instead
of naming a model family.

- `Explains`: `explain(images, texts)` on pairs (images[p], texts[p]) returns "score" (pairs,),
  "region_confidence" (pairs, regions) and "word_attention" (pairs, words, regions): the search
  page draws them over the picture.
- A first-stage embedding is the class attribute `embedding_key` (see `has_embedding`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from itmatch.models.base import Encoded, Matcher


@runtime_checkable
class Explains(Protocol):
    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]: ...


def has_embedding(model: Matcher) -> bool:
    """Whether the model's encodings hold one vector per item whose dot products rank pairs."""
    return model.embedding_key is not None
