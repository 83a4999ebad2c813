"""Colocated vLLM under torchrun (2 ranks): argv = workdir, vllm_tp (1 or 2).

vllm_tp=1: each rank owns an engine and generates its own prompts. vllm_tp=2: one engine
tensor-parallel over both ranks (external_launcher), both ranks send the same prompts.
Either way, on every rank: greedy == transformers greedy, sampled log-probs == transformers
log softmax(logits / T) within 1e-3, and after streaming another model's weights in, greedy ==
transformers greedy of that model. Untied Qwen2 (QKV bias), unlike the tied Qwen3 of the
single-process tests.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hf_reference import hf_greedy

from megatron_rlvr import platform
from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.rollout import SamplingParams, VLLMEngine, VLLMEngineConfig
from megatron_rlvr.fast_exit import exit_now


def main():
    workdir, vllm_tp = Path(sys.argv[1]), int(sys.argv[2])
    # As the trainer does before building the engine (init_distributed): the platform layer (on
    # CPU under torchrun, strict device mode), then the platform's backend (NCCL on a GPU).
    platform.setup()
    dist.init_process_group(platform.backend())
    rank = dist.get_rank()
    paths = {k: str(workdir / k) for k in "AB"}
    if rank == 0:
        save_tiny_model(paths["A"], "qwen2", seed=0, tie=False)
        save_tiny_model(paths["B"], "qwen2", seed=1, tie=False)
    dist.barrier()

    from transformers import AutoModelForCausalLM

    hf = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
          for k, p in paths.items()}
    engine = VLLMEngine(VLLMEngineConfig(model_path=paths["A"], dtype="float32",
                                         tensor_parallel_size=vllm_tp, max_model_len=128,
                                         enforce_eager=True, max_num_seqs=8, bucket_mb=0.2))
    # One engine per rank generates that rank's prompts; a TP group shares its prompts.
    g = torch.Generator().manual_seed(rank if vllm_tp == 1 else 0)
    prompts = [torch.randint(3, 512, (6 + i,), generator=g).tolist() for i in range(3)]

    def greedy():
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
        return [o.samples[0].token_ids for o in out.outputs]

    assert greedy() == [hf_greedy(hf["A"], p, 12) for p in prompts], f"rank {rank}: greedy A"

    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_tokens=10, seed=3))
    for o in out.outputs:
        for s in o.samples:
            ids = torch.tensor([o.prompt_token_ids + s.token_ids])
            with torch.no_grad():
                logits = hf["A"](ids).logits[0, len(o.prompt_token_ids) - 1:-1]
            ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(s.token_ids)[:, None])
            err = (torch.tensor(s.logprobs) - ref[:, 0]).abs().max().item()
            assert err < 1e-3, f"rank {rank}: log-prob error {err}"

    stats = engine.update_weights((n, t.detach()) for n, t in hf["B"].state_dict().items())
    assert stats.buckets > 1, stats
    new = greedy()
    assert new == [hf_greedy(hf["B"], p, 12) for p in prompts], f"rank {rank}: greedy B"
    assert new != [hf_greedy(hf["A"], p, 12) for p in prompts]
    print(f"rank {rank} sync {stats}", flush=True)
    print("ROLLOUT_COLOCATED_OK", flush=True)
    dist.barrier()
    engine.shutdown()  # also destroys the default process group


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
