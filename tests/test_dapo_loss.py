"""`algos/high_entropy.py::dapo_loss`, the loss the trainer calls, against a float64 re-derivation
(tests/dapo_reference.py) on a hand-made mini-batch, for every branch: ρ = 1 and ρ = 0.2; scope
global / micro_batch; norm kept_tokens / all_tokens; select top / bottom / random; each
loss_agg_mode. One process (a 1-rank gloo group); the context-parallel case is
tests/dist/dapo_loss_cp.py (run from tests/test_method_fidelity.py).

Both micro-batch layouts: padded rows, and packed (each sequence's prompt and response tokens one
after another in one row, with seq_index / cu_seqlens, the trainer's default). The trainer's path
is followed: micro-batches of MBS sequences, the global scope's selection by
`select_mini_batch` from the fused op's entropies (`token_stats`), one selection generator per
mini-batch, and Megatron's accounting (the mini-batch loss is Σ numerators / Σ denominators, the
gradient that of this quotient). Checked against the reference: the loss, its gradient with
respect to every logit, the kept-token counts per micro-batch, and the lowest kept entropy
(what `entropy/threshold` reports). For random selection: the mask has ⌈ρN⌉ tokens per pool,
all response tokens, and is the top-k of the uniform draws that the same generator seed yields.
"""
import pytest
import torch

from dapo_reference import (LENGTHS, MBS, N, S, cases, kept_count, make_inputs, reference_keep,
                            reference_loss, reference_stats, token_loss, T, EPS_LOW, EPS_HIGH, C)
from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, select_mini_batch, token_stats
from megatron_rlvr.parallel import destroy_distributed, init_distributed

SEED = 7


@pytest.fixture(scope="module")
def one_rank():
    init_distributed()  # one process: an in-memory store, gloo
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(0)


def settings(ratio, scope, norm, select, mode):
    return LossSettings(temperature=T, clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                        clip_ratio_c=C, loss_agg_mode=mode, ratio=ratio, scope=scope, norm=norm,
                        select=select)


def micro_batch_inputs(inp, layout):
    """The mini-batch as the trainer's micro-batches of MBS sequences, with leaf logits, and a map
    from each micro-batch's token positions back to [N, S] positions.

    padded: rows of S positions. packed: each sequence's P + R positions (prompt and response)
    one after another in a single row [1, T], with seq_index / cu_seqlens (batch.pack's layout)."""
    mbs, leaves, where = [], [], []
    for j in range(0, N, MBS):
        rows = slice(j, j + MBS)
        if layout == "padded":
            mb = {k: inp[k][rows] for k in ("labels", "response_mask", "advantages",
                                            "rollout_logprobs")}
            mb["old_logprobs_local"] = inp["old_logprobs"][rows]
            leaves.append(inp["logits"][rows].clone().requires_grad_())
            where.append((torch.arange(j, j + MBS).repeat_interleave(S),
                          torch.arange(S).repeat(MBS)))
        else:
            lengths = [p + r for p, r in LENGTHS[rows]]
            seq = torch.cat([torch.full((n,), j + i) for i, n in enumerate(lengths)])
            pos = torch.cat([torch.arange(n) for n in lengths])
            take = lambda x: x[seq, pos][None]  # noqa: E731
            mb = {k: take(inp[k]) for k in ("labels", "response_mask", "advantages",
                                            "rollout_logprobs")}
            mb["old_logprobs_local"] = take(inp["old_logprobs"])
            mb["seq_index"] = seq[None] - j
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            mb["cu_seqlens"], mb["cu_seqlens_dev"] = cu, torch.tensor(cu, dtype=torch.int32)
            mb["num_sequences"] = MBS
            leaves.append(take(inp["logits"]).clone().requires_grad_())
            where.append((seq, pos))
        mbs.append(mb)
    return mbs, leaves, where


def to_padded(parts, where, fill=0.0):
    """Per-micro-batch tensors [..., V?] back at their [N, S] positions."""
    out = torch.full((N, S, *parts[0].shape[2:]), fill, dtype=parts[0].dtype)
    for x, (seq, pos) in zip(parts, where):
        out[seq, pos] = x.reshape(len(seq), *x.shape[2:])
    return out


def run_trainer_path(inp, s, seed=SEED, layout="padded"):
    """dapo_loss over the micro-batches as the trainer runs it. Returns the loss, the gradient
    w.r.t. the logits [N, S, V], the per-micro-batch logs, the micro-batches and the map back."""
    mbs, leaves, where = micro_batch_inputs(inp, layout)
    gen = torch.Generator().manual_seed(seed)
    ents = [token_stats(mb, x.detach(), s)["entropy"] for mb, x in zip(mbs, leaves)]
    select_mini_batch(None, mbs, s, gen, entropies=ents)  # the global scope's (else a no-op)
    outs = [dapo_loss(mb, x, s, generator=gen) for mb, x in zip(mbs, leaves)]
    loss = sum(o[0] for o in outs) / sum(o[1] for o in outs).clamp(min=1)
    loss.backward()
    return loss.item(), to_padded([x.grad for x in leaves], where), [o[2] for o in outs], mbs, \
        where


