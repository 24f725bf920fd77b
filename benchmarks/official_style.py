"""A CMCAN scorer with the official code's structure, for the speed benchmark's reference.

As the official `forward_sim` under `shard_attn_scores`: shards of 100 images x 100 captions; in
each shard the image pooling and neighbourhood vectors are recomputed, and a Python loop runs over
the captions, each caption repeated for every image of the shard; every reasoning layer computes
queries and keys for all nodes. It reads the weights of an itmatch CMCAN model (official preset),
so both scorers compute the same function. Written from the official code's structure, not
copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itmatch.models.cmcan import CMCAN, neighbour_slots


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def scan_attention(query: Tensor, context: Tensor, smooth: float) -> Tensor:
    """(n, q, d) queries attend to (n, c, d) context: LeakyReLU, l2 over queries, softmax."""
    attn = nn.functional.leaky_relu(context @ query.transpose(1, 2), 0.1)
    attn = torch.softmax(l2norm(attn, dim=2).transpose(1, 2) * smooth, dim=2)
    return l2norm(attn @ context)


def similarity_vector(layer: nn.Linear, a: Tensor, b: Tensor) -> Tensor:
    return l2norm(torch.relu(layer((a - b) ** 2)))


def reason(layers: nn.ModuleList, nodes: Tensor) -> Tensor:
    for layer in layers:
        edges = torch.softmax(layer.query(nodes) @ layer.key(nodes).transpose(1, 2), dim=-1)
        nodes = torch.relu(layer.update(edges @ nodes))
    return nodes[:, 0]


def image_side(model: CMCAN, regions: Tensor, adjacency: Tensor) -> tuple[Tensor, Tensor]:
    """The shard's global image vectors and neighbourhood vectors (official GraphEmbv start)."""
    pool = model.image_pool
    local = torch.tanh(pool.item_norm(pool.item_proj(regions)))
    common = torch.tanh(pool.mean_norm(pool.mean_proj(regions.mean(1))))
    logits = pool.score(local * common[:, None]).squeeze(-1)
    pooled = (torch.softmax(logits, 1)[..., None] * regions).sum(1)
    norm = pooled.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8
    slots = neighbour_slots(adjacency, model.config.context.slots)  # (n, R, slots)
    n, n_regions = slots.shape[:2]
    gathered = regions[torch.arange(n)[:, None, None], slots]  # (n, R, slots, D)
    weights = torch.softmax(logits[torch.arange(n)[:, None, None], slots], dim=-1)
    context = (weights[..., None] * gathered).sum(2) / norm[:, None]
    return pooled / norm, context


def text_global(model: CMCAN, words: Tensor) -> Tensor:
    pool = model.text_pool
    local = torch.tanh(pool.item_proj(words))
    common = torch.tanh(pool.mean_proj(words.mean(1)))
    weights = torch.softmax(pool.score(local * common[:, None]).squeeze(-1), dim=1)
    return l2norm((weights[..., None] * words).sum(1))


def caption_loop_scores(model: CMCAN, regions: Tensor, adjacency: Tensor, words: Tensor, lengths: list[int]) -> Tensor:
    """Scores (n_images, n_captions), one caption at a time against every image: the official
    `forward_sim`, which training runs on the whole batch (with gradients) and evaluation on each
    shard."""
    n_images = len(regions)
    image_global, context = image_side(model, regions, adjacency)
    columns = []
    for caption, length in enumerate(lengths):
        caption_words = words[caption : caption + 1, :length]
        repeated = caption_words.expand(n_images, -1, -1)
        word_align = similarity_vector(model.word_align.proj, scan_attention(repeated, regions, 9.0), repeated)
        caption_global = text_global(model, caption_words)
        region_align = similarity_vector(model.region_align.proj, scan_attention(regions, repeated, 9.0), regions)
        context_align = similarity_vector(model.context_align.proj, context, caption_global[:, None])
        global_align = similarity_vector(model.global_align.proj, image_global, caption_global)
        confidence = model.confidence(context_align * global_align[:, None]).squeeze(-1)
        confidence = torch.sigmoid(model.confidence_norm(confidence))
        visual = torch.cat([global_align[:, None], confidence[..., None] * region_align], dim=1)
        text = torch.cat([global_align[:, None], word_align], dim=1)
        head = torch.cat([reason(model.text_reasoning, text), reason(model.visual_reasoning, visual)], dim=-1)
        columns.append(torch.sigmoid(model.head(head)))
    return torch.cat(columns, dim=1)


shard_scores = torch.no_grad()(caption_loop_scores)


def official_style_scores(
    model: CMCAN, regions: Tensor, adjacency: Tensor, words: Tensor, lengths: list[int], shard: int = 100
) -> Tensor:
    """All scores in shards of `shard` x `shard`, as the official evaluation does."""
    rows = []
    for i in range(0, len(regions), shard):
        rows.append(
            torch.cat(
                [
                    shard_scores(
                        model,
                        regions[i : i + shard],
                        adjacency[i : i + shard],
                        words[j : j + shard],
                        lengths[j : j + shard],
                    )
                    for j in range(0, len(words), shard)
                ],
                dim=1,
            )
        )
    return torch.cat(rows)
