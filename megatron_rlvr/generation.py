"""One generation round: prompts -> scored groups of responses, on every rank's engine at once.

The trainer's ranks all hold the same list of prompts for the round. Each vLLM engine (one per rank,
or one per `vllm_tp` ranks) generates its share, its first rank scores the responses in the reward
pool, and the groups are all-gathered so every rank ends the round with the same, complete list in
prompt order. That keeps the data path simple: every rank can then cut its own data-parallel share.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rlvr.parallel import host_group
from megatron_rlvr.rewards.shaping import overlong_penalty
from megatron_rlvr.rollout.base import SamplingParams


@dataclass
class Group:
    """One prompt and its n responses (token ids), with rollout log-probs and scores."""
    prompt_index: int                  # index into the dataset
    data_source: str
    ground_truth: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    finish_reasons: list[str]
    accuracy: list[float]              # 0/1 correctness (what dynamic sampling filters on)
    reward: list[float]                # correctness + overlong penalty (what advantages use)
    timed_out: int = 0                 # responses whose verification hit the timeout


@dataclass
class ShapingConfig:
    enable: bool
    max_response_length: int
    buffer_len: int
    penalty_factor: float


def generate_groups(engine, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                    reward_pool, shaping: ShapingConfig, vllm_tp: int = 1) -> list[Group]:
    """Generate, score and all-gather the groups of `indices` (the same list on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n_engines, engine_id = world // vllm_tp, rank // vllm_tp
    positions = list(range(len(indices)))[engine_id::n_engines]
    records = [dataset.records[indices[p]] for p in positions]
    if params.seed is not None:  # each engine samples its own prompts with its own seeds
        params = dataclasses.replace(params, seed=params.seed + 1_000_003 * engine_id)
    out = engine.generate([r.prompt_ids for r in records], params)
    groups: list[tuple[int, Group]] = []  # (position in `indices`, group)
    if rank % vllm_tp == 0:  # one scorer per engine: its tensor-parallel peers got the same output
        texts, truths = [], []
        for po in out.outputs:
            for s in po.samples:
                texts.append(tokenizer.decode(s.token_ids, skip_special_tokens=True))
                truths.append(records[po.index].ground_truth)
        results = reward_pool.score(texts, truths) if texts else []
        k = 0
        for po in out.outputs:
            rec = records[po.index]
            scored = results[k:k + len(po.samples)]
            k += len(po.samples)
            acc = [r.score for r in scored]
            reward = [a + (overlong_penalty(len(s.token_ids),
                                            max_response_length=shaping.max_response_length,
                                            buffer_len=shaping.buffer_len,
                                            penalty_factor=shaping.penalty_factor)
                           if shaping.enable else 0.0)
                      for a, s in zip(acc, po.samples)]
            groups.append((positions[po.index], Group(
                prompt_index=indices[positions[po.index]], data_source=rec.data_source,
                ground_truth=rec.ground_truth, prompt_ids=po.prompt_token_ids,
                responses=[s.token_ids for s in po.samples],
                rollout_logprobs=[s.logprobs for s in po.samples],
                finish_reasons=[s.finish_reason for s in po.samples],
                accuracy=acc, reward=reward, timed_out=sum(r.timed_out for r in scored))))
    gathered: list[list[tuple[int, Group]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, groups, group=host_group())
    return [g for _, g in sorted((pg for part in gathered for pg in part), key=lambda pg: pg[0])]
