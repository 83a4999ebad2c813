"""Validation: avg@k and pass@k per data source, with the paper's sampling settings.

avg@k is the mean correctness over the k samples of every prompt (the paper reports AIME24 as
avg@32 by repeating each problem 32 times in the file; `eval.n` samples k per row on top of that).
pass@k is the share of prompts with at least one correct sample among their k.
"""
from __future__ import annotations

from collections import defaultdict

from megatron_rlvr.generation import GroupSummary, ShapingConfig, generate_round
from megatron_rlvr.rollout.base import SamplingParams


def summarize(groups: list[GroupSummary], k: int, prefix: str = "val") -> dict[str, float]:
    """avg@k / pass@k per data source from the groups' accuracies (summaries or whole `Group`s:
    only `data_source` and `accuracy` are read)."""
    by_source: dict[str, list[list[float]]] = defaultdict(list)
    for g in groups:
        by_source[g.data_source].append(g.accuracy)
    out = {}
    for source, accs in sorted(by_source.items()):
        out[f"{prefix}/{source}/avg@{k}"] = sum(sum(a) / len(a) for a in accs) / len(accs)
        out[f"{prefix}/{source}/pass@{k}"] = sum(max(a) > 0 for a in accs) / len(accs)
        out[f"{prefix}/{source}/prompts"] = float(len(accs))
    return out


def evaluate(engine, dataset, *, n: int, temperature: float, top_p: float, max_tokens: int,
             seed: int, tokenizer, reward_pool, vllm_tp: int = 1) -> dict[str, float]:
    """Generate and score every prompt of `dataset` (a collective over all ranks)."""
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            seed=seed)
    no_shaping = ShapingConfig(enable=False, max_response_length=max_tokens, buffer_len=1,
                               penalty_factor=0.0)
    # Scores only: the summaries are all-gathered, the tokens stay on the ranks that scored them.
    rnd = generate_round(engine, dataset, list(range(len(dataset.records))), params,
                         tokenizer=tokenizer, reward_pool=reward_pool, shaping=no_shaping,
                         vllm_tp=vllm_tp)
    return summarize(rnd.summaries, n)


def run(cfg) -> int:
    """`python -m megatron_rlvr eval`: score model.hf_dir on data.val_files (under torchrun or
    as one process) and print avg@k / pass@k per data source."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_rlvr.data.dataset import PromptDataset
    from megatron_rlvr.parallel import destroy_distributed, init_distributed
    from megatron_rlvr.rewards.scorer import build_scorer
    from megatron_rlvr.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    if not cfg.data.val_files:
        raise ValueError("data.val_files is empty: nothing to evaluate")
    init_distributed()
    e, r = cfg.eval, cfg.rollout
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    dataset = PromptDataset(cfg.data.val_files, tokenizer, max_prompt_length=r.max_prompt_length,
                            prompt_key=cfg.data.prompt_key, prompt_overflow=r.prompt_overflow,
                            bad_rows=cfg.data.bad_rows)
    engine = VLLMEngine(VLLMEngineConfig(
        model_path=cfg.model.hf_dir, tensor_parallel_size=r.vllm_tp, dtype=cfg.model.dtype,
        max_model_len=r.max_prompt_length + e.max_response_length,
        max_prompt_tokens=r.max_prompt_length, prompt_overflow=r.prompt_overflow,
        seed=cfg.trainer.seed, enforce_eager=r.enforce_eager,
        gpu_memory_utilization=r.gpu_memory_utilization))
    try:
        with build_scorer(cfg.reward, backend="local") as pool:
            metrics = evaluate(engine, dataset, n=e.n, temperature=e.temperature, top_p=e.top_p,
                               max_tokens=e.max_response_length, seed=cfg.trainer.seed,
                               tokenizer=tokenizer, reward_pool=pool, vllm_tp=r.vllm_tp)
        if dist.get_rank() == 0:
            for k, v in metrics.items():
                print(f"{k}\t{v:.4f}")
    finally:
        engine.shutdown()  # before the process groups it uses are destroyed
        destroy_distributed()
    return 0
