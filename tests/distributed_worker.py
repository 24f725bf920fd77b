"""Run by torchrun from test_distributed.py: one training step's loss and gradients of a small
model with `global_batch`, each process holding its share of one batch (rank 0 saves them)."""

from __future__ import annotations

import sys

import torch
from test_models import inputs, small_model
from torch.nn.parallel import DistributedDataParallel

from itmatch.config import build_run_config
from itmatch.distributed import join_process_group, leave_process_group, shard
from itmatch.losses import TrainingContext

BATCH = 8  # captions: two of each of four images


def training_batch(model) -> dict[str, torch.Tensor]:
    features, tokens, lengths, adjacency = inputs(n_images=BATCH // 2, n_captions=BATCH, seed=3)
    image_index = torch.arange(BATCH) // 2
    batch = {"features": features[image_index], "tokens": tokens, "lengths": lengths, "image_index": image_index}
    if "region_graph" in model.inputs().image:
        batch["region_graph"] = adjacency[image_index]
    return batch


def share_of(batch: dict[str, torch.Tensor], items: slice) -> dict[str, torch.Tensor]:
    """A process's share, its tokens trimmed to its own longest caption (shares differ in width)."""
    part = {key: value[items] for key, value in batch.items()}
    part["tokens"] = part["tokens"][:, : int(part["lengths"].max())]
    return part


def loss_and_gradients(
    network, model, batch, global_batch: bool, active_pairs: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Under the default `active_pairs`, a cross-attention model backpropagates through the pairs
    its loss reads only (itmatch.losses.active_pair_scores)."""
    loss = build_run_config("vsepp").loss
    context = TrainingContext(loss, epoch=0, global_batch=global_batch, active_pairs=active_pairs)
    loss = sum(network(batch, context).values())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def main(preset: str, out: str) -> None:
    process = join_process_group()
    model = small_model(preset).eval()  # no dropout: the same computation in any process
    batch = share_of(training_batch(model), shard(BATCH))
    loss, grads = loss_and_gradients(DistributedDataParallel(model), model, batch, global_batch=True)
    if process.main:
        torch.save({"loss": loss, "grads": grads}, out)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
