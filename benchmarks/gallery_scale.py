"""Benchmark: a synthetic gallery grown to 100,000 images on disk, searched exhaustively and in two
stages with each first stage (exact flat pass, faiss IVF, faiss HNSW).

CMCAN at small sizes (64-d features and embeddings, 16 regions; untrained, which costs what a
trained one does) encodes 1,000 synthetic scenes; the gallery's images are drawn from them: each
key of a drawn image's encoding plus Gaussian noise (a tenth of the key's spread), its embedding
moved further (half its spread) and renormalised, so the first stage faces 100,000 distinct
vectors in 1,000 loose clusters. Encodings are appended to one index in chunks (float16 on
disk), as `itmatch index` appends them; at each size the benchmark measures:

- the append rate and the peak anonymous memory (RssAnon: not the mapped files) while appending;
- the index's size on disk (encodings, boxes, ids; no pictures, the gallery has none);
- per first stage: its build time from the stored vectors; in a fresh process, the anonymous
  memory of opening the index and serving 30 queries (with the model's own load) and their
  latency p50/p95 (k=10, rerank_k=100); the first stage's recall@100 against the exact first
  stage over 200 query sentences, for three nprobe (IVF) or efSearch (HNSW) values;
- exhaustive search (the model scores every image) latency over 3 queries;

and extends each measure to 1M and 10M images along the growth its mechanism gives (COLUMNS).

Run: `OMP_NUM_THREADS=1 python benchmarks/gallery_scale.py` (one torch and faiss thread); the
JSON goes to benchmark-output/gallery-scale/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from itmatch import build_run_config
from itmatch.checkpoint import save_checkpoint
from itmatch.data.precomp import read_captions
from itmatch.data.synthetic import SyntheticSpec, make_synthetic
from itmatch.data.vocab import Vocabulary
from itmatch.models.base import Encoded
from itmatch.models.registry import build_model
from itmatch.retrieval import embeddings, encode_queries
from itmatch.service.first_stage import FirstStageSpec
from itmatch.service.index import Gallery, IndexSettings, SearchIndex, build_index
from itmatch.service.search import search_by_text

SIZES = {"embed_size": 64, "sim_dim": 16, "img_dim": 64, "n_regions": 16, "text": {"word_dim": 32}}
CHUNK = 10_000
RERANK_K, K = 100, 10


def anonymous_memory() -> int:
    """Resident memory that is not a mapped file (what reading the index whole would add to)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("RssAnon:"))


class PeakMemory:
    """The highest RssAnon above the start, sampled every 5 ms while the block runs."""

    def __enter__(self):
        self.start, self.peak, self.running = anonymous_memory(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, anonymous_memory() - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anonymous_memory() - self.start)


def checkpoint_for(data: Path, path: Path) -> Path:
    vocab = Vocabulary.build(read_captions(data / "test_caps.txt"), threshold=1)
    config = build_run_config("cmcan-official", {"model": {**SIZES, "vocab_size": len(vocab)}})
    torch.manual_seed(0)
    model = build_model(config)
    model.vocab = vocab
    save_checkpoint(path, model, config)
    return path


def drawn_part(template: SearchIndex, rng: np.random.Generator, first: int, count: int) -> Gallery:
    """`count` images drawn from the template's, with noise (see the module's docstring)."""
    rows = np.sort(rng.integers(0, template.n_images, count))
    encoded = template.images.select(rows)
    tensors = {}
    for key, value in encoded.tensors.items():
        spread = 0.5 if key == template.model.embedding_key else 0.1
        noisy = value + spread * value.std() * torch.from_numpy(rng.standard_normal(value.shape, dtype=np.float32))
        tensors[key] = noisy / noisy.norm(dim=-1, keepdim=True) if key == template.model.embedding_key else noisy
    return Gallery(
        images=[{"source": 0, "id": str(first + n), "path": None} for n in range(count)],
        captions=[],
        caption_image=torch.zeros(0, dtype=torch.long),
        boxes=torch.from_numpy(np.array(template.boxes.view[rows])),
        encoded_images=Encoded(tensors, encoded.padded),
        encoded_texts=template.texts.select(slice(0, 0)),
    )


def first_stages(n_images: int) -> dict[str, FirstStageSpec]:
    nlist = int(4 * n_images**0.5)  # faiss's rule of thumb: 4 to 16 sqrt(N) lists
    return {
        "flat": FirstStageSpec("flat"),
        "ivf": FirstStageSpec("ivf", nlist=nlist, nprobe=64),
        "hnsw": FirstStageSpec("hnsw", hnsw_m=16, ef_construction=80, ef_search=128),
    }


