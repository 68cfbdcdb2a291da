"""Database-side cache of compressed CVNet-Rerank pyramids, optionally quantized (supp. Tab. S3-S4).

Each database image's pyramid (one (C', h_i, w_i) map per scale and feature layer) is computed once
and stored. The correlation is a cosine, so only directions matter: every location is L2-normalised
before storage, and the integer codecs quantize each location symmetrically on its own grid (code =
round(v / max|v| * q_max)) and re-normalise on load, which needs no stored scale. int4 codes (-7..7)
are packed two per byte.

Storage is in memory, or on disk as one file per image (format: cvnet/cache_items.py) at
``<dir>/items/<index // 10000>/<index>.pyr`` next to ``<dir>/cache_meta.json``. Items are written
atomically by a background thread, so the caller's device work overlaps the disk writes; an item
still being written is served from memory. From a GPU the codes are copied into pinned host memory
without waiting for the device (the writer waits for the copy), so a put inside the global
extraction leaves the device's queue full.
The metadata (model fingerprint, C', scales, dtype, feature layer, dataset) is checked when the
cache is opened and inside every item, so an inconsistent or corrupt cache either raises
``CacheError`` or, with ``rebuild=True``, is discarded and recomputed; it is never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from yacs.config import CfgNode

from cvnet.cache_items import atomic_write_bytes, read_item, write_item
from cvnet.correlation import normalize_locations

logger = logging.getLogger(__name__)
META_FILE = "cache_meta.json"
ITEMS_DIR = "items"
# Items per sub-folder of ITEMS_DIR (keeps folders small for +R1M shortlists).
ITEMS_PER_FOLDER = 10000
# 1: items saved with torch.save; 2: cvnet/cache_items.py (an older cache is rebuilt or refused)
FORMAT_VERSION = 2
# Items queued for the writer thread before put() waits (bounds the codes held in memory).
WRITE_BEHIND = 32


class CacheError(RuntimeError):
    """A cache not matching the model/settings, or a corrupt item; the message says which."""


@dataclasses.dataclass(frozen=True, eq=False)
class HostCodes:
    """One pyramid's codes on the host, possibly still being copied from a GPU."""

    codes: list[torch.Tensor]
    copied: torch.cuda.Event | None  # recorded after the copies; None: already on the host

    @classmethod
    def copy_of(cls, codes: Sequence[torch.Tensor]) -> HostCodes:
        """Start copying ``codes`` to the host. From a GPU: into pinned memory, queued on the
        current stream behind the work that makes them, without waiting for it."""
        if not codes or codes[0].device.type != "cuda":
            return cls([c.cpu() for c in codes], None)
        host = [torch.empty(c.shape, dtype=c.dtype, pin_memory=True) for c in codes]
        for target, source in zip(host, codes):
            target.copy_(source, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(codes[0].device))
        return cls(host, copied)

    def ready(self) -> list[torch.Tensor]:
        """The codes, once the copies have finished (waits for them; any thread)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.codes


@dataclasses.dataclass(frozen=True)
class CacheMeta:
    """Everything that decides what a cached pyramid contains."""

    model_hash: str
    compress_dim: int
    scales: tuple[float, ...]
    dtype: str
    feature_names: tuple[str, ...]
    dataset: str = ""
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            **dataclasses.asdict(self),
            "scales": list(self.scales),
            "feature_names": list(self.feature_names),
        }

    def digest(self) -> str:
        """Short hash identifying these settings (stored inside every item)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _unit_vectors(level: torch.Tensor) -> torch.Tensor:
    """One level (1, C', h, w) or (C', h, w) -> (C', h, w) float32, every location L2-normalised."""
    if level.dim() == 4 and level.shape[0] != 1:
        raise ValueError(f"cache one image at a time: got a level of batch {level.shape[0]}")
    return normalize_locations(level.detach().float().reshape(1, *level.shape[-3:]))[0]


