"""Clip-higher PPO policy loss with dual clip (DAPO), and its aggregation over tokens.

Per token, with ratio = exp(logp - logp_old):
    pg1 = -A * ratio
    pg2 = -A * clip(ratio, 1 - eps_low, 1 + eps_high)
    loss = max(pg1, pg2)                  (PPO's pessimistic bound, asymmetric clip)
    loss = min(loss, -A * c)  if A < 0    (dual clip: bounds the loss of very off-policy tokens)

Distributed use. The trainer splits a mini-batch into micro-batches over data-parallel ranks and
sums their gradients, so each micro-batch's loss must already be divided by the *mini-batch*
total. Pass that total as `denominator`:
    token-mean            denominator = loss tokens in the whole mini-batch (all ranks)
    seq-mean-token-sum    denominator = sequences in the whole mini-batch
    seq-mean-token-mean   denominator = sequences in the whole mini-batch
Then the sum over micro-batches and ranks of the returned losses is exactly the mini-batch loss
(with gradients averaged, not summed, over DP: multiply by the DP size). Without `denominator`
the loss is the micro-batch's own mean.
"""
from __future__ import annotations

from typing import Literal

import torch

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]

# |logp - logp_old| is clamped here before exp (as verl): a ratio of e^20 already saturates every
# clip, and the clamp keeps exp finite for garbage log-probs.
_MAX_LOG_RATIO = 20.0


def sequence_sums(x: torch.Tensor, seq_index: torch.Tensor | None, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums of the per-token `x`: over each row ([B, T] padded layout, `seq_index`
    None), or over the tokens `seq_index` assigns to each of `num_seqs` sequences (packed)."""
    if seq_index is None:
        return x.sum(-1)
    return x.new_zeros(num_seqs).index_add(0, seq_index.reshape(-1), x.reshape(-1))


def aggregate_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, mode: LossAggMode,
                   denominator: float | torch.Tensor | None = None,
                   seq_token_counts: torch.Tensor | None = None,
                   seq_index: torch.Tensor | None = None,
                   num_seqs: int | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar (see the module docstring for `denominator`).

    Sequences are the rows, or, for packed micro-batches, given by `seq_index` (each token's
    sequence, < `num_seqs`). `seq_token_counts` [sequences]: the per-sequence token counts that
    `seq-mean-token-mean` divides by; default the mask's. (Under entropy selection with all-token
    normalisation the trainer passes the response lengths.) A sequence with no tokens contributes 0.
    """
    mask = loss_mask.to(token_loss.dtype)
    masked = token_loss * mask
    sequences = token_loss.shape[0] if seq_index is None else num_seqs
    if mode == "token-mean":
        total = masked.sum()
        default = mask.sum()
    elif mode == "seq-mean-token-sum":
        total = masked.sum()
        default = sequences
    elif mode == "seq-mean-token-mean":
        counts = sequence_sums(mask, seq_index, sequences) if seq_token_counts is None \
            else seq_token_counts.to(mask.dtype)
        total = (sequence_sums(masked, seq_index, sequences) / counts.clamp(min=1)).sum()
        default = sequences
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    denom = default if denominator is None else denominator
    if torch.is_tensor(denom):
        denom = denom.to(total.dtype).clamp(min=1)
    else:
        denom = max(float(denom), 1.0)
    return total / denom


def compute_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                        clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: float,
                        loss_agg_mode: LossAggMode = "token-mean",
                        denominator: float | torch.Tensor | None = None,
                        seq_token_counts: torch.Tensor | None = None,
                        seq_index: torch.Tensor | None = None, num_seqs: int | None = None,
                        weights: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (scalar, differentiable w.r.t. `logprobs`) and metrics; all inputs [B, T] (packed
    micro-batches: [1, T] with `seq_index`/`num_seqs`, see `aggregate_loss`).

    `loss_mask` marks the tokens that receive gradient (response tokens, and under entropy
    selection only the kept ones). `weights` (detached, optional): per-token importance weights of
    the train/inference mismatch correction (algos/rollout_correction.py), applied to each token's
    loss after the clipping. Metrics are detached sums/counts/maxima over those tokens, so
    the trainer can reduce them exactly across micro-batches and ranks: keys ending in `_sum` or
    `_count` with SUM, `_max` with MAX; divide by `tokens_count` afterwards for fractions/means:
        tokens_count          tokens in the mask
        clip_high_count       A > 0 and ratio > 1 + eps_high (gradient clipped)
        clip_low_count        A < 0 and ratio < 1 - eps_low  (gradient clipped)
        dual_clip_count       A < 0 and ratio > c            (dual clip active)
        ratio_sum, ratio_max  importance ratio
        approx_kl_sum         logp_old - logp (mean = k1 estimate of KL(old || new))
    """
    mask = loss_mask.bool()
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = torch.maximum(pg1, pg2)
    dual = -advantages * clip_ratio_c
    negative = advantages < 0
    token_loss = torch.where(negative, torch.minimum(clipped, dual), clipped)
    if weights is not None:
        token_loss = token_loss * weights
    loss = aggregate_loss(token_loss, loss_mask, loss_agg_mode, denominator, seq_token_counts,
                          seq_index, num_seqs)

    with torch.no_grad():
        r = ratio.detach()
        count = lambda cond: (cond & mask).sum()  # noqa: E731
        metrics = {
            "tokens_count": mask.sum(),
            "clip_high_count": count((advantages > 0) & (r > 1.0 + clip_ratio_high)),
            "clip_low_count": count(negative & (r < 1.0 - clip_ratio_low)),
            "dual_clip_count": count(negative & (r > clip_ratio_c)),
            "ratio_sum": (r * mask).sum(),
            "ratio_max": r.masked_fill(~mask, float("-inf")).max() if mask.any()
            else r.new_tensor(float("-inf")),
            "approx_kl_sum": (-log_ratio.detach() * mask).sum(),
        }
    return loss, metrics
