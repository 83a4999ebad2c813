"""vLLM rollouts against our Megatron policy across training steps: argv = workdir, tp, pp.

One vLLM engine per rank (tensor_parallel_size=1), a Megatron policy at TP×PP over all ranks.
Three rounds of: sample (T=0.8, n=2) -> the Megatron policy's log softmax(logits / T) of the same
tokens must match vLLM's within 1e-3 -> one training step with a large learning rate -> sync the
exported weights into vLLM -> vLLM's greedy output must change and equal transformers' greedy
output of the exported weights.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.models.pipeline import gather_vocab
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.parallel import init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from hf_reference import hf_greedy
from megatron_rlvr.rollout import (SamplingParams, VLLMEngine, VLLMEngineConfig,
                                   logprob_mismatch)
from megatron_rlvr.fast_exit import exit_now

TEMPERATURE = 0.8


def batch(rows: list[list[int]]) -> torch.Tensor:
    """Right-padded [b, s] (causal attention: padding after a row cannot change it)."""
    s = max(map(len, rows))
    return torch.tensor([r + [0] * (s - len(r)) for r in rows])


def ce_loss(mb, logits):
    from megatron.core import tensor_parallel
    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), mb["labels"].transpose(0, 1).contiguous())
    num = losses.transpose(0, 1).sum()
    den = torch.tensor(mb["labels"].numel(), device=num.device)  # stacked with num: same device
    return num, den, {"numerator": num.detach(), "denominator": den}


def main():
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    workdir, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    init_distributed(tp, pp)
    rank = dist.get_rank()
    path = str(workdir / "model")
    if rank == 0:
        save_tiny_model(path, "qwen3", seed=0, tie=True)
    dist.barrier()
    spec = read_model_spec(path)
    engine = VLLMEngine(VLLMEngineConfig(model_path=path, dtype="float32", max_model_len=128,
                                         enforce_eager=True, max_num_seqs=8, bucket_mb=0.2))
    policy = Policy(spec, path, dtype=torch.float32, optim=OptimConfig(lr=3e-2, weight_decay=0.0))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (5 + 2 * i,), generator=g).tolist() for i in range(3)]
    greedy_params = SamplingParams(temperature=0.0, max_tokens=10)

    def greedy():
        return [o.samples[0].token_ids for o in engine.generate(prompts, greedy_params).outputs]

    before = greedy()
    for step in range(3):
        out = engine.generate(prompts, SamplingParams(n=2, temperature=TEMPERATURE,
                                                      max_tokens=10, seed=step))
        # The model-parallel ranks must see the same sequences: take rank 0's.
        samples = [[(o.prompt_token_ids, s.token_ids, s.logprobs) for o in out.outputs
                    for s in o.samples]]
        dist.broadcast_object_list(samples, src=0)
        samples = samples[0]
        tokens = batch([p + r for p, r, _ in samples]).to(platform.device())

        def logprobs_of_responses(mb, logits):
            full = gather_vocab(logits, spec.vocab_size).float()
            lp = torch.log_softmax(full / TEMPERATURE, -1)
            return [lp[i, len(p) - 1:len(p) + len(r) - 1].gather(
                -1, torch.tensor(r, device=lp.device)[:, None])[:, 0]
                    for i, (p, r, _) in enumerate(samples)]

        result = policy.forward([{"input_ids": tokens}], logprobs_of_responses)
        if parallel_state.is_pipeline_last_stage():
            m = logprob_mismatch([lps for _, _, lps in samples], result[0])
            assert m["rollout/logprob_mismatch_max"] < 1e-3, f"rank {rank} step {step}: {m}"
            print(f"rank {rank} step {step} mismatch {m}", flush=True)

        labels = torch.roll(tokens, -1, dims=1)
        policy.train_step([{"input_ids": tokens, "labels": labels}], ce_loss)
        stats = engine.update_weights(policy.hf_weights())  # tied head: the engine adds it
        exported = dict(policy.hf_weights())  # the reference: the same weights in transformers
        hf.load_state_dict(exported, strict=False)
        hf.tie_weights()
        after = greedy()
        assert after == [hf_greedy(hf, p, 10) for p in prompts], f"rank {rank} step {step}: greedy"
        assert after != before, f"rank {rank} step {step}: the sync did not change the outputs"
        before = after
        print(f"rank {rank} step {step} sync {stats}", flush=True)
    print("ROLLOUT_MEGATRON_OK", flush=True)
    dist.barrier()
    engine.shutdown()  # also destroys the process group


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
