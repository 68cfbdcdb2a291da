"""Label-aware momentum contrastive losses of CVNet-Global: L_con (Eq. S3) and SupCon L_s (Eq. S2).

MoCo-style setup: the key encoder is a momentum copy of the query model (`momentum_copy`, then
`momentum_update` after each optimiser step). A queue of K past keys (L2-normalised, fp32) and
their labels lives in registered buffers, so it is saved in the state_dict and a resumed run
continues exactly.

For a query q with label y the contrast set is the keys of the current batch (gathered over
processes) plus the filled queue slots; empty slots carry label -1 and are ignored.
P(q) = keys with label y. It includes the query's own key (the MoCo positive), so in forward()
every query has at least one positive. N(q) = keys with another label. With τ the temperature:

  L(q) = −1/|P(q)| Σ_{p∈P(q)} log[ exp(C̄(q·k_p, 1)/τ) / Σ_{i∈D(q,p)} exp(C̄(q·k_i, I_q^i)/τ) ]

  Eq. S3, `denominator="target"`: D(q, p) = {p} ∪ N(q). Only the target positive is in the
      denominator, so the loss scale does not depend on |P(q)| (the supplementary's point).
  Eq. S2, `denominator="all"` (SupCon): D(q, p) = P(q) ∪ N(q).

C̄(s, y) is the margin-adjusted similarity. The main paper's definition is not available to us;
we read it as an additive cosine margin on positives only: C̄(s, 1) = s − margin, C̄(s, 0) = s.
Eq. S2 prints the indicator 1 for every denominator term; we keep negatives unmargined there too,
so S2 and S3 differ only in the denominator set. margin = 0 (default) is plain cosine similarity.
The loss is averaged over queries that have a positive; the others add nothing and are counted
in `last_stats`.
Defaults: K = 73728 (Tab. S9; the "Ours" row of Tab. S10 repeats its numbers, so it is the main
setting), τ = 1/30 (unverified third-party hint, spec/cvnet.md §6).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.engine.distributed import all_gather_tensor
from retrieval.losses.checks import check_labels

EMPTY_LABEL = -1
LogDenominator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NamedTensors = Iterable[tuple[str, torch.Tensor]]


def target_log_denominator(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Eq. S3: log(exp(l_p) + Σ_N exp(l_n)) per (query, key); (B, N), (B, N) -> (B, N)."""
    return torch.logaddexp(pos_logits, neg_logits.logsumexp(dim=1, keepdim=True))


