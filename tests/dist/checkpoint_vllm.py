"""Serve an exported HF checkpoint with vLLM and compare its greedy output with transformers'.

    python tests/dist/checkpoint_vllm.py HF_DIR

Exits non-zero when vLLM cannot load the directory or its tokens differ from transformers'.
Runs in its own process: vLLM changes the thread count and RNG of the process that builds it.
"""
import os
import sys

from megatron_rlvr.fast_exit import exit_now


def main(hf_dir: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams, TokensPrompt

    prompts = [[5, 17, 33, 2 + k] for k in range(3)]
    max_tokens = 8
    llm = LLM(model=hf_dir, dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for p, out in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(max_tokens):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        got = list(out.outputs[0].token_ids)
        assert got == ids[len(p):], f"vLLM {got} vs transformers {ids[len(p):]}"
    print(f"vllm: {hf_dir} loaded; greedy tokens equal transformers' for {len(prompts)} prompts",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
