"""Tests for retrieval.losses: CurricularFace and the momentum contrastive / SupCon losses, against
independent float64 loop references written here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from retrieval.losses import (
    EMPTY_LABEL,
    CurricularFace,
    MomentumContrastiveLoss,
    SoftmaxClassifierLoss,
    SupConLoss,
    momentum_copy,
    momentum_update,
    multi_positive_contrastive_loss,
)
from retrieval.losses.contrastive import LOG_DENOMINATORS

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- references
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.double() / x.double().norm(dim=1, keepdim=True)


def ref_curricularface(emb, weight, labels, t0, m, s, alpha):
    """Paper formulas with acos/cos and loops -> (loss, new t, scaled logits, branch counts)."""
    cos = (_unit(emb) @ _unit(weight).t()).clamp(-1, 1)
    n, c = cos.shape
    t = (1 - alpha) * t0 + alpha * sum(float(cos[i, labels[i]]) for i in range(n)) / n
    logits = cos.clone()
    info = {"fallback": 0, "hard": 0, "easy": 0, "easy_in_fallback": 0}
    for i in range(n):
        y = int(labels[i])
        theta = math.acos(float(cos[i, y]))
        margin_logit = math.cos(theta + m)
        if theta + m <= math.pi:
            logits[i, y] = margin_logit
        else:
            logits[i, y] = float(cos[i, y]) - m * math.sin(m)
            info["fallback"] += 1
        for j in range(c):
            if j == y:
                continue
            cj = float(cos[i, j])
            if cj > margin_logit:
                logits[i, j] = cj * (t + cj)
                info["hard"] += 1
            else:
                info["easy"] += 1
                info["easy_in_fallback"] += theta + m > math.pi
    logits = logits * s
    loss = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        loss += (lse - row[int(labels[i])]) / n
    return loss, t, logits, info


def ref_contrastive(q, keys, labels, key_labels, tau, margin, all_in_denominator):
    """Per-query loop over Eq. S3 (target only) or Eq. S2 (all positives) on the given keys."""
    qn, kn = _unit(q), _unit(keys)
    per_query = []
    for i in range(qn.shape[0]):
        pos = [j for j in range(kn.shape[0]) if int(key_labels[j]) == int(labels[i])]
        neg = [j for j in range(kn.shape[0]) if int(key_labels[j]) != int(labels[i])]
        if not pos:
            continue
        e_pos = {p: math.exp((float(qn[i] @ kn[p]) - margin) / tau) for p in pos}
        neg_sum = sum(math.exp(float(qn[i] @ kn[j]) / tau) for j in neg)
        total = 0.0
        for p in pos:
            den = (sum(e_pos.values()) if all_in_denominator else e_pos[p]) + neg_sum
            total -= math.log(e_pos[p] / den)
        per_query.append(total / len(pos))
    return sum(per_query) / len(per_query) if per_query else 0.0


# ----------------------------------------------------------------------------- CurricularFace
def _cf_inputs(seed=0, n=10, d=4, c=6):
    g = torch.Generator().manual_seed(seed)
    crit = CurricularFace(d, c)
    with torch.no_grad():
        crit.weight.copy_(torch.randn(c, d, generator=g))
        crit.t.fill_(0.3)  # a non-trivial t so the hard-negative modulation matters
    labels = torch.randint(0, c, (n,), generator=g)
    emb = torch.randn(n, d, generator=g) * 3.0
    labels[0], labels[1] = 0, 1
    # class 1 near class 0: sample 0 then has a negative with cos θ_j < cos(θ_y + m)
    with torch.no_grad():
        crit.weight[1] = crit.weight[0] + 0.05 * torch.randn(d, generator=g)
    emb[0] = -crit.weight.detach()[0] + 0.05 * torch.randn(d, generator=g)  # θ_y + m > π
    return crit, emb, labels


def test_curricularface_matches_reference_and_updates_t():
    crit, emb, labels = _cf_inputs()
    weight = crit.weight.detach()
    ref = ref_curricularface(emb, weight, labels, 0.3, 0.5, 64.0, 0.01)
    ref_loss, ref_t, ref_logits, info = ref
    # every branch is exercised, including an easy negative of a fallback sample
    assert min(info.values()) >= 1, info
    logits = copy.deepcopy(crit).logits(emb, labels)
    # atol: s = 64 scales the fp32 cosine error
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-3, rtol=1e-5)
    loss = crit(emb, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert crit.t.item() == pytest.approx(ref_t, abs=1e-6)
    # second step: EMA continues from the updated t
    ref_loss2, ref_t2, _, _ = ref_curricularface(emb, weight, labels, ref_t, 0.5, 64.0, 0.01)
    assert crit(emb, labels).item() == pytest.approx(ref_loss2, rel=1e-5)
    assert crit.t.item() == pytest.approx(ref_t2, abs=1e-6)


def test_curricularface_eval_mode_keeps_t_and_other_margin():
    trained, emb, labels = _cf_inputs(seed=1)
    crit = CurricularFace(4, 6, margin=0.3, scale=16.0)
    crit.load_state_dict(trained.state_dict())
    crit.eval()
    ref_loss, _, _, _ = ref_curricularface(emb, crit.weight.detach(), labels, 0.3, 0.3, 16.0, 0.0)
    assert crit(emb, labels).item() == pytest.approx(ref_loss, rel=1e-5)
    assert crit.t.item() == pytest.approx(0.3)


def test_curricularface_gradients_reach_embeddings_and_weights():
    crit, emb, labels = _cf_inputs(seed=2)
    emb.requires_grad_(True)
    emb.data[1] = crit.weight.detach()[labels[1]]  # cos θ_y = 1: sqrt must not give NaN gradients
    crit(emb, labels).backward()
    for grad in (emb.grad, crit.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert "weight" in dict(crit.named_parameters()) and "t" in crit.state_dict()


def test_curricularface_autocast_computes_in_fp32():
    crit, emb, labels = _cf_inputs(seed=3)
    crit.eval()
    expected = crit(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(emb, labels)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [6, 17, -1])
@pytest.mark.parametrize("loss", [CurricularFace, SoftmaxClassifierLoss])
def test_classification_losses_reject_bad_labels(loss, bad):
    crit = loss(4, 6)
    labels = torch.tensor([0, bad, 2])
    with pytest.raises(ValueError, match=rf"label {bad} .*num_classes=6"):
        crit(torch.randn(3, 4), labels)
    with pytest.raises(ValueError, match="embeddings of shape"):
        crit(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes=0 must be >= 1"):
        loss(4, 0)


def test_softmax_loss_matches_linear_cross_entropy_with_smoothing():
    torch.manual_seed(0)
    crit = SoftmaxClassifierLoss(8, 5, scale=10.0, label_smoothing=0.1)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = 10.0 * F.normalize(emb, dim=1) @ crit.classifier.weight.T + crit.classifier.bias
    probs = logits.log_softmax(1)
    target = torch.full((6, 5), 0.1 / 5).scatter(1, labels[:, None], 0.9 + 0.1 / 5)
    assert crit(emb, labels).item() == pytest.approx(-(target * probs).sum(1).mean().item(), 1e-6)
    emb.requires_grad_(True)
    crit(emb, labels).backward()
    assert emb.grad.abs().sum() > 0 and crit.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxClassifierLoss(8, 5, label_smoothing=1.0)


# ----------------------------------------------------------------------------- contrastive
def _batch(seed, n=4, d=5, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return q, q + 0.5 * k, labels  # keys correlated with their queries


def test_queue_ring_buffer_wraps_around():
    crit = MomentumContrastiveLoss(5, queue_size=5)
    assert (crit.queue_labels == EMPTY_LABEL).all()
    batches = [_batch(s, n=2) for s in range(3)]
    crit(*batches[0])
    assert crit.queue_ptr.item() == 2 and (crit.queue_labels[2:] == EMPTY_LABEL).all()
    crit(*batches[1])
    crit(*batches[2])  # 6 keys in 5 slots: slot 0 holds the newest key, slot 1 the oldest kept
    assert crit.queue_ptr.item() == 1
    order = [(2, 1), (0, 1), (1, 0), (1, 1), (2, 0)]  # (batch, row) stored in slots 0..4
    for slot, (b, row) in enumerate(order):
        torch.testing.assert_close(crit.queue[slot], F.normalize(batches[b][1][row], dim=0))
        assert crit.queue_labels[slot] == batches[b][2][row]
    assert crit.queue.dtype == torch.float32


def test_batch_larger_than_queue_keeps_last_keys():
    crit = MomentumContrastiveLoss(5, queue_size=3)
    q, k, labels = _batch(0, n=4)
    crit(q, k, labels)
    assert crit.queue_ptr.item() == 1  # as if enqueued one by one
    for slot, row in enumerate([3, 1, 2]):
        torch.testing.assert_close(crit.queue[slot], F.normalize(k[row], dim=0))
        assert crit.queue_labels[slot] == labels[row]


def test_eval_mode_does_not_enqueue():
    crit = MomentumContrastiveLoss(5, queue_size=8).eval()
    crit(*_batch(0))
    assert (crit.queue_labels == EMPTY_LABEL).all() and crit.queue_ptr.item() == 0


@pytest.mark.parametrize("denominator", sorted(LOG_DENOMINATORS))
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_contrastive_matches_loop_reference(denominator, margin):
    crit = MomentumContrastiveLoss(5, 7, temperature=1 / 30, margin=margin, denominator=denominator)
    crit(*_batch(0))  # 4 of 7 slots filled, 3 still empty
    queue, queue_labels = crit.queue.clone(), crit.queue_labels.clone()
    q, k, labels = _batch(1)
    loss = crit(q, k, labels)
    filled = queue_labels != EMPTY_LABEL
    keys = torch.cat([k, queue[filled]])
    key_labels = torch.cat([labels, queue_labels[filled]])
    expected = ref_contrastive(q, keys, labels, key_labels, 1 / 30, margin, denominator == "all")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert crit.last_stats["num_no_positive"] == 0 and crit.last_stats["queue_filled"] == 4


def test_empty_slots_are_ignored():
    q, k, labels = _batch(2)
    clean = MomentumContrastiveLoss(5, queue_size=6)
    dirty = MomentumContrastiveLoss(5, queue_size=6)
    with torch.no_grad():  # garbage vectors, some equal to the queries, in slots still marked empty
        dirty.queue.copy_(F.normalize(torch.cat([q, torch.randn(2, 5)]), dim=1))
    assert clean(q, k, labels).item() == pytest.approx(dirty(q, k, labels).item(), rel=1e-6)
    # second call: the queue now holds the first call's keys
    expected = ref_contrastive(q, torch.cat([k, k]), labels, labels.repeat(2), 1 / 30, 0.0, False)
    assert clean(q, k, labels).item() == pytest.approx(expected, rel=1e-5)


def test_s3_equals_s2_with_one_positive_and_differs_with_several():
    q, k, _ = _batch(3, n=4)
    distinct = torch.arange(4)  # empty queue: the own key is each query's only positive
    repeated = torch.tensor([0, 0, 0, 1])
    for margin in (0.0, 0.3):
        s3, s2 = MomentumContrastiveLoss(5, 16, margin=margin), SupConLoss(5, 16, margin=margin)
        assert s3(q, k, distinct).item() == pytest.approx(s2(q, k, distinct).item(), rel=1e-6)
    s3, s2 = MomentumContrastiveLoss(5, 16), SupConLoss(5, 16)
    assert s2.denominator == "all" and s3.denominator == "target"
    # S2 denominators are strictly larger
    assert s2(q, k, repeated).item() > s3(q, k, repeated).item() + 1e-3


def test_queries_without_positive_are_excluded_and_counted():
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    keys = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    q.requires_grad_(True)
    labels, key_labels = torch.tensor([0, 7, 1]), torch.tensor([0, 0, 1, EMPTY_LABEL])
    for name, fn in LOG_DENOMINATORS.items():
        loss, no_pos, num_pos = multi_positive_contrastive_loss(
            q, keys, labels, key_labels, 0.1, 0.1, fn
        )
        expected = ref_contrastive(
            q.detach(), keys[:3], labels, key_labels[:3], 0.1, 0.1, name == "all"
        )
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert no_pos.item() == 1 and num_pos.tolist() == [2, 0, 1]
        (grad,) = torch.autograd.grad(loss, q)
        assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0
    loss, no_pos, _ = multi_positive_contrastive_loss(q, keys, labels + 9, key_labels, 0.1, 0, fn)
    assert loss.item() == 0.0 and no_pos.item() == 3


def test_no_negatives_is_finite():
    q, k, _ = _batch(5)
    same = torch.zeros(4, dtype=torch.long)
    qg = q.clone().requires_grad_(True)
    s3_loss = MomentumContrastiveLoss(5, 8)(qg, k, same)
    assert s3_loss.item() == pytest.approx(0.0, abs=1e-6)  # every term is −log(1)
    loss = SupConLoss(5, 8)(qg, k, same)
    expected = ref_contrastive(q, k, same, same, 1 / 30, 0.0, True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(qg.grad).all()


def test_gradient_reaches_queries_only():
    q, k, labels = _batch(6)
    q.requires_grad_(True)
    k.requires_grad_(True)  # a key encoder run without no_grad: the loss must still detach it
    crit = MomentumContrastiveLoss(5, 8)
    crit(q, k, labels).backward()
    assert k.grad is None
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert not crit.queue.requires_grad


def test_contrastive_autocast_and_bad_inputs():
    q, k, labels = _batch(7)
    expected = MomentumContrastiveLoss(5, 8)(q, k, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MomentumContrastiveLoss(5, 8)(q, k, labels)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-6)
    crit = MomentumContrastiveLoss(5, 8)
    with pytest.raises(ValueError, match="label -1 is negative"):
        crit(q, k, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match=r"must both be \(B, 5\)"):
        crit(q[:, :4], k[:, :4], labels)
    with pytest.raises(ValueError, match="denominator='mean'"):
        MomentumContrastiveLoss(5, 8, denominator="mean")


def test_state_dict_round_trip_gives_identical_next_loss():
    a = MomentumContrastiveLoss(5, queue_size=7, margin=0.1)
    for seed in range(3):  # wraps around once
        a(*_batch(seed))
    state = a.state_dict()
    assert set(state) == {"queue", "queue_labels", "queue_ptr"}
    b = MomentumContrastiveLoss(5, queue_size=7, margin=0.1)
    fresh = MomentumContrastiveLoss(5, queue_size=7, margin=0.1)
    b.load_state_dict(copy.deepcopy(state))
    nxt = _batch(10)
    loss_a, loss_b = a(*nxt), b(*nxt)
    assert loss_a.item() == loss_b.item() and loss_a.item() != fresh(*nxt).item()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_momentum_update_math():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key = momentum_copy(query)
    assert all(not p.requires_grad for p in key.parameters())
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    query(torch.randn(8, 3))  # changes the BN running statistics
    old_key = {n: p.clone() for n, p in key.named_parameters()}
    momentum_update(key, query, 0.9)
    for name, p in key.named_parameters():
        query_param = dict(query.named_parameters())[name]
        torch.testing.assert_close(p, 0.9 * old_key[name] + 0.1 * query_param)
    for name, buf in key.named_buffers():
        assert torch.equal(buf, dict(query.named_buffers())[name]), name
    with pytest.raises(ValueError, match="different parameters"):
        momentum_update(nn.Sequential(nn.Linear(3, 4)), query, 0.9)
    with pytest.raises(ValueError, match="momentum=1.5"):
        momentum_update(key, query, 1.5)


# ----------------------------------------------------------------------------- distributed (gloo)
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, labels = _batch(20 + rank, n=3)
        crit = MomentumContrastiveLoss(5, queue_size=10)
        loss = crit(q, k, labels)
        cf, emb, cf_labels = _cf_inputs(seed=30 + rank)
        cf.load_state_dict(_cf_inputs(seed=30)[0].state_dict())  # same weights and t on both ranks
        cf(emb, cf_labels)
        result = {"loss": loss.detach(), "state": crit.state_dict(), "t": cf.t}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_gathers_keys_and_averages_t(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batches = [_batch(20 + r, n=3) for r in range(2)]
    keys = torch.cat([b[1] for b in batches])
    key_labels = torch.cat([b[2] for b in batches])
    for r in range(2):
        torch.testing.assert_close(out[r]["state"]["queue"][:6], F.normalize(keys, dim=1))
        assert torch.equal(out[r]["state"]["queue_labels"][:6], key_labels)
        q, _, labels = batches[r]
        expected = ref_contrastive(q, keys, labels, key_labels, 1 / 30, 0.0, False)
        assert out[r]["loss"].item() == pytest.approx(expected, rel=1e-5)
    weight = _cf_inputs(seed=30)[0].weight.detach()
    means = []
    for r in range(2):
        _, emb, lab = _cf_inputs(seed=30 + r)
        means.append(float((_unit(emb) @ _unit(weight).t()).gather(1, lab[:, None]).mean()))
    expected_t = 0.99 * 0.3 + 0.01 * sum(means) / 2
    assert out[0]["t"].item() == pytest.approx(expected_t, abs=1e-6)
    assert out[1]["t"].item() == out[0]["t"].item()
