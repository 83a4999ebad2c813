"""logprobs_and_entropy against float64 single-process math (log_softmax, softmax, autograd)."""
import pytest
import torch

from megatron_rlvr.ops import logprobs_and_entropy, logprobs_and_entropy_from_hidden
from torchrun import ROOT, torchrun

TOL = dict(atol=1e-5, rtol=1e-5)


def random_logits(gen, *shape, dtype=torch.float32):
    """Fresh random logits of mixed sharpness; one row of very large values (overflow check)."""
    scale = torch.rand(*shape[:-1], 1, generator=gen) * 6
    logits = torch.randn(*shape, generator=gen) * scale
    logits.view(-1, shape[-1])[0] += 5e3
    return logits.to(dtype)


def reference(logits, labels, temperature, w_logp, w_ent):
    """float64: (log-probs, entropy, d(sum(w_logp*logp) + sum(w_ent*H))/d logits)."""
    z = logits.detach().double().requires_grad_()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ((logp * w_logp.double()).sum() + (ent * w_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), z.grad


def ours(logits, labels, temperature, w_logp, w_ent, **kw):
    x = logits.detach().clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, temperature=temperature, **kw)
    loss = (logp * w_logp).sum() + ((ent * w_ent).sum() if ent.requires_grad else 0)
    loss.backward()
    return logp.detach(), ent.detach(), x.grad


def case(seed, shape=(3, 7), vocab=203, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(gen, *shape, vocab, dtype=dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    return logits, labels, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_float32_matches_float64_reference(temperature, entropy_grad):
    logits, labels, w_logp, w_ent = case(seed=int(temperature * 10) + entropy_grad)
    ref = reference(logits, labels, temperature, w_logp, w_ent if entropy_grad else 0 * w_ent)
    got = ours(logits, labels, temperature, w_logp, w_ent, chunk_size=4,
               entropy_grad=entropy_grad)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.float(), **TOL)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_bfloat16_input_is_computed_in_float32(temperature):
    logits, labels, w_logp, w_ent = case(seed=5, dtype=torch.bfloat16)
    # Reference on the same (bf16-valued) logits: only the input is rounded, not the math.
    ref_logp, ref_ent, ref_grad = reference(logits, labels, temperature, w_logp, w_ent)
    logp, ent, grad = ours(logits, labels, temperature, w_logp, w_ent, chunk_size=5,
                           entropy_grad=True)
    assert logp.dtype == ent.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, ref_logp.float(), **TOL)
    torch.testing.assert_close(ent, ref_ent.float(), **TOL)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_not_modified(dtype):
    logits, labels, w_logp, w_ent = case(seed=11, dtype=dtype)
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, temperature=0.5, chunk_size=2, entropy_grad=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(x.detach(), logits)


def test_chunked_equals_one_chunk():
    logits, labels, w_logp, w_ent = case(seed=13, shape=(4, 9))
    whole = ours(logits, labels, 0.8, w_logp, w_ent, chunk_size=36, entropy_grad=True)
    for chunk in (1, 5, 7, None):
        got = ours(logits, labels, 0.8, w_logp, w_ent, chunk_size=chunk, entropy_grad=True)
        for g, w in zip(got, whole):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pad_value", [float("-inf"), torch.finfo(torch.float32).min,
                                       torch.finfo(torch.bfloat16).min])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_padded_vocabulary_columns_contribute_nothing(pad_value, temperature):
    """Padded columns: same results as the unpadded vocabulary, zero gradient, no NaN."""
    logits, labels, w_logp, w_ent = case(seed=17, vocab=200)
    padded = torch.cat([logits, torch.full((*labels.shape, 56), pad_value)], dim=-1)
    ref_logp, ref_ent, ref_grad = reference(logits, labels, temperature, w_logp, w_ent)
    logp, ent, grad = ours(padded, labels, temperature, w_logp, w_ent, chunk_size=4,
                           entropy_grad=True)
    torch.testing.assert_close(logp, ref_logp.float(), **TOL)
    torch.testing.assert_close(ent, ref_ent.float(), **TOL)
    torch.testing.assert_close(grad[..., :200], ref_grad.float(), **TOL)
    assert torch.equal(grad[..., 200:], torch.zeros_like(grad[..., 200:]))


def test_gradients_follow_the_flags():
    logits, labels, _, _ = case(seed=19)
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels)
    assert logp.requires_grad and not ent.requires_grad
    logp, ent = logprobs_and_entropy(x, labels, entropy_grad=True)
    assert logp.requires_grad and ent.requires_grad
    with torch.no_grad():
        logp, ent = logprobs_and_entropy(x, labels, entropy_grad=True)
    assert not logp.requires_grad and not ent.requires_grad


def test_bad_inputs_raise_clear_errors():
    logits, labels, _, _ = case(seed=23, vocab=50)
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\), got ids in \[-1, "):
        logprobs_and_entropy(logits, torch.where(labels == labels[0, 0], -1, labels))
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\), got ids in \[\d+, 50\]"):
        logprobs_and_entropy(logits, torch.where(labels == labels[0, 0], 50, labels))
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_and_entropy(logits, labels[:, :3])
    with pytest.raises(ValueError, match="integer token ids"):
        logprobs_and_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_and_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(logits, labels, chunk_size=0)


# bfloat16: the chunk's logits come out of a bf16 matmul (as from the model's output layer), so
# they carry bf16 rounding (~0.4%), which the weight gradient's sums over tokens can amplify.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL),
                                       (torch.bfloat16, dict(atol=3e-2, rtol=2e-2))])
def test_from_hidden_matches_reference(dtype, tol):
    gen = torch.Generator().manual_seed(29)
    hidden = torch.randn(2, 6, 16, generator=gen).to(dtype)
    weight = (torch.randn(150, 16, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, 150, (2, 6), generator=gen)
    w_logp, w_ent = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.t() / 0.9, dim=-1)
    ref_logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = logprobs_and_entropy_from_hidden(h, w, labels, temperature=0.9, chunk_size=5,
                                                 entropy_grad=True)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    assert h.grad.dtype == w.grad.dtype == dtype
    torch.testing.assert_close(logp, ref_logp.float(), **tol)
    torch.testing.assert_close(ent, ref_ent.float(), **tol)
    torch.testing.assert_close(h.grad.float(), h64.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), w64.grad.float(), **tol)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_parallel_matches_reference(nproc):
    out = torchrun(ROOT / "tests" / "dist" / "entropy_tp.py", nproc, timeout=300)
    assert out.count("entropy_tp OK") == nproc, out
