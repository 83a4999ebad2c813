"""The paper's method: the policy gradient flows only through the top-ρ highest-entropy tokens.

Per micro-batch, the loss function (run by Megatron's schedule on the last pipeline stage) computes
log-probs and entropies of the current policy with the fused vocab-parallel op, chooses the tokens
that receive gradient, and returns the clip-higher PPO loss as `(numerator, denominator, logs)`;
Megatron divides the summed gradients once by the summed denominators (see `policy.py`).

Selection (`algorithm.entropy_select`):
- `top`: the k = ⌈ρ·N⌉ highest-entropy response tokens; `bottom`: the ⌈(1−ρ)·N⌉ lowest (the paper's
  ablation); `random`: k tokens chosen uniformly (the control).
Scope (`algorithm.entropy_top_scope`):
- `global` (the paper's definition, the recipes' default): one exact threshold over every response
  token of the mini-batch on all data- and context-parallel ranks; the selection is made before the
  update by `select_mini_batch`, from the old pass's entropies for the first mini-batch and an extra
  no-grad forward of the current policy for later ones. The loss is the mini-batch's token-mean,
  whatever its split into micro-batches and ranks.
- `micro_batch` (the seed code's): the top-k is taken inside each micro-batch of a rank (across its
  context-parallel ranks), the loss is the masked mean over the micro-batch, and micro-batches are
  weighted by their share of the mini-batch's sequences (verl's `loss * n_mb / mini_batch_size`,
  averaged over data-parallel ranks). The seed's micro-batches are token budgets (verl dynamic
  batch size) holding ~16-32 responses; with `micro_batch_size: 1` the pool would be one response.
At ρ = 1 no token is dropped and both scopes are exactly DAPO's token-mean over the mini-batch.
Normalisation (`algorithm.entropy_loss_norm`): divide by the kept tokens (`kept_tokens`, the seed
code) or by all response tokens (`all_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr.algos.policy_loss import compute_policy_loss, sequence_sums
from megatron_rlvr.algos.rollout_correction import compute_rollout_correction
from megatron_rlvr.models.pipeline import local_tokens
from megatron_rlvr.ops.entropy import logprobs_and_entropy
from megatron_rlvr.ops.quantile import top_ratio_mask


@dataclass(frozen=True)
class LossSettings:
    temperature: float
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg_mode: str
    ratio: float          # entropy_top_ratio ρ (1.0 = every token)
    scope: str            # micro_batch | global
    norm: str             # kept_tokens | all_tokens
    select: str           # top | bottom | random
    # Train/inference mismatch correction (algos/rollout_correction.py): (level, method, cap)
    # when active, else None.
    correction: tuple[str, str, float] | None = None


def _groups():
    from megatron.core import parallel_state as ps
    tp = ps.get_tensor_model_parallel_world_size()
    return (ps.get_tensor_model_parallel_group() if tp > 1 else None,
            ps.get_context_parallel_group(), ps.get_context_parallel_rank(),
            ps.get_data_parallel_group(with_context_parallel=True))


def choose_tokens(entropy: torch.Tensor, mask: torch.Tensor, s: LossSettings, group,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The bool mask of tokens that train, chosen among `mask` across `group`."""
    if s.ratio >= 1.0:
        return mask.clone()
    if s.select == "top":
        return top_ratio_mask(entropy, mask, s.ratio, group=group)
    if s.select == "bottom":
        return top_ratio_mask(entropy, mask, 1.0 - s.ratio, group=group, largest=False)
    if s.select == "random":
        noise = torch.rand(entropy.shape, generator=generator, device=entropy.device)
        return top_ratio_mask(noise, mask, s.ratio, group=group)
    raise ValueError(f"algorithm.entropy_select must be top, bottom or random, got {s.select!r}")


def token_stats(mb: dict, logits: torch.Tensor, s: LossSettings) -> dict:
    """No-grad pass: this rank's log-probs and entropies of a micro-batch (context-parallel slice)."""
    tp_group, _, _, _ = _groups()
    logp, ent = logprobs_and_entropy(logits, local_tokens(mb, mb["labels"]),
                                     temperature=s.temperature, tp_group=tp_group)
    return {"logprobs": logp, "entropy": ent}


def select_mini_batch(policy, micro_batches: list[dict], s: LossSettings,
                      generator: torch.Generator | None,
                      entropies: list[torch.Tensor] | None = None) -> None:
    """The global scope's selection for one mini-batch, before its update: sets each micro-batch's
    `keep_local` (last pipeline stage). `entropies`: this rank's entropies of the current policy
    if already known (the old pass's, for the first mini-batch); otherwise a no-grad forward pass
    computes them (every pipeline stage takes part). A no-op in the micro-batch scope or at ρ = 1."""
    from megatron.core import parallel_state as ps

    if s.scope != "global" or s.ratio >= 1.0:
        return
    if entropies is None:
        entropies = [o["entropy"] for o in policy.forward(micro_batches, partial(token_stats, s=s))]
    if not ps.is_pipeline_last_stage():
        return
    keeps = select_global(entropies, [local_tokens(mb, mb["response_mask"]) for mb in micro_batches],
                          s, generator)
    for mb, keep, ent in zip(micro_batches, keeps, entropies):
        mb["keep_local"] = keep.view(ent.shape)


