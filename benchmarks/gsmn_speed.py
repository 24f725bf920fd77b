"""GSMN's scoring: the engine against a loop-style reference with the official structure.

    .venv/bin/python benchmarks/gsmn_speed.py [--preset gsmn-official-sparse] [--images 100 --captions 200]
        [--lengths 12] [--threads 1] [--repeats 3] [--compile]

At the official sizes (36 regions of 2048-d, D=1024, 16 blocks, 8 kernels, hidden 32, lambda 20),
with the same random weights: pairs/s of the reference (benchmarks/official_style_gsmn.py: 80 x 80
shards, a loop over captions, attended vectors, neighbour tensors by repeat, the kernel Linear
layers one by one) and of the engine (itmatch.scoring on GSMN's encodings) in fp32 and bf16
(compiled too with --compile), the ratios, the largest score difference and whether R@1/5/10
agree. As benchmark (a), scoring is timed from the encodings (the reference from the region and
word vectors), the encoding is timed apart, and each figure is the best of --repeats rounds.
Captions get a chain of dependency arcs (the sparse graph's input).
"""

from __future__ import annotations

import argparse

import torch
from official_style_gsmn import official_style_scores
from scoring_speed import inputs, length_range, print_comparison, timed_rounds

from itmatch import build_run_config, create_model
from itmatch.scoring import ScoringOptions, score_grid

VOCAB_SIZE = 8481  # SCAN's Flickr30K vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gsmn-official-sparse")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--lengths", type=length_range, default=(12, 12), help="words per caption: 12, or 8-20")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the compiled engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("gsmn", build_run_config(args.preset, {"model": {"vocab_size": VOCAB_SIZE}}).model).eval()
    features, _, tokens, lengths = inputs(args.images, args.captions, VOCAB_SIZE, args.lengths)
    corners = torch.rand(args.images, 36, 2) * 400
    boxes = torch.cat([corners, corners + 20 + torch.rand(args.images, 36, 2) * 200], dim=-1)
    sizes = torch.tensor([[640.0, 480.0]] * args.images)
    arcs = [[[t, t + 1] for t in range(1, int(n) - 2)] for n in lengths + 2]  # words between <start>, <end>
    tokens, lengths = torch.nn.functional.pad(tokens, (1, 1)), lengths + 2
    padded = torch.zeros(len(arcs), max(map(len, arcs)), 2, dtype=torch.int64)
    for index, caption in enumerate(arcs):
        padded[index, : len(caption)] = torch.tensor(caption)

    def encode():
        return model.encode_images(features, boxes, sizes), model.encode_texts(tokens, lengths, padded)

    with torch.no_grad():
        images, texts = encode()
    variants = [("fp32", False), ("bf16", False)] + ([("fp32", True), ("bf16", True)] if args.compile else [])
    functions = {
        "encoding": encode,
        "reference": lambda: official_style_scores(
            model, images["regions"], texts["words"], lengths, boxes, sizes, arcs
        ),
        **{
            v: lambda p=v[0], c=v[1]: score_grid(model, images, texts, ScoringOptions(precision=p, compile=c))
            for v in variants
        },
    }
    with torch.no_grad():
        timings = timed_rounds(functions, args.repeats)
    report(args, timings, variants)


def report(args, timings: dict, variants: list[tuple[str, bool]]) -> None:
    pairs = args.images * args.captions
    print(
        f"{args.preset}: {args.images} images x {args.captions} captions ({pairs:,} pairs) of "
        f"{args.lengths[0]}-{args.lengths[1]} words, {torch.get_num_threads()} threads, best of {args.repeats} rounds"
    )
    print_comparison(timings, variants, pairs, args.captions // args.images)


if __name__ == "__main__":
    main()
