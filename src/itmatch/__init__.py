"""itmatch: image-text matching with CMCAN and the methods it is compared with, on one interface.

model = itmatch.load_checkpoint("runs/cmcan/best.pt")
tokens, lengths = model.tokenize(["a red dog to the left of a blue car"])  # vocabulary or pretrained tokenizer
scores = model.similarity(features, tokens, lengths, boxes=boxes, image_sizes=sizes)
"""

from itmatch.checkpoint import load_checkpoint
from itmatch.config import build_run_config, preset_names
from itmatch.data.vocab import Vocabulary
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.models import CrossAttentionMatcher, EmbeddingMatcher, Encoded, Matcher, create_model

__version__ = "0.1.0"
__all__ = [
    "load_checkpoint",
    "build_run_config",
    "preset_names",
    "create_model",
    "Matcher",
    "EmbeddingMatcher",
    "CrossAttentionMatcher",
    "Encoded",
    "Vocabulary",
    "retrieval_metrics",
]
