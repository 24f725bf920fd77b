"""SAEM: Learning Fragment Self-Attention Embeddings for Image-Text Matching (Wu, Wang, Song,
Huang, ACM MM 2019).

Follows the official code (github:yiling2018/saem c48a975: image_net.py, text_net.py, bert.py,
loss.py, model.py, train.py):

- image: Linear(img_dim -> 256) on each region, one BERT layer over all regions (t_cfg.json:
  16 heads, feed-forward 2048, GELU, dropout 0.1, post-LayerNorm with eps 1e-12), the mean over
  the regions, l2-normalised;
- text: a BERT-family model, frozen as the official code freezes it (its dropout still runs in
  training), reads the caption cut to 32 word pieces ([CLS] and [SEP] included) and zero-padded
  to 32; a TextCNN over all 32 last-layer states, the padded ones included: for n = 1, 2, 3 a
  convolution over n positions (512 channels), ReLU and the max over positions; the 1536
  features through dropout 0.1 and Linear -> 256, l2-normalised. The score is their dot product;
- loss: the hinge loss (hardest negative, margin 0.2) + 0.01 x the sum of the L2 norms (not
  squared) of the image branch's weights (biases and LayerNorms excepted) + alpha(epoch) x the
  angular loss (Wang et al. 2017, hardest negative, tan^2 alpha = 1) with images and with
  captions as anchors; alpha = 0.5 x 0.1^(epoch // 5) up to epoch 20 (0-based), then 0. The
  weights are the preset's `loss.weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itmatch.errors import ConfigError
from itmatch.losses import TrainingContext
from itmatch.models.base import EmbeddingMatcher, Encoded, word_mask
from itmatch.models.layers import l2norm
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, TransformerTextEncoder


@dataclass
class SAEMConfig:
    img_dim: int = 2048  # set from the data
    embed_size: int = 256  # --final_dims: the image transformer's width and the joint space
    heads: int = 16  # t_cfg.json's num_attention_heads
    feed_forward: int = 2048  # t_cfg.json's intermediate_size
    image_dropout: float = 0.1  # t_cfg.json's hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12  # bert.py's BERTLayerNorm (inside the square root)
    max_words: int = 32  # --max_words: word pieces read, [CLS] and [SEP] included
    ngrams: list[int] = field(default_factory=lambda: [1, 2, 3])  # the TextCNN's kernel sizes
    channels: int = 512  # the TextCNN's output channels per kernel size
    # No gradient reaches the text model (the official freeze_layers); false: it learns at
    # text.pretrained_lr_scale times the learning rate.
    freeze_text_model: bool = True
    angle_bound: float = 1.0  # tan^2 of the angular loss's angle
    # encoder: a BERT-family folder or "minilm"; dropout: on the TextCNN features.
    text: TextConfig = field(default_factory=lambda: TextConfig(encoder="minilm", dropout=0.1))

    def __post_init__(self) -> None:
        if self.heads < 1 or self.embed_size % self.heads:
            raise ConfigError(f"model.embed_size ({self.embed_size}) must be a multiple of model.heads ({self.heads})")
        if not self.ngrams or min(self.ngrams) < 1 or max(self.ngrams) > self.max_words:
            raise ConfigError(f"model.ngrams must be sizes within 1..max_words ({self.max_words}), got {self.ngrams}")


class BertLayer(nn.Module):
    """bert.py's BERTLayer: self-attention, dense, dropout, residual and LayerNorm, then the
    GELU feed-forward, dense, dropout, residual and LayerNorm."""

    def __init__(self, size: int, config: SAEMConfig):
        super().__init__()
        self.heads, self.attention_dropout = config.heads, config.image_dropout
        self.query, self.key, self.value = nn.Linear(size, size), nn.Linear(size, size), nn.Linear(size, size)
        self.attention_out = nn.Linear(size, size)
        self.attention_norm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(size, config.feed_forward)
        self.output = nn.Linear(config.feed_forward, size)
        self.output_norm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.image_dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, length, size = x.shape

        def split(t: Tensor) -> Tensor:  # (n, heads, length, size / heads)
            return t.view(n, length, self.heads, size // self.heads).transpose(1, 2)

        dropout = self.attention_dropout if self.training else 0.0
        context = nn.functional.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), dropout_p=dropout
        )
        x = self.attention_norm(x + self.dropout(self.attention_out(context.transpose(1, 2).reshape(n, length, size))))
        feed_forward = self.output(nn.functional.gelu(self.intermediate(x)))
        return self.output_norm(x + self.dropout(feed_forward))


class RegionSelfAttention(nn.Module):
    """The image branch (TransformerMapping): projected regions, one BERT layer, their mean."""

    def __init__(self, config: SAEMConfig):
        super().__init__()
        self.proj = nn.Linear(config.img_dim, config.embed_size)
        self.layer = BertLayer(config.embed_size, config)

    def forward(self, features: Tensor) -> Tensor:
        return l2norm(self.layer(self.proj(features)).mean(1))

    def weight_norms(self) -> Tensor:
        """The sum of the L2 norms of the weights, biases and LayerNorms excepted (model.py)."""
        return sum(module.weight.norm() for module in self.modules() if isinstance(module, nn.Linear))


class BertTextCNN(TransformerTextEncoder):
    """The text branch (BertMapping, --txt_stru cnn): a pretrained model's last-layer states of
    the caption padded to max_words, n-gram convolutions, max over positions, a Linear layer."""

    def __init__(self, config: SAEMConfig):
        super().__init__(config.text.encoder, max_length=config.max_words)
        self.max_words, self.frozen = config.max_words, config.freeze_text_model
        self.transformer.requires_grad_(not self.frozen)
        hidden = self.transformer.config.hidden_size
        self.convs = nn.ModuleList(nn.Conv1d(hidden, config.channels, n) for n in config.ngrams)
        self.dropout = nn.Dropout(config.text.dropout)
        self.mapping = nn.Linear(len(config.ngrams) * config.channels, config.embed_size)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the token states (n, max_words, hidden), their mask and the caption vectors."""
        tokens = nn.functional.pad(tokens, (0, max(self.max_words - tokens.shape[1], 0)))[:, : self.max_words]
        mask = word_mask(lengths.to(tokens.device).clamp(max=self.max_words), self.max_words)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        positions = states.transpose(1, 2)  # (n, hidden, max_words): every position, padding included
        features = torch.cat([conv(positions).relu().amax(-1) for conv in self.convs], dim=-1)
        return states, mask, l2norm(self.mapping(self.dropout(features)))


