"""Training engine on tiny GLDv2 data: updates, key encoder, queue, schedule, resume, errors."""

from __future__ import annotations

import math

import pytest
import torch
from gldv2_fixtures import one_thread, tiny_cfg, write_gldv2

from retrieval.checkpoint import load_checkpoint, load_model_weights
from retrieval.config import cfg_from_dump, load_cfg
from retrieval.data.gldv2 import image_path
from retrieval.engine.global_task import GlobalTask
from retrieval.engine.logger import read_metrics
from retrieval.engine.optim import build_optimizer, build_scheduler, param_groups
from retrieval.engine.resume import last_checkpoint, seed_everything
from retrieval.engine.trainer import Trainer, TrainTask
from retrieval.modeling.registry import build_model

LANDMARKS = [3, 11, 7, 20]
pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture
def data_root(tmp_path):
    """4 classes x 3 images (12 images: 3 global batches of 4 per epoch)."""
    root = tmp_path / "data"
    write_gldv2(root, LANDMARKS, per_class=3)
    return root


def _trainer(cfg) -> Trainer:
    """Seeded task + trainer, as tools/train.py builds them."""
    seed_everything(cfg.SEED, False)
    return Trainer(cfg, GlobalTask(cfg))


def _losses(output_dir) -> dict[int, float]:
    """iteration -> total loss from metrics.jsonl (the last record wins after a resume)."""
    return {r["iteration"]: r["total_loss"] for r in read_metrics(output_dir / "metrics.jsonl")}


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (
            "cosine",
            {0: 0.1, 5: 0.55, 10: 1.0, 20: 0.5, 25: 0.5 * (1 + math.cos(math.pi * 0.75)), 30: 0.0},
        ),
        ("step", {0: 0.1, 10: 1.0, 19: 1.0, 20: 0.1, 25: 0.1}),
    ],
)
def test_lr_schedule(schedule, expected):
    cfg = load_cfg(
        None,
        ["OPTIM.SCHEDULE", schedule, "OPTIM.STEPS", "[2]", "TRAIN.EPOCHS", "3", "OPTIM.LR", "0.2"],
    )
    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=10)
    lrs = []
    for _ in range(31):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for it, factor in expected.items():
        assert lrs[it] == pytest.approx(0.2 * factor), it


def test_no_weight_decay_on_bn_bias_gem():
    cfg = load_cfg(
        None,
        [
            "MODEL.DEPTH",
            "18",
            "MODEL.REDUCTION_DIM",
            "8",
            "MODEL.SSM.MID_DIM",
            "8",
            "MODEL.GEM_TRAINABLE",
            "True",
        ],
    )
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "head.pool.p" in no_decay_names and "head.fc.bias" in no_decay_names
    assert "backbone.bn1.weight" in no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("arch", ["senet", "cvnet_global"])
def test_step_updates_every_parameter_and_momentum_encoder(data_root, tmp_path, arch):
    cfg = tiny_cfg(
        data_root,
        tmp_path / "out",
        "MODEL.ARCH",
        arch,
        "MODEL.GEM_TRAINABLE",
        "True",
        "OPTIM.WEIGHT_DECAY",
        "0.0",
        "LOSS.MOMENTUM",
        "0.9",
        "TRAIN.CLIP_GRAD_NORM",
        "0.0",
    )
    trainer = _trainer(cfg)
    module = trainer.module
    key_before = {n: p.clone() for n, p in module.key_encoder.named_parameters()}
    before = {n: p.clone() for n, p in module.named_parameters() if p.requires_grad}
    assert not any(n.startswith("key_encoder") for n in before)  # the key encoder is not optimised
    assert "cls_loss.weight" in before and "model.head.pool.p" in before
    batch = next(iter(trainer.loader))
    trainer.train_step([batch])
    params = dict(module.named_parameters())
    # a conv bias right before a train-mode BatchNorm has a zero gradient (BN removes it), up to
    # float32 rounding of the batch mean (1.2e-6 seen with torch 2.11 on 16 threads)
    before_bn = {
        n for n in before if n.startswith("model.ssm.encoder.blocks.") and n.endswith(".0.bias")
    }
    for name in before_bn:
        assert params[name].grad.abs().max() < 1e-5, name
    unchanged = [n for n in before if n not in before_bn and torch.equal(params[n], before[n])]
    assert (
        unchanged == []
    )  # SSM, GeM p, FC, classifier, backbone: every other trainable tensor moved
    # θ_k ← m·θ_k + (1 − m)·θ_q with θ_q after the optimiser step
    for name, key in module.key_encoder.named_parameters():
        query = dict(module.model.named_parameters())[name]
        assert key.grad is None
        torch.testing.assert_close(key, 0.9 * key_before[name] + 0.1 * query, rtol=1e-6, atol=1e-7)
    for (name, key), (_, query) in zip(
        module.key_encoder.named_buffers(), module.model.named_buffers()
    ):
        assert torch.equal(key, query), name


