"""Benchmark (a): the scoring engine against a loop-style reference with the official structure.

    .venv/bin/python benchmarks/scoring_speed.py [--images 100 --captions 200] [--lengths 12]
        [--threads 2] [--repeats 3] [--trained demo-output/cmcan-official/best.pt --data demo-output/data]

At the official sizes (36 regions, 2048-d features, D=1024, P=256, 12-word captions; --lengths
8-20 gives the mix of the official measurement), with the same weights: pairs/s of the reference
(official structure: 100 x 100 shards, a loop over captions) and of the engine in each precision,
eager and compiled (compiling is timed apart), the ratios, the largest score difference and
whether R@1/5/10 agree. Scoring is timed from the encodings, as the official measurement times
its scoring loop after encoding: the reference from the region and word vectors, the engine from
its encodings (which also hold the pooled and neighbourhood vectors the reference recomputes per
shard, about 1% of its time). The encoding both need is timed apart, and the end-to-end ratio
(features and tokens to scores) includes it on both sides. Each figure is the best of --repeats
rounds, each round timing every scorer once (a drift in the machine's speed reaches all alike).
With --trained, also the rSum of a trained checkpoint on its test split with each variant. On a
GPU, the same with fp16 too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from official_style import official_style_scores

from itmatch import build_run_config, create_model, load_checkpoint
from itmatch.data.precomp import PrecompSplit
from itmatch.data.region_graph import directional_adjacency
from itmatch.device import default_device
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.evaluation.runner import evaluate_split
from itmatch.precision import calibration
from itmatch.scoring import ScoringOptions, score_grid


def inputs(n_images: int, n_captions: int, vocab_size: int, lengths: tuple[int, int] = (12, 12), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n_images, 36, 2048, generator=generator)
    corners = torch.rand(n_images, 36, 2, generator=generator) * 400
    boxes = torch.cat([corners, corners + 20 + torch.rand(n_images, 36, 2, generator=generator) * 200], dim=-1)
    adjacency = torch.from_numpy(directional_adjacency(boxes.numpy(), [[640, 480]] * n_images))
    lengths = torch.randint(lengths[0], lengths[1] + 1, (n_captions,), generator=generator)
    tokens = torch.randint(4, vocab_size, (n_captions, 20), generator=generator) * (torch.arange(20) < lengths[:, None])
    return features, adjacency, tokens, lengths


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_rounds(functions: dict, repeats: int) -> dict:
    """Each function's (result, seconds of its first call, best seconds of `repeats` further calls).
    The further calls run in rounds, one call of each function per round, so that a drift in the
    machine's speed (this shared 2-core machine's reference speed moves by a fifth between runs)
    reaches every function alike and the ratios stay true."""
    results = {}
    for name, function in functions.items():
        synchronize()
        started = time.perf_counter()
        result = function()
        synchronize()
        results[name] = [result, time.perf_counter() - started, float("inf")]
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            synchronize()
            results[name][2] = min(results[name][2], time.perf_counter() - started)
    return {name: tuple(result) for name, result in results.items()}


def recalls(sims: torch.Tensor, per_image: int) -> dict:
    metrics = retrieval_metrics(sims.float().cpu().numpy(), per_image)
    return {d: [metrics[d][k] for k in ("r1", "r5", "r10")] for d in ("i2t", "t2i")}


def speed(args, device: torch.device) -> None:
    config = build_run_config("cmcan-official", {"model": {"vocab_size": 8481}})
    torch.manual_seed(0)
    model = create_model("cmcan", config.model).to(device).eval()
    tensors = inputs(args.images, args.captions, 8481, args.lengths)
    features, adjacency, tokens, lengths = (t.to(device) for t in tensors)
    per_image = args.captions // args.images

    with torch.no_grad():
        images, texts = model.encode_images(features, adjacency), model.encode_texts(tokens, lengths)
    variants = scoring_variants(device, args.every_precision)
    functions = {
        "encoding": lambda: (model.encode_images(features, adjacency), model.encode_texts(tokens, lengths)),
        "reference": lambda: official_style_scores(
            model, images["regions"], adjacency, texts["words"], lengths.tolist()
        ),
        **{
            variant: lambda p=variant[0], c=variant[1]: score_grid(
                model, images, texts, ScoringOptions(precision=p, compile=c)
            )
            for variant in variants
        },
    }
    with torch.no_grad():
        timings = timed_rounds(functions, args.repeats)
    pairs = args.images * args.captions
    print(
        f"{device.type}, {args.images} images x {args.captions} captions ({pairs:,} pairs) of "
        f"{args.lengths[0]}-{args.lengths[1]} words, {torch.get_num_threads()} threads, "
        f"best of {args.repeats} interleaved rounds"
    )
    print(f"precision auto chooses {calibration(device).describe()}")
    print_comparison(timings, variants, pairs, per_image)


def print_comparison(timings: dict, variants: list[tuple[str, bool]], pairs: int, per_image: int) -> None:
    """The encoding time, the reference's pairs/s, and each engine variant's pairs/s, ratios,
    largest score difference and whether its R@1/5/10 equal the reference's."""
    encoding_seconds, (reference, _, reference_seconds) = timings["encoding"][2], timings["reference"]
    print(f"encoding images and captions (both scorers need it): {encoding_seconds:.2f} s")
    print(f"reference (official structure, fp32): {pairs / reference_seconds:,.0f} pairs/s")
    reference_recalls = recalls(reference, per_image)
    for precision, compile in variants:
        scores, first, seconds = timings[precision, compile]
        difference = (scores - reference).abs().max().item()
        agree = recalls(scores, per_image) == reference_recalls
        end_to_end = (reference_seconds + encoding_seconds) / (seconds + encoding_seconds)
        mode = f"compiled (compiling: {first - seconds:.0f} s)" if compile else "eager"
        print(
            f"engine {precision} {mode}: {pairs / seconds:,.0f} pairs/s, {reference_seconds / seconds:.2f}x the "
            f"reference ({end_to_end:.2f}x end to end), max |diff| {difference:.1e}, "
            f"R@1/5/10 {'agree' if agree else 'differ'}",
            flush=True,
        )


