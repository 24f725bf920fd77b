"""VSRN: Visual Semantic Reasoning for Image-Text Matching (Li et al., ICCV 2019).

Follows the official code (github:KunpengLi1994/VSRN 777ae74: model.py, GCN_lib/Rs_GCN.py,
models/EncoderRNN.py, DecoderRNN.py, Attention.py, misc/utils.py):

- regions: fc (Xavier uniform, zero bias); the official code branches on the data set here
  (`data_branch`): on COCO each region is l2-normalised after fc, on Flickr30K it is not;
- four residual region-relation blocks (Rs_GCN): R = theta(v) phi(v)^T / N, no softmax, and
  v* = BN(W (R g(v))) + v with the BatchNorm's gain and bias at zero: each block starts as the
  identity;
- each region l2-normalised, then a GRU over the regions in their stored order (the region order
  of the features matters); its final state, on Flickr30K through a BatchNorm1d, l2-normalised,
  is the image vector;
- text: a unidirectional GRU's state at the last word, l2-normalised; the score is the dot product;
- training: the hinge loss (hardest negative, margin 0.2) plus, with weight 1, the caption
  generation loss: an attention decoder over the reasoned regions predicts each caption word
  from the previous one (teacher forcing); NLL over the words, summed and divided by the batch
  size. The caption branch only trains the regions: the official checkpoints do not hold it and
  scoring never runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from itmatch.losses import TrainingContext
from itmatch.models.base import EmbeddingMatcher, Encoded
from itmatch.models.layers import l2norm, xavier_init
from itmatch.models.registry import official_parts, register
from itmatch.models.text import TextConfig, build_text_encoder, float32_rnn


@dataclass
class CaptionConfig:
    """The caption-generation branch (the official train.py's caption options)."""

    hidden_size: int = 512  # --dim_hidden: the region GRU, the attention and the decoder GRU
    word_dim: int = 300  # --dim_word: the decoder's word embeddings
    # --input_dropout_p: on the regions entering the region GRU and on every decoder input.
    dropout: float = 0.2
    # --max_len: captions are cut to this many tokens (<start> and <end> included).
    max_len: int = 60


@dataclass
class VSRNConfig:
    vocab_size: int = 0  # set from the vocabulary
    img_dim: int = 2048  # set from the data
    embed_size: int = 2048
    gcn_blocks: int = 4
    # The official architecture depends on --data_name: "f30k" (f30k_precomp) keeps the regions
    # as fc gives them and batch-normalises the pooled vector; "coco" (any other data set)
    # l2-normalises each region after fc and has no final BatchNorm.
    data_branch: Literal["f30k", "coco"] = "f30k"
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(bidirectional=False, normalize=False))


class RegionRelation(nn.Module):
    """One residual region-relation block (Rs_GCN) on regions (n, N, D): the official 1x1
    convolutions are Linear layers on the last axis, its BatchNorm normalises each channel over
    all regions of the batch as it does."""

    def __init__(self, size: int):
        super().__init__()
        self.g, self.theta, self.phi = nn.Linear(size, size), nn.Linear(size, size), nn.Linear(size, size)
        self.out = nn.Linear(size, size)  # W's convolution
        self.norm = nn.BatchNorm1d(size)  # W's BatchNorm, zero gain and bias: the block starts as the identity
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, regions: Tensor) -> Tensor:
        relation = self.theta(regions) @ self.phi(regions).transpose(1, 2) / regions.shape[1]
        update = self.out(relation @ self.g(regions))
        return regions + self.norm(update.flatten(0, 1)).view_as(update)