def latencies(index: SearchIndex, queries: list[str], rerank_k: int | None) -> dict:
    seconds = []
    for query in queries:
        started = time.perf_counter()
        search_by_text(index, query, K, rerank_k)
        seconds.append(time.perf_counter() - started)
    cut = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else seconds * 19
    return {"p50_ms": 1000 * statistics.median(seconds), "p95_ms": 1000 * cut[18], "queries": len(seconds)}


def recall(index: SearchIndex, exact: np.ndarray, vectors: torch.Tensor) -> float:
    found = index.nearest("images", vectors, RERANK_K)
    hits = [len(set(row[row >= 0]) & set(truth)) for row, truth in zip(found, exact, strict=True)]
    return sum(hits) / exact.size


def measure_stage(folder: Path, kind: str, spec: FirstStageSpec, exact, vectors) -> dict:
    index = SearchIndex.open(folder, "cpu", writable=True)
    started = time.perf_counter()
    index.set_first_stage(spec)
    faiss_bytes = sum(path.stat().st_size for path in folder.glob("*.faiss"))
    result = {"build_s": time.perf_counter() - started, "faiss_mb": faiss_bytes / 2**20}
    serving = subprocess.run(
        [sys.executable, __file__, "--serve", str(folder)], capture_output=True, text=True, check=True
    )
    result.update(json.loads(serving.stdout.splitlines()[-1]))
    if kind != "flat":
        opened = SearchIndex.open(folder, "cpu")
        knob = "nprobe" if kind == "ivf" else "ef_search"
        for value in (16, 64, 256) if kind == "ivf" else (100, 200, 400):
            opened.spec = replace(spec, **{knob: value})
            result[f"recall_at_100_{knob}_{value}"] = recall(opened, exact, vectors)
    return result


def serve_and_measure(folder: Path) -> None:
    """In a fresh process: the anonymous memory of opening the index and answering 30 queries
    with the first stage, and their latencies; printed as JSON."""
    torch.set_num_threads(1)
    with PeakMemory() as memory:
        index = SearchIndex.open(folder, "cpu")
        queries = list(dict.fromkeys(SearchIndex.open(folder.parent / "template", "cpu").captions.all()))[:30]
        timing = latencies(index, queries, RERANK_K)
    print(json.dumps({"serving_anon_mb": memory.peak / 2**20, **timing}))