def trained_rsum(args) -> None:
    model = load_checkpoint(args.trained)
    split = PrecompSplit(args.data, "test")
    for precision, compile in scoring_variants(model.device, args.every_precision):
        result = evaluate_split(
            model, split, progress=False, scoring=ScoringOptions(precision=precision, compile=compile)
        )
        print(
            f"trained {model.run_config.preset} on {args.data} test ({split.n_images} images): "
            f"{precision} {'compiled' if compile else 'eager'} rSum {result['rsum']:.2f} "
            f"in {result['scoring_seconds']:.1f} s"
        )


# A precision whose matrix products the calibration found this much slower than fp32 would take
# hours at the default sizes (bf16 on a CPU without AVX-512 BF16: 1 GFLOP/s against 143).
HOPELESS_SLOWDOWN = 10


def scoring_variants(device: torch.device, every_precision: bool = False) -> list[tuple[str, bool]]:
    """(precision, compile) of each engine variant: auto (the default), fp32 and bf16, and fp16 on a
    GPU, leaving out those hopelessly slow here unless `every_precision`; eager and compiled."""
    speeds = calibration(device).gflops
    precisions = ["auto", "fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    if not every_precision:
        fast_enough = [p for p in precisions[2:] if speeds.get(p, 0) * HOPELESS_SLOWDOWN >= speeds["fp32"]]
        for left_out in sorted(set(precisions[2:]) - set(fast_enough)):
            print(f"{left_out} left out: {speeds[left_out]:.0f} GFLOP/s here against fp32's {speeds['fp32']:.0f}")
        precisions = precisions[:2] + fast_enough
    return [(precision, compile) for precision in precisions for compile in (False, True)]


def length_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=length_range, default=(12, 12), help="words per caption: 12, or 8-20")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every-precision", action="store_true", help="also time precisions hopelessly slow here")
    parser.add_argument("--trained", type=Path, help="an itmatch CMCAN checkpoint to compare precisions on")
    parser.add_argument("--data", type=Path, help="its precomp folder (test split)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed(args, default_device())
    if args.trained:
        trained_rsum(args)


if __name__ == "__main__":
    main()
