"""A float64 re-derivation of the trainer's loss, written from the method's definition
(DESIGN.md, "The method, precisely"; config.py's option texts), not from `algos/high_entropy.py`.

Shared by tests/test_dapo_loss.py (one process) and tests/dist/dapo_loss_cp.py (context parallel).

Inputs are hand-made: full-vocabulary logits (float32 values, read in float64 here), labels,
response masks of varied lengths (one response of a single token), per-sequence advantages of
both signs, and old log-probs = current - noise so the ratios cross both clip bounds and the
dual clip. The mini-batch is N sequences split into micro-batches of MBS.
"""
from __future__ import annotations

from fractions import Fraction
import math

import torch

N, S, V, MBS = 6, 16, 11, 2
T = 0.8
EPS_LOW, EPS_HIGH, C = 0.2, 0.28, 3.0
# (prompt length, response length) per sequence; the rest is padding.
LENGTHS = [(3, 12), (2, 1), (5, 9), (1, 15), (4, 7), (6, 10)]
ADVANTAGES = [1.3, -0.8, 0.5, -1.6, 0.9, -0.4]
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def make_inputs(seed: int = 0) -> dict:
    """Host tensors of one mini-batch; `logits` [N, S, V] float32."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, S, V, generator=g, dtype=torch.float64) * 2.0).float()
    labels = torch.randint(0, V, (N, S), generator=g)
    response = torch.zeros(N, S, dtype=torch.bool)
    for i, (p, r) in enumerate(LENGTHS):
        response[i, p - 1:p - 1 + r] = True
    logp, ent = reference_stats(logits, labels)
    # Ratios exp(noise) in [e^-1.6, e^1.6]: some beyond 1 + eps_high, below 1 - eps_low, above c.
    noise = (torch.rand(N, S, generator=g, dtype=torch.float64) - 0.5) * 3.2
    # vLLM's log-probs: the policy's plus a small mismatch of either sign.
    mismatch = (torch.rand(N, S, generator=g, dtype=torch.float64) - 0.5) * 0.02
    return {"logits": logits, "labels": labels, "response_mask": response,
            "advantages": torch.tensor(ADVANTAGES)[:, None].expand(N, S).contiguous(),
            "old_logprobs": (logp - noise).float(), "rollout_logprobs": (logp + mismatch).float(),
            "entropy64": ent}


def reference_stats(logits: torch.Tensor, labels: torch.Tensor):
    """float64 log p(label) and entropy of softmax(logits / T) (differentiable)."""
    logp_all = torch.log_softmax(logits.double() / T, -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def token_loss(logp, old, adv):
    """Clip-higher PPO with dual clip, per token (DESIGN.md)."""
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    return torch.where(adv < 0, torch.minimum(loss, -adv * C), loss)


def kept_count(ratio: float, select: str, n: int) -> int:
    """k = ceil(rho * n) for top/random, ceil((1 - rho) * n) for bottom, in exact arithmetic."""
    rho = Fraction(ratio).limit_denominator(1000)
    return math.ceil((1 - rho if select == "bottom" else rho) * n)


def extreme_mask(score: torch.Tensor, mask: torch.Tensor, k: int, largest: bool,
                 gap: float = 1e-5) -> torch.Tensor:
    """The k largest (smallest) masked scores, by torch.topk, with a margin check at the
    threshold (so float32 rounding in the code under test cannot flip the choice)."""
    fill = -math.inf if largest else math.inf
    flat = torch.where(mask, score.double(), torch.tensor(fill, dtype=torch.float64)).reshape(-1)
    n = int(mask.sum())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k == 0:
        return keep.view(mask.shape)
    values, idx = flat.topk(min(k + 1, n), largest=largest)
    if k < n:
        assert abs(values[k - 1] - values[k]) > gap, "a tie at the threshold: change the seed"
    keep[idx[:k]] = True
    return keep.view(mask.shape)


def reference_keep(inp: dict, ratio: float, scope: str, select: str,
                   noise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The kept tokens [N, S]. Pools: the whole mini-batch (global) or each micro-batch.
    `noise`: for select=random, one score tensor per pool (the uniform draws)."""
    mask = inp["response_mask"]
    if ratio >= 1.0:
        return mask.clone()
    pools = [slice(0, N)] if scope == "global" else [slice(j, j + MBS) for j in range(0, N, MBS)]
    keep = torch.zeros_like(mask)
    for i, rows in enumerate(pools):
        m = mask[rows]
        k = kept_count(ratio, select, int(m.sum()))
        if select == "random":
            score, largest = noise[i].view(m.shape), True
        else:
            score, largest = inp["entropy64"][rows], select == "top"
        keep[rows] = extreme_mask(score, m, k, largest)
    return keep


def reference_loss(logits: torch.Tensor, inp: dict, keep: torch.Tensor, ratio: float, scope: str,
                   norm: str, mode: str) -> torch.Tensor:
    """The mini-batch loss in float64 (differentiable w.r.t. `logits`):
      token-mean, global scope or rho = 1: sum of kept token losses / count over the mini-batch
        (count = kept tokens, or all response tokens with norm all_tokens; at rho = 1 both);
      token-mean, micro_batch scope: per micro-batch, the same mean within it, weighted by its
        share of the mini-batch's sequences (the seed code);
      seq-mean-token-sum: mean over sequences of each sequence's summed kept token losses;
      seq-mean-token-mean: mean over sequences of each sequence's kept-token-loss sum / its count
        (kept tokens or response tokens; a sequence with no tokens counted contributes 0).
    """
    mask = inp["response_mask"]
    logp, _ = reference_stats(logits, inp["labels"])
    pg = token_loss(logp, inp["old_logprobs"].double(), inp["advantages"].double())
    kept = pg * keep
    count = keep if (norm == "kept_tokens" and ratio < 1.0) else mask
    if mode == "token-mean":
        if scope == "global" or ratio >= 1.0:
            return kept.sum() / count.sum()
        total = 0.0
        for j in range(0, N, MBS):
            total = total + kept[j:j + MBS].sum() / count[j:j + MBS].sum() * (MBS / N)
        return total
    if mode == "seq-mean-token-sum":
        return kept.sum(-1).sum() / N
    if mode == "seq-mean-token-mean":
        per_seq = kept.sum(-1) / count.sum(-1).clamp(min=1)
        return per_seq.sum() / N
    raise ValueError(mode)


def cases():
    """(ratio, scope, norm, select, mode): every branch of dapo_loss."""
    out = [(1.0, scope, "kept_tokens", "top", mode)
           for scope in ("global", "micro_batch") for mode in MODES]
    out += [(0.2, scope, norm, select, mode)
            for scope in ("global", "micro_batch") for norm in ("kept_tokens", "all_tokens")
            for select in ("top", "bottom", "random") for mode in MODES]
    return out


def cp_cases():
    """The branches where context parallelism changes the code path: every (ρ, scope, norm, mode)
    with top selection (pools across ranks, per-sequence counts summed over ranks, sequences
    counted once); bottom and random (each rank's own draws) once per scope. The one-process test
    runs every combination."""
    return [c for c in cases()
            if c[3] == "top" or (c[2] == "kept_tokens" and c[4] == "token-mean")]
