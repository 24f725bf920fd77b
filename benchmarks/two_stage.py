"""Benchmark (b): exhaustive scoring against two-stage retrieval on 1,000 images / 5,000 captions.

    .venv/bin/python benchmarks/two_stage.py [--out benchmark-output/two-stage] [--precision fp32]

Makes a synthetic set (1,000 train, 100 dev, 1,000 test images; --group-size 6 makes the demo's
sibling scenes, whose captions a pooled embedding cannot tell apart; 1 makes independent scenes),
trains CMCAN and two embedding companions, VSE++ and VSE-infinity, with the demo's settings (once;
kept in --out), then evaluates CMCAN on the test split exhaustively and with reranking for K in
20, 50, 100, 200, the first stage being CMCAN's own global vectors or a companion's embeddings:
each query's top K ("top-k"), or the same budget of pairs shared out by first-stage margin
("margin"). Pairs scored, seconds, rSum, and the first stage's recall at K (how many captions find
their image among their top K; how many images find one of their captions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import encode_split, evaluate_split
from itmatch.retrieval import CANDIDATES, embeddings
from itmatch.scoring import ScoringOptions
from itmatch.training import train

SCHEDULE = {
    "train": {"batch_size": 32, "learning_rate": 1e-3, "checkpoint_every": 0},
    "loss": {"negatives": "sum", "exclude_same_image": True},
}
MODELS = {
    "cmcan-official": {"model": {"embed_size": 128, "sim_dim": 32, "text": {"word_dim": 128}}, "train": {"epochs": 7}},
    "vsepp": {"model": {"embed_size": 256, "text": {"word_dim": 128}}, "train": {"epochs": 12}},
    "vse-infty-bigru": {"model": {"embed_size": 256, "text": {"word_dim": 128}}, "train": {"epochs": 25}},
}
COMPANIONS = {"VSE++ embeddings": "vsepp", "VSE-infinity embeddings": "vse-infty-bigru"}


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
    companions = {name: load_checkpoint(trained(preset, data, out)) for name, preset in COMPANIONS.items()}
    test = PrecompSplit(data, "test")

    def run(**options) -> dict:
        return evaluate_split(model, test, progress=False, scoring=ScoringOptions(precision=args.precision), **options)

    exhaustive = run()
    print(
        f"CMCAN on {test.n_images:,} images / {test.n_captions:,} captions, sibling groups of {args.group_size} "
        f"({args.precision}, {torch.get_num_threads()} threads)"
    )
    print(
        "| scoring | candidates | pairs scored | fewer pairs | seconds | rSum | rSum - exhaustive "
        "| first stage recall@K t2i, i2t |"
    )
    print("|---|---|---|---|---|---|---|---|")
    row("exhaustive", "all", exhaustive, exhaustive, "")
    for name, first_stage in (("own global vectors", None), *companions.items()):
        found = first_stage_recall(first_stage or model, test, (20, 50, 100, 200))
        for k in (20, 50, 100, 200):
            for candidates in CANDIDATES:
                result = run(rerank_k=k, first_stage=first_stage, candidates=candidates)
                row(f"K = {k}, {name}", candidates, result, exhaustive, found[k])


def first_stage_recall(model, split: PrecompSplit, ks: tuple[int, ...]) -> dict[int, str]:
    """For each K: the share of captions whose image is among their top K by embedding, and of
    images with one of their captions among their top K."""
    images, texts = encode_split(model, split, progress=False)
    sims = embeddings(model, images) @ embeddings(model, texts).T
    per_image = split.captions_per_image
    owner = torch.arange(sims.shape[1]) // per_image
    caption_rank = (sims > sims[owner, torch.arange(sims.shape[1])]).sum(0)
    own = sims.view(len(sims), len(sims), per_image)[torch.arange(len(sims)), torch.arange(len(sims))]
    image_rank = (sims[:, None, :] > own[:, :, None]).sum(-1).min(1).values

    def share(ranks: torch.Tensor, k: int) -> float:
        return 100 * (ranks < k).float().mean().item()

    return {k: f"{share(caption_rank, k):.1f}%, {share(image_rank, k):.1f}%" for k in ks}


def row(name: str, candidates: str, result: dict, exhaustive: dict, recall: str) -> None:
    fewer = exhaustive["pairs_scored"] / result["pairs_scored"]
    print(
        f"| {name} | {candidates} | {result['pairs_scored']:,} | {fewer:.1f}x | {result['scoring_seconds']:.1f} | "
        f"{result['rsum']:.1f} | {result['rsum'] - exhaustive['rsum']:+.1f} | {recall} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
