"""VSE-infinity (Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding",
CVPR 2021): a VSE model whose image and text vectors are pooled by the Generalized Pooling
Operator (GPO) instead of a fixed mean or max.

GPO sorts every feature dimension over an item's regions (or words) in descending order and takes
a weighted sum: weight k belongs to the k-th largest value, so the operator can be max pooling
(all weight on k = 0), mean pooling (uniform weights), top-k pooling or anything between. The
weights are generated from the number of items n alone: sine/cosine encodings of the positions
0..n-1 run through a small BiGRU, a linear layer scores each position, and a softmax with a low
temperature turns the scores into weights. They are shared by all dimensions.

This is the official code's precomputed-region path (github woodfrog/vse_infty, branch `bigru`,
`--precomp_enc_type basic`): region features go through a linear layer plus a residual two-layer
MLP (Linear, BatchNorm, ReLU, Linear); words through a BiGRU whose two directions are averaged.
Training adds the official "size augmentation" here in the model, because the data pipeline is
shared by every architecture: each region is dropped with probability 0.2, and each word is, with
probability 0.2, replaced by a <mask> word (half of those), by a random word (a tenth) or deleted
(the rest). At evaluation every region and word is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.errors import ConfigError
from itmatch.models.base import EmbeddingMatcher, Encoded, word_mask
from itmatch.models.layers import l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder, float32_rnn


@dataclass
class GPOConfig:
    # Official GPO(32, 32): sin/cos positional encodings of 32 dimensions, a BiGRU of 32 units.
    pe_dim: int = 32
    hidden: int = 32
    # The position scores are divided by this before the softmax (official: 0.1).
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.pe_dim < 2 or self.pe_dim % 2:
            raise ConfigError(f"model.*_pool.pe_dim must be even and positive (sin/cos pairs), got {self.pe_dim}")
        if self.temperature <= 0:
            raise ConfigError(f"model.*_pool.temperature must be positive, got {self.temperature}")


@dataclass
class VSEInfinityConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 1024
    # Image encoder (official EncoderImageAggr, precomp_enc_type "basic"): fc(regions) plus, when
    # `residual_mlp`, an MLP of `mlp_layers` linear layers (BatchNorm + ReLU between them) whose
    # hidden size is `mlp_hidden` (None: embed_size // 2, the official MLP(img_dim, embed_size // 2,
    # embed_size, 2)). precomp_enc_type "backbone" (grid features) has no MLP.
    residual_mlp: bool = True
    mlp_layers: int = 2
    mlp_hidden: int | None = None
    image_pool: GPOConfig = field(default_factory=GPOConfig)
    text_pool: GPOConfig = field(default_factory=GPOConfig)
    # l2-normalise the pooled vectors (official: on unless --no_imgnorm / --no_txtnorm).
    normalize_images: bool = True
    normalize_texts: bool = True
    # Size augmentation of precomputed regions while training: each region is dropped with this
    # probability (official: kept where rand > 0.2); at least one region is always kept.
    region_drop: float = 0.2
    # The official batches pad the dropped regions away with zero rows, and the MLP's BatchNorm
    # takes its batch statistics over those zero rows too. True does the same (dropped regions
    # enter the MLP as zero vectors); False takes the statistics over the kept regions only.
    batchnorm_counts_dropped: bool = True
    # Caption augmentation while training (official process_caption with drop=True): each word,
    # <start> and <end> included, is picked with probability `word_augment`; a picked word becomes
    # <mask> with probability `word_mask_share`, a random word id with `word_random_share`, and is
    # deleted otherwise (official: 0.2, 0.5, 0.1, so 0.4 deleted). A caption keeps at least one word.
    word_augment: float = 0.2
    word_mask_share: float = 0.5
    word_random_share: float = 0.1
    # The official vocabulary gets one extra word, <mask>, after the others: the word embedding has
    # vocab_size + 1 rows and <mask> is id vocab_size (never a valid input id).
    mask_token: bool = True
    # The official text encoder: a 1-layer BiGRU with hidden size embed_size over 300-d word
    # embeddings, directions averaged, word vectors not normalised before pooling.
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=True, normalize=False))

    def __post_init__(self) -> None:
        for name in ("region_drop", "word_augment"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        shares = (self.word_mask_share, self.word_random_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ConfigError(f"model.word_mask_share and word_random_share must be >= 0 with a sum <= 1, got {shares}")
        if self.word_augment > 0 and self.word_mask_share > 0 and not self.mask_token:
            raise ConfigError("model.word_mask_share > 0 needs model.mask_token = true (the <mask> word)")
        if self.mlp_layers < 1:
            raise ConfigError(f"model.mlp_layers must be >= 1, got {self.mlp_layers}")


def positional_encoding(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) sinusoidal encodings of positions 0..length-1: sin on even channels, cos on
    odd ones, channel pair i at frequency 10000^(-2i/dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = position * frequency
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)


class GPO(nn.Module):
    """Generalized Pooling Operator over a padded set of vectors."""

    def __init__(self, config: GPOConfig):
        super().__init__()
        self.config = config
        self.rnn = nn.GRU(config.pe_dim, config.hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(config.hidden, 1, bias=False)

    def pool_weights(self, lengths: Tensor, max_length: int) -> Tensor:
        """(n, max_length) weights of the sorted positions for sets of `lengths` items: a softmax
        over the first length positions, exactly 0 after them.

        The weights depend on the length only, so the BiGRU runs once per distinct length.
        """
        distinct, inverse = torch.unique(lengths.cpu(), return_inverse=True)
        longest = int(distinct.max())
        encodings = positional_encoding(longest, self.config.pe_dim, self.score.weight.device)
        packed = pack_padded_sequence(
            encodings.expand(len(distinct), -1, -1), distinct, batch_first=True, enforce_sorted=False
        )
        with float32_rnn():
            output, _ = self.rnn(packed)
        hidden, _ = pad_packed_sequence(output, batch_first=True, total_length=max_length)
        hidden = (hidden[..., : self.config.hidden] + hidden[..., self.config.hidden :]) / 2
        logits = self.score(hidden).squeeze(-1) / self.config.temperature
        valid = word_mask(distinct.to(logits.device), max_length)
        weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
        return weights[inverse.to(weights.device)]

    def forward(self, items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pools items (n, L, D) of which `mask` (n, L) marks the real ones (anywhere along L, at
        least one per row); returns the pooled (n, D) vectors and the (n, L) position weights."""
        lengths = mask.sum(1)
        # Every dimension sorted on its own, largest first; the masked items sink to the end.
        ordered = items.masked_fill(~mask[..., None], float("-inf")).sort(dim=1, descending=True).values
        valid = word_mask(lengths, items.shape[1])
        ordered = ordered.masked_fill(~valid[..., None], 0.0)
        weights = self.pool_weights(lengths, items.shape[1])
        return (ordered * weights[..., None]).sum(1), weights


