"""Benchmark (c): peak memory of exhaustive scoring against the gallery size, for two budgets.

    .venv/bin/python benchmarks/memory.py [--sizes 100 200 400 800] [--budgets 16 64]

For each gallery of N images and 5N captions (CMCAN at the demo's sizes, random weights), one
fresh process encodes the gallery, then scores every pair with a tile budget; the peak resident
memory added by scoring (Linux: VmHWM after resetting it) is reported beside the score matrix it
returns (N x 5N floats), so the working memory (the rest) can be read off: it follows the
budget, not the number of pairs.
On CUDA the same is read from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

import torch


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_after_reset() -> int:
    """Bytes resident now, after handing freed heap back to the system and resetting the peak
    (Linux: writing 5 to clear_refs), so that VmHWM then measures what scoring adds."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_kib("VmRSS") * 1024


def measure(n_images: int, budget_mib: int) -> dict:
    from itmatch import build_run_config, create_model
    from itmatch.device import default_device
    from itmatch.scoring import ScoringOptions, score_grid

    torch.set_num_threads(2)
    torch.manual_seed(0)
    sizes = {"vocab_size": 60, "img_dim": 256, "n_regions": 16, "embed_size": 128, "sim_dim": 32}
    config = build_run_config("cmcan-official", {"model": {**sizes, "text": {"word_dim": 64}}})
    model = create_model("cmcan", config.model).to(default_device()).eval()
    n_captions = 5 * n_images
    with torch.no_grad():
        images = model.encode_images(torch.rand(n_images, 16, 256), (torch.rand(n_images, 16, 16) > 0.8).float())
        lengths = torch.randint(8, 16, (n_captions,))
        tokens = torch.randint(4, 60, (n_captions, 15)) * (torch.arange(15) < lengths[:, None])
        texts = model.encode_texts(tokens, lengths)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resident_after_reset()
        score_grid(model, images, texts, ScoringOptions(memory_budget=budget_mib << 20, precision="fp32"))
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = status_kib("VmHWM") * 1024 - before
    return {
        "images": n_images,
        "pairs": n_images * n_captions,
        "budget_mib": budget_mib,
        "peak_mib": peak / 2**20,
        "scores_mib": n_images * n_captions * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    print("| images | pairs | budget | peak added by scoring | of which the score matrix | working memory |")
    print("|---|---|---|---|---|---|")
    for budget in args.budgets:
        for n_images in args.sizes:
            output = subprocess.run(
                [sys.executable, __file__, "--one", str(n_images), str(budget)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(output.strip().splitlines()[-1])
            print(
                f"| {r['images']:,} | {r['pairs']:,} | {budget} MiB | {r['peak_mib']:.0f} MiB | "
                f"{r['scores_mib']:.0f} MiB | {r['peak_mib'] - r['scores_mib']:.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
