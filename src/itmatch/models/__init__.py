"""Matchers behind one interface; importing this package registers every architecture."""

from itmatch.models import cmcan, vsepp  # noqa: F401  (registration)
from itmatch.models.base import CrossAttentionMatcher, EmbeddingMatcher, Encoded, Matcher
from itmatch.models.registry import architecture_class, create_model

__all__ = ["Matcher", "EmbeddingMatcher", "CrossAttentionMatcher", "Encoded", "create_model", "architecture_class"]
