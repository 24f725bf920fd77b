"""Matchers behind one interface. Architectures live one per module and are found by the
registry (itmatch.models.registry), so adding one edits no other file."""

from itmatch.models.base import CrossAttentionMatcher, EmbeddingMatcher, Encoded, Matcher
from itmatch.models.registry import architecture_class, architectures, create_model

__all__ = [
    "Matcher",
    "EmbeddingMatcher",
    "CrossAttentionMatcher",
    "Encoded",
    "create_model",
    "architecture_class",
    "architectures",
]
