"""The generic training loop: ``train(cfg, task)``.

A task (TrainTask) supplies ``module`` whose forward(batch) returns a dict of losses (detectron2
style: the entries named ``loss*`` are summed; the others are only logged), the dataset and hooks.
The trainer adds everything else: torchrun DDP (env variables; nccl on CUDA, gloo on CPU), SyncBN /
frozen BN, AMP (autocast; GradScaler only for fp16), channels_last, gradient accumulation
(TRAIN.BATCH_SIZE is the batch of one optimiser step, split over ranks and TRAIN.ACCUM_STEPS
micro-batches), clipping, seeds, logging, atomic checkpoints with the full state (module incl. loss
buffers and key encoder, optimiser, scheduler, scaler, position, RNG, config) and automatic resume
that continues the same sample order mid-epoch. DDP uses broadcast_buffers=False: buffers such as a
73728-entry key queue must not be broadcast every step (the queue is identical on every rank anyway;
BN statistics stay per rank unless TRAIN.SYNC_BN).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from yacs.config import CfgNode

from retrieval.checkpoint import load_checkpoint, load_state_strict
from retrieval.config import cfg_from_dump, save_cfg
from retrieval.data.samplers import TrainSampler
from retrieval.engine import distributed as du
from retrieval.engine.logger import MetricLogger, setup_logging
from retrieval.engine.optim import build_optimizer, build_scheduler, clip_gradients
from retrieval.engine.resume import (
    checkpoint_name,
    last_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    warn_order_changes,
    write_checkpoint,
)
from retrieval.engine.task import TrainTask, set_train_mode, to_device
from retrieval.modeling.memory_format import to_channels_last
from retrieval.precision import AMP_DTYPES, resolve_amp

logger = logging.getLogger(__name__)


class Trainer:
    """State and steps of one training run; ``run()`` trains from the resume point."""

    def __init__(self, cfg: CfgNode, task: TrainTask) -> None:
        self.cfg, self.task, self.accum = cfg, task, cfg.TRAIN.ACCUM_STEPS
        self.device = du.resolve_device(cfg.DEVICE)
        du.init_distributed(self.device)
        self.rank, self.world = du.get_rank(), du.get_world_size()
        setup_logging(du.is_main_process())
        seed_everything(cfg.SEED + self.rank, cfg.DETERMINISTIC)
        self.out = Path(cfg.OUTPUT_DIR)
        self.module, self.ddp = self._wrap(task.module)
        self.sampler, self.loader = self._build_loader()
        self.iters_per_epoch = self.sampler.batches_per_epoch // self.accum
        self.optimizer = build_optimizer(cfg, self.module)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.iters_per_epoch)
        amp = resolve_amp(cfg.TRAIN.AMP, self.device)
        if cfg.TRAIN.AMP == "auto":
            logger.info("TRAIN.AMP auto -> %s on %s", amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.amp_dtype = AMP_DTYPES[amp]
        self.epoch = self.epoch_iter = self.iteration = self.unreadable = 0
        self.checkpoint_path: Path | None = None
        self.metrics = MetricLogger(self.out, du.is_main_process())

    def _wrap(self, module: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(module on the device, the module to call: DDP-wrapped when distributed)."""
        if self.cfg.TRAIN.SYNC_BN and self.world > 1:
            if self.device.type != "cuda":
                raise ValueError(
                    "TRAIN.SYNC_BN needs CUDA (SyncBatchNorm has no CPU kernel); "
                    "use TRAIN.FREEZE_BN"
                )
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module = module.to(self.device)
        if self.cfg.TRAIN.CHANNELS_LAST:
            to_channels_last(module)
        if self.world == 1:
            return module, module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return module, nn.parallel.DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False
        )

    def _build_loader(self) -> tuple[TrainSampler, DataLoader]:
        """Sharded resumable sampler over micro-batches and its DataLoader."""
        cfg, labels = self.cfg, self.task.sample_labels
        if cfg.TRAIN.BATCH_SIZE % (self.accum * self.world):
            raise ValueError(
                f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} is not divisible by "
                f"TRAIN.ACCUM_STEPS={self.accum} "
                f"x world size {self.world}"
            )
        labels = labels if labels is not None else [0] * len(self.task.dataset)
        sampler = TrainSampler(
            labels,
            cfg.TRAIN.BATCH_SIZE // self.accum,
            self.world,
            self.rank,
            cfg.SEED,
            cfg.TRAIN.SAMPLES_PER_CLASS,
        )
        loader = DataLoader(
            self.task.dataset,
            batch_size=sampler.local_batch,
            sampler=sampler,
            num_workers=cfg.DATA.NUM_WORKERS,
            collate_fn=self.task.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        return sampler, loader

    def run(self) -> dict:
        """Train (resuming when TRAIN.AUTO_RESUME finds a checkpoint); the last logged metrics."""
        if du.is_main_process():
            save_cfg(self.cfg, self.out / "config.yaml")
            self.task.save_info(self.out)
        self.resume()
        last: dict = {}
        while self.epoch < self.cfg.TRAIN.EPOCHS and not self._stop():
            last = self.train_epoch() or last
            self._maybe_evaluate()
        if self.checkpoint_path is None or self.checkpoint_path.name != checkpoint_name(
            self.iteration
        ):
            self.save()
        if du.is_main_process():
            self.task.export(self.out / "model_final.pth")
        self.metrics.close()
        return last

    def _stop(self) -> bool:
        """TRAIN.MAX_ITERS reached."""
        return 0 < self.cfg.TRAIN.MAX_ITERS <= self.iteration

    def train_epoch(self) -> dict:
        """Iterate the rest of the epoch (or up to TRAIN.MAX_ITERS); the last logged metrics."""
        self.sampler.set_epoch(self.epoch, self.epoch_iter * self.accum)
        self.task.before_epoch(self.epoch)
        set_train_mode(self.module, self.cfg.TRAIN.FREEZE_BN)
        self.unreadable = self.unreadable if self.epoch_iter else 0  # counted per epoch
        batches, last = iter(self.loader), {}
        bar = tqdm(
            range(self.epoch_iter, self.iters_per_epoch),
            desc=f"epoch {self.epoch}",
            disable=not du.is_main_process(),
            leave=False,
        )
        for _ in bar:
            tic = time.perf_counter()
            losses = self.train_step([next(batches) for _ in range(self.accum)])
            self.iteration, self.epoch_iter = self.iteration + 1, self.epoch_iter + 1
            last = self._after_iteration(losses, time.perf_counter() - tic) or last
            if self._stop():
                break
        if self.epoch_iter == self.iters_per_epoch:
            self.epoch, self.epoch_iter = self.epoch + 1, 0
            self.save()
        return last

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over ACCUM_STEPS micro-batches; the mean of every loss entry."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for j, batch in enumerate(micro_batches):
            self.unreadable += int(torch.as_tensor(batch.pop("unreadable", 0)).sum())
            last = j == len(micro_batches) - 1
            sync = (
                self.ddp.no_sync()
                if self.ddp is not self.module and not last
                else contextlib.nullcontext()
            )
            with sync:
                total, losses = self._forward(batch)
                self.scaler.scale(total / len(micro_batches)).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.module.parameters(), self.cfg.TRAIN.CLIP_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.task.after_step()
        return {**sums, **({"grad_norm": float(norm)} if norm is not None else {})}

    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward under autocast -> (sum of the loss* entries, all entries); stops on NaN/inf."""
        batch = to_device(batch, self.device, self.cfg.TRAIN.CHANNELS_LAST)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            losses = self.ddp(batch)
        losses = {name: value.float() for name, value in losses.items()}
        total = sum(value for name, value in losses.items() if name.startswith("loss"))
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iteration + 1} (epoch {self.epoch}): "
                f"{ {k: float(v.detach()) for k, v in losses.items()} }; "
                f"last checkpoint: {self.checkpoint_path or 'none'}"
            )
        return total, {"total_loss": total.detach(), **{k: v.detach() for k, v in losses.items()}}

    def _after_iteration(self, losses: dict[str, float], seconds: float) -> dict:
        """Unreadable-image check, periodic logging and checkpoints; the logged metrics if any."""
        self._check_unreadable()
        logged = {}
        if self.iteration % self.cfg.TRAIN.LOG_PERIOD == 0 or self._stop():
            logged = du.all_reduce_mean(losses)
            logged.update(
                lr=self.optimizer.param_groups[0]["lr"],
                epoch=self.epoch,
                images_per_s=self.cfg.TRAIN.BATCH_SIZE / seconds,
                unreadable=self.unreadable,
            )
            self.metrics.log(self.iteration, logged)
            logger.info(
                "iter %d: %s", self.iteration, ", ".join(f"{k}={v:.4g}" for k, v in logged.items())
            )
        if (
            self.iteration % self.cfg.TRAIN.CHECKPOINT_PERIOD == 0
            and self.epoch_iter < self.iters_per_epoch
        ):
            self.save()
        return logged

    def _check_unreadable(self) -> None:
        """Stop when this rank skipped over DATA.MAX_UNREADABLE_FRACTION of its share this epoch."""
        limit = self.cfg.DATA.MAX_UNREADABLE_FRACTION * len(self.task.dataset) / self.world
        if self.unreadable > limit:
            raise RuntimeError(
                f"{self.unreadable} unreadable training images skipped on rank {self.rank}, more "
                f"than DATA.MAX_UNREADABLE_FRACTION={self.cfg.DATA.MAX_UNREADABLE_FRACTION} of "
                f"{len(self.task.dataset)}"
                f" images (see the warnings above for their paths)"
            )

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (collective: every rank gives its RNG state)."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "epoch_iter": self.epoch_iter,
            "iteration": self.iteration,
            "sampler": {
                "epoch": self.epoch,
                "start_batch": self.epoch_iter * self.accum,
                "seed": self.cfg.SEED,
            },
            "unreadable": self.unreadable,
            "rng": du.all_gather(rng_state()),
            "world_size": self.world,
            "task": self.task.extra_state(),
            "config": self.cfg.dump(),
        }

    def save(self) -> None:
        """Write a checkpoint (main process) and remember its path on every rank."""
        state = self.state_dict()
        if du.is_main_process():
            write_checkpoint(state, self.out, self.iteration, self.cfg.TRAIN.CHECKPOINT_KEEP)
        self.checkpoint_path = self.out / checkpoint_name(self.iteration)
        du.barrier()

    def resume(self) -> None:
        """Load the checkpoint named by OUTPUT_DIR/last_checkpoint when TRAIN.AUTO_RESUME."""
        path = last_checkpoint(self.out) if self.cfg.TRAIN.AUTO_RESUME else None
        if path is None:
            return
        ckpt = load_checkpoint(path)
        load_state_strict(self.module, ckpt["module"], f"checkpoint {str(path)!r}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        warn_order_changes(cfg_from_dump(ckpt["config"]), self.cfg, path)
        self.epoch, self.epoch_iter, self.iteration = (
            ckpt["epoch"],
            ckpt["epoch_iter"],
            ckpt["iteration"],
        )
        self.unreadable, self.checkpoint_path = ckpt["unreadable"], path
        if len(ckpt["rng"]) == self.world:
            set_rng_state(ckpt["rng"][self.rank])
        logger.info("resumed from %s at iteration %d (epoch %d)", path, self.iteration, self.epoch)

    def _maybe_evaluate(self) -> None:
        """Task evaluation every TRAIN.EVAL_PERIOD epochs and after the last (main process)."""
        period = self.cfg.TRAIN.EVAL_PERIOD
        if period <= 0 or self.epoch_iter != 0:
            return
        if self.epoch % period and self.epoch < self.cfg.TRAIN.EPOCHS:
            return
        if du.is_main_process():
            results = self.task.evaluate(self.cfg, self.out / "eval" / f"epoch_{self.epoch}")
            self.metrics.log(self.iteration, {f"eval/{k}": v for k, v in results.items()})
        du.barrier()


def train(cfg: CfgNode, task: TrainTask) -> dict:
    """Train ``task`` with the recipe of ``cfg``; returns the last logged metrics."""
    return Trainer(cfg, task).run()
