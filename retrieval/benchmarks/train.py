"""Training-step benchmark: images/s and peak memory of R50 CVNet-Global and SENet, fp32 vs AMP.

One case = one architecture x precision, measured in its own subprocess (a clean memory high-water
mark). A step is the real training step: GlobalTrainModule forward (query model + key encoder +
CurricularFace + momentum contrastive loss), backward, SGD step and momentum update, on random
images. Time: wall clock per step and, robust to other processes' load, this process's CPU time
per step (time.process_time; on CPU it sums the busy time of all torch threads). Memory:
  * CUDA: torch.cuda.max_memory_allocated over the timed steps (caching-allocator tensor memory);
  * CPU: the process peak RSS (getrusage ru_maxrss) after the steps minus the peak RSS before the
    first step: how far training raised the high-water mark above the built model + optimiser. An
    upper bound of activation memory that includes allocator caching, not a tensor-level count.
The SSM's share compares SENet with the same network whose SSM is replaced by an identity.
Usage: ``python -m retrieval.benchmarks.train [--device cpu] [--batch 2] [--size 512]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from retrieval.config import load_cfg
from retrieval.engine.distributed import resolve_device
from retrieval.engine.global_task import build_global_train_module
from retrieval.modeling.memory_format import to_channels_last
from retrieval.modeling.registry import build_model
from retrieval.precision import AMP_DTYPES

# (label, MODEL.ARCH, SSM replaced by identity)
CASES = (
    ("cvnet_global", "cvnet_global", False),
    ("senet", "senet", False),
    ("senet_no_ssm", "senet", True),
)


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="training-step throughput and memory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument(
        "--amp", default="off,bf16", help="comma-separated precisions: off, bf16, fp16"
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--case", default="", help=argparse.SUPPRESS
    )  # internal: run one case, print JSON
    return parser


def _build(args: argparse.Namespace, arch: str, no_ssm: bool, device: torch.device) -> nn.Module:
    """The training module of ``arch`` (random weights) on ``device``."""
    cfg = load_cfg(
        None,
        ["MODEL.ARCH", arch, "MODEL.DEPTH", str(args.depth), "LOSS.QUEUE_SIZE", str(args.queue)],
    )
    model = build_model(cfg)
    if no_ssm:
        model.ssm = nn.Identity()  # sum fusion keeps the shape, so the rest of SENet is unchanged
    module = build_global_train_module(cfg, model, args.num_classes)
    module = module.to(device).train()
    return to_channels_last(module) if args.channels_last else module


def _step(
    module: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, amp: str, scaler
) -> None:
    """One training step as in the trainer (autocast, scaled backward, SGD, momentum update)."""
    optimizer.zero_grad(set_to_none=True)
    device_type = batch["image"].device.type
    with torch.autocast(device_type, dtype=AMP_DTYPES[amp], enabled=amp != "off"):
        total = sum(module(batch).values())
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    module.momentum_step(0.999)


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timing is meaningful."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA allocator peak, or the process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_case(args: argparse.Namespace, label: str, amp: str) -> dict:
    """Time ``args.steps`` steps after ``args.warmup`` of one case: throughput and memory."""
    arch, no_ssm = {c[0]: c[1:] for c in CASES}[label]
    device = resolve_device(args.device)
    torch.manual_seed(0)
    module = _build(args, arch, no_ssm, device)
    optimizer = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    batch = {"image": images, "label": torch.arange(args.batch, device=device) % args.num_classes}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_mb(device)
    for _ in range(args.warmup):
        _step(module, optimizer, batch, amp, scaler)
    _sync(device)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        _step(module, optimizer, batch, amp, scaler)
    _sync(device)
    seconds = (time.perf_counter() - tic) / args.steps
    cpu_seconds = (time.process_time() - cpu_tic) / args.steps  # robust to other processes' load
    peak = _peak_mb(device)
    memory = peak if device.type == "cuda" else peak - before
    return {
        "case": label,
        "amp": amp,
        "device": str(device),
        "step_s": seconds,
        "step_cpu_s": cpu_seconds,
        "images_per_s": args.batch / seconds,
        "peak_mem_mb": memory,
    }


def _run_isolated(argv: list[str], label: str, amp: str) -> dict:
    """measure_case in a fresh interpreter (its own memory high-water mark)."""
    command = [
        sys.executable,
        "-m",
        "retrieval.benchmarks.train",
        *argv,
        "--case",
        f"{label}:{amp}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": label, "amp": amp, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ssm_share(results: list[dict]) -> dict[str, dict]:
    """Per precision: the fraction of SENet step time and memory due to the SSM."""
    by_key = {(r["case"], r["amp"]): r for r in results if "error" not in r}
    shares = {}
    for (case, amp), full in by_key.items():
        base = by_key.get(("senet_no_ssm", amp))
        if case == "senet" and base is not None:
            shares[amp] = {
                "time": 1.0 - base["step_s"] / full["step_s"],
                "cpu_time": 1.0 - base["step_cpu_s"] / full["step_cpu_s"],
                "memory": 1.0 - base["peak_mem_mb"] / full["peak_mem_mb"],
            }
    return shares


def _supported(amp: str, device: torch.device) -> bool:
    """fp16 autocast is only measured on CUDA; bf16 where the device has it."""
    if amp == "fp16":
        return device.type == "cuda"
    return amp != "bf16" or device.type == "cpu" or torch.cuda.is_bf16_supported()


def run(argv: list[str] | None = None) -> dict:
    """Benchmark every case x precision; returns {'settings', 'results', 'ssm_share'}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.case:
        label, amp = args.case.split(":")
        return measure_case(args, label, amp)
    device = resolve_device(args.device)
    precisions = [a for a in args.amp.split(",") if _supported(a, device)]
    results = [_run_isolated(argv, label, amp) for amp in precisions for label, *_ in CASES]
    settings = {k: v for k, v in vars(args).items() if k != "case"}
    return {"settings": settings, "results": results, "ssm_share": ssm_share(results)}


if __name__ == "__main__":
    print(json.dumps(run()))
