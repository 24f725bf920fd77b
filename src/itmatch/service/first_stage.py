"""The first stage of a search index: each query's best items by embedding dot product, which the
model then rescores.

- `flat`: exact, a pass over the stored (memory-mapped) vectors in chunks: no copy in memory;
- `ivf`: faiss IVF (`nlist` clusters trained by k-means on a sample of `train_sample` vectors,
  `nprobe` of them searched; `codes` Flat keeps exact vectors, SQ8 one byte per dimension, PQm
  m bytes per vector), memory-mapped when served;
- `hnsw`: faiss HNSW (`hnsw_m` links per node, `ef_construction`, `ef_search`); its file, graph
  included, is memory-mapped when served (IO_FLAG_MMAP_IFC).

Removed items are left out inside the search (a faiss ID selector, or a mask on the exact pass), so
a query still gets its k best among the items kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import faiss
import numpy as np
import torch

from itmatch.errors import DataError, InputError

KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class FirstStageSpec:
    """Which first stage an index keeps, and its parameters (see the module's docstring)."""

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 16
    codes: str = "Flat"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    train_sample: int = 65536

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"first-stage index must be one of {', '.join(KINDS)}, got {self.kind!r}")
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.type == "int"}
        bad = [f"{name}={value}" for name, value in numbers.items() if not isinstance(value, int) or value < 1]
        if bad:
            raise InputError(f"first-stage parameters must be positive integers: {', '.join(bad)}")
        if self.codes != "Flat" and self.codes != "SQ8" and not _is_pq(self.codes):
            raise InputError(f"IVF codes must be Flat, SQ8 or PQm (m bytes per vector), got {self.codes!r}")

    @classmethod
    def from_dict(cls, values: dict, where: Path) -> FirstStageSpec:
        try:
            return cls(**values)
        except (TypeError, InputError) as error:
            raise DataError(where, f"has a bad first stage ({error})") from None

    def as_dict(self) -> dict:
        return asdict(self)

    def factory(self) -> str:
        """faiss's description of the index (None for flat)."""
        return f"IVF{self.nlist},{self.codes}" if self.kind == "ivf" else f"HNSW{self.hnsw_m},Flat"

    def min_rows(self) -> int:
        """Vectors needed before the faiss index exists (IVF trains k-means on them); below, flat."""
        return 0 if self.kind == "flat" else (self.nlist if self.kind == "ivf" else 1)


def _is_pq(codes: str) -> bool:
    return codes.startswith("PQ") and codes[2:].isdigit() and int(codes[2:]) > 0


def new_faiss_index(spec: FirstStageSpec, sample: np.ndarray) -> faiss.Index:
    """An empty faiss index of `spec`, trained on `sample` (float32 vectors)."""
    index = faiss.index_factory(sample.shape[1], spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = spec.ef_construction
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample))
    return index


def read_faiss_index(path: Path, spec: FirstStageSpec, writable: bool) -> faiss.Index:
    """A faiss index file; for serving, IVF lists or HNSW vectors are memory-mapped, not read."""
    serving = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if spec.kind == "ivf" else faiss.IO_FLAG_MMAP_IFC
    flags = 0 if writable else serving
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise DataError(path, f"is not a readable faiss index ({_first_line(error)})") from None


def faiss_search(
    index: faiss.Index, spec: FirstStageSpec, queries: np.ndarray, k: int, excluded: np.ndarray
) -> np.ndarray:
    """Ids (n_queries, <= k) of the best items, `excluded` ones left out; -1 where fewer exist."""
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)) if len(excluded) else None
    if spec.kind == "ivf":
        params = faiss.SearchParametersIVF(sel=selector, nprobe=spec.nprobe)
    else:
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(spec.ef_search, k))
    _, found = index.search(np.ascontiguousarray(queries), min(k, index.ntotal), params=params)
    return found


def exhaustive_search(chunks, queries: np.ndarray, k: int, excluded: np.ndarray) -> np.ndarray:
    """Exact search over (start, vectors) chunks: ids (n_queries, <= k), -1 where fewer exist."""
    queries = torch.from_numpy(np.ascontiguousarray(queries))
    best = torch.full((len(queries), 0), -torch.inf)
    ids = torch.zeros((len(queries), 0), dtype=torch.long)
    for start, vectors in chunks:
        scores = queries @ torch.from_numpy(vectors).T
        dropped = excluded[(excluded >= start) & (excluded < start + len(vectors))] - start
        scores[:, torch.from_numpy(dropped)] = -torch.inf
        best, order = torch.cat([best, scores], 1).topk(min(k, best.shape[1] + len(vectors)), dim=1)
        ids = torch.cat([ids, torch.arange(start, start + len(vectors)).expand(len(queries), -1)], 1).gather(1, order)
    return torch.where(best.isinf(), -1, ids).numpy()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