def select_global(entropies: list[torch.Tensor], masks: list[torch.Tensor], s: LossSettings,
                  generator: torch.Generator | None) -> list[torch.Tensor]:
    """One exact selection over the whole mini-batch (all data- and context-parallel ranks)."""
    _, _, _, dp_cp = _groups()
    flat_e = torch.cat([e.reshape(-1) for e in entropies])
    flat_m = torch.cat([m.reshape(-1) for m in masks])
    keep = choose_tokens(flat_e, flat_m, s, dp_cp, generator)
    return list(keep.split([m.numel() for m in masks]))


def _sequence_sum(x: torch.Tensor, seq_index: torch.Tensor, num_segments: int,
                  cp_group) -> torch.Tensor:
    """Per-sequence sums over the tokens of every context-parallel rank (no gradient)."""
    out = sequence_sums(x.double(), seq_index, num_segments)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(out, group=cp_group)
    return out


def dapo_loss(mb: dict, logits: torch.Tensor, s: LossSettings,
              generator: torch.Generator | None = None):
    """The micro-batch loss as `(numerator, denominator, logs)` (see the module docstring)."""
    tp_group, cp_group, cp_rank, _ = _groups()
    labels = local_tokens(mb, mb["labels"])
    response = local_tokens(mb, mb["response_mask"])
    advantages = local_tokens(mb, mb["advantages"])
    # Sequences: the rows (padded layout) or the segments of `seq_index` (packed).
    seq_index = local_tokens(mb, mb["seq_index"]) if "cu_seqlens" in mb else None
    num_segments = len(mb["cu_seqlens"]) - 1 if "cu_seqlens" in mb else labels.shape[0]
    sequences = mb.get("num_sequences", num_segments)  # a padding-only micro-batch has none
    logp, ent = logprobs_and_entropy(logits, labels, temperature=s.temperature, tp_group=tp_group)
    # On-policy single-update steps skip the old pass (trainer): the old policy is this one.
    old = mb["old_logprobs_local"] if "old_logprobs_local" in mb else logp.detach()
    # vLLM's log-probs (absent in hand-made micro-batches: no mismatch statistics then).
    rollout = local_tokens(mb, mb["rollout_logprobs"]) if "rollout_logprobs" in mb \
        else logp.detach()
    if s.scope == "global" or s.ratio >= 1.0:
        keep = mb["keep_local"] if s.ratio < 1.0 else response
    else:
        keep = choose_tokens(ent.detach(), response, s, cp_group, generator)
    count_mask = keep if s.norm == "kept_tokens" else response
    weights, corr_logs, dropped_seqs = None, {}, None
    if s.correction is not None:
        level, method, cap = s.correction
        corr = compute_rollout_correction(old, rollout, response, level=level, method=method,
                                          cap=cap, seq_index=seq_index, num_seqs=num_segments,
                                          cp_group=cp_group)
        # Dropped (MIS) tokens leave the loss and its denominator alike.
        keep, count_mask, weights = keep & corr.mask, count_mask & corr.mask, corr.weights
        corr_logs = corr.metrics
        if corr.seq_kept is not None:
            dropped_seqs = (~corr.seq_kept).sum()
    lead = cp_rank == 0  # count each sequence / micro-batch once over its context-parallel ranks
    per_micro_batch = s.scope == "micro_batch" and s.ratio < 1.0 and s.loss_agg_mode == "token-mean"

    # Sum of per-token (or per-sequence) losses over this rank's tokens; denominators are counts.
    token_mean = s.loss_agg_mode == "token-mean"
    seq_counts = _sequence_sum(count_mask, seq_index, num_segments, cp_group) \
        if s.loss_agg_mode == "seq-mean-token-mean" else None
    total, metrics = compute_policy_loss(
        logp, old, advantages, keep, clip_ratio_low=s.clip_ratio_low,
        clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c,
        loss_agg_mode=s.loss_agg_mode, denominator=1.0, seq_token_counts=seq_counts,
        seq_index=seq_index, num_seqs=num_segments, weights=weights)
    # Counts stay on the device: Megatron all-reduces the denominators over data-parallel ranks.
    if token_mean:
        count = count_mask.sum(dtype=torch.int64)
    else:
        count = torch.tensor(sequences if lead else 0, dtype=torch.int64, device=logits.device)
        if dropped_seqs is not None and lead:  # sequences MIS dropped leave the denominator
            count = count - dropped_seqs
    if per_micro_batch:
        # The seed code: the micro-batch's masked mean, weighted by its sequences; Megatron then
        # divides by the mini-batch's sequences (the summed denominators).
        mb_count = count.double()
        if dist.get_world_size(cp_group) > 1:
            dist.all_reduce(mb_count, group=cp_group)
        total = total * (sequences / mb_count.clamp(min=1))
        count = torch.tensor(sequences if lead else 0, dtype=torch.int64, device=logits.device)
    denominator = count.int()
    with torch.no_grad():
        kept_ent = ent.masked_fill(~keep, float("inf"))
        logs = {
            "numerator": total.detach(), "denominator": denominator,
            "kept_count": keep.sum(), "response_count": response.sum(),
            "kept_entropy_min": kept_ent.min() if keep.any() else ent.new_tensor(float("inf")),
            # The policy's own statistics (the trainer reports them when the old pass is skipped).
            "entropy_sum": (ent.double() * response).sum(),
            "mismatch_sum": ((logp.detach() - rollout).abs().double() * response).sum(),
            "mismatch_max": (logp.detach() - rollout).abs().masked_fill(~response, 0).max()
            .double(),
            **metrics, **corr_logs,
        }
    return total, denominator, logs



