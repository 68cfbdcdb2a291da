"""Benchmark: CVNet-Rerank scoring on ROxf's real mix of sizes, cold and warm, by scoring threads.

``rerank`` times one query size against one database size; a real evaluation scores every query
crop (each a new size) against database pyramids of many sizes, batched by equal size. On CUDA
each new (query size, database size, batch) shape makes cuDNN plan every conv of the 4D CNN on the
host, and PyTorch keeps those plans per thread. This benchmark separates that cost:

* ``batch_sweep``: ms per pair of ``score_pyramids`` for one query crop (547x449, the median ROxf
  query box) against 1024x768 database pyramids, by batch size, fp32 and bf16 autocast (warm).
* ``mix``: ``--db-images`` database pyramids of sizes drawn from ``<name>_gallery_sizes.txt``, two
  disjoint sets of ``--queries`` query crops of ROxf box sizes (from ``--gnd``), and per query a
  shortlist of ``--topk`` random database items. Set A is scored by a reranker with one scoring
  thread, cold (shapes never seen) then warm (the same calls again), then by one with
  ``--streams`` threads; set B the other way round. The first reranker of each set scores once
  more from an on-disk fp16 cache (reads included, plans warm).
  The query pyramid (one backbone pass per query) is part of each query's time.
  Run once per ``--pad-multiples`` value (``TEST.RERANK_PAD_MULTIPLE``, cvnet/padding.py).
* ``mix_profile`` (with ``--profile``): a third query set P, one scoring thread, the first pad
  multiple, cold then warm, each pass under torch.profiler: wall ms, the ms the device spent in
  kernels and copies, and the ops with the most host time, so host-bound (dispatch, cuDNN
  planning) and device-bound passes are told apart.
* ``cache``: per database image, the compress convs alone, compress + ``PyramidCache.put`` to disk
  (flushed), ``PyramidCache.get`` from disk to the device, and ``read_item`` of one item file.
* ``shapes``: what padding does to the batches of a whole evaluation, without scoring: every query
  box of ``--gnd`` against ``--topk`` random database images of the whole sizes file, batched by
  the reranker's own rule (stand-in pyramids of one channel), per pad multiple, for one scoring
  thread (``pad<m>``) and for ``--streams`` (``pad<m>_streams<n>``, which share the memory
  budget): batches, distinct (query grid, database grid, batch) shapes (what cuDNN plans from one
  thread), and the padded cells of the 4D CNN over the exact ones.

Every reranker bounds its correlation volumes by ``--memory-mb`` (``TEST.RERANK_MEMORY_MB``; 0 =
automatic as in the evaluation: half the GPU's free memory, 4096 on the CPU), resolved once.

Random weights and images; the scores of one and of several threads must agree (reported).
"""

from __future__ import annotations

import argparse
import itertools
import math
import pickle
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cvnet.cache import PyramidCache, cache_meta_for
from cvnet.cache_items import read_item
from cvnet.correlation import pyramid_sizes
from cvnet.rerank_model import CVNetRerank
from cvnet.reranker import CVNetReranker, memory_budget_mb
from retrieval.benchmarks.rerank import _timed, build_random_model, profile_busy, profile_ops
from retrieval.benchmarks.rerank_eval import _read_sizes, _sizes_file