def _int_codes(x: torch.Tensor, q_max: int) -> torch.Tensor:
    """(C, h, w) unit vectors -> integer codes in [-q_max, q_max] on each location's own grid."""
    peak = x.abs().amax(dim=0, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    return torch.round(x / peak * q_max)


def _pack_int4(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w) unit vectors -> (ceil(C/2), h, w) uint8: channel 2c low, 2c+1 high nibble."""
    codes = (_int_codes(x, 7) + 8).to(torch.uint8)  # 1..15
    if codes.shape[0] % 2:
        codes = torch.cat([codes, torch.full_like(codes[:1], 8)])  # an extra zero channel (code 8)
    return codes[0::2] | (codes[1::2] << 4)


def _unpack_int4(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """(ceil(C/2), h, w) uint8 -> (C, h, w) float codes in [-7, 7]."""
    low, high = (packed & 0xF).float() - 8, (packed >> 4).float() - 8
    return torch.stack([low, high], dim=1).flatten(0, 1)[:channels]


# dtype -> (encode (C, h, w) unit vectors -> stored tensor, decode (stored, C) -> (C, h, w) float)
CODECS: dict[str, tuple[Callable, Callable]] = {
    "float32": (lambda x: x.float(), lambda t, c: t.float()),
    "float16": (lambda x: x.half(), lambda t, c: t.float()),
    "int8": (lambda x: _int_codes(x, 127).to(torch.int8), lambda t, c: t.float()),
    "int4": (_pack_int4, _unpack_int4),
}
# Stored bytes per value for the unpacked dtypes.
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1}


def bytes_per_location(compress_dim: int, dtype: str) -> int:
    """Stored bytes of one location's C'-vector."""
    if dtype == "int4":
        return (compress_dim + 1) // 2
    return compress_dim * BYTES_PER_VALUE[dtype]


def cached_bytes(level_sizes: Sequence[tuple[int, int]], compress_dim: int, dtype: str) -> int:
    """Payload bytes of one cached pyramid with the given level sizes."""
    return sum(h * w for h, w in level_sizes) * bytes_per_location(compress_dim, dtype)


def model_fingerprint(model: nn.Module) -> str:
    """sha1 of the weights that decide a pyramid: the encoder's backbone and the compress convs."""
    digest = hashlib.sha1()
    for prefix in ("encoder.backbone.", "compress."):
        for name, tensor in model.state_dict().items():
            if name.startswith(prefix):
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_meta_for(model: nn.Module, dtype: str, dataset: str = "") -> CacheMeta:
    """The CacheMeta of a CVNetRerank model's pyramids stored as ``dtype``."""
    return CacheMeta(
        model_fingerprint(model),
        model.compress_dim,
        model.scales,
        dtype,
        model.feature_names,
        dataset,
    )


class PyramidCache:
    """Quantized store of database pyramids by database index; in memory or one file per image."""

    def __init__(
        self, meta: CacheMeta, directory: str | os.PathLike | None = None, rebuild: bool = False
    ) -> None:
        if meta.dtype not in CODECS:
            raise ValueError(f"cache dtype {meta.dtype!r} unknown; allowed: {sorted(CODECS)}")
        self.meta = meta
        self._encode, self._decode = CODECS[meta.dtype]
        self._digest = meta.digest()
        self.directory = None if directory is None else Path(directory)
        self.rebuild = rebuild
        self._memory: dict[int, list[torch.Tensor]] = {}
        # directory mode: items queued for writing (served from here until written), oldest first
        self._pending: dict[int, HostCodes] = {}
        self._writes: deque[tuple[int, HostCodes, Future]] = deque()
        self._writer: ThreadPoolExecutor | None = None
        if self.directory is not None:
            self._open_directory()

    def _open_directory(self) -> None:
        """Check or create the metadata file; a mismatch raises (with rebuild: wipes the items)."""
        meta_path = self.directory / META_FILE
        stored = self._read_meta(meta_path)
        if stored == self.meta.to_dict():
            return
        if stored is not None or (self.directory / ITEMS_DIR).exists():
            problem = self._describe_mismatch(stored)
            if not self.rebuild:
                raise CacheError(
                    f"pyramid cache {str(self.directory)!r} {problem}; delete it or rebuild"
                )
            logger.warning("pyramid cache %s %s: rebuilding", self.directory, problem)
            shutil.rmtree(self.directory / ITEMS_DIR, ignore_errors=True)
        atomic_write_bytes(meta_path, json.dumps(self.meta.to_dict(), indent=1).encode())

    @staticmethod
    def _read_meta(path: Path) -> dict | None:
        """The stored metadata dict, None when absent, {} when unreadable."""
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _describe_mismatch(self, stored: dict | None) -> str:
        """Human-readable difference between the stored and the requested metadata."""
        if not stored:
            return f"has items but no readable {META_FILE}"
        wanted = self.meta.to_dict()
        diffs = [
            f"{k}: cached {stored.get(k)!r} vs wanted {v!r}"
            for k, v in wanted.items()
            if stored.get(k) != v
        ]
        return "was built with other settings (" + "; ".join(diffs) + ")"

    def _item_path(self, index: int) -> Path:
        return self.directory / ITEMS_DIR / f"{index // ITEMS_PER_FOLDER:04d}" / f"{index}.pyr"

    def __contains__(self, index: int) -> bool:
        if self.directory is None:
            return index in self._memory
        return index in self._pending or self._item_path(index).is_file()

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._memory)
        self.flush()
        return sum(1 for _ in (self.directory / ITEMS_DIR).glob("*/*.pyr"))

    def flush(self) -> None:
        """Wait until every queued item is on disk; a failed write raises here."""
        while self._writes:
            self._finish_oldest_write()

    def _finish_oldest_write(self) -> None:
        index, entry, write = self._writes.popleft()
        write.result()
        # the file exists before the entry goes, so a concurrent get() always finds one of them
        if self._pending.get(index) is entry:
            del self._pending[index]

    def put(self, index: int, levels: Sequence[torch.Tensor]) -> None:
        """Store the pyramid of one image: levels (1, C', h_i, w_i) (or (C', h_i, w_i))."""
        codes = [self._encode(_unit_vectors(x)) for x in levels]
        if self.directory is None:  # kept as long as the cache: pageable memory
            self._memory[index] = [c.cpu() for c in codes]
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="pyramid-write")
        entry = HostCodes.copy_of(codes)
        self._pending[index] = entry
        write = self._writer.submit(self._write_item, index, entry)
        self._writes.append((index, entry, write))
        while len(self._writes) > WRITE_BEHIND:
            self._finish_oldest_write()

    def _write_item(self, index: int, entry: HostCodes) -> None:
        """Write one item's file once its codes are on the host (writer thread)."""
        write_item(self._item_path(index), self._digest, self.meta.compress_dim, entry.ready())

    def get(self, index: int, device: torch.device | str = "cpu") -> list[torch.Tensor] | None:
        """The pyramid as float32 unit vectors (1, C', h_i, w_i) on ``device``; None if absent.

        For a GPU an item file is read into pinned memory, so its copy is asynchronous on the
        current stream (the decoding after it is queued on the same stream)."""
        to_gpu = torch.device(device).type == "cuda"
        if self.directory is None:
            codes = self._memory.get(index)
        else:  # an item still queued for writing is served from memory
            entry = self._pending.get(index)
            codes = entry.ready() if entry is not None else None
            if codes is None:
                codes = self._load_item(index, pin_memory=to_gpu)
        if codes is None:
            return None
        channels = self.meta.compress_dim
        return [
            normalize_locations(
                self._decode(c.to(device, non_blocking=to_gpu), channels).unsqueeze(0)
            )
            for c in codes
        ]

    def _load_item(self, index: int, pin_memory: bool = False) -> list[torch.Tensor] | None:
        """Read and check one item file; a bad one raises (or, with rebuild, is deleted: None)."""
        path = self._item_path(index)
        if not path.is_file():
            return None
        try:
            header, levels = read_item(path, pin_memory)
            problem = self._item_problem(header, levels)
        except ValueError as err:
            problem = f"is unreadable ({err})"
        if problem is None:
            return levels
        if not self.rebuild:
            raise CacheError(
                f"pyramid cache item {str(path)!r} {problem}; delete the cache or rebuild"
            )
        logger.warning("pyramid cache item %s %s: recomputing it", path, problem)
        path.unlink(missing_ok=True)
        return None

    def _item_problem(self, header: dict, levels: list[torch.Tensor]) -> str | None:
        """Why an item does not belong to this cache (None when it does)."""
        if header.get("digest") != self._digest:
            return "belongs to another cache configuration"
        expected = len(self.meta.scales) * len(self.meta.feature_names)
        if len(levels) != expected:
            return f"holds {len(levels)} levels, expected {expected}"
        return None


def build_pyramid_cache(
    cfg: CfgNode,
    model: nn.Module,
    directory: str | os.PathLike | None = None,
    dataset: str = "",
    rebuild: bool = False,
) -> PyramidCache:
    """Cache for ``model``'s pyramids stored as TEST.RERANK_CACHE_DTYPE."""
    return PyramidCache(
        cache_meta_for(model, cfg.TEST.RERANK_CACHE_DTYPE, dataset), directory, rebuild
    )
