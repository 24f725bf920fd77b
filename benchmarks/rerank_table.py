"""Benchmark (d): post-hoc re-ranking of several trained models on a held-out synthetic test set.

    .venv/bin/python benchmarks/rerank_table.py --presets P1 P2 [P3] [--out benchmark-output/rerank]

Makes a synthetic set (train, dev and a held-out test split of independent scenes), trains each
preset briefly at small sizes (once; kept in --out), scores the test split with each model once,
then ranks by each model alone, the plain mean of all (the field's ensemble) and adaptive metric
fusion (AMF), each as is and with each post-hoc stage on top: inverted softmax (IS; temperature
the best of a few on the dev split), CSLS and reciprocal re-ranking (k = `--k`, also AMF's).
Prints a Markdown table of rSum, and the CPU seconds (process time, which a busy machine does not
inflate) each stage takes on the mean's matrix, the models' scoring apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from itmatch import build_run_config, load_checkpoint
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.evaluation.posthoc import AmfSettings, PostHoc
from itmatch.evaluation.runner import encode_split
from itmatch.scoring import ScoringOptions, score_grid
from itmatch.training import train

SCHEDULE = {
    "train": {"batch_size": 32, "learning_rate": 1e-3, "checkpoint_every": 0},
    "loss": {"negatives": "sum", "exclude_same_image": True},
}
# Small sizes, applied to whichever fields a preset's model config has.
SIZES = {"embed_size": 128, "sim_dim": 32, "text": {"word_dim": 96}}
TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2)

FP32 = ScoringOptions(precision="fp32")  # as the README's table was measured, on any CPU


def trained(preset: str, data: Path, out: Path, epochs: int) -> Path:
    if not (out / preset / "best.pt").exists():
        torch.manual_seed(0)
        fields = {field.name for field in dataclasses.fields(build_run_config(preset).model)}
        sizes = {key: value for key, value in SIZES.items() if key in fields}
        config = build_run_config(preset, merge(SCHEDULE, {"model": sizes, "train": {"epochs": epochs}}))
        started = time.process_time()
        train(config, data, out / preset, progress=False, log=lambda *_: None)
        print(f"trained {preset} in {time.process_time() - started:.0f} CPU s", flush=True)
    return out / preset / "best.pt"


def scores(checkpoint: Path, split: PrecompSplit) -> tuple[torch.Tensor, float]:
    """The model's (n_images, n_captions) score matrix of the split, and the CPU seconds it took."""
    model = load_checkpoint(checkpoint).eval()
    started = time.process_time()
    with torch.no_grad():
        sims = score_grid(model, *encode_split(model, split, progress=False), FP32).cpu()
    return sims, time.process_time() - started


def rsum_of(stages: PostHoc, matrices: list[torch.Tensor]) -> tuple[float, float]:
    """rSum after the stages, and the CPU seconds the stages took."""
    started = time.process_time()
    views = stages(matrices)
    seconds = time.process_time() - started
    return retrieval_metrics(views.i2t.numpy(), t2i_sims=views.t2i.numpy())["rsum"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", required=True, help="2 or 3 presets to train and fuse")
    parser.add_argument("--out", type=Path, default=Path("benchmark-output/rerank"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="held-out test images (5 captions each)")
    parser.add_argument("--k", type=int, default=10, help="of CSLS, reciprocal re-ranking and AMF")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.out / "data"
    if not (data / "test_ims.npy").exists():
        splits = {"train": args.train, "dev": 100, "test": args.test}
        make_synthetic(data, splits, seed=1, spec=SyntheticSpec(n_regions=16, group_size=1))
    checkpoints = [trained(preset, data, args.out, args.epochs) for preset in args.presets]
    dev, test = PrecompSplit(data, "dev"), PrecompSplit(data, "test")
    dev_matrices = [scores(path, dev)[0] for path in checkpoints]
    scored = [scores(path, test) for path in checkpoints]
    matrices = [sims for sims, _ in scored]
    amf = AmfSettings(k=args.k)
    bases = {f"{preset} alone": ("mean", [i]) for i, preset in enumerate(args.presets)}
    bases |= {"plain ensemble (mean)": ("mean", range(len(matrices))), "AMF": ("amf", range(len(matrices)))}
    stages = {
        "as is": {},
        "+ IS": {},
        f"+ CSLS {args.k}": {"csls": args.k},
        f"+ reciprocal {args.k}": {"reciprocal": args.k},
    }
    print(f"{test.n_images:,} test images / {test.n_captions:,} captions, {torch.get_num_threads()} threads")
    print(f"| rSum | {' | '.join(stages)} |")
    print(f"|---|{'---|' * len(stages)}")
    seconds = {}
    for base, (fuse, members) in bases.items():
        pick = [matrices[i] for i in members]
        temperature = best_temperature(fuse, [dev_matrices[i] for i in members], amf)
        cells = []
        for stage, options in stages.items():
            options = {"inverted_softmax": temperature} if stage == "+ IS" else options
            rsum, seconds[base, stage] = rsum_of(PostHoc(fuse, amf=amf, **options), pick)
            cells.append(f"{rsum:.1f}" + (f" (T = {temperature:g})" if stage == "+ IS" else ""))
        print(f"| {base} | {' | '.join(cells)} |", flush=True)
    ensemble = "plain ensemble (mean)"
    extra = [f"{seconds[ensemble, stage] - seconds[ensemble, 'as is']:.2f}" for stage in list(stages)[1:]]
    print(
        f"| CPU seconds of the stage (on the mean) | mean {seconds[ensemble, 'as is']:.2f}, AMF "
        f"{seconds['AMF', 'as is']:.2f} | {' | '.join(extra)} |"
    )
    print("scoring CPU seconds: " + ", ".join(f"{p} {t:.1f}" for p, (_, t) in zip(args.presets, scored, strict=True)))


def best_temperature(fuse: str, dev_matrices: list[torch.Tensor], amf: AmfSettings) -> float:
    """The inverted-softmax temperature with the best dev rSum."""
    return max(TEMPERATURES, key=lambda t: rsum_of(PostHoc(fuse, inverted_softmax=t, amf=amf), dev_matrices)[0])


if __name__ == "__main__":
    main()
