"""DVSA: Deep Visual-Semantic Alignments (Karpathy and Fei-Fei, CVPR 2015, Sec. 3.1).

No official alignment code exists (karpathy/neuraltalk holds only the captioner), so this follows
the paper; where it could not be followed the config names the choice:

- image fragments: the paper embeds the top 19 R-CNN detections plus the whole image (fc7, 4096-d)
  by v = W_m CNN(I_b) + b_m. Here the precomputed regions stand in for the detections and their
  mean feature for the whole image (`whole_image`), each through the same W_m;
- words: a bidirectional ReLU RNN over word embeddings, e_t = f(W_e x_t + b_e),
  h^f_t = f(e_t + W_f h^f_{t-1} + b_f), h^b_t = f(e_t + W_b h^b_{t+1} + b_b),
  s_t = f(W_d (h^f_t + h^b_t) + b_d), f = ReLU. The paper's word2vec vectors are not available
  here: the embeddings start random and train (`text.train_embeddings`);
- score: S_kl = sum over the words t of l of max over the fragments i of k of v_i . s_t
  (unnormalised: longer sentences score higher, as in the paper);
- loss: the presets' triplet loss with margin 1 summed over every negative in both directions
  (the paper's C); the paper's SGD with momentum and element-wise clipping at 5 are replaced by
  the trainer's Adam and norm clipping (say so in a comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itmatch.errors import InputError
from itmatch.models.base import CrossAttentionMatcher, Encoded, word_mask
from itmatch.models.registry import register
from itmatch.models.text import TextEncoder


@dataclass
class BRNNTextConfig:
    """The paper's bidirectional ReLU RNN over the word vocabulary."""

    word_dim: int = 300  # the paper's word2vec size
    dropout: float = 0.0  # on the word embeddings (the paper: dropout on non-recurrent layers)
    # The paper keeps word2vec vectors fixed; random vectors must train.
    train_embeddings: bool = True
    encoder: str = "brnn"  # read by training: a word vocabulary, not a pretrained tokenizer
    pretrained_lr_scale: float = 1.0

    @property
    def pretrained(self) -> bool:
        return False


@dataclass
class DVSAConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    # h, the multimodal space: the paper's values lie in 1000-1600.
    embed_size: int = 1000
    # Add the mean of the region features as one more fragment (the paper's whole-image box).
    whole_image: bool = True
    text: BRNNTextConfig = field(default_factory=BRNNTextConfig)


class BRNNTextEncoder(TextEncoder):
    """s_t for every word (n, L, h): the paper's BRNN, padded positions zero."""

    def __init__(self, vocab_size: int, embed_size: int, config: BRNNTextConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.word_dim)
        self.embed.weight.requires_grad_(config.train_embeddings)
        self.dropout = nn.Dropout(config.dropout)
        self.input = nn.Linear(config.word_dim, embed_size)  # W_e, b_e
        self.forward_step = nn.Linear(embed_size, embed_size)  # W_f, b_f
        self.backward_step = nn.Linear(embed_size, embed_size)  # W_b, b_b
        self.output = nn.Linear(embed_size, embed_size)  # W_d, b_d

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = word_mask(lengths.to(tokens.device), tokens.shape[1])
        inputs = torch.relu(self.input(self.dropout(self.embed(tokens))))
        keep = mask[..., None].to(inputs.dtype)
        forward_states = self._run(self.forward_step, inputs, keep, range(tokens.shape[1]))
        backward_states = self._run(self.backward_step, inputs, keep, reversed(range(tokens.shape[1])))
        words = torch.relu(self.output(forward_states + backward_states)) * keep
        last = words[torch.arange(len(words)), lengths.to(words.device) - 1]
        return words, mask, last

    @staticmethod
    def _run(step: nn.Linear, inputs: Tensor, keep: Tensor, order) -> Tensor:
        """One direction of the recurrence, one time step at a time for the whole batch; padded
        positions keep a zero state, so the backward pass starts at each caption's last word."""
        state = inputs.new_zeros(inputs.shape[0], inputs.shape[2])
        states = [None] * inputs.shape[1]
        for t in order:
            state = torch.relu(inputs[:, t] + step(state)) * keep[:, t]
            states[t] = state
        return torch.stack(states, dim=1)


@register
class DVSA(CrossAttentionMatcher):
    architecture = "dvsa"
    config_class = DVSAConfig

    def __init__(self, config: DVSAConfig):
        super().__init__(config)
        self.image_proj = nn.Linear(config.img_dim, config.embed_size)  # W_m, b_m
        self.text_encoder = BRNNTextEncoder(config.vocab_size, config.embed_size, config.text)

    def encode_images(self, features: Tensor) -> Encoded:
        features = self._check_features(features, self.config.img_dim, None)
        if self.config.whole_image:
            features = torch.cat([features, features.mean(1, keepdim=True)], dim=1)
        return Encoded({"regions": self.image_proj(features)})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        return Encoded({"words": words, "mask": mask}, padded=frozenset({"words", "mask"}))

    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        return 4 * (2 * n_regions * n_words + 2 * n_words)

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        """sum_t max_i v_i . s_t over the real words (padded word vectors are zero)."""
        dots = torch.einsum("...ld,...rd->...lr", texts["words"], images["regions"])
        return (dots.amax(-1).float() * texts["mask"]).sum(-1)

    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]:
        """Why images[p] and texts[p] match, for each pair p (the search page's `Explains`): `score`
        (pairs,); `word_attention` (pairs, L, R), each word's best fragment, the alignment the score
        sums (a word aligned with the whole image spreads over every region; padding rows are 0);
        `region_confidence` (pairs, R), the share of the caption's words aligned with each region."""
        if len(images) != len(texts):
            raise InputError(f"explain takes pairs: {len(images)} images but {len(texts)} texts")
        dots = torch.einsum("pld,prd->plr", texts["words"], images["regions"])
        best = nn.functional.one_hot(dots.argmax(-1), dots.shape[-1]).to(dots.dtype)
        if self.config.whole_image:  # the last fragment is the whole image
            best = best[..., :-1] + best[..., -1:] / (dots.shape[-1] - 1)
        mask = texts["mask"]
        attention = best * mask[..., None]
        return {
            "score": self.pair_scores(images.tensors, texts.tensors),
            "region_confidence": attention.sum(1) / mask.sum(1, keepdim=True),
            "word_attention": attention,
        }
