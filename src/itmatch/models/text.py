"""Text encoders: a (Bi)GRU over word embeddings, as in SCAN, SGRAF, CMCAN and VSE++."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.models.base import word_mask
from itmatch.models.layers import l2norm


@dataclass
class GRUTextConfig:
    word_dim: int = 300
    num_layers: int = 1
    bidirectional: bool = True
    # Dropout on the word embeddings (CMCAN: 0.4).
    dropout: float = 0.0
    # l2-normalise every word vector (the official code's default; --no_txtnorm turns it off).
    normalize: bool = True


class GRUTextEncoder(nn.Module):
    """Word vectors (directions averaged) and the final hidden state of a (Bi)GRU.

    Captions need not be sorted by length; padded positions come out as zero vectors.
    """

    def __init__(self, vocab_size: int, embed_size: int, config: GRUTextConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.word_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = nn.GRU(
            config.word_dim, embed_size, config.num_layers, batch_first=True, bidirectional=config.bidirectional
        )
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns words (n, L, D), mask (n, L) and the last hidden state (n, D)."""
        embedded = self.dropout(self.embed(tokens))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        with float32_rnn():
            output, hidden = self.rnn(packed)
        words, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])
        last = hidden[-1]
        if self.config.bidirectional:
            half = words.shape[-1] // 2
            words = (words[..., :half] + words[..., half:]) / 2
            last = (hidden[-2] + hidden[-1]) / 2
        if self.config.normalize:
            words = l2norm(words)
        return words, word_mask(lengths.to(tokens.device), tokens.shape[1]), last


@contextmanager
def float32_rnn() -> Iterator[None]:
    """cuDNN runs RNNs in TF32 by default, which moves word vectors by ~1e-4 on recent GPUs; the
    official checkpoints' outputs are reproduced (to ~1e-6) only in true float32."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous
