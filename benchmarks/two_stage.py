"""Benchmark (b): exhaustive scoring against two-stage retrieval on 1,000 images / 5,000 captions.

    .venv/bin/python benchmarks/two_stage.py [--out benchmark-output/two-stage] [--precision fp32]

Makes a synthetic set (1,000 train, 100 dev, 1,000 test images; --group-size 6 makes the demo's
sibling scenes, whose captions a pooled embedding cannot tell apart, which starves the first
stage; 1 makes independent scenes), trains CMCAN and a VSE++
companion with the demo's settings (once; kept in --out), then evaluates CMCAN on the test split
exhaustively and with reranking of the top K for K in 20, 50, 100, 200, the first stage being
CMCAN's own global vectors or the VSE++ embeddings: pairs scored, seconds, rSum.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import evaluate_split
from itmatch.training import train

SCHEDULE = {
    "train": {"batch_size": 32, "learning_rate": 1e-3, "checkpoint_every": 0},
    "loss": {"negatives": "sum", "exclude_same_image": True},
}
MODELS = {
    "cmcan-official": {"model": {"embed_size": 128, "sim_dim": 32, "text": {"word_dim": 128}}, "train": {"epochs": 7}},
    "vsepp": {"model": {"embed_size": 256, "text": {"word_dim": 128}}, "train": {"epochs": 12}},
}


def trained(preset: str, data: Path, out: Path) -> Path:
    from itmatch.config import merge

    if not (out / preset / "best.pt").exists():
        torch.manual_seed(0)
        config = build_run_config(preset, merge(SCHEDULE, MODELS[preset]))
        train(config, data, out / preset, progress=False, log=lambda *_: None)
    return out / preset / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark-output/two-stage"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--group-size", type=int, default=6, help="scenes per sibling group: 6 as the demo, 1 for independent scenes"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out / f"groups-of-{args.group_size}"
    data = out / "data"
    if not (data / "test_ims.npy").exists():
        spec = SyntheticSpec(n_regions=16, group_size=args.group_size)
        make_synthetic(data, {"train": 1000, "dev": 100, "test": 1000}, seed=1, spec=spec)
    model = load_checkpoint(trained("cmcan-official", data, out))
    companion = load_checkpoint(trained("vsepp", data, out))
    test = PrecompSplit(data, "test")

    def run(**options) -> dict:
        return evaluate_split(model, test, progress=False, precision=args.precision, **options)

    exhaustive = run()
    print(
        f"CMCAN on {test.n_images:,} images / {test.n_captions:,} captions, sibling groups of {args.group_size} "
        f"({args.precision}, {torch.get_num_threads()} threads)"
    )
    print("| scoring | pairs scored | fewer pairs | seconds | rSum | rSum - exhaustive |")
    print("|---|---|---|---|---|---|")
    row("exhaustive", exhaustive, exhaustive)
    for name, first_stage in (("own global vectors", None), ("VSE++ embeddings", companion)):
        for k in (20, 50, 100, 200):
            row(f"top {k} of {name}", run(rerank_k=k, first_stage=first_stage), exhaustive)


def row(name: str, result: dict, exhaustive: dict) -> None:
    fewer = exhaustive["pairs_scored"] / result["pairs_scored"]
    print(
        f"| {name} | {result['pairs_scored']:,} | {fewer:.1f}x | {result['scoring_seconds']:.1f} | "
        f"{result['rsum']:.1f} | {result['rsum'] - exhaustive['rsum']:+.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
