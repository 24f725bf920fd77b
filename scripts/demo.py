"""The demo behind `make demo`: synthetic scenes, VSE++ and CMCAN trained a few minutes each on the
CPU, both evaluated on the test split side by side, and three text queries answered by CMCAN.

Every step is an `itmatch` command (printed before it runs), so the demo doubles as a tutorial.
Output goes to demo-output/ (replaced on every run).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from itmatch import load_checkpoint
from itmatch.cli import main as itmatch
from itmatch.data.precomp import PrecompSplit
from itmatch.data.synthetic import describe
from itmatch.evaluation.metrics import format_results
from itmatch.evaluation.runner import encode_split
from itmatch.retrieval import search_images

OUT = Path("demo-output")
DATA = OUT / "data"
# Sizes and schedule chosen so that both models train in a few minutes on 2 CPU cores: small
# dimensions, batches of 32, lr 1e-3 and the sum of violations (the papers' hardest negative at
# lr 2e-4 stalls for the first epochs, longer than this demo lasts). See the README.
COMMON = (
    "--batch-size 32 --quiet --set train.learning_rate=0.001 --set loss.negatives=sum "
    "--set loss.exclude_same_image=true --set train.checkpoint_every=0"
).split()
MODELS = {
    "VSE++": "--model vsepp --epochs 12 --set model.embed_size=256 --set model.text.word_dim=128".split(),
    "CMCAN": (
        "--model cmcan-official --epochs 7 --set model.embed_size=128 --set model.sim_dim=32 "
        "--set model.text.word_dim=128"
    ).split(),
}


def run(*args: str) -> None:
    print(f"\n$ itmatch {shlex.join(args)}", flush=True)
    code = itmatch(list(args))
    if code:
        sys.exit(code)


def main() -> None:
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    run("make-synthetic", str(DATA), "--train", "1000", "--dev", "100", "--test", "200", "--regions", "16")
    results, minutes = {}, {}
    for name, args in MODELS.items():
        started = time.time()
        run_dir = OUT / args[1]  # the preset's name
        run("train", *args, "--data", str(DATA), "--out", str(run_dir), *COMMON)
        minutes[name] = (time.time() - started) / 60
        run(
            "evaluate",
            str(run_dir / "best.pt"),
            "--data",
            str(DATA),
            "--split",
            "test",
            "--json",
            str(run_dir / "test.json"),
            "--quiet",
        )
        results[name] = json.loads((run_dir / "test.json").read_text())
    results["chance"] = chance(results["CMCAN"]["n_images"])
    print("\n" + format_results(results, title="Synthetic test split (200 images, 1,000 captions)"))
    print("training time: " + ", ".join(f"{name} {m:.1f} min" for name, m in minutes.items()))
    show_queries(OUT / "cmcan-official" / "best.pt")
    build_search_index(OUT / "cmcan-official" / "best.pt")


def chance(n_images: int) -> dict:
    """Expected metrics of random scores (t2i: one right image; i2t: five right captions)."""
    n_captions = 5 * n_images
    t2i = {f"r{k}": 100 * k / n_images for k in (1, 5, 10)}
    i2t = {f"r{k}": 100 * (1 - _miss_all(n_captions, 5, k)) for k in (1, 5, 10)}
    return {
        # the best of 5 random positions among n has mean rank (n + 1) / 6
        "i2t": {**i2t, "medr": n_captions * (1 - 0.5 ** (1 / 5)), "meanr": (n_captions + 1) / 6},
        "t2i": {**t2i, "medr": n_images / 2, "meanr": (n_images + 1) / 2},
        "rsum": sum(i2t.values()) + sum(t2i.values()),
    }


def _miss_all(n: int, good: int, k: int) -> float:
    """Probability that the top k of n items holds none of the `good` ones."""
    probability = 1.0
    for i in range(k):
        probability *= (n - good - i) / (n - i)
    return probability


def show_queries(checkpoint: Path) -> None:
    """Three test captions as text queries; the image they were written for is marked."""
    model = load_checkpoint(checkpoint)
    split = PrecompSplit(DATA, "test")
    images, _ = encode_split(model, split, progress=False)
    scenes = [json.loads(line)["objects"] for line in (DATA / "test_scenes.jsonl").read_text().splitlines()]
    described = [0, 7, 14]
    queries = [split.captions[5 * image + 2] for image in described]
    scores, top = search_images(model, images, queries, k=5)
    for query, image_of_query, row_scores, row in zip(queries, described, scores.tolist(), top.tolist(), strict=False):
        print(f'\nCMCAN, top 5 test images for "{query}"')
        for rank, (score, image) in enumerate(zip(row_scores, row, strict=False), start=1):
            mark = "   <- the image it describes" if image == image_of_query else ""
            print(f"  {rank}. image {image:3d}  score {score:.3f}  {describe(scenes[image])}{mark}")


def build_search_index(checkpoint: Path) -> None:
    """The test split indexed for the search page, and how to open it."""
    run("index", str(checkpoint), "--data", str(DATA), "--split", "test", "--out", str(OUT / "index"), "--quiet")
    print(
        "\nThe search page (CMCAN on the 200 test images, region confidences, word attention on hover):\n"
        f"  {Path(sys.executable).parent / 'itmatch'} serve {OUT / 'index'}\n"
        "  then open http://127.0.0.1:8000/"
    )


if __name__ == "__main__":
    main()
