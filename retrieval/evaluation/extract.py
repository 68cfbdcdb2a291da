"""Multi-scale global descriptors as the official test path, with a metadata-checked cache.

Per image: d_s = model(image at scale s) (already L2-normalised), descriptor = L2(mean_s L2(d_s))
(spec/cvnet.md §5). Features are saved as ``<stem>.npy`` + ``<stem>.json``; each file is written to
a temporary name and renamed, the JSON last, so a killed run leaves no file that looks finished. A
cached file is reused only when its stored ``key`` (model config hash, weights fingerprint, dataset,
split, image list, scales, crop, input format, min side, AMP) equals the requested one. Large sets
(R1M) are extracted in shards under ``<stem>.shards/``; a rerun skips finished shards. Under
torchrun each rank extracts a strided subset and every rank receives the gathered result.

Weights fingerprint (fast, documented): ``size:mtime_ns:sha1(first MiB + last MiB)`` of the
checkpoint file; a model without a weights file is fingerprinted by the sha1 of its state dict
instead.

A ``DenseTap`` hands backbone maps of one scale's pass to a second consumer, image by image (the
re-ranker's database pyramids, retrieval/evaluation/rerankers.py), so they need no second pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from retrieval.data.revisitop import collate_items
from retrieval.engine.distributed import (
    all_gather,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
)
from retrieval.precision import AMP_DTYPES

FINGERPRINT_BYTES = 1 << 20
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    """Extraction knobs (plain values; ``from_cfg`` reads the config)."""

    scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)
    input_format: str = "BGR"
    crop_mode: str = "truncate"
    min_side: int = 32
    amp: str = "off"
    channels_last: bool = False
    num_workers: int = 0
    skip_unreadable: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> ExtractSettings:
        """Settings from TEST.*, MODEL.INPUT_FORMAT and DATA.*."""
        if cfg.TEST.BATCH_SIZE != 1:
            logger.warning(
                "TEST.BATCH_SIZE=%s: extraction runs at batch 1 (official)", cfg.TEST.BATCH_SIZE
            )
        return cls(
            tuple(float(s) for s in cfg.TEST.SCALES),
            cfg.MODEL.INPUT_FORMAT,
            cfg.TEST.CROP,
            int(cfg.TEST.MIN_SIDE),
            cfg.TEST.AMP,
            bool(cfg.TEST.CHANNELS_LAST),
            int(cfg.DATA.NUM_WORKERS),
            bool(cfg.DATA.SKIP_UNREADABLE),
        )

    def key(self) -> dict:
        """The settings that change descriptors (part of the cache key)."""
        return {
            "scales": list(self.scales),
            "input_format": self.input_format,
            "crop": self.crop_mode,
            "min_side": self.min_side,
            "amp": self.amp,
        }


@dataclass
class Features:
    """Descriptors (N, D) float32, indices skipped as unreadable (zero rows) and upscaled."""

    features: np.ndarray
    skipped: list[int] = field(default_factory=list)
    upscaled: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class DenseTap:
    """Capture ``names`` from ``backbone`` in the forward at ``scales[scale_index]`` and pass them,
    as a list of (1, C, h, w) maps, to ``consume(dataset index, maps)`` after that forward."""

    backbone: nn.Module
    names: tuple[str, ...]
    scale_index: int
    consume: Callable[[int, list[torch.Tensor]], None]


@contextlib.contextmanager
def _tapping(tap: DenseTap | None, scale_index: int, index: int) -> Iterator[None]:
    """Run the enclosed forward with the tap's capture when it is the tapped scale."""
    if tap is None or scale_index != tap.scale_index:
        yield
        return
    with tap.backbone.capture(tap.names) as maps:
        yield
    tap.consume(index, [maps[name] for name in tap.names])


def file_fingerprint(path: str | os.PathLike) -> str:
    """Fast file fingerprint: size, mtime and sha1 of the first and last MiB."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        handle.seek(max(0, stat.st_size - FINGERPRINT_BYTES))
        digest.update(handle.read(FINGERPRINT_BYTES))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def state_fingerprint(model: nn.Module) -> str:
    """sha1 of every state-dict tensor (for models without a weights file, e.g. random init)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return "state:" + digest.hexdigest()


def config_hash(cfg) -> str:
    """sha1 of the MODEL section of the config (the part that defines the network)."""
    return hashlib.sha1(cfg.MODEL.dump().encode()).hexdigest()


def list_hash(paths: Sequence) -> str:
    """sha1 of an image list (names in order), so a changed list never reuses features."""
    return hashlib.sha1("\n".join(str(p) for p in paths).encode()).hexdigest()


def _autocast(device: torch.device, amp: str):
    """Autocast context for CUDA mixed precision; a no-op on CPU or when AMP is off."""
    dtype = AMP_DTYPES[amp]
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def multiscale_descriptor(
    model: nn.Module,
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    settings: ExtractSettings,
    tap: DenseTap | None = None,
    index: int = -1,
) -> torch.Tensor:
    """L2(mean_s L2(model(x_s))) over the per-scale (3, H_s, W_s) tensors -> (D,) float32.

    ``tap`` (with the image's dataset ``index``) receives the captured maps of its scale."""
    memory_format = (
        torch.channels_last if settings.channels_last and device.type == "cuda" else None
    )
    descriptors = []
    for scale_index, tensor in enumerate(tensors):
        batch = tensor.unsqueeze(0).to(device)  # (3, H, W) -> (1, 3, H, W)
        if memory_format is not None:
            batch = batch.contiguous(memory_format=memory_format)
        # the tap consumes after autocast has ended
        with _tapping(tap, scale_index, index), _autocast(device, settings.amp):
            out = model(batch)
        descriptors.append(nn.functional.normalize(out.float(), dim=1))  # (1, D)
    mean = torch.cat(descriptors).mean(dim=0)  # (S, D) -> (D,)
    return nn.functional.normalize(mean, dim=0)


