"""cm-SSFT adapted to image-text matching: shared-specific feature transfer (Lu et al., "Cross-
modality Person Re-identification with Shared-Specific Feature Transfer", CVPR 2020), from the
paper's abstract and our notes (../shared/notes/zoo2.md sec. 10); no code was released, and the
paper is RGB-infrared re-identification, so this is an ADAPTATION:

- each tower (pooled regions; BiGRU words) ends in a trunk feature split by two heads into a
  shared feature (the joint space) and a modality-specific one;
- every item becomes a node [shared, image-specific, caption-specific], zero in the slot of the
  modality it lacks; affinities come from the shared features alone, split into the
  within-modality and the cross-modality blocks, each softmax-normalised per row (temperature
  `affinity_temperature`; an item is not its own neighbour);
- transfer: each node gathers its neighbours' nodes through both blocks (the mean of the two),
  which fills its missing specific slot from the other modality; the fused feature is the node
  and the gathered one side by side, scored by cosine;
- losses (named terms, weighted by `loss.weights`): the shared terms of `loss.terms` on the
  shared features (the inductive score), "transfer" (the same hinge loss on the fused features
  of the batch), and the complementary ones: "modality" (the specific features predict their
  modality), "projection" (the encoders make the specific feature unpredictable from the shared
  one, against a projector trained by the adversary optimizer on "projector"), "reconstruction"
  (both features rebuild the trunk feature).

The model's score is the inductive two-tower cosine of the shared features. The transfer needs
the whole gallery, so its score is transductive (`transductive_scores`, `itmatch evaluate
--transductive`) and reported apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itmatch.losses import TrainingContext, triplet_term
from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import l2norm, xavier_init
from itmatch.models.registry import register
from itmatch.models.text import TextConfig, build_text_encoder


@dataclass
class CmSSFTConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 512  # the size of the trunk, shared and specific features
    # Softmax temperature of the affinities (cosines of shared features) that transfer features.
    affinity_temperature: float = 0.1
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=True, normalize=False))


class _Tower(nn.Module):
    """A trunk feature's shared and specific heads, the decoder rebuilding it from both, and the
    adversary's projector from shared to specific."""

    def __init__(self, size: int):
        super().__init__()
        self.shared = nn.Linear(size, size)
        self.specific = nn.Linear(size, size)
        self.decoder = nn.Linear(2 * size, size)
        self.projector = nn.Linear(size, size)
        xavier_init(self)

    def forward(self, trunk: Tensor) -> Encoded:
        codes = {"vector": l2norm(self.shared(trunk)), "specific": l2norm(self.specific(trunk))}
        # The trunk is the reconstruction's target: kept in training only, not in indexes.
        return Encoded(codes | ({"trunk": trunk} if self.training else {}))


