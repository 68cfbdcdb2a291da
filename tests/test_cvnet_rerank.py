"""CVNet-Rerank: official keys, pyramid/correlation, fast == official order, cache, re-ranker."""

from __future__ import annotations

import copy
import itertools
import threading

import numpy as np
import pytest
import torch
from torch import nn

from cvnet.cache import (
    CODECS,
    CacheError,
    CacheMeta,
    PyramidCache,
    cache_meta_for,
    cached_bytes,
    model_fingerprint,
)
from cvnet.correlation import correlation_reference, pyramid_sizes
from cvnet.learner import CVLearner
from cvnet.reranker import CVNetReranker, shortlist_union
from retrieval.checkpoint import CheckpointError, load_model_weights, save_checkpoint
from retrieval.config import load_cfg
from retrieval.modeling.official_names import to_official
from retrieval.modeling.registry import build_model

# Documented tolerances of quantized caches vs the fp32 cache on random weights (CVNet Tab. S4):
# max |score difference| and max |correlation difference|.
# Measured here: fp16 2e-6 / 5e-5, int8 5e-5 / 1.6e-3, int4 1e-3 / 0.04.
QUANT_SCORE_TOL = {"float32": 1e-5, "float16": 2e-5, "int8": 5e-4, "int4": 1e-2}
QUANT_CORR_TOL = {"float32": 1e-5, "float16": 5e-4, "int8": 1e-2, "int4": 0.1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread is as fast and immune to an oversubscribed CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rerank_cfg(depth: int = 50, *opts: str):
    """A cvnet_rerank config with the official learnable GeM p."""
    return load_cfg(
        None,
        [
            "MODEL.ARCH",
            "cvnet_rerank",
            "MODEL.DEPTH",
            str(depth),
            "MODEL.GEM_TRAINABLE",
            "True",
            *opts,
        ],
    )


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and GN/BN affine parameters, so every normalisation matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(
                    0.1 * torch.randn(module.running_mean.shape, generator=generator)
                )
                module.running_var.copy_(
                    0.5 + torch.rand(module.running_var.shape, generator=generator)
                )
    return model.eval()


def image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return randomize_norms(build_model(rerank_cfg(50)))


def key_lines(state: dict) -> list[str]:
    return [
        f"{k} ({','.join(str(d) for d in v.shape)}{',' if v.dim() == 1 else ''})"
        for k, v in state.items()
    ]


@pytest.mark.parametrize("depth", [50, 101])
def test_keys_equal_official_list_line_by_line(depth, data_dir):
    model = build_model(rerank_cfg(depth))
    official = [
        line
        for line in (data_dir / f"cvnet_keys_rerank_r{depth}.txt").read_text().splitlines()
        if line
    ]
    assert key_lines(to_official(model.state_dict(), "cvnet_rerank")) == official


def test_pyramid_sizes_use_round_half_to_even():
    # 21 * 0.5 = 10.5 -> 10 and 63 * 0.5 = 31.5 -> 32 (floor(x + 0.5) would give 11 and 32)
    assert pyramid_sizes(21, 63, (0.25, 0.5, 1.0)) == [(10, 32), (15, 45), (21, 63)]
    assert pyramid_sizes(64, 48, (0.25, 0.5, 1.0)) == [(32, 24), (45, 34), (64, 48)]


def test_build_pyramid_shapes(r50):
    with torch.no_grad():
        levels = r50.build_pyramid([torch.randn(1, 1024, 21, 63)])
    assert [tuple(x.shape) for x in levels] == [
        (1, 256, 10, 32),
        (1, 256, 15, 45),
        (1, 256, 21, 63),
    ]


def test_images_below_17_px_raise_and_17_px_work(r50):
    with torch.no_grad(), pytest.raises(ValueError, match="17 px"):
        r50(image(16, 40, 0), image(64, 64, 1))
    with torch.no_grad():
        score = r50(image(17, 17, 0), image(40, 17, 1))
    assert score.shape == (1,) and 0 <= score.item() <= 1


def test_dense_feature_is_prerelu_res4_and_global_pass_matches(r50):
    img = image(97, 130, 0)
    with torch.no_grad():
        (dense,) = r50.extract_dense(img)
        res4 = r50.encoder.backbone(img, ("res4",))["res4"]
        with r50.encoder.backbone.capture(r50.feature_names) as captured:
            descriptor = r50.encoder(img)  # the global pass also yields the dense map
        dense_again = captured["res4_prerelu"]
        expected_descriptor = r50.encoder(img)
    assert dense.shape == (1, 1024, 7, 9) and dense.min() < 0
    torch.testing.assert_close(dense.clamp(min=0), res4, rtol=0, atol=0)
    torch.testing.assert_close(dense_again, dense, rtol=0, atol=0)
    torch.testing.assert_close(descriptor, expected_descriptor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("q_size,k_size", [((250, 330), (300, 260)), ((161, 223), (223, 161))])
def test_fast_path_equals_official_order(r50, q_size, k_size):
    with torch.no_grad():
        q_pyr = r50.build_pyramid(r50.extract_dense(image(*q_size, 1)))
        k_pyr = r50.build_pyramid(r50.extract_dense(image(*k_size, 2)))
        (reference,) = r50.correlate(q_pyr, k_pyr, correlation_reference)
        (fast,) = r50.correlate(q_pyr, k_pyr)
        ref_logits, fast_logits = r50.cv_learner([reference]), r50.cv_learner([fast])
        score = r50(image(*q_size, 1), image(*k_size, 2))
    hq, wq = q_pyr[-1].shape[-2:]
    hk, wk = k_pyr[-1].shape[-2:]
    assert reference.shape == fast.shape == (1, 9, hq, wq, hk, wk)
    assert reference.min() == 0 and reference.max() <= 1
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(score, ref_logits.softmax(dim=1)[:, 1], rtol=0, atol=1e-5)


def straightforward_score(model, q_img, k_img) -> float:
    """The official per-pair computation: both maps and pyramids, official correlation order."""
    with torch.no_grad():
        q_pyr = model.build_pyramid(model.extract_dense(q_img))
        k_pyr = model.build_pyramid(model.extract_dense(k_img))
        return model.score_correlations(model.correlate(q_pyr, k_pyr, correlation_reference)).item()


class Counter:
    """A loader that records how often each index was loaded."""

    def __init__(self, images: dict) -> None:
        self.images, self.calls = images, []

    def __call__(self, index: int) -> torch.Tensor:
        self.calls.append(index)
        return self.images[index]


DB_SIZES = {0: (97, 130), 1: (130, 97), 2: (97, 130), 3: (97, 130), 4: (90, 113)}


@pytest.mark.parametrize("pad_multiple", [1, 8], ids=["exact", "padded"])
def test_cached_batched_scores_equal_straightforward(r50, tmp_path, pad_multiple):
    """Batches of equal grids, or (padded to 8x8 cells) of the three database grids mixed."""
    query, db = (
        Counter({7: image(81, 113, 7)}),
        Counter({i: image(*s, 10 + i) for i, s in DB_SIZES.items()}),
    )
    cache = PyramidCache(cache_meta_for(r50, "float32"), tmp_path / "cache")
    reranker = CVNetReranker(r50, query, db, cache, batch_size=2, pad_multiple=pad_multiple)
    ids = np.array([3, 0, 1, 2, 4, 0])
    scores = reranker.score(7, ids)
    expected = [straightforward_score(r50, query.images[7], db.images[i]) for i in ids]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert sorted(db.calls) == [0, 1, 2, 3, 4] and query.calls == [7]
    np.testing.assert_array_equal(reranker.score(7, ids[::-1]), scores[::-1])
    assert sorted(db.calls) == [0, 1, 2, 3, 4] and query.calls == [7]  # nothing recomputed


def test_concurrent_scoring_streams_give_the_same_scores(r50):
    """streams > 1: batches scored from several threads come back in shortlist order, and a
    shortlist mixing sizes and repeats scores as one thread does."""
    query = Counter({7: image(81, 113, 7)})
    db = Counter({i: image(*s, 10 + i) for i, s in DB_SIZES.items()})
    cache = PyramidCache(cache_meta_for(r50, "float32"))
    ids = np.array([4, 3, 0, 1, 2, 0, 1, 3])
    one = CVNetReranker(r50, query, db, cache, batch_size=2).score(7, ids)
    reranker = CVNetReranker(r50, query, db, cache, batch_size=2, streams=3)
    threads = set()
    score_batch = reranker._score_batch

    def recording(*args):
        threads.add(threading.current_thread())
        return score_batch(*args)

    reranker._score_batch = recording
    np.testing.assert_allclose(reranker.score(7, ids), one, rtol=0, atol=1e-6)
    assert len(np.unique(one.round(6))) == 5  # five distinct pairs: a mix-up would show
    np.testing.assert_allclose(reranker.score(7, ids[::-1]), one[::-1], rtol=0, atol=1e-6)
    # the same threads serve every call (PyTorch keeps cuDNN plans per thread)
    assert threading.current_thread() not in threads and 1 <= len(threads) <= 3
    with pytest.raises(ValueError, match="streams"):
        CVNetReranker(r50, query, db, cache, streams=0)
    with pytest.raises(ValueError, match="pad_multiple"):
        CVNetReranker(r50, query, db, cache, pad_multiple=0)


@pytest.mark.gpu
def test_cached_batched_scores_on_cuda_equal_straightforward_on_cpu(r50, tmp_path):
    """The fast path on CUDA (cuDNN convs over the channels-last 4D volumes) against the official
    computation on the CPU: fp32 without TF32 to 1e-5, bf16 autocast within 2e-3; once more from
    the filled cache (side-stream reads) with concurrent scoring streams and padded grids."""
    model = copy.deepcopy(r50).cuda()
    query = Counter({7: image(81, 113, 7)})
    db = Counter({i: image(*s, 10 + i) for i, s in DB_SIZES.items()})
    ids = np.array([3, 0, 1, 2, 4, 0])
    expected = [straightforward_score(r50, query.images[7], db.images[i]) for i in ids]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for amp, tolerance in ((None, 1e-5), (torch.bfloat16, 2e-3)):
            cache = PyramidCache(cache_meta_for(model, "float32"), tmp_path / str(amp))
            reranker = CVNetReranker(
                model, query, db, cache, device="cuda", batch_size=2, amp_dtype=amp
            )
            scores = reranker.score(7, ids)
            np.testing.assert_allclose(scores, expected, rtol=0, atol=tolerance, err_msg=str(amp))
            threaded = CVNetReranker(
                model, query, db, cache, "cuda", 2, amp, streams=2, pad_multiple=8
            )
            again = threaded.score(7, ids[::-1])[::-1]  # padded: batches mix database sizes
            np.testing.assert_allclose(again, expected, rtol=0, atol=tolerance, err_msg=str(amp))


def test_quantized_caches_stay_within_documented_tolerance(r50):
    query, db = (
        Counter({0: image(81, 113, 7)}),
        Counter({i: image(*DB_SIZES[i], 10 + i) for i in (0, 1)}),
    )
    ids = np.array([0, 1])
    results = {}
    for dtype in CODECS:
        reranker = CVNetReranker(r50, query, db, PyramidCache(cache_meta_for(r50, dtype)))
        k_levels = reranker.db_pyramid(0)
        (corr,) = r50.correlate(reranker.query_pyramid(0), k_levels)
        results[dtype] = (reranker.score(0, ids), corr)
    for dtype, (scores, corr) in results.items():
        assert np.abs(scores - results["float32"][0]).max() <= QUANT_SCORE_TOL[dtype], dtype
        assert (corr - results["float32"][1]).abs().max() <= QUANT_CORR_TOL[dtype], dtype


@pytest.mark.parametrize(
    "dtype,channels", [("float16", 64), ("int8", 64), ("int4", 64), ("int4", 17)]
)
def test_codecs_round_trip_directions_and_sizes(dtype, channels):
    torch.manual_seed(0)
    level = torch.randn(1, channels, 5, 3)
    level[0, :, 0, 0] = 0  # an all-zero location stays zero
    cache = PyramidCache(CacheMeta("h", channels, (1.0,), dtype, ("res4_prerelu",)))
    cache.put(0, [level])
    (decoded,) = cache.get(0)
    cosine = nn.functional.cosine_similarity(decoded, level, dim=1)[0].flatten()[1:]
    assert cosine.min() >= {"float16": 1 - 1e-5, "int8": 0.999, "int4": 0.97}[dtype]
    assert decoded[0, :, 0, 0].abs().max() == 0
    assert sum(c.numel() * c.element_size() for c in cache._memory[0]) == cached_bytes(
        [(5, 3)], channels, dtype
    )


def test_int4_codes_on_the_grid_are_exact():
    codes = torch.tensor(
        [-7.0, 7, 3, -1, 0, 5, -6]
    )  # odd C', max |code| = 7 as the encoder produces
    level = codes.view(1, 7, 1, 1)
    cache = PyramidCache(CacheMeta("h", 7, (1.0,), "int4", ("res4_prerelu",)))
    cache.put(0, [level])
    assert cache._memory[0][0].dtype == torch.uint8 and cache._memory[0][0].shape == (4, 1, 1)
    torch.testing.assert_close(cache.get(0)[0], level / codes.norm(), rtol=0, atol=1e-7)


def fake_meta(**changes) -> CacheMeta:
    fields = {
        "model_hash": "abc",
        "compress_dim": 4,
        "scales": (0.25, 1.0),
        "dtype": "float16",
        "feature_names": ("res4_prerelu",),
        "dataset": "roxford5k",
    }
    return CacheMeta(**{**fields, **changes})


def test_disk_cache_checks_metadata_and_items(tmp_path):
    levels = [torch.randn(1, 4, 2, 3), torch.randn(1, 4, 4, 5)]
    cache = PyramidCache(fake_meta(), tmp_path)
    cache.put(12345, levels)
    assert 12345 in cache and len(cache) == 1 and cache.get(7) is None
    stored = PyramidCache(fake_meta(), tmp_path).get(12345)
    for got, want in zip(stored, levels):
        torch.testing.assert_close(got, want / want.norm(dim=1, keepdim=True), rtol=0, atol=2e-3)
    for change in (
        {"compress_dim": 8},
        {"dtype": "int8"},
        {"model_hash": "xyz"},
        {"scales": (1.0,)},
    ):
        field = next(iter(change))
        with pytest.raises(CacheError, match=field):
            PyramidCache(fake_meta(**change), tmp_path)
    rebuilt = PyramidCache(fake_meta(model_hash="xyz"), tmp_path, rebuild=True)
    assert len(rebuilt) == 0 and 12345 not in rebuilt


def test_corrupt_or_foreign_items_raise_or_are_recomputed(tmp_path):
    cache = PyramidCache(fake_meta(), tmp_path)
    cache.put(3, [torch.randn(1, 4, 2, 3), torch.randn(1, 4, 4, 5)])
    cache.flush()
    path = cache._item_path(3)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.raises(CacheError, match="unreadable"):
        cache.get(3)
    assert PyramidCache(fake_meta(), tmp_path, rebuild=True).get(3) is None and not path.exists()
    other = PyramidCache(fake_meta(dataset="rparis6k"), tmp_path / "other")
    other.put(3, [torch.randn(1, 4, 2, 3), torch.randn(1, 4, 4, 5)])
    other.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(other._item_path(3).read_bytes())  # an item of another configuration
    with pytest.raises(CacheError, match="another cache configuration"):
        cache.get(3)


def test_items_being_written_are_served_from_memory_and_write_errors_surface(tmp_path, monkeypatch):
    import cvnet.cache as cache_module

    levels = [torch.randn(1, 4, 2, 3), torch.randn(1, 4, 4, 5)]
    release = threading.Event()
    save = cache_module.write_item
    monkeypatch.setattr(cache_module, "write_item", lambda *a: release.wait() and save(*a))
    cache = PyramidCache(fake_meta(), tmp_path)
    cache.put(0, levels)
    assert 0 in cache and not cache._item_path(0).exists()  # the writer is held back
    pending = cache.get(0)
    release.set()
    cache.flush()
    assert cache._item_path(0).is_file() and not cache._pending
    for a, b in zip(pending, cache.get(0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(cache) == 1

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_item", full)
    cache.put(1, levels)
    with pytest.raises(OSError, match="No space left"):
        cache.flush()


@pytest.mark.gpu
def test_disk_cache_put_from_cuda_does_not_wait_and_its_readers_do(tmp_path):
    """put() from a GPU queues the copies to pinned host memory and returns; an item served while
    queued and the written file hold the codes of a synchronous copy all the same."""
    levels = [torch.randn(1, 4, 30, 40, device="cuda"), torch.randn(1, 4, 60, 80, device="cuda")]
    memory = PyramidCache(fake_meta())  # stores synchronously
    memory.put(0, levels)
    expected = memory.get(0)
    cache = PyramidCache(fake_meta(), tmp_path)
    torch.cuda._sleep(200_000_000)  # the stream spins (about 0.1 s): the copies queue behind it
    cache.put(0, levels)
    entry = cache._pending[0]
    assert entry.copied is not None and not entry.copied.query()  # put() did not wait
    served = cache.get(0, "cuda")
    cache.flush()
    for want, got, stored in zip(expected, served, cache.get(0)):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
        torch.testing.assert_close(stored, want, rtol=0, atol=0)


def test_model_fingerprint_tracks_pyramid_weights_only():
    model = build_model(rerank_cfg(18, "MODEL.RERANK.COMPRESS_DIM", "8"))
    before = model_fingerprint(model)
    with torch.no_grad():
        model.cv_learner.mlp[0].weight.add_(1)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.compress[1].weight[0, 0, 0, 0] += 1
    assert model_fingerprint(model) != before


def test_shortlist_union():
    np.testing.assert_array_equal(
        shortlist_union([np.array([5, 1]), np.array([[1, 9]])]), [1, 5, 9]
    )
    assert shortlist_union([]).size == 0


def test_checkpoint_of_wrong_depth_or_compress_dim_is_rejected(tmp_path):
    """Official-format round trip; clear errors for a wrong C' or depth (R18/R34 for speed)."""
    model = build_model(rerank_cfg(18, "MODEL.RERANK.COMPRESS_DIM", "16"))
    path = save_checkpoint(
        {"model_state": to_official(model.state_dict(), "cvnet_rerank")}, tmp_path / "c.pyth"
    )
    fresh = build_model(rerank_cfg(18, "MODEL.RERANK.COMPRESS_DIM", "16"))
    load_model_weights(fresh, path, "cvnet_rerank")
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"compress\.0\.weight: checkpoint \(16, 256, 3, 3\)"):
        load_model_weights(
            build_model(rerank_cfg(18, "MODEL.RERANK.COMPRESS_DIM", "32")), path, "cvnet_rerank"
        )
    with pytest.raises(CheckpointError, match=r"missing encoder\.backbone\.layer3\.2"):
        load_model_weights(
            build_model(rerank_cfg(34, "MODEL.RERANK.COMPRESS_DIM", "16")), path, "cvnet_rerank"
        )


def test_learner_block_output_sizes_halve_with_ceil():
    learner = CVLearner()
    shapes = []
    # block1's last module: forward() runs block1's conv and the rest of block1 separately
    for module in (learner.block1[-1], learner.block2, learner.block3, learner.block4):
        module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    logits = learner([torch.rand(2, 9, 13, 7, 9, 11)])
    assert logits.shape == (2, 2)
    assert shapes == [(16, 7, 4, 5, 6), (32, 4, 2, 3, 3), (64, 2, 1, 2, 2), (128, 2, 1, 2, 2)]


ABLATIONS = [
    [("FEATURE_LAYER", layer), ("CROSS_SCALE", cross), ("KERNEL", kernel)]
    for layer, cross, kernel in itertools.product(
        ("res4", "res5", "fuse"), ("True", "False"), ("asymmetric", "symmetric")
    )
] + [[("SCALES", scales)] for scales in ("[1.0]", "[0.25, 1.0]", "[0.5, 1.0]")]


@pytest.mark.parametrize("changes", ABLATIONS, ids=lambda c: "-".join(v for _, v in c))
def test_every_ablation_builds_runs_and_trains(changes):
    opts = [item for key, value in changes for item in (f"MODEL.RERANK.{key}", value)]
    model = build_model(rerank_cfg(18, "MODEL.RERANK.COMPRESS_DIM", "8", *opts)).train()
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 70, 90), torch.randn(2, 3, 100, 66)
    score = model(q, k)
    assert (
        score.shape == (2,) and torch.isfinite(score).all() and ((score >= 0) & (score <= 1)).all()
    )
    score.sum().backward()
    for name, param in itertools.chain(
        model.compress.named_parameters(), model.cv_learner.named_parameters()
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    num_scales, num_layers = len(model.scales), len(model.feature_names)
    assert len(model.compress) == num_scales * num_layers
    cross_scale = dict(changes).get("CROSS_SCALE", "True") == "True"
    assert model.cv_learner.in_channels == (num_scales**2 if cross_scale else num_scales)


def test_benchmark_quick_run():
    from retrieval.benchmarks.rerank import run

    out = run(
        [
            "--depth",
            "18",
            "--compress-dim",
            "16",
            "--db-size",
            "64x48",
            "--query-size",
            "48x40",
            "--rounds",
            "1",
            "--db-images",
            "2",
            "--repeat",
            "1",
            "--shortlist",
            "4",
            "--profile",
            "3",
        ]
    )
    assert out["max_abs_score_diff"]["fp32_ours_vs_straightforward"] <= 1e-5
    for ops in out["profile"].values():  # the three costliest ops, costliest first
        assert len(ops) == 3 and ops[0]["self_cpu_ms"] >= ops[-1]["self_cpu_ms"] > 0
        assert any(op["op"].startswith("aten::") for op in ops)
    assert out["pairs_per_s"]["ours_fp32"] > 0 and out["speedup"]["fp32"] > 0
    assert out["bytes_per_cached_image"]["int4"][256] == 256 // 2 * (2 * 2 + 3 * 2 + 4 * 3)
    assert set(out["quantized"]) == set(CODECS)
