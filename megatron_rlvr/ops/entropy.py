"""Fused, chunked, vocab-parallel log-probs of the sampled tokens and entropy of the distribution.

Every policy update needs log p(label) for the PPO ratio and the entropy H of the whole next-token
distribution (to keep the top-20% tokens). The straightforward way (log_softmax + gather, then
logsumexp - sum(softmax * logits)) holds two or three float32 copies of the [tokens, vocab] logits;
with Qwen's 151,936-token vocabulary that is the most common cause of OOM. Here the work goes over
chunks of tokens, in float32 whatever the input dtype, so the extra memory is O(chunk x V_local);
backward recomputes the softmax of each chunk from the saved per-token max and log-sum-exp
instead of keeping it, and needs no collective. With tensor parallelism each rank holds the
vocabulary shard [rank * V_local, (rank + 1) * V_local) and the forward makes two small
all-reduces a chunk (max; then sum of exp, sum of p*z and the label's logit together).

Padded vocabulary columns may hold -inf (or the dtype's most negative value): a zero probability
contributes exactly 0 to the entropy and its gradient, never 0 * (-inf).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["logprobs_and_entropy", "logprobs_and_entropy_from_hidden"]

_FLOAT32_MIN = torch.finfo(torch.float32).min
# Default chunk: float32 working buffers of about this many elements (2^20 floats = 4 MiB), small
# enough to stay in a CPU's L3 cache, large enough that per-chunk overhead is noise on a GPU.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                         tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = None,
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log p(labels), entropy) of softmax(logits / T), float32, in the shape of labels.

    logits: [..., V_local] float32 or bfloat16, this rank's vocabulary shard (not modified).
    labels: [...] global token ids. tp_group: the tensor-parallel group the vocabulary is sharded
    over (None: no tensor parallelism). chunk_size: tokens per chunk (None: a size that keeps the
    working buffers at a few MiB on CPU, 256 MiB on GPU). Log-probs are differentiable with respect
    to logits; entropy only with entropy_grad=True (for an entropy bonus).
    """
    vocab_local = _check(logits, labels, temperature, chunk_size)
    rank, vocab = _vocab_range(vocab_local, tp_group)
    _check_labels(labels, vocab)
    chunk = chunk_size or _default_chunk(logits.device, vocab_local)
    logp, ent = _LogprobsEntropy.apply(logits.reshape(-1, vocab_local), labels.reshape(-1),
                                       float(temperature), tp_group, rank * vocab_local, chunk,
                                       entropy_grad)
    return logp.view(labels.shape), ent.view(labels.shape)


def logprobs_and_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor,
                                     labels: torch.Tensor, *, temperature: float = 1.0,
                                     tp_group: dist.ProcessGroup | None = None,
                                     chunk_size: int | None = None, entropy_grad: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs_and_entropy(hidden @ weight.T, labels, ...) without materialising the logits.

    hidden: [..., D], the final hidden states, the same on every TP rank. weight: [V_local, D], this
    rank's shard of the (vocab-parallel) output layer. Each chunk's logits are recomputed in
    backward. The gradient of hidden is summed over the TP group here (what Megatron's
    copy-to-tensor-parallel-region does before a column-parallel output layer), so hand this op the
    hidden states from before that region. Sequence parallelism is not handled: gather first.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V_local, D] do not match: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    vocab_local = weight.shape[0]
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    _check_options(temperature, chunk_size, labels)
    rank, vocab = _vocab_range(vocab_local, tp_group)
    _check_labels(labels, vocab)
    chunk = chunk_size or _default_chunk(hidden.device, vocab_local)
    logp, ent = _HiddenLogprobsEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                             labels.reshape(-1), float(temperature), tp_group,
                                             rank * vocab_local, chunk, entropy_grad)
    return logp.view(labels.shape), ent.view(labels.shape)


# ----------------------------------------------------------------------------- argument checks

def _check(logits, labels, temperature, chunk_size) -> int:
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits' shape without "
                         f"its vocabulary dimension, {tuple(logits.shape[:-1])}")
    _check_options(temperature, chunk_size, labels)
    return logits.shape[-1]


def _check_options(temperature, chunk_size, labels) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")


def _vocab_range(vocab_local: int, tp_group) -> tuple[int, int]:
    """(this rank's index in the TP group, the global vocabulary size)."""
    if tp_group is None:
        return 0, vocab_local
    return dist.get_rank(tp_group), vocab_local * dist.get_world_size(tp_group)


def _check_labels(labels: torch.Tensor, vocab: int) -> None:
    if labels.numel() == 0:
        return
    lo, hi = labels.min().item(), labels.max().item()
    if lo < 0 or hi >= vocab:
        raise ValueError(f"labels must be token ids in [0, {vocab}), got ids in [{lo}, {hi}]")


def _default_chunk(device: torch.device, vocab_local: int) -> int:
    budget = _CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // vocab_local)


# ----------------------------------------------------------------------------- per-chunk math

def _row_max(logits: torch.Tensor, tp_group) -> torch.Tensor:
    m = logits.amax(dim=-1).float()
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    return m


