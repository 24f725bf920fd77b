"""The one interface every matcher implements: encode images, encode texts, score pairs.

Training, evaluation and retrieval only use this interface. Embedding models score a pair by a dot
product of two vectors; cross-attention models run a network on every image-caption pair, which
`CrossAttentionMatcher.score` tiles over images x captions so that memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from itmatch.data.inputs import Inputs, derived_image_inputs
from itmatch.distributed import pad_axis
from itmatch.errors import ConfigError, InputError

if TYPE_CHECKING:
    from itmatch.config import LossConfig
    from itmatch.losses import TrainingContext


@dataclass
class Encoded:
    """Per-item tensors of one modality, the item axis first.

    Text encodings keep their words padded: keys in `padded` have the word axis second, and
    `mask` (items, words) tells which positions are real words. Keys in `square` (a subset of
    `padded`) are word-by-word matrices: their third axis is a word axis too.
    """

    tensors: dict[str, Tensor]
    padded: frozenset[str] = frozenset()
    square: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def select(self, index: slice | Tensor) -> Encoded:
        """A subset of the items, with word padding trimmed to the longest caption kept."""
        picked = {key: value[index] for key, value in self.tensors.items()}
        if "mask" in picked and self.padded:
            length = max(int(picked["mask"].sum(1).max().item()), 1) if len(picked["mask"]) else 1
            for key in self.padded:
                picked[key] = picked[key][:, :length, :length] if key in self.square else picked[key][:, :length]
        return Encoded(picked, self.padded, self.square)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Encoded:
        """On `device`, with floating-point tensors in `dtype` (masks keep theirs)."""
        return Encoded(
            {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in self.tensors.items()},
            self.padded,
            self.square,
        )

    @staticmethod
    def cat(parts: list[Encoded]) -> Encoded:
        """Concatenates encodings of consecutive batches, padding the word axis to the longest."""
        padded, square = parts[0].padded, parts[0].square
        out = {}
        for key in parts[0].tensors:
            values = [p.tensors[key] for p in parts]
            if key in padded:
                length = max(v.shape[1] for v in values)
                values = [pad_axis(v, 1, length) for v in values]
                if key in square:
                    values = [pad_axis(v, 2, length) for v in values]
            out[key] = torch.cat(values)
        return Encoded(out, padded, square)


def word_mask(lengths: Tensor, max_length: int) -> Tensor:
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class Matcher(nn.Module):
    """Base class of every model: subclasses set `architecture` and `config_class`."""

    architecture: ClassVar[str]
    config_class: ClassVar[type]
    # The encoding key holding one unit vector per item whose dot products rank pairs: what a
    # first retrieval stage searches (None: the model has no such vector).
    embedding_key: ClassVar[str | None] = None
    # True when a pair's score is the dot product of the two `embedding_key` vectors: the scoring
    # engine then multiplies matrices instead of calling `pair_scores` on tiles.
    scores_by_dot_product: ClassVar[bool] = False
    # Set by every model from its `text` config (itmatch.models.text.build_text_encoder).
    text_encoder: nn.Module

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.vocab = None  # the Vocabulary the word ids refer to (set by training / loading)
        self.run_config = None  # the RunConfig (preset, training settings) it was built from
        # The pixels -> regions image encoder of end-to-end training on raw images (set by
        # build_model from RunConfig.backbone); None when the model reads region features.
        self.backbone = None
        # Parameters of the shared loss terms the run trains with (`attach_loss_heads`).
        self.loss_heads = nn.ModuleDict()

    @classmethod
    def data_settings(cls, config, feature_dim: int, n_regions: int, vocab) -> dict:
        """The model settings the training data decides: feature size, regions per image (for
        configs that fix them), vocabulary size (a word vocabulary; None for a pretrained text
        encoder's tokenizer)."""
        settings = {"img_dim": feature_dim} | ({} if vocab is None else {"vocab_size": len(vocab)})
        return settings | ({"n_regions": n_regions} if hasattr(config, "n_regions") else {})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def tokenizer(self):
        """What turns caption strings into the token ids `encode_texts` reads: a pretrained text
        encoder's own tokenizer, else the word vocabulary (`vocab`); both have encode(caption),
        encode_batch(captions) and unk_rate(captions)."""
        own = self.text_encoder.tokenizer
        if own is None and self.vocab is None:
            raise InputError("the model has no vocabulary: load it from an itmatch checkpoint that has one")
        return own if own is not None else self.vocab

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Caption strings as (token ids padded with 0, lengths): what `encode_texts` takes."""
        return self.tokenizer.encode_batch(captions)

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (the adversary's parameters left to the second one),
        each with the multiplier `lr_scale` of the learning rate: a pretrained text encoder's
        weights learn at `text.pretrained_lr_scale` of it."""
        pretrained = {id(p) for p in self.text_encoder.pretrained_parameters()}
        adversary = {id(p) for p in self.adversary_parameters()}  # the second optimizer's
        own = [p for p in self.parameters() if id(p) not in adversary]
        groups = [{"params": [p for p in own if id(p) not in pretrained], "lr_scale": 1.0}]
        if pretrained:
            params = [p for p in self.parameters() if id(p) in pretrained]
            groups.append({"params": params, "lr_scale": self.config.text.pretrained_lr_scale})
        return groups

    # -- the interface -------------------------------------------------------------------------
    def inputs(self) -> Inputs:
        """The named inputs the model reads (see `itmatch.data.inputs`): region features and token
        ids unless a model says otherwise."""
        return Inputs()

    def encode_images(self, features: Tensor, **inputs: Tensor) -> Encoded:
        """Per-image encodings from the image inputs, passed by name."""
        raise NotImplementedError

    def encode_texts(self, tokens: Tensor, lengths: Tensor, **inputs: Tensor) -> Encoded:
        """Per-caption encodings from token ids (padded with 0), lengths and other text inputs."""
        raise NotImplementedError

    def encode_image_batch(self, batch: Mapping[str, Tensor]) -> Encoded:
        """The images of a batch of named inputs: pixels through the backbone for a model that has
        one, else the image inputs the model declares."""
        if self.backbone is not None:
            return self.encode_pixels(batch["pixels"])
        return self.encode_images(**{name: batch[name] for name in self.inputs().image})

    def encode_text_batch(self, batch: Mapping[str, Tensor]) -> Encoded:
        """The captions of a batch of named inputs."""
        extra = {name: batch[name] for name in self.inputs().text if name != "tokens"}
        return self.encode_texts(batch["tokens"], batch["lengths"], **extra)

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        """The training objective of a batch as named terms (the trainer weights, sums and logs
        them): the shared terms `loss.terms` names, the triplet ranking loss by default (of the
        global batch under global negatives: see `itmatch.losses`)."""
        return self.shared_terms(self.encode_image_batch(batch), self.encode_text_batch(batch), batch, context)

    def shared_terms(
        self, images: Encoded, texts: Encoded, batch: Mapping[str, Tensor], context: TrainingContext
    ) -> dict[str, Tensor]:
        """The terms of `loss.terms` (itmatch.losses) on a batch's encodings, caption j's image
        being image j: what a model adds its own terms to."""
        from itmatch.losses import batch_triplet_term, embedding_terms

        terms = {}
        if "triplet" in context.loss.terms:
            terms["triplet"] = batch_triplet_term(self, images, texts, batch, context)
        if self.embedding_key is None:
            return terms
        return terms | embedding_terms(images, texts, self.embedding_key, self.loss_heads, batch, context)

    def attach_loss_heads(self, config: LossConfig) -> None:
        """Builds the parameters the run's shared loss terms own (the identity classifier), sized
        by `model.embed_size`; terms on one vector per item refuse a model that has none."""
        from itmatch.losses import VECTOR_TERMS, loss_heads

        needs_vectors = sorted(set(config.terms) & set(VECTOR_TERMS))
        if needs_vectors and self.embedding_key is None:
            raise ConfigError(
                f"loss.terms {', '.join(needs_vectors)} need one vector per item; {self.architecture} has none"
            )
        self.loss_heads = loss_heads(config, getattr(self.config, "embed_size", None))

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by a second optimizer on `adversary_losses`, in alternation with
        the rest (a modality discriminator); none by default."""
        return []

    def adversary_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Tensor], context: TrainingContext, adversary: bool = False):
        """The loss terms of a batch: what training calls (and DistributedDataParallel wraps)."""
        return self.adversary_losses(batch, context) if adversary else self.training_losses(batch, context)

    def similarity(
        self,
        images: Tensor,
        captions: Tensor,
        lengths: Tensor,
        boxes: Tensor | None = None,
        image_sizes: Tensor | None = None,
        precision: str = "auto",
        **inputs: Tensor,
    ) -> Tensor:
        """The (n_images, n_captions) score matrix of region features (pixels for a model with
        a backbone) and token-id captions.

        Other image inputs the model reads are given by name (`region_graph=...`), or derived
        from `boxes` and `image_sizes` (w, h). `precision`: "fp32", "bf16", "fp16" or "auto" scoring (see
        `itmatch.precision`).
        """
        from itmatch.scoring import ScoringOptions, score_grid

        batch = {"pixels" if self.backbone is not None else "features": images, **inputs}
        if self.backbone is None:
            missing = [name for name in self.inputs().image if name not in batch]
            batch |= derived_image_inputs(missing, self.inputs(), images, boxes, image_sizes)
        encoded = self.encode_image_batch(batch), self.encode_texts(captions, lengths)
        return score_grid(self, *encoded, ScoringOptions(precision=precision))

    def encode_pixels(self, pixels: Tensor) -> Encoded:
        """Images as pixels (n, 3, S, S), uint8 or [0, 1], through the backbone into `encode_images`;
        other image inputs (boxes, region graph) are those of the backbone's grid cells."""
        if self.backbone is None:
            raise InputError(f"this {self.architecture} model reads region features, not pixels: it has no backbone")
        size = self.backbone.config.image_size
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise InputError(f"pixels must be a tensor (n_images, 3, {size}, {size}), got {_describe(pixels)}")
        features = self.backbone(pixels)
        others = [name for name in self.inputs().image if name != "features"]
        grid = derived_image_inputs(
            others, self.inputs(), features[:1], self.backbone.grid_boxes()[None], [[size, size]]
        )
        grid = {name: value.to(features.device).expand(len(features), *value.shape[1:]) for name, value in grid.items()}
        return self.encode_images(features, **grid)

    @property
    def tile_spans_all_images(self) -> bool:
        """True when a pair's score depends on the other images scored with it (a BatchNorm over
        images in training): the scoring engine then puts all images in every tile."""
        return False

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        """Scores of pairs whose leading axes broadcast (see CrossAttentionMatcher)."""
        raise NotImplementedError

    def transductive_scores(self, images: Encoded, texts: Encoded) -> Tensor:
        """The (n_images, n_captions) scores of a model whose score of a pair depends on every
        other image and caption given (the whole gallery and its queries): a post-hoc stage
        reported apart from the model's own, inductive, score (`evaluate_split(transductive=True)`)."""
        raise InputError(f"{self.architecture} has no transductive score: it scores each pair alone")

    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        """An estimate of the working memory one pair needs inside `pair_scores`."""
        return 0

    # -- input checks shared by the subclasses ---------------------------------------------------
    def _check_features(self, features: Tensor, feature_dim: int, n_regions: int | None) -> Tensor:
        if not torch.is_tensor(features) or features.dim() != 3 or not features.is_floating_point():
            raise InputError(
                "image features must be a float tensor of shape (n_images, n_regions, feature_dim), "
                f"got {_describe(features)}"
            )
        if features.shape[2] != feature_dim:
            raise InputError(f"the model expects {feature_dim}-d region features, got {features.shape[2]}-d")
        if n_regions is not None and features.shape[1] != n_regions:
            raise InputError(
                f"the model expects {n_regions} regions per image (set when it was trained), got {features.shape[1]}"
            )
        if not torch.isfinite(features).all():
            bad = (~torch.isfinite(features)).flatten(1).any(1).nonzero().flatten().tolist()
            raise InputError(f"image features contain NaN or inf (images {bad[:10]})")
        return features.to(self.device, torch.float32)

    def _check_tokens(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"captions must be an integer tensor (n_captions, max_length), got {_describe(tokens)}")
        lengths = torch.as_tensor(lengths, dtype=torch.int64).flatten()
        if lengths.shape[0] != tokens.shape[0]:
            raise InputError(f"{tokens.shape[0]} captions but {lengths.shape[0]} lengths")
        if len(lengths) and (lengths.min() < 1 or lengths.max() > tokens.shape[1]):
            raise InputError(f"caption lengths must be within 1..{tokens.shape[1]}, got {lengths.tolist()[:10]}")
        own = self.text_encoder.tokenizer  # a pretrained encoder's, else the word vocabulary
        vocab_size, source = (len(own), "tokenizer") if own is not None else (self.config.vocab_size, "vocabulary")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise InputError(f"word ids must be within 0..{vocab_size - 1} (the model's {source})")
        return tokens.to(self.device, torch.int64), lengths


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class EmbeddingMatcher(Matcher):
    """Scores by the dot product of one image vector and one text vector (key "vector")."""

    embedding_key = "vector"
    scores_by_dot_product = True

    def pair_scores(self, images: dict[str, Tensor], texts: dict[str, Tensor]) -> Tensor:
        return (images["vector"] * texts["vector"]).sum(-1)


class CrossAttentionMatcher(Matcher):
    """Scores pairs with a network run on each pair.

    A subclass implements `pair_scores(images, texts)` on dicts of tensors whose leading "pair"
    axes broadcast: a grid tile passes texts as (n_t, 1, ...) and images as (1, n_i, ...) (see
    `grid_view`), a list of pairs passes (n_pairs, ...) on both sides. One function thus scores
    exhaustive tiles and reranked candidates alike; einsum with `...` keeps the broadcast free (no
    copies).
    """

    def bytes_per_pair(self, n_regions: int, n_words: int) -> int:
        """An estimate of the working memory one pair needs inside `pair_scores`."""
        raise NotImplementedError
