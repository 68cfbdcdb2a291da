"""CVNet-Rerank as a re-ranker of the evaluation engine (``retrieval.evaluation.rerank.Reranker``).

The official test loop recomputes the database backbone and both pyramids for every (query, item)
pair at batch 1 (spec/cvnet.md §5). Here the query pyramid is computed once per query, database
pyramids come from a ``PyramidCache`` (computed on first use, or pre-computed for the union of all
shortlists, e.g. for +R1M), and the shortlist is scored in batches of database images of one
(padded) 4D CNN grid (cvnet/padding.py); the correlation goes straight into the first 4D conv
(``cvnet/correlation_conv.py``), so no full correlation volume is built. Worker threads read the
cached pyramids of a shortlist ahead of the scoring, so disk reads and host-to-device copies overlap
the device work; on CUDA they copy on a side stream of their own, so a read never waits for the
scoring kernels queued before it.
Pyramids are always computed in fp32 (their storage precision is the cache dtype); ``amp_dtype``
applies to the scoring (correlation + 4D CNN) only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from cvnet.cache import PyramidCache
from cvnet.rerank_model import CVNetRerank, match_probability

# Full-volume equivalents alive while scoring one item: the fused first layer holds two half-volume
# buffers at block1's stride 2 (a branch input and its channels-last copy), two full ones at
# stride 1 (f4); measured peak (R50, 500x400 vs 1024x768, batch 8, CPU): 585 MiB, against 1484 MiB
# for the materialised volume.
CORRELATION_COPIES = 2
# Bound (MiB) on the correlation volumes scored at once: the default, and the CPU's when automatic.
CPU_MEMORY_MB = 4096
# Cached database pyramids read ahead of the scoring (each about 11 MB in fp32 for 1024x768).
READ_AHEAD = 16
# Reader threads. On CUDA a read is host work plus a copy and decode: 2.0-2.3 ms in all for a
# 1024x768 fp16 item on an H100 host when items were read with torch.load (0.9-1.1 ms of it; now
# cvnet/cache_items.py, not yet timed there), against about 1.1 ms of scoring per pair in batches of
# 8: one thread could not keep up. On the CPU one thread leaves the cores to the scoring.
READ_THREADS = {"cuda": 4, "cpu": 1}


def _hand_over(tensors: list[torch.Tensor], made: torch.cuda.Event, device: torch.device) -> None:
    """Make CUDA tensors written on another stream (up to the event ``made``) safe to use on the
    current stream of ``device``: it waits for ``made``, and their memory is not reused before it
    has read them."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(made)
    for tensor in tensors:
        tensor.record_stream(stream)