def test_queue_enqueues_keys_with_labels(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path / "out", "TRAIN.SAMPLES_PER_CLASS", "2")
    trainer = _trainer(cfg)
    queue = trainer.module.con_loss
    batches = iter(trainer.loader)
    labels = []
    for _ in range(2):
        batch = next(batches)
        labels.append(batch["label"].clone())
        trainer.train_step([batch])
    # queue of 6: step 1 fills slots 0-3, step 2 fills 4, 5 then wraps to 0, 1 (oldest overwritten)
    assert queue.queue_ptr.item() == 2
    assert (
        queue.queue_labels.tolist()
        == labels[1][2:].tolist() + labels[0][2:].tolist() + labels[1][:2].tolist()
    )
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(6))


def test_resume_after_kill_matches_uninterrupted_run(data_root, tmp_path, monkeypatch):
    # 3 iterations per epoch; warm-up 2 iterations then cosine; queue of 6 wraps at the second step
    opts = ("TRAIN.CHECKPOINT_PERIOD", "2", "OPTIM.WARMUP_EPOCHS", "0.5", "TRAIN.MAX_ITERS", "4")
    full = _trainer(tiny_cfg(data_root, tmp_path / "full", *opts))
    full.run()
    killed_cfg = tiny_cfg(data_root, tmp_path / "killed", *opts)
    original_step = Trainer.train_step

    def crash_at_three(self, batches):
        if self.iteration == 2:
            raise KeyboardInterrupt("simulated kill during iteration 3")
        return original_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_at_three)
    with pytest.raises(KeyboardInterrupt):
        _trainer(killed_cfg).run()
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert last_checkpoint(tmp_path / "killed").name == "checkpoint_0000002.pth"  # mid-epoch 0
    resumed = _trainer(killed_cfg)
    resumed.run()  # iterations 3, 4: the rest of epoch 0, then into epoch 1
    assert (resumed.iteration, resumed.epoch, resumed.epoch_iter) == (4, 1, 1)
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for it in range(1, 5):
        assert got[it] == pytest.approx(expected[it], rel=1e-5, abs=1e-6), it
    for (name, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-6, msg=name
        )  # weights, queue, key encoder, t
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_export_is_retrieval_model_only(data_root, tmp_path):
    cfg = tiny_cfg(
        data_root, tmp_path / "out", "TRAIN.MAX_ITERS", "1", "MODEL.ARCH", "cvnet_global"
    )
    trainer = _trainer(cfg)
    trainer.run()
    final = load_checkpoint(tmp_path / "out" / "model_final.pth")
    assert set(final) == {"model", "config"}
    rebuilt = build_model(cfg_from_dump(final["config"]))
    load_model_weights(
        rebuilt, tmp_path / "out" / "model_final.pth", "cvnet_global"
    )  # strict: no extra keys
    for name, value in trainer.module.model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    ckpt = load_checkpoint(last_checkpoint(tmp_path / "out"))
    assert (
        ckpt["task"]["classes"] == ["3", "7", "11", "20"] and cfg_from_dump(ckpt["config"]) == cfg
    )
    assert "con_loss.queue" in ckpt["module"] and "key_encoder.head.fc.weight" in ckpt["module"]
    assert (tmp_path / "out" / "config.yaml").is_file() and (
        tmp_path / "out" / "train_classes.json"
    ).is_file()