class CaptionDecoder(nn.Module):
    """The official S2VTAttModel: a GRU over the reasoned regions, and a GRU decoder that attends
    its outputs and reads the previous word of the caption."""

    def __init__(self, region_size: int, vocab_size: int, config: CaptionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.max_len = config.max_len
        self.region_in = nn.Linear(region_size, hidden)  # EncoderRNN.vid2hid
        self.region_rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.embed = nn.Embedding(vocab_size, config.word_dim)
        self.attention_in = nn.Linear(2 * hidden, hidden)  # on [region state; decoder state]
        self.attention_out = nn.Linear(hidden, 1, bias=False)
        self.cell = nn.GRUCell(config.word_dim + hidden, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        nn.init.xavier_normal_(self.region_in.weight)
        nn.init.xavier_normal_(self.out.weight)

    def loss(self, regions: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The masked NLL of each caption given its image's regions, summed, over the batch size."""
        labels, mask = caption_targets(tokens, lengths, self.max_len)
        with float32_rnn():
            states, hidden = self.region_rnn(self.dropout(self.region_in(regions)))
        hidden, size = hidden[0], states.shape[-1]
        # The attention's first layer on [state; hidden], its region half computed once.
        keys = nn.functional.linear(states, self.attention_in.weight[:, :size], self.attention_in.bias)
        query = self.attention_in.weight[:, size:]
        words = self.embed(labels)
        outputs = []
        for step in range(labels.shape[1] - 1):
            energy = self.attention_out(torch.tanh(keys + (hidden @ query.T)[:, None])).squeeze(-1)
            context = torch.einsum("nr,nrd->nd", energy.softmax(-1), states)
            hidden = self.cell(self.dropout(torch.cat([words[:, step], context], -1)), hidden)
            outputs.append(hidden)
        logprobs = self.out(torch.stack(outputs, 1)).log_softmax(-1)
        nll = -logprobs.gather(2, labels[:, 1:, None]).squeeze(2)
        return (nll * mask[:, 1:]).sum() / len(tokens)


def caption_targets(tokens: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """The official caption labels and mask: the caption cut to `max_len` tokens, its last kept
    token replaced by its own final one (<end>), then padding; the mask covers the tokens and one
    padding position, which the decoder also learns to predict (its end of sentence is id 0).
    Positions past what the official decoder's max_len - 1 steps predict are left out."""
    kept = lengths.clamp(max=max_len)
    width = min(int(kept.max()) + 1, max_len)
    positions = torch.arange(width, device=tokens.device)
    labels = nn.functional.pad(tokens, (0, max(width - tokens.shape[1], 0)))[:, :width]
    labels = labels * (positions < kept[:, None])
    rows = torch.arange(len(tokens), device=tokens.device)
    labels[rows, kept - 1] = tokens[rows, lengths - 1]
    return labels, (positions <= kept[:, None]).to(torch.float32)


@register(
    converter="itmatch.convert.vsrn:convert_official_vsrn", recognizes=official_parts(2, marker=r"Rs_GCN_\d+\..+")
)
class VSRN(EmbeddingMatcher):
    architecture = "vsrn"
    config_class = VSRNConfig

    def __init__(self, config: VSRNConfig):
        super().__init__(config)
        size = config.embed_size
        self.image_proj = nn.Linear(config.img_dim, size)
        xavier_init(self.image_proj)
        self.gcn = nn.ModuleList(RegionRelation(size) for _ in range(config.gcn_blocks))
        self.region_rnn = nn.GRU(size, size, batch_first=True)
        self.final_norm = nn.BatchNorm1d(size) if config.data_branch == "f30k" else None
        self.text_encoder = build_text_encoder(config.text, config.vocab_size, size)
        own = self.text_encoder.tokenizer
        vocab_size = len(own) if own is not None else config.vocab_size
        self.captioner = CaptionDecoder(size, vocab_size, config.caption)

    def reason(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(image vectors (n, D), reasoned regions (n, N, D), each l2-normalised)."""
        regions = self.image_proj(self._check_features(features, self.config.img_dim, None))
        if self.final_norm is None:  # the COCO branch
            regions = l2norm(regions)
        for block in self.gcn:
            regions = block(regions)
        regions = l2norm(regions)
        with float32_rnn():
            _, hidden = self.region_rnn(regions)
        vector = hidden[0] if self.final_norm is None else self.final_norm(hidden[0])
        return l2norm(vector), regions

    def encode_images(self, features: Tensor) -> Encoded:
        return Encoded({"vector": self.reason(features)[0]})

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        tokens, lengths = self._check_tokens(tokens, lengths)
        _, _, last = self.text_encoder(tokens, lengths)
        return Encoded({"vector": l2norm(last)})

    def training_losses(self, batch: Mapping[str, Tensor], context: TrainingContext) -> dict[str, Tensor]:
        """The shared terms (`loss.terms`: the hinge loss in the presets) and the caption-generation
        loss on the same reasoned regions."""
        features = self.backbone(batch["pixels"]) if self.backbone is not None else batch["features"]
        vectors, regions = self.reason(features)
        terms = self.shared_terms(Encoded({"vector": vectors}), self.encode_text_batch(batch), batch, context)
        caption = self.captioner.loss(regions, *self._check_tokens(batch["tokens"], batch["lengths"]))
        return terms | {"caption": caption}