def _shifted(logits: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh float32 (logits - max) / T; the caller's tensor is never written.

    The max goes first so that T's rounding applies to small differences, not to large logits.
    """
    y = torch.sub(logits, row_max.unsqueeze(-1))  # float32 whatever logits' dtype
    return y.div_(temperature) if temperature != 1.0 else y


def _chunk_stats(logits, local_label, owned, temperature, tp_group):
    """Return (max, log S, entropy, log p(label)) of a chunk of logits.

    y = (z - max) / T; S = sum exp(y); A = sum exp(y) * y; then H = log S - A / S and
    log p(label) = y_label - log S. Under TP the max is all-reduced first, then S, A and y_label
    (zero on ranks that do not own the label) in one all-reduce.
    """
    m = _row_max(logits, tp_group)
    y = _shifted(logits, m, temperature)
    stats = torch.empty(3, y.shape[0], dtype=torch.float32, device=y.device)
    stats[2] = torch.where(owned, y.gather(-1, local_label.unsqueeze(-1)).squeeze(-1), 0.0)
    y.clamp_(min=_FLOAT32_MIN)  # exp(-inf) = 0 stays 0, and 0 * y is 0 instead of NaN
    e = torch.exp(y)
    torch.sum(e, dim=-1, out=stats[0])
    torch.sum(e.mul_(y), dim=-1, out=stats[1])
    if tp_group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
    sum_exp, sum_ey, label_y = stats
    log_sum_exp = sum_exp.log()
    return m, log_sum_exp, log_sum_exp - sum_ey / sum_exp, label_y - log_sum_exp


def _chunk_grad(logits, local_label, owned, m, log_sum_exp, ent, temperature, g_logp, g_ent):
    """Return d(loss)/d(logits) of a chunk, float32; g_logp and g_ent already carry the 1/T.

    d log p(label)/dy_v = onehot_v - p_v;  dH/dy_v = -p_v (log p_v + H);  y = (z - max) / T.
    """
    logp_v = _shifted(logits, m, temperature).sub_(log_sum_exp.unsqueeze(-1))
    if g_ent is None:
        grad = logp_v.exp_().mul_(-g_logp)
    else:
        p = torch.exp(logp_v)
        t = logp_v.add_(ent.unsqueeze(-1)).clamp_(min=_FLOAT32_MIN).mul_(p)  # p (log p + H)
        grad = p.mul_(g_logp).add_(t.mul_(g_ent)).neg_()
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, local_label] += torch.where(owned, g_logp.squeeze(-1), 0.0)
    return grad


def _labels_local(labels, vocab_start, vocab_local):
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.clamp_(0, vocab_local - 1), owned


def _forward(logits_of, n, local_label, owned, temperature, tp_group, chunk, device):
    """Run _chunk_stats over chunks; return float32 (max, log S, entropy, log p), each [n]."""
    out = tuple(torch.empty(n, dtype=torch.float32, device=device) for _ in range(4))
    for s in range(0, n, chunk):
        c = slice(s, s + chunk)
        for whole, part in zip(out, _chunk_stats(logits_of(c), local_label[c], owned[c],
                                                 temperature, tp_group)):
            whole[c] = part
    return out


def _backward_scales(g_logp, g_ent, temperature, entropy_grad):
    """Output gradients as float32 columns, with the 1/T of dy/dz folded in."""
    g_logp = (g_logp.float() / temperature).unsqueeze(-1)
    if not entropy_grad:
        return g_logp, None
    return g_logp, (g_ent.float() / temperature).unsqueeze(-1)


# ----------------------------------------------------------------------------- autograd

class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, tp_group, vocab_start, chunk, entropy_grad):
        local_label, owned = _labels_local(labels, vocab_start, logits.shape[1])
        m, log_sum_exp, ent, logp = _forward(lambda c: logits[c], logits.shape[0], local_label,
                                             owned, temperature, tp_group, chunk, logits.device)
        ctx.save_for_backward(logits, local_label, owned, m, log_sum_exp, ent)
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_label, owned, m, log_sum_exp, ent = ctx.saved_tensors
        g_logp, g_ent = _backward_scales(g_logp, g_ent, ctx.temperature, ctx.entropy_grad)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            g_ent_c = None if g_ent is None else g_ent[c]
            grad[c] = _chunk_grad(logits[c], local_label[c], owned[c], m[c], log_sum_exp[c],
                                  ent[c], ctx.temperature, g_logp[c], g_ent_c)
        return grad, None, None, None, None, None, None


class _HiddenLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, tp_group, vocab_start, chunk,
                entropy_grad):
        local_label, owned = _labels_local(labels, vocab_start, weight.shape[0])
        m, log_sum_exp, ent, logp = _forward(lambda c: hidden[c] @ weight.t(), hidden.shape[0],
                                             local_label, owned, temperature, tp_group, chunk,
                                             hidden.device)
        ctx.save_for_backward(hidden, weight, local_label, owned, m, log_sum_exp, ent)
        ctx.temperature, ctx.chunk, ctx.entropy_grad = temperature, chunk, entropy_grad
        ctx.tp_group = tp_group
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, local_label, owned, m, log_sum_exp, ent = ctx.saved_tensors
        g_logp, g_ent = _backward_scales(g_logp, g_ent, ctx.temperature, ctx.entropy_grad)
        grad_hidden = torch.empty_like(hidden)
        # Accumulated over chunks in float32, cast to the weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            g_ent_c = None if g_ent is None else g_ent[c]
            grad_z = _chunk_grad(hidden[c] @ weight.t(), local_label[c], owned[c], m[c],
                                 log_sum_exp[c], ent[c], ctx.temperature, g_logp[c], g_ent_c)
            grad_hidden[c] = grad_z.to(weight.dtype) @ weight
            grad_weight.addmm_(grad_z.t(), hidden[c].float())
        if ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None