def all_log_denominator(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Eq. S2: log(Σ_P exp(l_p) + Σ_N exp(l_n)) per query; (B, N), (B, N) -> (B, 1)."""
    pos_lse = pos_logits.logsumexp(dim=1, keepdim=True)
    return torch.logaddexp(pos_lse, neg_logits.logsumexp(dim=1, keepdim=True))


LOG_DENOMINATORS: dict[str, LogDenominator] = {
    "target": target_log_denominator,
    "all": all_log_denominator,
}


def multi_positive_contrastive_loss(
    q: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float,
    margin: float,
    log_denominator: LogDenominator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. S2/S3 on unit q (B, d), keys (N, d) -> (loss, #queries without positive, |P(q)| (B,))."""
    sim = q @ keys.t()  # (B, d) x (N, d) -> (B, N) cosine similarities
    valid = key_labels != EMPTY_LABEL  # (N,)
    same = labels[:, None] == key_labels[None, :]  # (B, N)
    pos_mask, neg_mask = same & valid, ~same & valid
    # A huge finite fill (not -inf) keeps logsumexp gradients finite in rows with no pos/neg.
    fill = torch.finfo(sim.dtype).min
    pos_logits = ((sim - margin) / temperature).masked_fill(~pos_mask, fill)  # C̄(s, 1) / τ
    neg_logits = (sim / temperature).masked_fill(~neg_mask, fill)  # C̄(s, 0) / τ
    # (B, N): −log(exp(l_p) / denominator) for every positive pair
    neg_log_ratio = log_denominator(pos_logits, neg_logits) - pos_logits
    num_pos = pos_mask.sum(dim=1)  # (B,)
    per_query = torch.where(pos_mask, neg_log_ratio, 0.0).sum(dim=1) / num_pos.clamp_min(1)
    has_pos = num_pos > 0
    # Queries without a positive add 0 and are left out of the mean.
    loss = per_query.sum() / has_pos.sum().clamp_min(1)
    return loss, (~has_pos).sum(), num_pos


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of the query model, to serve as the MoCo key encoder."""
    key_model = copy.deepcopy(model)
    key_model.requires_grad_(False)
    return key_model


def _paired(
    key_items: NamedTensors, query_items: NamedTensors, kind: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zip two named tensor lists; raise if names differ (the models must share an architecture)."""
    key_items, query_items = list(key_items), list(query_items)
    key_names, query_names = [n for n, _ in key_items], [n for n, _ in query_items]
    if key_names != query_names:
        example = sorted(set(key_names) ^ set(query_names))[:5] or key_names[:5]
        raise ValueError(
            f"momentum_update: key and query models have different {kind} (e.g. {example})"
        )
    return [(k, q) for (_, k), (_, q) in zip(key_items, query_items, strict=True)]


@torch.no_grad()
def momentum_update(key_model: nn.Module, query_model: nn.Module, momentum: float) -> None:
    """MoCo key-encoder step: θ_k ← m·θ_k + (1 − m)·θ_q for parameters; buffers are copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum_update: momentum={momentum} must be in [0, 1]")
    params = _paired(key_model.named_parameters(), query_model.named_parameters(), "parameters")
    for key_param, query_param in params:
        key_param.lerp_(query_param.detach(), 1.0 - momentum)
    buffers = _paired(key_model.named_buffers(), query_model.named_buffers(), "buffers")
    for key_buf, query_buf in buffers:
        key_buf.copy_(query_buf)  # BN running statistics follow the query model


class MomentumContrastiveLoss(nn.Module):
    """L_con (Eq. S3) over batch keys + a labelled key queue; `denominator="all"` gives Eq. S2."""

    def __init__(
        self,
        dim: int,
        queue_size: int = 73728,
        temperature: float = 1.0 / 30.0,
        margin: float = 0.0,
        denominator: str = "target",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if dim < 1 or queue_size < 1:
            raise ValueError(f"{name}: dim={dim} and queue_size={queue_size} must be >= 1")
        if temperature <= 0:
            raise ValueError(f"{name}: temperature={temperature} must be > 0")
        if denominator not in LOG_DENOMINATORS:
            raise ValueError(
                f"{name}: denominator={denominator!r}, expected one of {sorted(LOG_DENOMINATORS)}"
            )
        self.dim, self.queue_size = dim, queue_size
        self.temperature, self.margin, self.denominator = temperature, margin, denominator
        self.log_denominator = LOG_DENOMINATORS[denominator]
        self.register_buffer("queue", torch.zeros(queue_size, dim))  # (K, d) fp32 unit keys
        empty = torch.full((queue_size,), EMPTY_LABEL, dtype=torch.long)
        self.register_buffer("queue_labels", empty)  # (K,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next slot to write
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """q (B, d) query descriptors, k (B, d) key descriptors of the same images, labels (B,)."""
        self._check_inputs(q, k, labels)
        labels = labels.long()
        # Keys never carry gradient and are fp32 whatever autocast does; ranks need equal B.
        keys = F.normalize(k.detach().float(), dim=1)  # (B, d)
        batch_keys = torch.cat(all_gather_tensor(keys))  # (world·B, d), rank order
        batch_labels = torch.cat(all_gather_tensor(labels))  # (world·B,)
        with torch.autocast(device_type=q.device.type, enabled=False):
            loss, no_pos, num_pos = multi_positive_contrastive_loss(
                F.normalize(q.float(), dim=1),
                torch.cat([batch_keys, self.queue]),  # (world·B + K, d)
                labels,
                torch.cat([batch_labels, self.queue_labels]),
                self.temperature,
                self.margin,
                self.log_denominator,
            )
        self.last_stats = {
            "num_no_positive": no_pos.detach(),
            "mean_num_positives": num_pos.float().mean().detach(),
            "queue_filled": (self.queue_labels != EMPTY_LABEL).sum(),
        }
        if self.training:
            self._dequeue_and_enqueue(batch_keys, batch_labels)
        return loss

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Ring buffer: write n keys at slots ptr, ptr+1, ... mod K, overwriting the oldest."""
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size  # (n,)
        # If n > K only the last K keys survive; index_copy_ with repeated slots is undefined.
        keep = slice(max(n - self.queue_size, 0), n)
        self.queue.index_copy_(0, slots[keep], keys[keep].to(self.queue.dtype))
        self.queue_labels.index_copy_(0, slots[keep], labels[keep])
        self.queue_ptr.add_(n).remainder_(self.queue_size)  # on device: no host sync

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise a clear error for bad shapes, non-integer or negative labels (-1 marks empty)."""
        name = type(self).__name__
        if q.dim() != 2 or q.shape[1] != self.dim or k.shape != q.shape:
            raise ValueError(
                f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, {self.dim})"
            )
        check_labels(name, labels, q.shape[0])
        if labels.numel() and labels.min() < 0:
            raise ValueError(f"{name}: label {int(labels.min())} is negative; labels must be >= 0")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, queue_size={self.queue_size}, temperature={self.temperature:.6g}, "
            f"margin={self.margin}, denominator={self.denominator!r}"
        )


class SupConLoss(MomentumContrastiveLoss):
    """SupCon L_s (Eq. S2, Tab. S10 baseline): every positive in each denominator, same queue."""

    def __init__(
        self,
        dim: int,
        queue_size: int = 73728,
        temperature: float = 1.0 / 30.0,
        margin: float = 0.0,
    ) -> None:
        super().__init__(dim, queue_size, temperature, margin, denominator="all")