@register
class CmSSFT(EmbeddingMatcher):
    architecture = "cmssft"
    config_class = CmSSFTConfig

    def __init__(self, config: CmSSFTConfig):
        super().__init__(config)
        self.image_trunk = nn.Linear(config.img_dim, config.embed_size)
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, config.embed_size)
        self.image_tower, self.text_tower = _Tower(config.embed_size), _Tower(config.embed_size)
        self.modality = nn.Linear(config.embed_size, 1)  # on specific features: 1 image, 0 caption
        xavier_init(self.image_trunk)

    def encode_images(self, features: Tensor) -> Encoded:
        features = self._check_features(features, self.config.img_dim, None)
        return self.image_tower(self.image_trunk(features.mean(1)))

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        return self.text_tower(self.text_encoder(tokens, lengths)[2])

    def transductive_scores(self, images: Encoded, texts: Encoded) -> Tensor:
        """Cosines of the fused features, every image and caption given being the graph."""
        fused_images, fused_texts = shared_specific_transfer(images, texts, self.config.affinity_temperature)
        return fused_images @ fused_texts.T

    def adversary_parameters(self) -> list[nn.Parameter]:
        return [*self.image_tower.projector.parameters(), *self.text_tower.projector.parameters()]

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        images, texts = self.encode_image_batch(batch), self.encode_text_batch(batch)
        terms = self.shared_terms(images, texts, batch, context)
        graph = context.gather_encoded(images), context.gather_encoded(texts)  # the global batch's
        terms["transfer"] = triplet_term(self.transductive_scores(*graph), batch, context)
        logits = self.modality(torch.cat([images["specific"], texts["specific"]])).squeeze(-1)
        labels = torch.cat([torch.ones(len(images)), torch.zeros(len(texts))]).to(logits)
        terms["modality"] = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        pairs = ((self.image_tower, images), (self.text_tower, texts))
        terms["projection"] = -sum(_projection_error(tower, codes) for tower, codes in pairs)
        terms["reconstruction"] = sum(_reconstruction_error(tower, codes) for tower, codes in pairs)
        return terms

    def adversary_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        with torch.no_grad():
            images, texts = self.encode_image_batch(batch), self.encode_text_batch(batch)
        pairs = ((self.image_tower, images), (self.text_tower, texts))
        return {"projector": sum(_projection_error(tower, codes) for tower, codes in pairs)}


def _projection_error(tower: _Tower, codes: Encoded) -> Tensor:
    """How far the projector's guess from the shared feature lands from the specific one."""
    return (l2norm(tower.projector(codes["vector"])) - codes["specific"]).pow(2).sum(1).mean()


def _reconstruction_error(tower: _Tower, codes: Encoded) -> Tensor:
    """The trunk feature rebuilt from [shared, specific] (the trunk is the target, not moved by it)."""
    rebuilt = tower.decoder(torch.cat([codes["vector"], codes["specific"]], dim=1))
    return nn.functional.mse_loss(rebuilt, codes["trunk"].detach())


def shared_specific_transfer(images: Encoded, texts: Encoded, temperature: float) -> tuple[Tensor, Tensor]:
    """Unit fused features of the images (n_i, 6D) and captions (n_t, 6D).

    Nodes: images [shared, specific, 0], captions [shared, 0, specific]. Affinities: the cosines of
    the shared features / temperature, softmax-normalised per row within each block
    (image-image, image-caption, caption-image, caption-caption; an item never its own
    neighbour). Each node gathers the mean of what its two blocks send, and the fused feature is
    [node, gathered]."""
    image_shared, text_shared = images["vector"], texts["vector"]
    image_nodes = torch.cat([image_shared, images["specific"], torch.zeros_like(images["specific"])], dim=1)
    text_nodes = torch.cat([text_shared, torch.zeros_like(texts["specific"]), texts["specific"]], dim=1)
    cross = image_shared @ text_shared.T / temperature
    image_gathered = (_row_softmax(_no_self(image_shared, temperature)) @ image_nodes) + (
        torch.softmax(cross, dim=1) @ text_nodes
    )
    text_gathered = (_row_softmax(_no_self(text_shared, temperature)) @ text_nodes) + (
        torch.softmax(cross.T, dim=1) @ image_nodes
    )
    fused_images = torch.cat([image_nodes, image_gathered / 2], dim=1)
    fused_texts = torch.cat([text_nodes, text_gathered / 2], dim=1)
    return l2norm(fused_images), l2norm(fused_texts)


def _no_self(shared: Tensor, temperature: float) -> Tensor:
    """Within-modality affinity logits with the diagonal removed (-inf)."""
    logits = shared @ shared.T / temperature
    return logits.masked_fill(torch.eye(len(shared), dtype=torch.bool, device=shared.device), float("-inf"))


def _row_softmax(logits: Tensor) -> Tensor:
    """Row softmax; a row with no neighbour (a single item) gathers nothing instead of NaN."""
    return torch.softmax(logits, dim=1).nan_to_num(0.0)