def test_nan_loss_stops_with_iteration_and_checkpoint(data_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(
        data_root,
        tmp_path / "out",
        "TRAIN.CHECKPOINT_PERIOD",
        "1",
        "LOSS.CON",
        "none",
        "TRAIN.MAX_ITERS",
        "2",
    )
    trainer = _trainer(cfg)
    original = type(trainer.module).forward

    def nan_on_second(self, batch):
        losses = original(self, batch)
        return (
            {k: v * float("nan") for k, v in losses.items()} if trainer.iteration == 1 else losses
        )

    monkeypatch.setattr(type(trainer.module), "forward", nan_on_second)
    with pytest.raises(FloatingPointError, match=r"iteration 2 .*checkpoint_0000001\.pth"):
        trainer.run()


def test_unreadable_images_counted_then_threshold(data_root, tmp_path):
    image_path(
        data_root / "train",
        (data_root / "train.csv").read_text().split("\n")[1].split(",")[1].split()[0],
    ).write_bytes(b"broken")
    # one global batch of all 12 images: the broken one is met in the single step
    opts = (
        "DATA.SKIP_UNREADABLE",
        "True",
        "TRAIN.EPOCHS",
        "1",
        "LOSS.CON",
        "none",
        "TRAIN.BATCH_SIZE",
        "12",
    )
    trainer = _trainer(
        tiny_cfg(data_root, tmp_path / "ok", *opts, "DATA.MAX_UNREADABLE_FRACTION", "0.1")
    )
    assert trainer.run()["unreadable"] == 1  # 1 of 12 images skipped, below 10 %
    strict = _trainer(
        tiny_cfg(data_root, tmp_path / "strict", *opts, "DATA.MAX_UNREADABLE_FRACTION", "0.05")
    )
    with pytest.raises(RuntimeError, match="1 unreadable training images"):
        strict.run()


def test_label_outside_classifier_is_rejected(data_root, tmp_path):
    trainer = _trainer(tiny_cfg(data_root, tmp_path / "out"))
    batch = next(iter(trainer.loader))
    batch["label"][0] = len(LANDMARKS)
    with pytest.raises(ValueError, match="outside \\[0, num_classes\\)"):
        trainer.train_step([batch])


class ToyTask(TrainTask):
    """Linear regression through the generic engine: a stateless loss, so accumulation is exact."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(16, 5, generator=generator), torch.randn(5, 1, generator=generator)
        self.dataset = [{"x": x[i], "y": x[i] @ w} for i in range(16)]
        self.module = torch.nn.Linear(5, 1)
        torch.nn.init.zeros_(self.module.weight)
        torch.nn.init.zeros_(self.module.bias)
        self.module.forward = (
            self._losses
        )  # forward(batch) -> dict of losses, as the engine expects

    def _losses(self, batch: dict) -> dict:
        """Mean squared error (B, 1) vs (B, 1)."""
        pred = torch.nn.functional.linear(batch["x"], self.module.weight, self.module.bias)
        return {"loss_mse": ((pred.float() - batch["y"]) ** 2).mean()}


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gradient_accumulation_equals_full_batch(tmp_path, amp):
    params = {}
    for accum in (1, 2):
        opts = [
            "OUTPUT_DIR",
            str(tmp_path / f"a{accum}"),
            "TRAIN.BATCH_SIZE",
            "8",
            "TRAIN.AMP",
            amp,
            "TRAIN.ACCUM_STEPS",
            str(accum),
            "TRAIN.EPOCHS",
            "1",
            "DATA.NUM_WORKERS",
            "0",
            "DEVICE",
            "cpu",
            "TRAIN.CLIP_GRAD_NORM",
            "0.0",
            "OPTIM.WARMUP_EPOCHS",
            "0.0",
        ]
        trainer = Trainer(load_cfg(None, opts), ToyTask())
        trainer.run()
        params[accum] = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
        assert trainer.iteration == 2  # 16 samples / global batch 8, whatever the accumulation
    assert params[1].abs().sum() > 0
    tolerance = 1e-6 if amp == "off" else 1e-2  # bf16 matmuls round differently per micro-batch
    torch.testing.assert_close(params[2], params[1], rtol=tolerance, atol=tolerance)


def test_amp_auto_is_resolved_for_the_device(tmp_path, monkeypatch):
    """TRAIN.AMP auto takes resolve_amp's answer: autocast dtype, GradScaler only for fp16."""
    opts = [
        "OUTPUT_DIR",
        str(tmp_path),
        "TRAIN.AMP",
        "auto",
        "DEVICE",
        "cpu",
        "TRAIN.BATCH_SIZE",
        "8",
        "DATA.NUM_WORKERS",
        "0",
    ]
    for resolved, dtype in (("bf16", torch.bfloat16), ("off", None)):
        monkeypatch.setattr(
            "retrieval.engine.trainer.resolve_amp", lambda amp, device, r=resolved: r
        )
        trainer = Trainer(load_cfg(None, opts), ToyTask())
        assert trainer.amp_dtype == dtype
        assert not trainer.scaler.is_enabled()


def test_log_lines_print_once_after_cli_and_trainer_setup(capfd):
    """run_cli sets up logging, the trainer sets it up again: each message is printed once."""
    import logging

    from retrieval.cli import run_cli
    from retrieval.engine.logger import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [h for h in root.handlers if not getattr(h, "_retrieval", False)]
    try:

        def main(argv):
            setup_logging(main_process=True)  # what Trainer does once the rank is known
            logging.getLogger("retrieval.test").info("one line please")

        run_cli(main, [])
        assert capfd.readouterr().err.count("one line please") == 1
    finally:
        root.handlers, root.level = saved[0], saved[1]