def uniform_draws(scope, seed=SEED, where=None):
    """The uniform scores a generator seeded `seed` yields for each selection pool, in the order
    the pools are drawn (the global scope: one draw over the mini-batch's flattened tokens), at
    their [N, S] positions (`where`: the packed layout's map)."""
    gen = torch.Generator().manual_seed(seed)
    if where is None:
        if scope == "global":
            return [torch.rand(N * S, generator=gen)]
        return [torch.rand(MBS, S, generator=gen) for _ in range(N // MBS)]
    sizes = [len(seq) for seq, _ in where]
    if scope == "global":
        flat = torch.rand(sum(sizes), generator=gen).split(sizes)
        return [to_padded([x[None] for x in flat], where)]
    draws = [torch.rand(1, n, generator=gen) for n in sizes]
    full = to_padded(draws, where)
    return [full[j:j + MBS] for j in range(0, N, MBS)]


def test_inputs_cover_every_clip_regime(inputs):
    """The hand-made batch reaches every branch of the per-token loss on response tokens."""
    logp, _ = reference_stats(inputs["logits"], inputs["labels"])
    ratio = torch.exp(logp - inputs["old_logprobs"].double())[inputs["response_mask"]]
    adv = inputs["advantages"][inputs["response_mask"]]
    assert ((adv > 0) & (ratio > 1 + EPS_HIGH)).any()
    assert ((adv < 0) & (ratio < 1 - EPS_LOW)).any()
    assert ((adv < 0) & (ratio > C)).any()
    assert ((ratio > 1 - EPS_LOW) & (ratio < 1 + EPS_HIGH)).any()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("ratio,scope,norm,select,mode", cases(),
                         ids=lambda v: str(v))
def test_dapo_loss_equals_float64_reference(one_rank, inputs, ratio, scope, norm, select, mode,
                                            layout):
    s = settings(ratio, scope, norm, select, mode)
    got, grad, logs, mbs, where = run_trainer_path(inputs, s, layout=layout)

    noise = uniform_draws(scope, where=where if layout == "packed" else None) \
        if select == "random" else None
    keep = reference_keep(inputs, ratio, scope, select, noise)
    logits = inputs["logits"].double().requires_grad_()
    want = reference_loss(logits, inputs, keep, ratio, scope, norm, mode)
    want.backward()

    assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-6)  # float32 sums
    scale = logits.grad.abs().max().item()
    assert scale > 0
    assert torch.allclose(grad.double(), logits.grad, rtol=1e-4, atol=1e-6 * scale), \
        (grad.double() - logits.grad).abs().max()

    mask = inputs["response_mask"]
    _, ent = reference_stats(inputs["logits"], inputs["labels"])
    for j, log in enumerate(logs):
        rows = slice(j * MBS, (j + 1) * MBS)
        assert int(log["kept_count"]) == int(keep[rows].sum())
        assert int(log["response_count"]) == int(mask[rows].sum())
        if "entropy_sum" in log:  # the policy's own entropy and vLLM mismatch, over responses
            logp, _ = reference_stats(inputs["logits"], inputs["labels"])
            m = mask[rows]
            assert log["entropy_sum"].item() == pytest.approx(ent[rows][m].sum().item(), rel=1e-6)
            diff = (logp[rows] - inputs["rollout_logprobs"][rows].double()).abs()[m]
            assert log["mismatch_sum"].item() == pytest.approx(diff.sum().item(), rel=1e-4)
            assert log["mismatch_max"].item() == pytest.approx(diff.max().item(), rel=1e-4)
        if keep[rows].any():  # the lowest kept entropy: what entropy/threshold reports
            assert log["kept_entropy_min"].item() == pytest.approx(
                ent[rows][keep[rows]].min().item(), rel=1e-5)
        else:
            assert log["kept_entropy_min"].item() == float("inf")

    if ratio < 1.0:
        pools = [slice(0, N)] if scope == "global" else \
            [slice(j, j + MBS) for j in range(0, N, MBS)]
        for rows in pools:  # ⌈ρN⌉ (bottom: ⌈(1-ρ)N⌉) response tokens per pool
            assert int(keep[rows].sum()) == kept_count(ratio, select, int(mask[rows].sum()))
    assert not (keep & ~mask).any()
    if scope == "global" and ratio < 1.0:  # the selection the trainer hands dapo_loss
        chosen = to_padded([mb["keep_local"] for mb in mbs], where, fill=False)
        assert torch.equal(chosen, keep)


@pytest.mark.parametrize("scope", ["global", "micro_batch"])
def test_random_selection_follows_the_seed(one_rank, inputs, scope):
    """Random selection is the same for the same seed and another for another seed; neither is
    the top-entropy selection."""
    s = settings(0.2, scope, "kept_tokens", "random", "token-mean")
    a, b, c = (run_trainer_path(inputs, s, seed)[:2] for seed in (SEED, SEED, SEED + 1))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    other = reference_keep(inputs, 0.2, scope, "random", uniform_draws(scope, SEED + 1))
    mine = reference_keep(inputs, 0.2, scope, "random", uniform_draws(scope, SEED))
    top = reference_keep(inputs, 0.2, scope, "top")
    assert not torch.equal(mine, other) and not torch.equal(mine, top)
    assert a[0] != c[0]


def test_token_mean_at_full_ratio_is_dapo(one_rank, inputs):
    """ρ = 1, both scopes: DAPO's token-mean over the mini-batch, written out once more without
    the reference module's branches."""
    logp, _ = reference_stats(inputs["logits"], inputs["labels"])
    m = inputs["response_mask"]
    pg = token_loss(logp, inputs["old_logprobs"].double(), inputs["advantages"].double())
    want = pg[m].mean().item()
    for scope in ("global", "micro_batch"):
        got = run_trainer_path(inputs, settings(1.0, scope, "kept_tokens", "top", "token-mean"))[0]
        assert got == pytest.approx(want, rel=2e-6)
