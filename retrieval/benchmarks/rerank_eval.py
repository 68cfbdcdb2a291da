"""Benchmark: a whole ROxf-sized evaluation with CVNet-Rerank top-K, timed phase by phase.

The database is a stand-in for a revisitop set: the real ground truth (``gnd_<name>.pkl``) and the
real database image sizes (``<name>_gallery_sizes.txt``: ``jpg/<image>.jpg,<label>,<w>,<h>``; each
query image is the smallest that holds its box), filled with smooth random JPEGs, so the
loaders, extraction, search, shortlists and re-ranking do exactly the work of the real set (the
scores of the random-weight model mean nothing). ``--queries``/``--db-images``/``--size-divisor``
shrink it for a CPU check.

Runs, each with ``retrieval.evaluation.evaluator.evaluate`` and its per-phase wall seconds, in this
order (the essential ones first):

* ``shared_cold``: global descriptors + re-rank top-K with TEST.RERANK_SHARED_PASS, cold: the
  database pyramids are built in the scale-1 pass of the global extraction (timed as
  ``extract_db_rerank_pyramids``), the queries' when first scored;
* ``shared_warm``: the same again (global features and pyramids come from the cache);
* ``warm KEY=VALUE ...`` (each ``--variant``): shared_warm with those overrides as well, so
  re-rank settings (``TEST.RERANK_PAD_MULTIPLE``, ``TEST.RERANK_STREAMS``...) are compared side by
  side on one extraction; its mAP must equal shared_warm's where the setting leaves scores alone;
* ``global`` (``--global-run``): global descriptors only, cold: the extraction without the tap;
* ``lazy_cold`` (``--lazy``): shared pass off, cold: pyramids built for the shortlisted images.

``rerank_cold_s`` = shared_cold's ``rerank`` + ``extract_db_rerank_pyramids``: what the re-rank adds
to a cold evaluation, as far as the host waits for it. On CUDA the pyramids' device work overlaps
the extraction (cvnet/cache.py), so with ``--global-run`` ``shared_pass_extraction_overhead_s``
(shared_cold's ``extract_db`` - global's) is the fuller measure. It overstates: global runs after
the shared runs, with the JPEGs in the page cache and the backbone's cuDNN plans warm.
``variants``: per variant, its re-rank seconds and the largest mAP difference from shared_warm.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from retrieval.config import load_cfg
from retrieval.evaluation.evaluator import evaluate
from retrieval.modeling.registry import build_model

GND_KEYS = ("easy", "hard", "junk")
# Marks a --work folder as this benchmark's scratch space (only such a folder is emptied).
WORK_MARKER = ".rerank_eval_work"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(
        prog="benchmark rerank-eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gnd", required=True, help="real gnd_<name>.pkl (its name names the set)")
    parser.add_argument("--sizes-dir", required=True, help="folder of <name>_gallery_sizes.txt")
    parser.add_argument("--work", required=True, help="scratch folder (data, caches, outputs)")
    parser.add_argument("--queries", type=int, default=0, help="first N queries only (0 = all)")
    parser.add_argument(
        "--db-images",
        type=int,
        default=0,
        help="database subset: the queries' labelled images first, then unlabelled ones (0 = all)",
    )
    parser.add_argument("--size-divisor", type=int, default=1, help="divide every image size")
    parser.add_argument("--topk", type=int, default=100, help="re-ranking depth K")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=4, help="DATA.NUM_WORKERS and generators")
    parser.add_argument("--cache-dtype", default="float16", help="TEST.RERANK_CACHE_DTYPE")
    parser.add_argument(
        "--amp",
        default="off",
        help="TEST.AMP (extraction and scoring; on CUDA not 'off' disables the shared pass)",
    )
    parser.add_argument(
        "--global-run", action="store_true", help="also time a global-only evaluation, cold"
    )
    parser.add_argument("--lazy", action="store_true", help="also time the lazy path, cold")
    parser.add_argument(
        "--opts",
        nargs="*",
        default=[],
        metavar="KEY VALUE",
        help="config overrides for every run, e.g. TEST.RERANK_STREAMS 4",
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="KEY VALUE",
        help="one more warm run with these overrides (repeatable), e.g. TEST.RERANK_PAD_MULTIPLE 1",
    )
    args = parser.parse_args(argv)
    for variant in args.variant:
        if len(variant) % 2:
            parser.error(f"--variant {' '.join(variant)!r}: expected KEY VALUE pairs")
    labels = [_variant_label(variant) for variant in args.variant]
    if len(set(labels)) < len(labels):
        parser.error(f"--variant: the same overrides given twice ({labels})")
    for flag, path in (("--gnd", Path(args.gnd)), ("--sizes-dir", _sizes_file(args))):
        if not path.is_file():
            parser.error(f"{flag}: {str(path)!r} is not a file")
    return args


def _set_name(args: argparse.Namespace) -> str:
    """The revisitop set name of --gnd (gnd_<name>.pkl)."""
    return Path(args.gnd).stem.removeprefix("gnd_")


def _sizes_file(args: argparse.Namespace) -> Path:
    """--sizes-dir/<name>_gallery_sizes.txt."""
    return Path(args.sizes_dir) / f"{_set_name(args)}_gallery_sizes.txt"


def _fresh_work_dir(work: Path) -> None:
    """Empty ``work`` for a cold run; a non-empty folder this benchmark did not create is refused,
    so a mistyped --work never deletes user data."""
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).is_file():
        raise SystemExit(
            f"--work {str(work)!r} is not empty and was not made by this benchmark "
            f"(no {WORK_MARKER}); give a new or empty folder"
        )
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("scratch folder of tools/benchmark.py rerank-eval\n")


def _read_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """image name -> (width, height) of a revisitop sizes file."""
    sizes = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, _, width, height = line.strip().split(",")
            sizes[Path(name).stem] = (int(width), int(height))
    return sizes


def subset_gnd(gnd: dict, n_queries: int, n_db: int) -> dict:
    """The first ``n_queries`` queries and ``n_db`` database images (the queries' labelled images
    first, in gnd order), with every index renumbered; 0 keeps all."""
    entries = gnd["gnd"][: n_queries or None]
    if not n_db or n_db >= len(gnd["imlist"]):
        return {**gnd, "gnd": entries, "qimlist": gnd["qimlist"][: len(entries)]}
    picked: dict[int, int] = {}
    labelled = [i for entry in entries for key in GND_KEYS for i in entry[key]]
    for index in [*labelled, *range(len(gnd["imlist"]))]:
        if len(picked) == n_db:
            break
        picked.setdefault(index, len(picked))
    return {
        "imlist": [gnd["imlist"][i] for i in picked],
        "qimlist": gnd["qimlist"][: len(entries)],
        "gnd": [
            {
                "bbx": entry["bbx"],
                **{key: [picked[i] for i in entry[key] if i in picked] for key in GND_KEYS},
            }
            for entry in entries
        ],
    }


def _write_image(job: tuple[str, int, int, int]) -> int:
    """A smooth random BGR JPEG of width x height (content seeded by ``seed``); returns bytes."""
    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.normal(0, 6, image.shape).astype(np.int16)  # photo-like JPEG entropy
    ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8))
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    Path(path).write_bytes(encoded.tobytes())
    return len(encoded)


def make_standin(args: argparse.Namespace, root: Path) -> tuple[str, dict]:
    """Write the stand-in set under root/<name>; returns (name, its facts)."""
    name = _set_name(args)
    real = pickle.loads(Path(args.gnd).read_bytes())
    gnd = subset_gnd(real, args.queries, args.db_images)
    divisor = args.size_divisor
    for entry in gnd["gnd"]:
        entry["bbx"] = [v / divisor for v in entry["bbx"]]
    gallery = _read_sizes(_sizes_file(args))
    sizes = [(w // divisor, h // divisor) for w, h in (gallery[image] for image in gnd["imlist"])]
    # only the query crops are extracted: the smallest image that holds the box will do
    sizes += [(math.ceil(e["bbx"][2]) + 1, math.ceil(e["bbx"][3]) + 1) for e in gnd["gnd"]]
    folder = root / name
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    (folder / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    work = [
        (str(folder / "jpg" / f"{image}.jpg"), max(1, w), max(1, h), seed)
        for seed, (image, (w, h)) in enumerate(zip([*gnd["imlist"], *gnd["qimlist"]], sizes))
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        total = sum(pool.map(_write_image, work, chunksize=32))
    return name, {
        "queries": len(gnd["qimlist"]),
        "db_images": len(gnd["imlist"]),
        "size_divisor": divisor,
        "mean_jpeg_kb": total / len(work) / 1024,
        "generation_s": time.perf_counter() - start,
    }


def _cfg(args: argparse.Namespace, data_root: Path, name: str, out: Path, opts: list):
    """CVNet-Rerank R<depth> evaluation config of the stand-in set."""
    return load_cfg(
        None,
        [
            *("MODEL.ARCH", "cvnet_rerank", "MODEL.DEPTH", str(args.depth)),
            *("MODEL.GEM_TRAINABLE", "True", "DEVICE", args.device),
            *("DATA.ROOT", str(data_root), "DATA.NUM_WORKERS", str(args.workers)),
            *("TEST.DATASETS", f"['{name}']", "TEST.QE_N", "0", "OUTPUT_DIR", str(out)),
            *("TEST.RERANK_CACHE_DTYPE", args.cache_dtype, "TEST.AMP", args.amp),
            *args.opts,
            *opts,
        ],
    )


def _variant_label(variant: list[str]) -> str:
    """'warm KEY=VALUE ...' of one --variant."""
    pairs = zip(variant[::2], variant[1::2])
    return "warm " + " ".join(f"{key}={value}" for key, value in pairs)


def _max_map_difference(run_a: dict, run_b: dict) -> float:
    """The largest |mAP difference| over the rows and protocols two runs share (NaNs skipped)."""
    differences = [
        abs(value - run_b["map"][row][protocol])
        for row, protocols in run_a["map"].items()
        if row in run_b["map"]
        for protocol, value in protocols.items()
    ]
    return max((d for d in differences if not math.isnan(d)), default=0.0)


def _cache_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns the results dict (see the module docstring)."""
    args = parse_args(argv)
    work = Path(args.work)
    _fresh_work_dir(work)  # every run starts cold
    name, standin = make_standin(args, work / "data")
    topk = f"[{args.topk}]"
    runs = {
        "shared_cold": ("shared", ["TEST.RERANK_TOPK", topk]),
        "shared_warm": ("shared", ["TEST.RERANK_TOPK", topk]),
    }
    for variant in args.variant:
        runs[_variant_label(variant)] = ("shared", ["TEST.RERANK_TOPK", topk, *variant])
    if args.global_run:
        runs["global"] = ("global", ["TEST.RERANK_TOPK", "[]"])
    if args.lazy:
        runs["lazy_cold"] = ("lazy", ["TEST.RERANK_TOPK", topk, "TEST.RERANK_SHARED_PASS", "False"])
    torch.manual_seed(0)
    model = build_model(_cfg(args, work / "data", name, work, [])).eval()
    results: dict = {"setup": vars(args), "standin": standin, "runs": {}}
    for label, (folder, opts) in runs.items():
        cfg = _cfg(args, work / "data", name, work / folder, opts)
        start = time.perf_counter()
        entry = evaluate(cfg, model.encoder, model)["datasets"][name]
        results["runs"][label] = {
            "total_s": time.perf_counter() - start,
            "seconds": entry["seconds"],
            "rerank_pairs": entry.get("rerank_pairs", 0),
            "cache_bytes": _cache_bytes(work / folder / "features"),
            "map": {row: {p: v["map"] for p, v in r.items()} for row, r in entry["rows"].items()},
        }
        print(label, results["runs"][label], flush=True)
    done = results["runs"]
    cold = done["shared_cold"]["seconds"]
    # absent when the shared pass did not apply (the evaluation logs why)
    results["shared_pass_used"] = "extract_db_rerank_pyramids" in cold
    results["rerank_cold_s"] = cold["rerank"] + cold.get("extract_db_rerank_pyramids", 0.0)
    results["rerank_warm_s"] = done["shared_warm"]["seconds"]["rerank"]
    results["variants"] = {
        label: {
            "rerank_s": done[label]["seconds"]["rerank"],
            "max_map_difference": _max_map_difference(done[label], done["shared_warm"]),
        }
        for label in map(_variant_label, args.variant)
    }
    if args.global_run:
        overhead = cold["extract_db"] - done["global"]["seconds"]["extract_db"]
        results["shared_pass_extraction_overhead_s"] = overhead
    if args.lazy:
        results["lazy_rerank_cold_s"] = done["lazy_cold"]["seconds"]["rerank"]
        # compared as JSON, where NaN (a protocol without positives) equals NaN
        lazy, shared = (json.dumps(done[k]["map"]) for k in ("lazy_cold", "shared_cold"))
        results["lazy_equals_shared"] = lazy == shared
    shutil.rmtree(work / "data", ignore_errors=True)
    return results