def shortlist_union(shortlists: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted unique database ids over all shortlists (the only items whose pyramids are needed)."""
    arrays = [np.asarray(ids, dtype=np.int64).ravel() for ids in shortlists]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)


def _level_sizes(levels: list[torch.Tensor]) -> tuple:
    """The (h_i, w_i) of every level of a pyramid."""
    return tuple(tuple(level.shape[-2:]) for level in levels)


def _sizes_adjacent(
    group: list[tuple[int, list[torch.Tensor]]],
) -> list[tuple[int, list[torch.Tensor]]]:
    """(position, pyramid) items reordered so pyramids of equal size are adjacent."""
    return sorted(group, key=lambda item: _level_sizes(item[1]))


def memory_budget_mb(requested: int, device: torch.device | str) -> int:
    """``requested`` MiB for the correlation volumes scored at once; 0 = automatic: half the GPU's
    free memory on CUDA (a fixed 4 GB, shared by four streams, cut a ROxf evaluation's batches to
    2.5 items on average where 4.7 fit), CPU_MEMORY_MB on the CPU."""
    if requested:
        return requested
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_MEMORY_MB
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(1, free_bytes // 2 // 2**20)


class CVNetReranker:
    """score(query_index, db_indices) -> match probabilities with cached database pyramids.

    ``load_query(i)`` / ``load_db(j)`` return normalised (1, 3, H, W) tensors (query: cropped, scale
    1.0; database: full image). ``memory_mb`` bounds the correlation volumes of the batches in
    flight. ``streams`` > 1 scores that many batches at once, each from its own host thread (on
    CUDA on its own stream). It pays on CUDA: every new (query size, database size, batch) shape
    makes cuDNN build an execution plan for each of the 4D CNN's 18 convs on the host (about 1.3 ms
    each), and each ROxf query brings a new size, so one thread leaves the GPU waiting for the host
    (H100, 12 ROxf-sized queries x 100 pairs: 6.6 ms a pair from one thread, 3.7 from four). The
    scoring threads live as long as the reranker: PyTorch keeps cuDNN's plans per thread, so a
    thread started for one query would plan every shape again for the next call. ``pad_multiple``
    > 1 rounds the 4D CNN's grids up to a multiple of that many cells, masked (cvnet/padding.py):
    database images of nearby sizes share batches, and queries of nearby sizes share shapes, so
    cuDNN plans fewer of them, for a little more work per pair. On an H100 it paid from one thread
    and lost with four, measured under a memory budget that cut padded batches most
    (docs/benchmarks).
    """

    def __init__(
        self,
        model: CVNetRerank,
        load_query: Callable[[int], torch.Tensor],
        load_db: Callable[[int], torch.Tensor],
        cache: PyramidCache,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        amp_dtype: torch.dtype | None = None,
        memory_mb: int = CPU_MEMORY_MB,
        streams: int = 1,
        pad_multiple: int = 1,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        self.model = model.eval()
        self.load_query, self.load_db = load_query, load_db
        self.cache = cache
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.memory_bytes = memory_mb * 2**20
        self._streams = streams
        self.pad_multiple = pad_multiple
        self._scoring_threads = (
            ThreadPoolExecutor(streams, thread_name_prefix="rerank-score") if streams > 1 else None
        )
        self._query: tuple[int, list[torch.Tensor]] | None = None
        # cached pyramids are copied to the GPU on this stream, beside the scoring's
        self._read_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def streams(self) -> int:
        """Batches scored at once (fixed: the scoring threads are made with the reranker)."""
        return self._streams

    def _scoring_precision(self) -> contextlib.AbstractContextManager:
        """Autocast for the scoring when an AMP dtype is set."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def pyramid(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(1, 3, H, W) normalised image -> compressed pyramid levels (1, C', h_i, w_i), fp32."""
        return self.model.build_pyramid(self.model.extract_dense(img.to(self.device)))

    def query_pyramid(self, query_index: int) -> list[torch.Tensor]:
        """The query's pyramid, computed once and kept while the same query is scored."""
        if self._query is None or self._query[0] != query_index:
            self._query = (query_index, self.pyramid(self.load_query(query_index)))
        return self._query[1]

    def db_pyramid(self, index: int) -> list[torch.Tensor]:
        """A database pyramid from the cache (computed and stored on first use), as decoded."""
        levels = self.cache.get(index, self.device)
        if levels is None:
            self.cache.put(index, self.pyramid(self.load_db(index)))
            levels = self.cache.get(index, self.device)
        return levels

    def precompute(self, db_indices: Iterable[int]) -> int:
        """Cache the pyramids of the given ids not cached yet; returns how many were computed."""
        missing = [int(i) for i in db_indices if int(i) not in self.cache]
        for index in tqdm(missing, desc="rerank pyramids", leave=False):
            self.cache.put(index, self.pyramid(self.load_db(index)))
        self.cache.flush()
        return len(missing)

    def _chunk_size(self, q_grid: tuple[int, int], k_grid: tuple[int, int]) -> int:
        """Batch size whose correlation volumes, for every stream, fit in ``memory_mb``, for
        padded first-layer grids (the full-scale volume holds stride^4 cells per grid cell)."""
        stride = self.model.cv_learner.first_convs[0].stride
        cells = q_grid[0] * q_grid[1] * k_grid[0] * k_grid[1] * stride**4
        per_item = len(self.model.pairs) * cells * 4
        budget = self.memory_bytes // self._streams
        return max(1, min(self.batch_size, budget // (CORRELATION_COPIES * per_item)))

    @torch.inference_mode()
    def _score_batch(
        self, q_levels: list[torch.Tensor], batch: list[list[torch.Tensor]]
    ) -> torch.Tensor:
        """Score one query against database pyramids of one padded grid, equal sizes adjacent ->
        (B,) fp32."""
        groups = []  # per run of equal sizes: levels (B_g, C', h_i, w_i)
        for _, run in itertools.groupby(batch, key=_level_sizes):
            groups.append([torch.cat(level) for level in zip(*run)])
        with self._scoring_precision():
            logits = self.model.grouped_logits(q_levels, groups, self.pad_multiple)
        return match_probability(logits)

    def _score_on_stream(
        self,
        q_levels: list[torch.Tensor],
        batch: list[list[torch.Tensor]],
        inputs_ready: torch.cuda.Event | None,
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``_score_batch`` from a scoring thread, on CUDA on a pooled stream that first waits for
        ``inputs_ready`` -> (scores, event recorded after them or None)."""
        if inputs_ready is None:
            return self._score_batch(q_levels, batch), None
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            _hand_over(
                [*q_levels, *(level for levels in batch for level in levels)],
                inputs_ready,
                self.device,
            )
            scores = self._score_batch(q_levels, batch)
            done = torch.cuda.Event()
            done.record(stream)
        return scores, done

    def score(self, query_index: int, db_indices: np.ndarray) -> np.ndarray:
        """Match probabilities (len(db_indices),) of the query vs database ids (higher = better).

        Database pyramids are grouped by padded grid and scored as soon as a group fills a batch,
        so at most about (number of distinct grids x batch) pyramids are held at once. The scores
        stay on the device until the whole shortlist is queued: one synchronisation per query, so
        the host assembles the next batch while the device computes the last.
        """
        q_levels = self.query_pyramid(query_index)
        ids = np.asarray(db_indices, dtype=np.int64).reshape(-1)
        positions: list[int] = []
        results: list = []  # per batch: (B,) scores on the device, or a scoring thread's future
        try:
            for group in self._batches(q_levels, ids):
                positions.extend(position for position, _ in group)
                results.append(self._submit(q_levels, [levels for _, levels in group]))
            batch_scores = [self._joined(result) for result in results]
        finally:  # after an error too, no scoring thread still reads this query's tensors
            futures.wait([result for result in results if isinstance(result, futures.Future)])
        self.cache.flush()  # pyramids computed here are on disk (or their write error raised)
        scores = np.zeros(ids.size, dtype=np.float32)
        if batch_scores:
            scores[positions] = torch.cat(batch_scores).cpu().numpy()
        return scores

    def _batches(
        self, q_levels: list[torch.Tensor], ids: np.ndarray
    ) -> Iterator[list[tuple[int, list[torch.Tensor]]]]:
        """(shortlist position, database pyramid) groups of one padded grid, equal sizes adjacent,
        each as soon as it fills a batch, then the partial ones."""
        pending: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = defaultdict(list)
        q_grid = self.model.padded_grid(q_levels, self.pad_multiple)
        cached = self._read_ahead(ids.tolist())
        for position, (index, levels) in enumerate(zip(ids.tolist(), cached)):
            levels = levels if levels is not None else self.db_pyramid(index)
            grid = self.model.padded_grid(levels, self.pad_multiple)
            pending[grid].append((position, levels))
            if len(pending[grid]) >= self._chunk_size(q_grid, grid):
                yield _sizes_adjacent(pending.pop(grid))
        yield from map(_sizes_adjacent, pending.values())

    def _submit(
        self, q_levels: list[torch.Tensor], batch: list[list[torch.Tensor]]
    ) -> torch.Tensor | futures.Future:
        """Score a batch on this thread, or hand it to a scoring thread (its future)."""
        if self._scoring_threads is None:
            return self._score_batch(q_levels, batch)
        ready = None  # on CUDA, the scoring stream starts after what this stream queued for it
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._scoring_threads.submit(self._score_on_stream, q_levels, batch, ready)

    def _joined(self, result: torch.Tensor | futures.Future) -> torch.Tensor:
        """A batch's scores, safe to use on the current stream."""
        if not isinstance(result, futures.Future):
            return result
        scores, done = result.result()
        if done is not None:
            _hand_over([scores], done, self.device)
        return scores

    def _read_ahead(self, ids: list[int]) -> Iterator[list[torch.Tensor] | None]:
        """The cached pyramids of ``ids`` in order (None where not cached), read on worker threads
        up to READ_AHEAD items ahead of the caller, ready for use on the caller's stream."""
        threads = READ_THREADS.get(self.device.type, 1)
        with ThreadPoolExecutor(threads, thread_name_prefix="pyramid-read") as pool:
            reads = deque(pool.submit(self._read, i) for i in ids[:READ_AHEAD])
            for index in ids[READ_AHEAD:]:
                yield self._ready(*reads.popleft().result())
                reads.append(pool.submit(self._read, index))
            while reads:
                yield self._ready(*reads.popleft().result())

    def _read(self, index: int) -> tuple[list[torch.Tensor] | None, torch.cuda.Event | None]:
        """(cached pyramid or None, CUDA event of its copy on the read stream or None)."""
        if self._read_stream is None:
            return self.cache.get(index, self.device), None
        with torch.cuda.stream(self._read_stream):
            levels = self.cache.get(index, self.device)
            copied = torch.cuda.Event()
            copied.record()
        return levels, copied

    def _ready(
        self, levels: list[torch.Tensor] | None, copied: torch.cuda.Event | None
    ) -> list[torch.Tensor] | None:
        """A read pyramid, safe to use on the current stream."""
        if copied is not None:
            _hand_over(levels or [], copied, self.device)
        return levels