def angular_loss(anchors: Tensor, others: Tensor, not_negative: Tensor, angle_bound: float) -> Tensor:
    """sum_i log(1 + exp(max_j x_ij)), x_ij = 4 t (a_i + p_i) . n_j - 2 (1 + t) a_i . p_i with
    t = tan^2 alpha: anchors a_i, their positives p_i = others[i], negatives n_j = others[j]."""
    positives = (anchors * others).sum(-1, keepdim=True)
    x = 4 * angle_bound * (anchors + others) @ others.T - 2 * (1 + angle_bound) * positives
    hardest = x.masked_fill(not_negative, float("-inf")).amax(1)
    return nn.functional.softplus(hardest).sum()


@register
class SAEM(EmbeddingMatcher):
    architecture = "saem"
    config_class = SAEMConfig

    def __init__(self, config: SAEMConfig):
        super().__init__(config)
        self.image_encoder = RegionSelfAttention(config)
        self.text_encoder = BertTextCNN(config)

    def encode_images(self, features: Tensor) -> Encoded:
        return Encoded({"vector": self.image_encoder(self._check_features(features, self.config.img_dim, None))})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        return Encoded({"vector": self.text_encoder(*self._check_tokens(tokens, lengths))[2]})

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        """The shared terms (`loss.terms`: the hinge loss in the preset), the angular and the
        weight-norm terms (weighted by `loss.weights`); the in-batch terms see the global batch
        under global negatives."""
        images, texts = self.encode_image_batch(batch), self.encode_text_batch(batch)
        image_vectors, text_vectors = context.gather(images["vector"]), context.gather(texts["vector"])
        not_negative = torch.eye(len(text_vectors), dtype=torch.bool, device=text_vectors.device)
        if context.loss.exclude_same_image:
            ids = context.gather(batch["image_index"].to(not_negative.device))
            not_negative = not_negative | (ids[:, None] == ids[None, :])
        bound = self.config.angle_bound
        angular = angular_loss(image_vectors, text_vectors, not_negative, bound)
        angular = angular + angular_loss(text_vectors, image_vectors, not_negative.T, bound)
        own = {"angular": angular, "weight_norm": self.image_encoder.weight_norms()}
        return self.shared_terms(images, texts, batch, context) | own
