"""Benchmark (e): one CMCAN training step (forward and backward) against a loop-style reference
with the official structure.

    .venv/bin/python benchmarks/training_step.py [--batch 128] [--threads 2] [--repeats 2] [--compile] [--bf16]
                                                 [--itmatch-only]

At the official sizes (a batch of 128 images of 36 regions of 2048-d with one 12-word caption
each, D=1024, P=256, the official preset): the reference runs the official training step's
structure (both encoders, the batch's score matrix by a Python loop over the captions, each
against every image, as the official `forward_sim`; the max-violation triplet loss summed;
backward); itmatch runs `training_losses` and backward in fp32, first with every pair scored
with gradients (`train.backward_pairs=all`: the scoring engine's tiles), then as it trains by
default (`active`: every pair scored without gradients, the pairs the loss reads again with
them), and under bf16 autocast where this machine's calibration chooses bf16 (or with --bf16),
and with --compile its pair scorer compiled too. Same weights; each figure is the best of
--repeats rounds, each round timing every variant once (the machine's drift reaches all alike).
Before timing, in eval mode (no dropout), the loss of each variant and its largest gradient
difference from the reference are printed: the same function is computed.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace

import torch
from official_style import caption_loop_scores
from scoring_speed import inputs, synchronize

from itmatch import build_run_config, create_model
from itmatch.device import default_device
from itmatch.losses import TrainingContext, triplet_ranking_loss
from itmatch.precision import calibration, training_precision


def reference_loss(model, batch: dict, context: TrainingContext) -> torch.Tensor:
    images = model.encode_images(batch["features"], batch["region_graph"])
    texts = model.encode_texts(batch["tokens"], batch["lengths"])
    lengths = batch["lengths"].tolist()
    scores = caption_loop_scores(model, images["regions"], batch["region_graph"], texts["words"], lengths)
    return triplet_ranking_loss(scores, context.loss, negatives=context.negatives)


def engine_loss(model, batch: dict, context: TrainingContext, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(model.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return sum(model.training_losses(batch, context).values()).float()


def step(model, loss_function) -> torch.Tensor:
    """One forward and backward; returns the loss (the gradients stay in the model)."""
    model.zero_grad(set_to_none=True)
    loss = loss_function()
    loss.backward()
    synchronize()
    return loss.detach()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def variants(model, batch: dict, context: TrainingContext, args: argparse.Namespace, bf16: bool) -> dict:
    functions = {}
    if not args.itmatch_only:
        every_pair = replace(context, active_pairs=False)
        functions["reference fp32"] = lambda: reference_loss(model, batch, context)
        functions["itmatch fp32, every pair with gradients"] = lambda: engine_loss(model, batch, every_pair, None)
    functions["itmatch fp32"] = lambda: engine_loss(model, batch, context, None)
    if bf16:
        functions["itmatch bf16 autocast"] = lambda: engine_loss(model, batch, context, torch.bfloat16)
    if args.compile:
        compiled = replace(context, compile=True)
        functions["itmatch fp32 compiled"] = lambda: engine_loss(model, batch, compiled, None)
    return functions


def check_same_function(model, functions: dict) -> None:
    """Each variant's loss and largest gradient difference from the reference, relative to the
    largest gradient (eval mode: no dropout)."""
    model.eval()
    reference_value, reference_grads = None, None
    for name, function in functions.items():
        loss = step(model, function).item()
        grads = gradients(model)
        if reference_grads is None:
            reference_value, reference_grads = loss, grads
            print(f"{name}: loss {loss:.4f}")
            continue
        scale = max(g.abs().max().item() for g in reference_grads.values())
        difference = max((grads[k] - g).abs().max().item() for k, g in reference_grads.items()) / scale
        print(f"{name}: loss {loss:.4f} ({loss - reference_value:+.1e}), gradients off by {difference:.0e} of the max")
    model.train()


def timed(model, functions: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(functions, float("inf"))
    for function in functions.values():  # warm-up (and compiling) outside the rounds
        step(model, function)
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            step(model, function)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the pair scorer compiled")
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even where auto would not take it")
    parser.add_argument(
        "--itmatch-only",
        action="store_true",
        help="leave out the variants that keep every pair's activations (the reference's need 30 GB at batch 128)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = default_device()
    config = build_run_config("cmcan-official", {"model": {"vocab_size": 8481}})
    torch.manual_seed(0)
    model = create_model("cmcan", config.model).to(device)
    features, adjacency, tokens, lengths = (t.to(device) for t in inputs(args.batch, args.batch, 8481))
    batch = {"features": features, "region_graph": adjacency, "tokens": tokens, "lengths": lengths}
    batch["image_index"] = torch.arange(args.batch, device=device)
    context = TrainingContext(config.loss)
    auto = training_precision("auto", device)
    functions = variants(model, batch, context, args, args.bf16 or auto == "bf16")
    print(f"{device.type}, batch {args.batch}, best of {args.repeats} rounds")
    print(f"train.precision=auto trains in {auto} here (calibration {calibration(device).describe()})")
    check_same_function(model, functions)
    seconds = timed(model, functions, args.repeats)
    reference = seconds.get("reference fp32")
    for name, value in seconds.items():
        ratio = f", {reference / value:.2f}x the reference" if reference else ""
        print(f"{name}: {value:.2f} s/step, {1 / value:.3f} steps/s{ratio}", flush=True)
    print(f"peak memory of the whole run: {peak_memory_gib(device):.1f} GiB")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # resident set, KiB on Linux


if __name__ == "__main__":
    main()