def _extract_local(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    device: torch.device,
    settings: ExtractSettings,
    desc: str,
    tap: DenseTap | None = None,
) -> dict:
    """Descriptors of ``indices`` here: {'rows': {index: (D,)}, 'skipped', 'upscaled'}."""
    loader = DataLoader(
        Subset(dataset, list(indices)),
        batch_size=1,
        num_workers=settings.num_workers,
        collate_fn=collate_items,
    )
    rows, skipped, upscaled = {}, [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not is_main_process(), leave=False):
            for item in batch:
                if item.images is None:
                    skipped.append(item.index)
                    continue
                upscaled += [item.index] if item.upscaled else []
                descriptor = multiscale_descriptor(
                    model, item.images, device, settings, tap, item.index
                )
                rows[item.index] = descriptor.cpu().numpy()
    return {"rows": rows, "skipped": skipped, "upscaled": upscaled}


def extract_descriptors(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    settings: ExtractSettings,
    indices: Sequence[int] | None = None,
    desc: str = "extract",
    tap: DenseTap | None = None,
) -> Features:
    """Descriptors of ``indices`` (default all) in order; strided over ranks, gathered."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    model.eval()
    parts = all_gather(
        _extract_local(
            model, dataset, indices[get_rank() :: get_world_size()], device, settings, desc, tap
        )
    )
    rows = {i: row for part in parts for i, row in part["rows"].items()}
    if not rows:
        raise RuntimeError(f"{desc}: no image of {len(indices)} could be read")
    dim = next(iter(rows.values())).shape[0]
    features = np.stack([rows.get(i, np.zeros(dim, np.float32)) for i in indices]).astype(
        np.float32
    )
    skipped = sorted(i for part in parts for i in part["skipped"])
    return Features(features, skipped, sorted(i for part in parts for i in part["upscaled"]))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_features(stem: str | os.PathLike, result: Features, key: dict) -> None:
    """Write <stem>.npy then <stem>.json (metadata last: its presence marks a finished file)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "key": key,
        "count": int(result.features.shape[0]),
        "dim": int(result.features.shape[1]),
        "skipped": result.skipped,
        "upscaled": result.upscaled,
    }

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, result.features)

    _atomic_write(stem.with_suffix(".npy"), write_npy)
    _atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def load_features(stem: str | os.PathLike, key: dict) -> Features | None:
    """Saved features whose metadata key equals ``key`` (None when absent, stale or incomplete)."""
    stem = Path(stem)
    meta_path, npy_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if not (meta_path.is_file() and npy_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != json.loads(json.dumps(key)):
        return None
    features = np.load(npy_path)
    if features.shape != (meta["count"], meta["dim"]):
        return None
    return Features(features, meta["skipped"], meta["upscaled"])


def _cached(stem: Path, key: dict, reuse: bool, compute: Callable[[], Features]) -> Features:
    """Load ``stem`` when reusable, else compute it, save it on rank 0 and wait for every rank."""
    found = load_features(stem, key) if reuse else None
    if found is not None:
        return found
    result = compute()
    if is_main_process():
        save_features(stem, result, key)
    barrier()
    return result


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    settings: ExtractSettings,
    stem: str | os.PathLike,
    key: dict,
    reuse: bool = True,
    shard_size: int = 0,
    desc: str = "extract",
    tap: DenseTap | None = None,
) -> Features:
    """Cached descriptors of a dataset; shard_size > 0 extracts (and resumes) by shard. ``tap``
    sees only the images extracted now, none when the descriptors come from the cache."""
    stem, n = Path(stem), len(dataset)
    if shard_size <= 0 or n <= shard_size:
        return _cached(
            stem,
            key,
            reuse,
            lambda: extract_descriptors(model, dataset, device, settings, desc=desc, tap=tap),
        )

    def compute_shard(start: int) -> Features:
        indices = range(start, min(start + shard_size, n))
        return extract_descriptors(
            model, dataset, device, settings, indices, f"{desc} [{start}:{n}]", tap
        )

    def compute_all() -> Features:
        parts = [
            _cached(
                stem.with_name(f"{stem.name}.shards") / f"{start:09d}",
                {**key, "shard": [start, min(start + shard_size, n)]},
                reuse,
                lambda start=start: compute_shard(start),
            )
            for start in tqdm(
                range(0, n, shard_size), desc=f"{desc} shards", disable=not is_main_process()
            )
        ]
        # skipped/upscaled already hold dataset indices (items carry their own index)
        return Features(
            np.concatenate([p.features for p in parts]),
            [i for p in parts for i in p.skipped],
            [i for p in parts for i in p.upscaled],
        )

    return _cached(stem, key, reuse, compute_all)
