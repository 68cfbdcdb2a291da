"""Benchmark: CVNet-Rerank pairs/s, the official loop vs our cached, batched, fused path.

Both paths use the same random-weight CVNet-Rerank model on ROxf-like sizes (database 1024x768,
query crop 500x400) and are timed side by side, interleaved round by round so machine load hits both
alike.

* straightforward (official test loop, spec/cvnet.md §5): the query map once per query; per pair,
  the database backbone (up to res4 only, which favours the baseline: the official code also runs
  res5), both pyramids, the official correlate-then-4D-interpolate order, batch 1, fp32.
* ours: the query pyramid once per query, database pyramids from a PyramidCache (their one-time
  extraction is reported separately; in the evaluation the dense map comes from the global
  extraction pass, TEST.RERANK_SHARED_PASS, so only the compress convs remain), the upsample-first
  correlation computed straight into the first 4D conv (cvnet/correlation_conv.py: no full
  volume), equal-size database items batched; fp32 and bf16 autocast.

``--profile N`` adds, for one query's list of our fp32 and bf16 paths, the N ops with the most
self time on the device (torch.profiler; device time on CUDA, CPU time on the CPU).

pairs/s is reported for a shortlist of K pairs per query: K / (per-query cost + K * per-pair cost),
each cost the median over the rounds. Scores of both fp32 paths must agree to 1e-5. Also reported:
stored bytes per cached 1024x768 database image for every cache dtype and C', measured file sizes,
quantized-cache score deviations, and the peak memory of each path (CUDA allocator peak, or on CPU
the kernel's peak RSS above the RSS before).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cvnet.cache import CODECS, PyramidCache, cache_meta_for, cached_bytes
from cvnet.correlation import correlation_reference, pyramid_sizes
from cvnet.rerank_model import CVNetRerank
from cvnet.reranker import CVNetReranker
from retrieval.config import load_cfg
from retrieval.modeling.registry import build_model

COMPRESS_DIMS = (16, 32, 64, 128, 256, 512, 1024)
FP32_TOLERANCE = 1e-5


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(prog="benchmark rerank", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth")
    parser.add_argument("--compress-dim", type=int, default=256, help="C' of the model")
    parser.add_argument("--db-size", default="1024x768", help="database image HxW")
    parser.add_argument("--query-size", default="500x400", help="query crop HxW")
    parser.add_argument("--db-images", type=int, default=2, help="distinct database images")
    parser.add_argument(
        "--repeat", type=int, default=8, help="our scored list = the db images repeated"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians)")
    parser.add_argument("--shortlist", type=int, default=100, help="K pairs per query for pairs/s")
    parser.add_argument("--batch-size", type=int, default=8, help="our scoring batch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="also profile one query of our fp32 and bf16 paths: the N costliest ops (0 = off)",
    )
    parser.add_argument(
        "--no-quant", action="store_true", help="skip the quantized-cache score check"
    )
    return parser.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def build_random_model(depth: int, compress_dim: int, device: torch.device) -> CVNetRerank:
    """The official CVNet-Rerank architecture with random weights, in eval mode."""
    opts = [
        "MODEL.ARCH",
        "cvnet_rerank",
        "MODEL.DEPTH",
        str(depth),
        "MODEL.GEM_TRAINABLE",
        "True",
        "MODEL.RERANK.COMPRESS_DIM",
        str(compress_dim),
    ]
    return build_model(load_cfg(None, opts)).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn() with device synchronisation."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(field + ":")).split()[1]) * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict, name: str) -> Iterator[None]:
    """Max over calls of the block's peak memory (MiB) in out[name]: CUDA peak or CPU RSS growth."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out[name] = max(out.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
        return
    rss = _status_bytes("VmRSS")
    try:
        # resets the kernel's peak-RSS counter of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        yield
        out[name] = None  # the peak RSS cannot be reset here
        return
    yield
    out[name] = max(out.get(name, 0.0), (_status_bytes("VmHWM") - rss) / 2**20)


@torch.inference_mode()
def straightforward_pair(model: CVNetRerank, q_dense: list, db_img: torch.Tensor) -> torch.Tensor:
    """Official per-pair work: db backbone, both pyramids, correlate-then-resize, batch 1, fp32."""
    q_pyr, k_pyr = model.build_pyramid(q_dense), model.build_pyramid(model.extract_dense(db_img))
    return model.score_correlations(model.correlate(q_pyr, k_pyr, correlation_reference))


