"""Train/inference mismatch correction: truncated (TIS) and masked (MIS) importance sampling.

The responses were sampled by the rollout engine (vLLM), whose probabilities differ from the old
policy's (the trainer's forward on the same weights) through numerics, and through weights when
rollouts are off-policy (stale or asynchronous). The PPO ratio exp(logp − logp_old) corrects only
from the old policy to the current one; the importance weight

    w_t = exp(logp_old_t − logp_rollout_t)                               (per response token t)

corrects from the rollout engine to the old policy. It multiplies each token's policy-gradient
loss (after PPO's clipping), bounded by a cap C > 1 (`algorithm.rollout_correction`):

level (what one weight covers)
    token       w_t itself.
    sequence    W_i = Π_{t∈i} w_t = exp(Σ_{t∈i} log w_t): the exact likelihood ratio of sequence i,
                given to each of its tokens. Unbiased, but its spread grows with length; for
                long chain-of-thought responses it is usually far from 1 (use a large C, or mask).
    geometric   W_i = exp(mean_{t∈i} log w_t): the geometric mean of the token weights; length-
                independent, biased; its natural bounds are tight (C ≈ 1.001–1.01).
method (how C bounds it)
    truncate    TIS: weight min(w, C); no lower bound, every token stays in the loss.
    mask        MIS: tokens (token level) or whole sequences (sequence, geometric) with w outside
                [1/C, C] are dropped: the returned mask excludes them, so they leave the loss's
                numerator and its denominator (token count); the others keep their weight w.
Bounds are inclusive (w = C is neither truncated nor dropped). Log-ratios are clamped to ±20 per
token (as the PPO ratio in `policy_loss.py`) and the comparison with C is made in log space, so
garbage log-probs and sequence sums of thousands of tokens never overflow.

Layouts. All per-token inputs share one shape: padded `[B, T]` (one sequence a row), or packed
`[1, T]` / `[T]` with several sequences concatenated; `seq_index` (int, same shape) then says which
sequence each token belongs to (`seq_index_from_cu_seqlens` makes it from `cu_seqlens`), numbered
0 .. num_seqs − 1 identically on every context-parallel rank. Only positions inside `mask` are read;
padding may hold anything (NaN included). With context parallelism a sequence's tokens are split
over the CP ranks: its log-ratio sum is all-reduced over `cp_group` (sequence and geometric levels
only; every CP rank must call, with the same `num_seqs`). The token level needs no collective.

Metrics are detached float64 sums and counts over this rank's tokens (keys `METRIC_KEYS`, all
SUM-reduced): sum them over micro-batches and data/context-parallel ranks, then
`finalize_metrics` divides:
    rollout_corr/weight_mean        mean applied weight over the tokens left in the loss
    rollout_corr/clipped_fraction   response tokens whose weight was truncated at C (truncate)
    rollout_corr/masked_fraction    response tokens dropped (mask)
    rollout_corr/kl                 k3 estimate of KL(rollout ‖ old): mean over response tokens of
                                    w − 1 − log w (per token whatever the level; ≥ 0, unbiased
                                    since the tokens are sampled from the rollout policy)
Everything runs on the inputs' device without host synchronisation.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, NamedTuple

import torch
import torch.distributed as dist

Level = Literal["token", "sequence", "geometric"]
Method = Literal["truncate", "mask"]
LEVELS = ("token", "sequence", "geometric")
METHODS = ("truncate", "mask")

_MAX_LOG_RATIO = 20.0

METRIC_KEYS = ("corr_tokens_count",   # response tokens seen (the input mask)
               "corr_kept_count",     # tokens left in the loss (the output mask)
               "corr_weight_sum",     # sum of the applied weights over the kept tokens
               "corr_clipped_count",  # tokens whose weight was truncated at C
               "corr_masked_count",   # tokens dropped
               "corr_kl_sum")         # sum of w - 1 - log w over the response tokens


class RolloutCorrection(NamedTuple):
    """What `compute_rollout_correction` returns (every tensor detached, on the inputs' device).

    weights      float32, the inputs' shape: the weight that multiplies each token's loss; 0 outside
                 `mask`.
    mask         bool, the inputs' shape: the tokens the loss keeps, numerator and count alike: the
                 input mask minus the dropped tokens (truncate: the input mask itself).
    metrics      METRIC_KEYS -> 0-dim float64 sums/counts (see the module docstring).
    seq_weights  float64 [num_seqs], the weight each sequence's tokens get (sequence/geometric
                 levels; 0 for a dropped sequence); None at the token level.
    seq_kept     bool [num_seqs], sequences not dropped (sequence/geometric levels); None at the
                 token level. Identical on every CP rank.
    """
    weights: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, torch.Tensor]
    seq_weights: torch.Tensor | None
    seq_kept: torch.Tensor | None


def check_settings(level: str, method: str, cap: float) -> None:
    """Raise ValueError unless level/method are known and cap is a finite number > 1."""
    if level not in LEVELS:
        raise ValueError(f"rollout correction level must be one of {', '.join(LEVELS)}, "
                         f"got {level!r}")
    if method not in METHODS:
        raise ValueError(f"rollout correction method must be one of {', '.join(METHODS)}, "
                         f"got {method!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) \
            or cap <= 1:
        raise ValueError(f"rollout correction cap must be a finite number > 1 (the bounds are "
                         f"[1/cap, cap]), got {cap!r}")


def seq_index_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sequence id (int64, [num_tokens], on cu_seqlens' device) of each position of a packed row
    whose sequence i spans [cu_seqlens[i], cu_seqlens[i+1]). Positions at or past cu_seqlens[-1]
    get id len(cu_seqlens) − 1 (one past the last sequence): they must be outside the mask."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [num_seqs + 1], got shape "
                         f"{tuple(cu_seqlens.shape)}")
    pos = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)


def compute_rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                               mask: torch.Tensor, *, level: Level = "token",
                               method: Method = "truncate", cap: float = 2.0,
                               seq_index: torch.Tensor | None = None, num_seqs: int | None = None,
                               cp_group=None) -> RolloutCorrection:
    """Importance weights, the loss mask and metrics for one micro-batch (module docstring).

    old_logprobs, rollout_logprobs: the old policy's and the rollout engine's log-probs of the
        sampled tokens, same shape, aligned per position. mask: the response tokens (bool-like).
    seq_index, num_seqs: the sequence of each position and how many sequences there are, for the
        sequence/geometric levels. Default: one sequence per row of a 2-D input (num_seqs = rows).
    cp_group: the context-parallel group over which sequences are split (None: not split).
    """
    check_settings(level, method, cap)
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and mask {tuple(mask.shape)} must have "
                         "the same shape")
    m = mask.bool()
    with torch.no_grad():
        log_w = (old_logprobs.double() - rollout_logprobs.double()).clamp(
            -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        log_w = torch.where(m, log_w, torch.zeros_like(log_w))  # padding may hold NaN
        log_cap = math.log(cap)

        seq_log_w = seq_weights = seq_kept = None
        if level == "token":
            applied = log_w
        else:
            ids, n = _sequence_index(m, seq_index, num_seqs)
            flat_ids = torch.where(m, ids, torch.zeros_like(ids)).reshape(-1)
            sums = torch.zeros((2, n), dtype=torch.float64, device=log_w.device)
            sums[0].index_add_(0, flat_ids, log_w.reshape(-1))
            sums[1].index_add_(0, flat_ids, m.reshape(-1).double())
            _all_reduce_sum(sums, cp_group)
            seq_log_w = sums[0] if level == "sequence" else sums[0] / sums[1].clamp(min=1)
            applied = seq_log_w[flat_ids].view(log_w.shape)

        if method == "truncate":
            keep = m.clone()  # never the caller's mask itself (`bool()` of a bool tensor is it)
            clipped = m & (applied > log_cap)
            w = torch.exp(applied.clamp(max=log_cap))
        else:
            keep = m & (applied >= -log_cap) & (applied <= log_cap)
            clipped = torch.zeros_like(m)
            w = torch.exp(applied.clamp(-log_cap, log_cap))
        weights = torch.where(keep, w, torch.zeros_like(w))
        if seq_log_w is not None:
            if method == "truncate":
                seq_kept = torch.ones_like(seq_log_w, dtype=torch.bool)
                seq_weights = torch.exp(seq_log_w.clamp(max=log_cap))
            else:
                seq_kept = (seq_log_w >= -log_cap) & (seq_log_w <= log_cap)
                seq_weights = torch.where(seq_kept, torch.exp(seq_log_w.clamp(-log_cap, log_cap)),
                                          torch.zeros_like(seq_log_w))

        f64 = torch.float64
        k3 = torch.where(m, torch.expm1(log_w) - log_w, torch.zeros_like(log_w))
        metrics = {
            "corr_tokens_count": m.sum(dtype=f64),
            "corr_kept_count": keep.sum(dtype=f64),
            "corr_weight_sum": weights.sum(dtype=f64),
            "corr_clipped_count": clipped.sum(dtype=f64),
            "corr_masked_count": (m & ~keep).sum(dtype=f64),
            "corr_kl_sum": k3.sum(dtype=f64),
        }
    return RolloutCorrection(weights.float(), keep, metrics, seq_weights, seq_kept)


def _sequence_index(m: torch.Tensor, seq_index: torch.Tensor | None,
                  num_seqs: int | None) -> tuple[torch.Tensor, int]:
    if seq_index is None:
        if m.dim() != 2:
            raise ValueError(f"sequence-level correction of a {m.dim()}-D input needs seq_index "
                             "and num_seqs (one sequence a row only for [B, T] inputs)")
        rows = m.shape[0]
        if num_seqs is not None and num_seqs != rows:
            raise ValueError(f"num_seqs {num_seqs} != {rows} rows (one sequence a row without "
                             "seq_index)")
        ids = torch.arange(rows, device=m.device).unsqueeze(1).expand(m.shape)
        return ids, rows
    if seq_index.shape != m.shape:
        raise ValueError(f"seq_index {tuple(seq_index.shape)} must have the shape of the log-probs "
                         f"{tuple(m.shape)}")
    if seq_index.dtype.is_floating_point or seq_index.dtype == torch.bool:
        raise ValueError(f"seq_index must be an integer tensor, got {seq_index.dtype}")
    if num_seqs is None or num_seqs < 1:
        raise ValueError(f"seq_index needs num_seqs >= 1 (the same on every context-parallel "
                         f"rank), got {num_seqs!r}")
    return seq_index.long(), int(num_seqs)


def finalize_metrics(sums: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """The logged metrics from METRIC_KEYS sums (over micro-batches and ranks); host floats."""
    v = {k: float(sums[k]) for k in METRIC_KEYS}
    tokens = max(v["corr_tokens_count"], 1.0)
    return {
        "rollout_corr/weight_mean": v["corr_weight_sum"] / max(v["corr_kept_count"], 1.0),
        "rollout_corr/clipped_fraction": v["corr_clipped_count"] / tokens,
        "rollout_corr/masked_fraction": v["corr_masked_count"] / tokens,
        "rollout_corr/kl": v["corr_kl_sum"] / tokens,
    }
