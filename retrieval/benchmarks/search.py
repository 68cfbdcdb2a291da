"""Benchmark: top-k search over a large database (default 1M x 2048, 70 queries, k = 100).

Methods: exact torch fp32 (``torch``, the reference), faiss flat inner product (``faiss``), and the
certified low-precision shortlist + fp32 re-score (``torch_shortlist``). Each method runs in a fresh
spawned process that regenerates the same random unit database (in chunks, seeded per chunk), so one
method's freed memory cannot hide another's peak. Peak memory: after the database is built the child
resets the kernel's peak-RSS counter (write 5 to /proc/self/clear_refs) and reports VmHWM - VmRSS
after the search, i.e. the extra resident memory the method needed on top of the database; where
clear_refs is not writable it reports the ru_maxrss growth instead (a lower bound). On CUDA the
torch allocator peak is reported too (faiss allocations are not visible to it).
"""

from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.evaluation.search import SEARCH_BACKENDS, get_search_backend, shortlist_search

_GENERATION_ROWS = 8192  # database rows generated per step (64 MiB at d = 2048)


def make_database(n: int, dim: int, seed: int) -> torch.Tensor:
    """Random L2-normalized float32 rows (n, dim), generated chunk by chunk (seed + chunk index)."""
    database = torch.empty(n, dim)
    for index, start in enumerate(range(0, n, _GENERATION_ROWS)):
        generator = torch.Generator().manual_seed(seed + 1 + index)
        chunk = torch.randn(min(_GENERATION_ROWS, n - start), dim, generator=generator)
        database[start : start + len(chunk)] = F.normalize(chunk, dim=1)
    return database


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> bool:
    """Reset this process's kernel peak-RSS counter (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(
    method: str,
    n_db: int,
    dim: int,
    n_queries: int,
    k: int,
    device: str,
    chunk_bytes: int,
    seed: int,
) -> dict:
    """Child process: build the data, run one method; return time, extra peak memory, top-k ids."""
    database = make_database(n_db, dim, seed)
    queries = F.normalize(
        torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(seed)), dim=1
    )
    rss_before, maxrss_before = (
        _status_bytes("VmRSS"),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    exact_peak = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if (
        method == "torch_shortlist"
    ):  # the shortlist also reports how many queries failed the certificate
        result = shortlist_search(queries, database, k, max_chunk_bytes=chunk_bytes, device=device)
        indices, extra = (
            result.indices,
            {"n_exact_fallback": result.n_exact_fallback, "shortlist_size": result.shortlist_size},
        )
    else:
        _, indices = get_search_backend(method)(
            queries, database, k, max_chunk_bytes=chunk_bytes, device=device
        )
        extra = {}
    seconds = time.perf_counter() - start
    if exact_peak:
        peak = _status_bytes("VmHWM") - rss_before
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) * 1024
    out = {
        "seconds": seconds,
        "extra_peak_rss_mib": peak / 2**20,
        "peak_method": "VmHWM" if exact_peak else "ru_maxrss growth (lower bound)",
        "indices": indices.cpu().numpy(),
        **extra,
    }
    if device == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _agreement(indices: np.ndarray, reference: np.ndarray) -> dict:
    """Top-k set agreement (mean over queries) and position agreement with the reference ids."""
    overlap = [len(np.intersect1d(a, b)) / len(b) for a, b in zip(indices, reference)]
    return {
        "top_k_agreement": float(np.mean(overlap)),
        "same_position": float((indices == reference).mean()),
    }


def run(argv: list[str]) -> dict:
    """Run each method in its own process: time, extra peak memory, agreement with exact fp32."""
    parser = argparse.ArgumentParser(prog="search", description=__doc__)
    parser.add_argument("--n-db", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n-queries", type=int, default=70)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument(
        "--methods",
        default="torch,faiss,torch_shortlist",
        help=f"comma-separated subset of {sorted(SEARCH_BACKENDS)}; 'torch' always runs",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-chunk-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = ["torch"] + [m for m in args.methods.split(",") if m and m != "torch"]
    for method in methods:
        get_search_backend(method)  # fail before any expensive work on a bad name
    results = {}
    for method in methods:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            results[method] = pool.submit(
                _measure,
                method,
                args.n_db,
                args.dim,
                args.n_queries,
                args.k,
                args.device,
                args.max_chunk_bytes,
                args.seed,
            ).result()
    reference = results["torch"]["indices"]
    for result in results.values():
        result.update(_agreement(result.pop("indices"), reference))
    settings = {key: getattr(args, key) for key in ("n_db", "dim", "n_queries", "k", "device")}
    return {**settings, "threads": torch.get_num_threads(), "methods": results}
