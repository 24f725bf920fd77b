"""Load test of the search service: a bounded number of requests, several at a time, on loopback.

    .venv/bin/python benchmarks/service_load.py [--checkpoint CKPT] [--requests 500] [--concurrency 16]
                                                [--rerank-k K] [--out benchmark-output/service-load]

Makes a synthetic test split of 1,000 images (16 regions of 256-d features, 5,000 captions: the
demo's sizes and feature codes), indexes it with a CMCAN checkpoint (default: an untrained one at
the demo's sizes, D=128, P=32, which costs exactly what a trained one does), starts
`itmatch serve` in its own process and sends the requests the page makes, in turn: a text search
(k=12, the split's captions as queries), the captions of an image (k=5), an explanation of a pair
and a thumbnail. Prints p50 / p95 / max latency and the errors per endpoint; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from itmatch import build_run_config
from itmatch.checkpoint import save_checkpoint
from itmatch.data.precomp import read_captions
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import Vocabulary
from itmatch.models.registry import build_model
from itmatch.service.index import build_index

DEMO_SIZES = {"embed_size": 128, "sim_dim": 32, "text": {"word_dim": 128}}


def untrained_checkpoint(data: Path, path: Path) -> Path:
    if not path.exists():
        vocab = Vocabulary.build(read_captions(data / "test_caps.txt"), threshold=1)
        sizes = {**DEMO_SIZES, "vocab_size": len(vocab), "img_dim": 256, "n_regions": 16}
        config = build_run_config("cmcan-official", {"model": sizes})
        torch.manual_seed(0)
        model = build_model(config)
        model.vocab = vocab
        save_checkpoint(path, model, config)
    return path


def request_paths(captions: list[str], n_images: int, count: int) -> list[tuple[str, str]]:
    """(endpoint, path) of `count` requests cycling through what the page asks for."""
    paths = []
    for number in range(count):
        image, query = (number * 37) % n_images, urllib.parse.quote(captions[(number * 101) % len(captions)])
        page_requests = [
            ("text search", f"/api/search/text?q={query}&k=12"),
            ("image search", f"/api/search/image?image={image}&k=5"),
            ("explain", f"/api/explain?image={image}&text={query}"),
            ("thumbnail", f"/api/images/{image}/thumbnail"),
        ]
        paths.append(page_requests[number % len(page_requests)])
    return paths


def timed_get(url: str) -> tuple[float, str | None]:
    """(seconds, error or None) of one GET."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as answer:
            answer.read()
        error = None
    except (urllib.error.URLError, OSError) as failure:
        error = str(failure)
    return time.perf_counter() - started, error


def start_server(index: Path, rerank_k: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "itmatch.cli", "serve", str(index), "--port", str(port)]
    server = subprocess.Popen(command + (["--rerank-k", str(rerank_k)] if rerank_k else []))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while timed_get(f"{base}/api/info")[1] is not None:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {' '.join(command)}")
        time.sleep(0.5)
    return server, base


def summary(results: list[tuple[str, float, str | None]]) -> dict:
    kinds = sorted({kind for kind, _, _ in results}) + ["all"]
    table = {}
    for kind in kinds:
        rows = [(seconds, error) for k, seconds, error in results if kind in (k, "all")]
        latencies = [1000 * seconds for seconds, _ in rows]
        table[kind] = {
            "requests": len(rows),
            "errors": sum(error is not None for _, error in rows),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "max_ms": round(max(latencies), 1),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a CMCAN checkpoint for 256-d, 16-region features")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rerank-k", type=int, help="the server's default: score the first stage's top K only")
    parser.add_argument("--out", type=Path, default=Path("benchmark-output/service-load"))
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "test_ims.npy").exists():
        make_synthetic(data, {"test": 1000}, seed=0, spec=SyntheticSpec(n_regions=16))
    checkpoint = args.checkpoint or untrained_checkpoint(data, args.out / "cmcan-untrained.pt")
    index_dir = args.out / f"index-{checkpoint.stem}"
    index, _ = build_index(checkpoint, data, "test", index_dir)
    captions = index.captions.all()
    server, base = start_server(index_dir, args.rerank_k)
    try:
        paths = request_paths(captions, index.n_images, args.requests)
        for _, path in paths[:8]:  # warm-up, not counted
            timed_get(base + path)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            timings = list(pool.map(lambda item: timed_get(base + item[1]), paths))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    table = summary([(kind, seconds, error) for (kind, _), (seconds, error) in zip(paths, timings, strict=True)])
    mode = f"rerank{args.rerank_k}" if args.rerank_k else "exhaustive"
    title = (
        f"{args.requests} requests, {args.concurrency} concurrent, {index.n_images:,} images "
        f"({mode}, {checkpoint}): {wall:.1f} s, {args.requests / wall:.1f} requests/s; "
        f"load average {os.getloadavg()[1]:.1f} (other work on the machine slows every figure)"
    )
    print(title)
    print(f"{'endpoint':14s} {'requests':>8s} {'errors':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for kind, row in table.items():
        print(
            f"{kind:14s} {row['requests']:8d} {row['errors']:6d} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} "
            f"{row['max_ms']:8.1f}"
        )
    result = {"title": title, "wall_seconds": round(wall, 2), "rerank_k": args.rerank_k, "endpoints": table}
    (args.out / f"results-{mode}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
