"""A GSMN scorer with the official code's structure, for the speed benchmark's reference and the
tests' equality check (github.com/CrossmodalGroup/GSMN graph_model.py, layers.py and evaluation's
shard_xattn).

Shards of 80 images x 80 captions. In each shard the boxes' pseudo-coordinates are computed once;
then a Python loop runs over the captions: the caption is repeated for every image of the shard,
both node-level matchings form their attended vectors, the Gaussian kernel weights and the word
affinity are recomputed, the neighbour tensors are built by `repeat` (the released code: each
node's own matching vector; the paper: its neighbours'), and the per-kernel Linear layers run one
after the other. It reads the weights of an itmatch GSMN model, so both scorers compute the same
function. Written from the official code's structure, not copied.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SHARD = 80  # evaluation.py's shard_size for GSMN


def l2norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def scaled_boxes(boxes: Tensor, sizes: Tensor, divisions: int) -> Tensor:
    """Boxes divided by (w, h, w, h) `divisions` times, as the data loader leaves them."""
    for _ in range(divisions):
        boxes = boxes / sizes.repeat(1, 2)[:, None, :]
    return boxes


def pseudo_coordinates(boxes: Tensor) -> Tensor:
    centre = boxes[..., :2] + 0.5 * (boxes[..., 2:] - boxes[..., :2])
    offset = centre[:, :, None] - centre[:, None, :]
    return torch.stack([offset.norm(dim=-1), torch.atan2(offset[..., 0], offset[..., 1])], -1)


def inter_relations(keys: Tensor, queries: Tensor, smooth: float) -> Tensor:
    """(n, queries, keys) weights: LeakyReLU, l2 over the queries, softmax over the keys."""
    attn = nn.functional.leaky_relu(keys @ queries.transpose(1, 2), 0.1)
    return torch.softmax(l2norm(attn, 2).transpose(1, 2) * smooth, dim=2)


def multi_block_cosine(queries: Tensor, context: Tensor, blocks: int) -> Tensor:
    q, c = (torch.stack(torch.split(x, x.shape[-1] // blocks, dim=2), dim=2) for x in (queries, context))
    return (q * c).sum(-1) / (q.norm(dim=-1) * c.norm(dim=-1)).clamp(min=1e-8)


def gaussian_weights(kernels, coords: Tensor) -> Tensor:
    """(n * K * K, kernels), normalised over the kernels; NaN set to 0 before normalising."""
    rho, theta = coords[..., 0].reshape(-1, 1), coords[..., 1].reshape(-1, 1)
    spread_rho = 1e-14 + kernels.precision_rho.view(1, -1) ** 2
    w_rho = torch.exp(-0.5 * (rho - kernels.mean_rho.view(1, -1)) ** 2 / spread_rho)
    first = (theta - kernels.mean_theta.view(1, -1)).abs()
    angle = torch.min(first, (2 * math.pi - first).abs())
    w_theta = torch.exp(-0.5 * angle**2 / (1e-14 + kernels.precision_theta.view(1, -1) ** 2))
    weights = w_rho * w_theta
    weights[weights != weights] = 0
    return weights / weights.sum(1, keepdim=True)


def convolve(graph, neighbourhood: Tensor, weights: Tensor) -> Tensor:
    """The patch operator, the per-kernel Linear layers one by one, the weight-normalised head."""
    patches = weights.transpose(1, 2) @ neighbourhood
    outs = [layer(patches[:, k]) for k, layer in enumerate(graph.conv_weights)]
    hidden = torch.cat([o.unsqueeze(1) for o in outs], dim=1).flatten(1)
    return graph.out_2(torch.tanh(graph.out_1(hidden)))


def sparse_adjacency(arcs: list[list[int]], length: int) -> Tensor:
    adjacency = torch.zeros(length, length)
    for governor, dependent in arcs:
        if governor < length and dependent < length:
            adjacency[governor, dependent] = adjacency[dependent, governor] = 1
    return adjacency + torch.eye(length)


def visual_scores(model, regions: Tensor, caption: Tensor, coords: Tensor) -> Tensor:
    config, (n, r) = model.config, regions.shape[:2]
    expand = caption.repeat(n, 1, 1)
    context = inter_relations(expand, regions, config.attention.temperature) @ expand
    match = multi_block_cosine(regions, context, config.blocks)  # (n, R, B)
    paper = config.neighbours == "neighbours"
    nodes = match.unsqueeze(1).repeat(1, r, 1, 1) if paper else match.unsqueeze(2).repeat(1, 1, r, 1)
    weights = gaussian_weights(model.visual_kernels, coords).view(n * r, r, -1)
    return convolve(model.visual_graph, nodes.reshape(n * r, r, -1), weights).view(n, r).mean(1)


def text_scores(model, regions: Tensor, caption: Tensor, arcs: list[list[int]]) -> Tensor:
    config, n, length = model.config, len(regions), caption.shape[1]
    expand = caption.repeat(n, 1, 1)
    context = inter_relations(regions, expand, config.attention.temperature) @ regions
    match = multi_block_cosine(expand, context, config.blocks)  # (n, L, B)
    affinity = torch.softmax(config.affinity_temperature * caption @ caption.transpose(1, 2), dim=2)[0]
    adjacency = torch.ones(length, length)
    if config.sparse:
        adjacency = sparse_adjacency(arcs, length)
        affinity = l2norm(adjacency * affinity, 1)
    weights = affinity.reshape(-1, 1) * model.text_kernels.view(1, -1)
    weights = weights.view(length, length, -1)
    weights = (weights / weights.sum(1, keepdim=True)).repeat(n, 1, 1)
    if config.neighbours == "neighbours":
        nodes = match.unsqueeze(1).repeat(1, length, 1, 1)
    else:
        nodes = adjacency[None, :, :, None] * match.unsqueeze(2)
    return convolve(model.text_graph, nodes.reshape(n * length, length, -1), weights).view(n, length).mean(1)


@torch.no_grad()
def official_style_scores(model, regions, words, lengths, boxes, sizes, arcs) -> Tensor:
    """(n_images, n_captions) scores from region and word embeddings, boxes in pixels, sizes
    (w, h) and each caption's arcs (token positions, ROOT arcs left out)."""
    scores = torch.zeros(len(regions), len(words))
    scaled = scaled_boxes(boxes, sizes, model.config.box_divisions)
    for i in range(0, len(regions), SHARD):
        shard, coords = regions[i : i + SHARD], pseudo_coordinates(scaled[i : i + SHARD])
        for c in range(len(words)):
            caption = words[c : c + 1, : int(lengths[c])]
            total = visual_scores(model, shard, caption, coords) + text_scores(model, shard, caption, arcs[c])
            scores[i : i + SHARD, c] = total
    return scores