def measure_straightforward(model, query, db_img, device, memory) -> tuple[float, float, float]:
    """(per-query seconds, per-pair seconds, score) of the official loop for one pair."""
    with torch.inference_mode():
        query_seconds, q_dense = _timed(lambda: model.extract_dense(query), device)
    with peak_memory(device, memory, "straightforward"):
        pair_seconds, score = _timed(lambda: straightforward_pair(model, q_dense, db_img), device)
    return query_seconds, pair_seconds, float(score)


def measure_ours(
    reranker, query_index, ids, device, memory, name
) -> tuple[float, float, np.ndarray]:
    """(per-query seconds, per-pair seconds, scores) of our path for one query's list ``ids``."""
    query_seconds, _ = _timed(lambda: reranker.query_pyramid(query_index), device)
    with peak_memory(device, memory, name):
        seconds, scores = _timed(lambda: reranker.score(query_index, ids), device)
    return query_seconds, seconds / ids.size, scores


def _profiled(fn: Callable, device: torch.device) -> tuple[float, torch.profiler.profile]:
    """(wall seconds, torch.profiler's record) of one call of ``fn``, device synchronised; CPU ops,
    and on CUDA the kernels and copies too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        seconds, _ = _timed(fn, device)
    return seconds, prof


def _top_ops(prof: torch.profiler.profile, key: str, top: int) -> list[dict]:
    """The ``top`` ops of a record by ``key`` (a FunctionEvent time attribute), costliest first."""
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {
            "op": event.key,
            "calls": event.count,
            "self_device_ms": event.self_device_time_total / 1e3,
            "self_cpu_ms": event.self_cpu_time_total / 1e3,
        }
        for event in events
    ]


def profile_ops(fn: Callable, device: torch.device, top: int) -> list[dict]:
    """The ``top`` ops of one call of ``fn`` by self time on ``device``, costliest first."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return _top_ops(_profiled(fn, device)[1], key, top)


def profile_busy(fn: Callable, device: torch.device, top: int) -> dict:
    """Is one call of ``fn`` host- or device-bound? Its wall ms under the profiler, the ms the
    device spent in kernels and copies (0 on the CPU; work on overlapping streams counts twice),
    their ratio, and the ``top`` ops by self CPU time (the host's work: dispatch, cuDNN
    planning)."""
    seconds, prof = _profiled(fn, device)
    device_events = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU]
    busy_ms = sum(event.device_time_total for event in device_events) / 1e3
    return {
        "wall_ms": seconds * 1e3,
        "device_busy_ms": busy_ms,
        "device_busy_share": busy_ms / (seconds * 1e3),
        "top_host_ops": _top_ops(prof, "self_cpu_time_total", top),
    }


def pairs_per_second(query_seconds: list[float], pair_seconds: list[float], k: int) -> float:
    """K pairs over (median per-query cost + K * median per-pair cost)."""
    return k / (statistics.median(query_seconds) + k * statistics.median(pair_seconds))