QUERY_CROP = (547, 449)  # H x W of the median ROxf query box
DB_SIZE = (768, 1024)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(
        prog="benchmark rerank-mix", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gnd", required=True, help="real gnd_<name>.pkl (query boxes)")
    parser.add_argument("--sizes-dir", required=True, help="folder of <name>_gallery_sizes.txt")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth")
    parser.add_argument("--db-images", type=int, default=400, help="database pyramids of the mix")
    parser.add_argument("--queries", type=int, default=12, help="query crops per set (two sets)")
    parser.add_argument("--topk", type=int, default=100, help="shortlist length per query")
    parser.add_argument("--streams", type=int, default=4, help="scoring threads to compare with 1")
    parser.add_argument("--size-divisor", type=int, default=1, help="divide every image size")
    parser.add_argument("--batches", default="1,2,4,8,16", help="batch sizes of the sweep")
    parser.add_argument(
        "--profile",
        type=int,
        default=12,
        help="top ops of one batch of 16, and of a profiled pass of the mix (0 = neither)",
    )
    parser.add_argument(
        "--pad-multiples", default="1,4", help="TEST.RERANK_PAD_MULTIPLE values to compare"
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=0,
        help="TEST.RERANK_MEMORY_MB of every reranker (0 = automatic, as in the evaluation)",
    )
    args = parser.parse_args(argv)
    for flag, path in (("--gnd", Path(args.gnd)), ("--sizes-dir", _sizes_file(args))):
        if not path.is_file():
            parser.error(f"{flag}: {str(path)!r} is not a file")
    if args.streams < 2:
        parser.error(f"--streams {args.streams}: give at least 2 (it is compared with 1)")
    try:
        args.pad_multiples = [int(m) for m in args.pad_multiples.split(",")]
    except ValueError:
        parser.error(f"--pad-multiples {args.pad_multiples!r}: expected integers like 1,4")
    if min(args.pad_multiples) < 1:
        parser.error(f"--pad-multiples {args.pad_multiples}: each must be >= 1")
    if args.memory_mb < 0:
        parser.error(f"--memory-mb {args.memory_mb}: expected >= 0 (0 = automatic)")
    boxes = len(pickle.loads(Path(args.gnd).read_bytes())["gnd"])
    needed = len(_query_set_names(args)) * args.queries
    if needed > boxes:
        parser.error(
            f"--queries {args.queries}: the query sets need {needed} boxes, --gnd has {boxes}"
        )
    return args


def _query_set_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The mix's disjoint query sets: A and B, and P for the profiled passes."""
    return ("A", "B", "P") if args.profile else ("A", "B")


def _median_seconds(fn: Callable, device: torch.device, reps: int = 5, warmup: int = 2) -> float:
    """Median wall time of fn() after warm-up calls, device synchronised."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device)[0] for _ in range(reps))


def _image(size: tuple[int, int], divisor: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random normalised (1, 3, H, W) image of size (H, W) / divisor."""
    return torch.randn(
        1, 3, max(17, size[0] // divisor), max(17, size[1] // divisor), device=device
    )


@torch.inference_mode()
def batch_sweep(model: CVNetRerank, args, device: torch.device) -> tuple[dict, list]:
    """({fp32|bf16}_b{B}: ms per batch and per pair, peak MiB}, profile of fp32 batch 16)."""
    divisor = args.size_divisor
    q = model.build_pyramid(model.extract_dense(_image(QUERY_CROP, divisor, device)))
    k = model.build_pyramid(model.extract_dense(_image(DB_SIZE, divisor, device)))
    sweep = {}
    batches = [int(b) for b in args.batches.split(",")]
    for amp in ("fp32", "bf16"):
        for batch in batches if amp == "fp32" else [b for b in batches if b >= 8]:
            k_batch = [level.expand(batch, -1, -1, -1).contiguous() for level in k]

            def score(k_batch=k_batch, amp=amp):
                with torch.autocast(device.type, torch.bfloat16, enabled=amp == "bf16"):
                    return model.score_pyramids(q, k_batch)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _median_seconds(score, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
            sweep[f"{amp}_b{batch}"] = {
                "ms_batch": seconds * 1e3,
                "ms_pair": seconds * 1e3 / batch,
                "peak_mib": peak,
            }
    k_16 = [level.expand(16, -1, -1, -1).contiguous() for level in k]
    profile = profile_ops(lambda: model.score_pyramids(q, k_16), device, args.profile)
    return sweep, profile


@torch.inference_mode()
def cache_costs(model: CVNetRerank, args, device: torch.device, items: int = 32) -> dict:
    """ms per database image of the compress convs, compress + put (flushed), get, read_item."""
    image = _image(DB_SIZE, args.size_divisor, device)
    dense = model.extract_dense(image)
    out = {"compress_ms": _median_seconds(lambda: model.build_pyramid(dense), device) * 1e3}
    with tempfile.TemporaryDirectory() as folder:
        cache = PyramidCache(cache_meta_for(model, "float16", "mix"), folder)

        def put_all() -> None:
            for index in range(items):
                cache.put(index, model.build_pyramid(dense))
            cache.flush()

        timings = {
            "compress_put_ms": put_all,
            "get_from_disk_ms": lambda: [cache.get(i, device) for i in range(items)],
            "read_item_ms": lambda: [read_item(cache._item_path(i)) for i in range(items)],
        }
        for key, fn in timings.items():  # in this order: each needs the items of the one before
            out[key] = _timed(fn, device)[0] / items * 1e3
        out["item_bytes"] = cache._item_path(0).stat().st_size
    return out


def _real_sizes(args) -> tuple[list, list]:
    """(every database image's (W, H) of the sizes file, every query box's (W, H) of --gnd)."""
    sizes = list(_read_sizes(_sizes_file(args)).values())
    boxes = [entry["bbx"] for entry in pickle.loads(Path(args.gnd).read_bytes())["gnd"]]
    return sizes, [(int(b[2] - b[0]) + 1, int(b[3] - b[1]) + 1) for b in boxes]


def _mix_inputs(args, rng: np.random.Generator) -> tuple[list, dict, list]:
    """(database (W, H) sizes, {set: query (W, H) sizes}, shortlists)."""
    sizes, boxes = _real_sizes(args)
    names = _query_set_names(args)
    db_sizes = [sizes[i] for i in rng.choice(len(sizes), args.db_images, replace=False)]
    order = rng.permutation(len(boxes))
    query_sets = {
        name: [boxes[i] for i in order[n * args.queries : (n + 1) * args.queries]]
        for n, name in enumerate(names)
    }
    shortlists = [
        rng.choice(args.db_images, min(args.topk, args.db_images), replace=False)
        for _ in range(args.queries)
    ]
    return db_sizes, query_sets, shortlists


def _stand_in(model: CVNetRerank, size_wh: tuple[int, int]) -> list[torch.Tensor]:
    """One-channel levels of the pyramid sizes of an image of size (W, H)."""
    height, width = size_wh[1], size_wh[0]
    for _ in range(4):  # stem, max pool, res3 and res4 each halve (ceil): stride 16
        height, width = -(-height // 2), -(-width // 2)
    return [torch.zeros(1, 1, *size) for size in pyramid_sizes(height, width, model.scales)]


def batch_shapes(model: CVNetRerank, args) -> dict:
    """Per pad multiple: batches, distinct batch shapes, padded / exact 4D cells (docstring)."""
    rng = np.random.default_rng(0)
    sizes, boxes = _real_sizes(args)
    cache = PyramidCache(cache_meta_for(model, "float32", "shapes"))
    for index, size in enumerate(sizes):
        cache.put(index, _stand_in(model, size))
    queries = [_stand_in(model, box) for box in boxes]
    shortlists = [rng.choice(len(sizes), min(args.topk, len(sizes)), replace=False) for _ in boxes]
    out = {}
    for multiple, streams in itertools.product(args.pad_multiples, (1, args.streams)):
        reranker = CVNetReranker(
            model,
            None,
            None,
            cache,
            memory_mb=args.memory_mb,
            streams=streams,
            pad_multiple=multiple,
        )
        shapes, batches, padded, exact = set(), 0, 0, 0
        for q_levels, ids in zip(queries, shortlists):
            q_grid, q_exact = model.padded_grid(q_levels, multiple), model.grid(q_levels)
            for group in reranker._batches(q_levels, ids):
                k_grid = model.padded_grid(group[0][1], multiple)
                shapes.add((q_grid, k_grid, len(group)))
                batches += 1
                padded += len(group) * math.prod(q_grid) * math.prod(k_grid)
                exact += math.prod(q_exact) * sum(math.prod(model.grid(k)) for _, k in group)
        out[f"pad{multiple}" + (f"_streams{streams}" if streams > 1 else "")] = {
            "batches": batches,
            "distinct_shapes": len(shapes),
            "mean_batch": sum(len(ids) for ids in shortlists) / batches,
            "padded_over_exact_cells": padded / exact,
        }
    out["setup"] = {
        "queries": len(queries),
        "db_images": len(sizes),
        "batch_size": reranker.batch_size,
    }
    return out


def real_mix(model: CVNetRerank, args, device: torch.device) -> tuple[dict, dict | None]:
    """(per pad multiple, ms per pair of the real-size mix by query set, threads, cold/warm and
    cache; the profiled passes of set P or None) (docstring); the database pyramids and caches are
    built once for all multiples."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    db_sizes, query_sets, shortlists = _mix_inputs(args, rng)
    divisor = args.size_divisor
    memory = PyramidCache(cache_meta_for(model, "float16", "mix"))
    with torch.inference_mode():
        for index, (width, height) in enumerate(db_sizes):
            image = _image((height, width), divisor, device)
            memory.put(index, model.build_pyramid(model.extract_dense(image)))
    queries = {
        name: [_image((h, w), divisor) for w, h in sizes] for name, sizes in query_sets.items()
    }
    pairs = sum(len(ids) for ids in shortlists)
    with tempfile.TemporaryDirectory() as folder:
        disk = PyramidCache(cache_meta_for(model, "float16", "mix"), folder)
        for index in range(len(db_sizes)):
            disk.put(index, memory.get(index))
        disk.flush()

        def timed_pass(reranker: CVNetReranker) -> tuple[float, list]:
            """ms per pair of one pass over the set's queries, and the scores."""
            seconds, scores = _timed(
                lambda: [reranker.score(i, ids) for i, ids in enumerate(shortlists)], device
            )
            return seconds / pairs * 1e3, scores

        by_multiple = {}
        for multiple in args.pad_multiples:
            out: dict = {}
            for name, first, second in (("A", 1, args.streams), ("B", args.streams, 1)):
                rerankers = {
                    threads: CVNetReranker(
                        model,
                        queries[name].__getitem__,
                        None,
                        memory,
                        device,
                        memory_mb=args.memory_mb,
                        streams=threads,
                        pad_multiple=multiple,
                    )
                    for threads in (first, second)
                }
                for phase in ("cold", "warm"):  # the same reranker (and scoring threads) twice
                    out[f"{name}_threads{first}_{phase}_ms_pair"], scores = timed_pass(
                        rerankers[first]
                    )
                out[f"{name}_threads{second}_after_ms_pair"], other = timed_pass(rerankers[second])
                rerankers[first].cache = disk
                out[f"{name}_threads{first}_disk_ms_pair"], _ = timed_pass(rerankers[first])
                out[f"{name}_max_abs_threads_diff"] = float(
                    max(np.abs(a - b).max() for a, b in zip(scores, other))
                )
            out["setup"] = {"pairs_per_run": pairs, "query_sizes_wh": query_sets}
            by_multiple[f"pad{multiple}"] = out
    if "P" not in queries:
        return by_multiple, None
    multiple = args.pad_multiples[0]
    reranker = CVNetReranker(
        model,
        queries["P"].__getitem__,
        None,
        memory,
        device,
        memory_mb=args.memory_mb,
        pad_multiple=multiple,
    )
    profiled = {"pad_multiple": multiple, "pairs": pairs}
    for phase in ("cold", "warm"):
        profiled[phase] = profile_busy(
            lambda: [reranker.score(i, ids) for i, ids in enumerate(shortlists)],
            device,
            args.profile,
        )
    return by_multiple, profiled


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns the results dict (see the module docstring)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_random_model(args.depth, 256, device)
    args.memory_mb = memory_budget_mb(args.memory_mb, device)
    sweep, profile = batch_sweep(model, args, device)
    cache, shapes = cache_costs(model, args, device), batch_shapes(model, args)
    mix, mix_profile = real_mix(model, args, device)
    return {
        "setup": {k: str(v) for k, v in vars(args).items()},
        "batch_sweep": sweep,
        "profile_fp32_b16": profile,
        "cache": cache,
        "shapes": shapes,
        "mix": mix,
        "mix_profile": mix_profile,
        "note": (
            "A/B: disjoint query sets; 'cold' = shapes never scored in this process, 'warm' = "
            "the same calls again, 'after' = the other thread count on shapes the first has seen "
            "(PyTorch keeps cuDNN plans per thread); 'disk' = read from an on-disk fp16 cache"
        ),
    }