class RegionMLP(nn.Module):
    """The official MLP on region features: Linear, then (BatchNorm1d, ReLU, Linear) repeated."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        sizes = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        # The official MLP also builds a BatchNorm after the last layer but never applies it; an
        # unused parameter would break DistributedDataParallel, so it is left out.
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers - 1))

    def forward(self, regions: Tensor, kept: Tensor | None = None) -> Tensor:
        """regions (n, R, in_dim) -> (n, R, out_dim). With `kept` (n, R), the BatchNorm batch
        statistics come from the kept regions only (the others come out as zero vectors)."""
        x = regions
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.norms):
                x = torch.relu(self._batchnorm(self.norms[i], x, kept))
        return x

    @staticmethod
    def _batchnorm(norm: nn.BatchNorm1d, x: Tensor, kept: Tensor | None) -> Tensor:
        if kept is None:
            return norm(x.flatten(0, 1)).view_as(x)
        return torch.zeros_like(x).masked_scatter(kept[..., None], norm(x[kept]))


@register
class VSEInfinity(EmbeddingMatcher):
    architecture = "vse_infinity"
    config_class = VSEInfinityConfig

    def __init__(self, config: VSEInfinityConfig):
        super().__init__(config)
        self.image_fc = nn.Linear(config.img_dim, config.embed_size)
        xavier_init(self.image_fc)
        self.image_mlp = None
        if config.residual_mlp:
            hidden = config.mlp_hidden or config.embed_size // 2
            # PyTorch's default initialisation, as in the official MLP.
            self.image_mlp = RegionMLP(config.img_dim, hidden, config.embed_size, config.mlp_layers)
        self.image_pool = GPO(config.image_pool)
        n_words = config.vocab_size + (1 if config.mask_token else 0)
        self.text_encoder = build_text_encoder(config.text, n_words, config.embed_size)
        self.text_pool = GPO(config.text_pool)
        if config.word_augment > 0 and config.word_mask_share > 0 and self._augment_ids()[0] is None:
            raise ConfigError(f"model.word_mask_share > 0 needs a mask token; {config.text.encoder} has none")

    # -- images ------------------------------------------------------------------------------------
    def encode_images(self, features: Tensor) -> Encoded:
        config = self.config
        features = self._check_features(features, config.img_dim, None)
        kept = self.region_keep_mask(features)
        dropping = not bool(kept.all())
        if dropping and config.batchnorm_counts_dropped:
            features = features * kept[..., None]  # the official zero rows
        regions = self.image_fc(features)
        if self.image_mlp is not None:
            select = kept if dropping and not config.batchnorm_counts_dropped else None
            regions = regions + self.image_mlp(features, select)
        pooled, _ = self.image_pool(regions, kept)
        return Encoded({"vector": l2norm(pooled) if config.normalize_images else pooled})

    def region_keep_mask(self, features: Tensor) -> Tensor:
        """(n, R) True for the regions used: all of them at evaluation; while training each is
        dropped with probability `region_drop`, keeping at least one (a random one) per image."""
        shape = features.shape[:2]
        if not self.training or self.config.region_drop == 0:
            return torch.ones(shape, dtype=torch.bool, device=features.device)
        draw = torch.rand(shape, device=features.device)
        kept = draw >= self.config.region_drop
        # The region with the largest draw is kept anyway (it is kept already unless all are dropped).
        return kept.scatter(1, draw.argmax(1, keepdim=True), True)

    # -- texts -------------------------------------------------------------------------------------
    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        config = self.config
        tokens, lengths = self._check_tokens(tokens, lengths)
        if self.training and config.word_augment > 0:
            tokens, lengths = self.augment_words(tokens, lengths)
        words, mask, _ = self.text_encoder(tokens, lengths)
        pooled, _ = self.text_pool(words, mask)
        return Encoded({"vector": l2norm(pooled) if config.normalize_texts else pooled})

    def augment_words(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The official caption augmentation, batched: returns new (tokens, lengths) with the
        deleted words squeezed out (the remaining words keep their order)."""
        config = self.config
        valid = word_mask(lengths.to(tokens.device), tokens.shape[1])
        draw = torch.rand(tokens.shape, device=tokens.device)
        picked = valid & (draw < config.word_augment)
        share = draw / config.word_augment  # uniform in [0, 1) among the picked words
        to_mask = picked & (share < config.word_mask_share)
        to_random = picked & ~to_mask & (share < config.word_mask_share + config.word_random_share)
        to_delete = picked & ~to_mask & ~to_random
        mask_id, n_ids = self._augment_ids()
        tokens = torch.where(to_mask, mask_id, tokens)
        tokens = torch.where(to_random, torch.randint_like(tokens, n_ids), tokens)
        kept = valid & ~to_delete
        kept = torch.where(kept.any(1, keepdim=True), kept, valid)  # never delete a whole caption
        # A stable sort of "deleted or padding" moves the kept words to the front, in order.
        order = (~kept).to(torch.int8).sort(dim=1, stable=True).indices
        new_lengths = kept.sum(1)
        tokens = tokens.gather(1, order).masked_fill(~word_mask(new_lengths, tokens.shape[1]), 0)
        return tokens, new_lengths.cpu()

    def _augment_ids(self) -> tuple[int | None, int]:
        """(the <mask> id, how many ids a random word is drawn from, <mask> included): those of a
        pretrained encoder's tokenizer, else the word vocabulary plus <mask>."""
        tokenizer = self.text_encoder.tokenizer
        if tokenizer is not None:
            return tokenizer.mask_id, len(tokenizer)
        return self.config.vocab_size, self.text_encoder.embed.num_embeddings