def measure(folder: Path, queries: list[str], vectors: torch.Tensor) -> dict:
    exact_index = SearchIndex.open(folder, "cpu")
    exact = exact_index.nearest("images", vectors, RERANK_K)
    stages = {}
    for kind, spec in first_stages(exact_index.n_images).items():
        stages[kind] = measure_stage(folder, kind, spec, exact, vectors)
    SearchIndex.open(folder, "cpu", writable=True).set_first_stage(FirstStageSpec("flat"))
    stages["exhaustive"] = latencies(SearchIndex.open(folder, "cpu"), queries[:3], None)
    disk = sum(path.stat().st_size for path in folder.iterdir() if path.is_file() and path.suffix != ".faiss")
    return {"disk_mb": disk / 2**20, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path("benchmark-output/gallery-scale"))
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the serving measurement's own process
    args = parser.parse_args()
    if args.serve:
        return serve_and_measure(args.serve)
    torch.set_num_threads(1)
    data = args.out / "data"
    if not (data / "test_ims.npy").exists():
        make_synthetic(data, {"test": 1000}, seed=0, spec=SyntheticSpec(n_regions=16, feature_dim=64))
    checkpoint = checkpoint_for(data, args.out / "cmcan-small.pt")
    started = time.perf_counter()
    template, _ = build_index(checkpoint, data, "test", args.out / "template", IndexSettings(progress=False), "cpu")
    encode_rate = template.n_images / (time.perf_counter() - started)
    queries = list(dict.fromkeys(template.captions.all()))[:200]
    with torch.no_grad():
        vectors = embeddings(template.model, encode_queries(template.model, queries))
    folder, rng, results = args.out / "gallery", np.random.default_rng(0), []
    SearchIndex.create(folder, checkpoint, template.checkpoint_sha256, "cpu")
    append_seconds, append_peak = 0.0, 0
    for size in sorted(args.sizes):
        index = SearchIndex.open(folder, "cpu", writable=True)  # measuring changed its first stage
        with PeakMemory() as memory:
            started = time.perf_counter()
            while index.n_images < size:
                count = min(CHUNK, size - index.n_images)
                index.append({"data": "synthetic", "split": "test"}, drawn_part(template, rng, index.n_images, count))
            append_seconds += time.perf_counter() - started
        append_peak = max(append_peak, memory.peak)
        row = {"images": size, "append_images_per_s": size / append_seconds, "append_anon_mb": append_peak / 2**20}
        row.update(measure(folder, queries, vectors))
        results.append(row)
        print(json.dumps(row), flush=True)
    summary = {"encode_images_per_s": encode_rate, "sizes": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(table(results))


# How each measure grows with the gallery, for the extrapolation: "N" linear, "sqrt N" (IVF with
# nlist ~ sqrt N and a fixed nprobe scans ~ sqrt N vectors), "log N" (an HNSW search), "chunk"
# (linear up to one --memory-mb chunk of vectors, then flat), "flat" (bounded: the largest measured,
# as for a fit that falls).
COLUMNS = [
    ("append the encodings (s)", "N", lambda row: row["images"] / row["append_images_per_s"]),
    ("build IVF (s)", "N", lambda row: row["stages"]["ivf"]["build_s"]),
    ("build HNSW (s)", "N", lambda row: row["stages"]["hnsw"]["build_s"]),
    ("IVF file (MB)", "N", lambda row: row["stages"]["ivf"]["faiss_mb"]),
    ("HNSW file (MB)", "N", lambda row: row["stages"]["hnsw"]["faiss_mb"]),
    ("index on disk (MB)", "N", lambda row: row["disk_mb"]),
    ("append peak memory (MB)", "flat", lambda row: row["append_anon_mb"]),
    *[
        (f"{kind} {what}", growth, lambda row, kind=kind, key=key: row["stages"][kind][key])
        for kind, memory, latency in (("flat", "chunk", "N"), ("ivf", "flat", "sqrt N"), ("hnsw", "flat", "log N"))
        for what, key, growth in (
            ("serving memory (MB)", "serving_anon_mb", memory),
            ("p50 (ms)", "p50_ms", latency),
            ("p95 (ms)", "p95_ms", latency),
        )
    ],
    ("exhaustive p50 (ms)", "N", lambda row: row["stages"]["exhaustive"]["p50_ms"]),
]
CHUNK_ROWS = (256 << 20) // (4 * SIZES["embed_size"])  # float32 embeddings in the default --memory-mb


def grown(sizes: np.ndarray, measured: np.ndarray, growth: str, targets: list[float]) -> list[float]:
    """`measured` at `sizes` fitted as a + b g(N) (least squares) and evaluated at `targets`."""
    if growth == "flat":
        return [measured.max()] * len(targets)
    shape = {
        "N": lambda n: n,
        "sqrt N": np.sqrt,
        "log N": np.log,
        "chunk": lambda n: np.minimum(n, CHUNK_ROWS),
    }[growth]
    slope, intercept = np.polyfit(shape(sizes), measured, 1)
    if slope < 0:  # no growth measured (noise): the largest measured value
        return [measured.max()] * len(targets)
    return [intercept + slope * shape(np.float64(target)) for target in targets]


def table(results: list[dict]) -> str:
    """Markdown: each measure at the measured sizes, and its fit (see COLUMNS) at 1M and 10M images."""
    sizes = np.array([row["images"] for row in results], dtype=float)
    head = [f"{int(n):,}" for n in sizes] + ["1M (fit)", "10M (fit)", "fit"]
    lines = ["| measure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, growth, value in COLUMNS:
        measured = np.array([value(row) for row in results])
        cells = [*measured, *grown(sizes, measured, growth, [1e6, 1e7])]
        lines.append(f"| {name} | " + " | ".join(f"{cell:,.1f}" for cell in cells) + f" | {growth} |")
    recalls = [key for key in results[0]["stages"]["ivf"] | results[0]["stages"]["hnsw"] if key.startswith("recall")]
    for key in recalls:
        kind = "ivf" if "nprobe" in key else "hnsw"
        cells = [f"{row['stages'][kind][key]:.3f}" for row in results]
        lines.append(f"| {kind} {key.replace('_', ' ')} | " + " | ".join(cells) + " | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
