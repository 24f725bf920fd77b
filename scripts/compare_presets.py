"""Every preset trained on the same synthetic set with the same budget, one table.

    .venv/bin/python scripts/compare_presets.py [--out compare-output] [--epochs 7] [PRESET ...]

For each preset: train (same data, epochs, batch size, learning rate, loss, small dimensions),
evaluate the best dev checkpoint on the test split, and time scoring of the whole test split.
Prints a Markdown table: test R@K and rSum, seconds per training epoch, scoring pairs/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from itmatch import build_run_config, load_checkpoint, preset_names
from itmatch.config import merge
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.evaluation.runner import encode_split, evaluate_split
from itmatch.scoring import score_grid
from itmatch.training import train

# The table compares presets in fp32, whatever precision="auto" would pick on this machine (the
# dev evaluations, the test metrics and the pairs/s alike); ITMATCH_PRECISION set outside wins.
os.environ.setdefault("ITMATCH_PRECISION", "fp32")

SPLITS = {"train": 1000, "dev": 100, "test": 200}
# The same budget for every preset: the demo's schedule and small dimensions (sizes that a
# preset's config does not have are left out).
SCHEDULE = {
    "train": {"batch_size": 32, "learning_rate": 1e-3, "checkpoint_every": 0, "dev_max_captions": None},
    "loss": {"negatives": "sum", "warmup_epochs": 0, "exclude_same_image": True},
}
SIZES = {"embed_size": 128, "sim_dim": 32, "text": {"word_dim": 128}}


def overrides(preset: str, epochs: int) -> dict:
    fields = {f.name for f in dataclasses.fields(build_run_config(preset).model)}
    sizes = {key: value for key, value in SIZES.items() if key in fields}
    return merge(SCHEDULE, {"train": {"epochs": epochs}, "model": sizes})


def scoring_rate(checkpoint: Path, split: PrecompSplit) -> float:
    """Pairs per second of score() over the whole test split (encoding excluded)."""
    model = load_checkpoint(checkpoint)
    images, texts = encode_split(model, split, progress=False)
    with torch.no_grad():
        score_grid(model, images.select(slice(0, 10)), texts.select(slice(0, 50)))  # warm-up
        started = time.perf_counter()
        score_grid(model, images, texts)
    return len(images) * len(texts) / (time.perf_counter() - started)


def run(preset: str, data: Path, out: Path, epochs: int) -> dict:
    torch.manual_seed(0)
    config = build_run_config(preset, overrides(preset, epochs))
    state = train(config, data, out / preset, progress=False, log=lambda *_: None)
    test = PrecompSplit(data, "test")
    metrics = evaluate_split(load_checkpoint(out / preset / "best.pt"), test, progress=False)
    seconds = sum(record["seconds"] for record in state.history) / len(state.history)
    return {
        "preset": preset,
        **metrics,
        "seconds_per_epoch": seconds,
        "pairs_per_second": scoring_rate(out / preset / "best.pt", test),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | i2t R@1 / R@5 / R@10 | t2i R@1 / R@5 / R@10 | rSum | s / epoch | scoring pairs/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        i2t = " / ".join(f"{row['i2t'][k]:.1f}" for k in ("r1", "r5", "r10"))
        t2i = " / ".join(f"{row['t2i'][k]:.1f}" for k in ("r1", "r5", "r10"))
        lines.append(
            f"| `{row['preset']}` | {i2t} | {t2i} | {row['rsum']:.1f} | {row['seconds_per_epoch']:.0f} | "
            f"{row['pairs_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="default: every preset")
    parser.add_argument("--out", type=Path, default=Path("compare-output"))
    parser.add_argument("--epochs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = args.out / "data"
    if not (data / "test_ims.npy").exists():
        make_synthetic(data, SPLITS, seed=0, spec=SyntheticSpec(n_regions=16))
    rows = []
    for preset in args.presets or preset_names():
        if (args.out / preset / "result.json").exists():
            rows.append(json.loads((args.out / preset / "result.json").read_text()))
            continue
        row = run(preset, data, args.out, args.epochs)
        (args.out / preset / "result.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(f"{preset}: rSum {row['rsum']:.1f}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