def bytes_table(db_size: tuple[int, int], model: CVNetRerank) -> dict:
    """Stored bytes per cached database image of ``db_size`` for every cache dtype and C'."""
    feat = [-(-side // model.encoder.backbone.output_shape()["res4"].stride) for side in db_size]
    sizes = pyramid_sizes(feat[0], feat[1], model.scales)
    return {
        dtype: {dim: cached_bytes(sizes, dim, dtype) for dim in COMPRESS_DIMS} for dtype in CODECS
    }


def quantized_checks(model: CVNetRerank, ours: CVNetReranker, num_db: int) -> dict:
    """Per cache dtype: max |score - fp32-cache score| over query 0's pairs, file size of one item.

    Each dtype re-stores the fp32-cached pyramids (unit vectors: quantizing them = quantizing the
    raw ones), so no further backbone pass is needed.
    """
    q_levels = ours.query_pyramid(0)
    out = {}
    for dtype in CODECS:
        with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
            cache = PyramidCache(cache_meta_for(model, dtype), folder)
            diffs = []
            for index in range(num_db):
                reference = ours.cache.get(index, ours.device)
                cache.put(index, reference)
                exact = model.score_pyramids(q_levels, reference)
                quantized = model.score_pyramids(q_levels, cache.get(index, ours.device))
                diffs.append(float((quantized - exact).abs().max()))
            cache.flush()
            file_bytes = cache._item_path(0).stat().st_size
        out[dtype] = {"max_abs_score_diff": max(diffs), "file_bytes": file_bytes}
    return out


NOTE = (
    "one_time_* is paid once per database image; in the evaluation the dense map comes from the "
    "scale-1 pass of the global extraction (TEST.RERANK_SHARED_PASS), so only the compress convs "
    "(one_time_db_compress_only) are extra. Straightforward = official loop (query map once per "
    "query, database backbone to res4 + both pyramids + correlate-then-resize per pair, batch 1)."
)


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns the results dict (see the module docstring)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_random_model(args.depth, args.compress_dim, device)
    generator = torch.Generator().manual_seed(0)
    queries = [
        torch.randn(1, 3, *_size(args.query_size), generator=generator).to(device)
        for _ in range(args.rounds)
    ]
    dbs = [
        torch.randn(1, 3, *_size(args.db_size), generator=generator).to(device)
        for _ in range(args.db_images)
    ]
    cache = PyramidCache(cache_meta_for(model, "float32"))
    loaders = (queries.__getitem__, dbs.__getitem__)
    ours = CVNetReranker(model, *loaders, cache, device, args.batch_size)
    bf16 = CVNetReranker(model, *loaders, cache, device, args.batch_size, torch.bfloat16)
    extract_seconds, _ = _timed(lambda: ours.precompute(range(len(dbs))), device)
    with torch.inference_mode():
        dense = model.extract_dense(dbs[0])
        compress_seconds, _ = _timed(lambda: model.build_pyramid(dense), device)
    ids = np.tile(np.arange(len(dbs)), args.repeat)  # our scored list for every query
    results = _rounds(args, model, ours, bf16, queries, dbs, ids, device)
    results["one_time_db_extraction_s_per_image"] = extract_seconds / len(dbs)
    results["one_time_db_compress_only_s_per_image"] = compress_seconds
    results["note"] = NOTE
    results["bytes_per_cached_image"] = {
        "db_size": args.db_size,
        **bytes_table(_size(args.db_size), model),
    }
    if args.profile:
        results["profile"] = {
            name: profile_ops(lambda r=reranker: r.score(0, ids), device, args.profile)
            for name, reranker in (("ours_fp32", ours), ("ours_bf16", bf16))
        }
    if not args.no_quant:
        results["quantized"] = quantized_checks(model, ours, len(dbs))
    return results


def _rounds(args, model, ours, bf16, queries, dbs, ids, device) -> dict:
    """Interleaved timing rounds of the three paths; fp32 scores checked against each other."""
    times: dict[str, list[float]] = {
        key: [] for key in ("base_q", "base", "ours_q", "ours", "bf16_q", "bf16")
    }
    memory: dict = {}
    fp32_diff, bf16_diff = 0.0, 0.0
    for r in range(args.rounds):
        db = r % len(dbs)
        base_q, base_pair, base_score = measure_straightforward(
            model, queries[r], dbs[db], device, memory
        )
        ours_q, ours_pair, scores = measure_ours(ours, r, ids, device, memory, "ours_fp32")
        bf_q, bf_pair, bf_scores = measure_ours(bf16, r, ids, device, memory, "ours_bf16")
        for key, value in zip(times, (base_q, base_pair, ours_q, ours_pair, bf_q, bf_pair)):
            times[key].append(value)
        fp32_diff = max(fp32_diff, abs(float(scores[db]) - base_score))
        bf16_diff = max(bf16_diff, float(np.abs(bf_scores - scores).max()))
    if fp32_diff > FP32_TOLERANCE:
        raise AssertionError(
            f"fp32 scores differ by {fp32_diff:.3g} > {FP32_TOLERANCE} between the paths"
        )
    rates = {
        name: pairs_per_second(times[f"{key}_q"], times[key], args.shortlist)
        for name, key in (
            ("straightforward_fp32", "base"),
            ("ours_fp32", "ours"),
            ("ours_bf16", "bf16"),
        )
    }
    return {
        "setup": {**vars(args), "threads_used": torch.get_num_threads()},
        "median_seconds": {key: statistics.median(values) for key, values in times.items()},
        "pairs_per_s": rates,
        "speedup": {
            "fp32": rates["ours_fp32"] / rates["straightforward_fp32"],
            "bf16": rates["ours_bf16"] / rates["straightforward_fp32"],
        },
        "max_abs_score_diff": {
            "fp32_ours_vs_straightforward": fp32_diff,
            "bf16_vs_fp32": bf16_diff,
        },
        "peak_memory_mib": memory,
    }
