"""One generation round: prompts -> scored groups of responses, on every rank's engine at once.

The trainer's ranks all hold the same list of prompts for the round. Each vLLM engine (one per rank,
or one per `vllm_tp` ranks) generates its share and its first rank scores the responses in the
reward pool. That rank, the group's *owner*, keeps the group's tokens (prompt ids, response ids,
rollout log-probs: the payload, `Group`); only a `GroupSummary` (scores, lengths, finish reasons,
the owner's rank: a few numbers per response) is all-gathered, so every rank ends the round with
the same list of summaries in prompt order. Dynamic sampling, the metrics, the GRPO advantages and
the data-parallel plan need nothing more; exchange.py then moves each payload from its owner to
the ranks that train on it (memory and traffic O(each rank's share), not O(world × batch)).

`generate_groups` is the old, simple path (every group's tokens on every rank); for evaluation
tools, tests and probes of small runs only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from megatron_rlvr.parallel import host_group
from megatron_rlvr.rewards.shaping import overlong_penalty
from megatron_rlvr.rollout.base import RolloutOutput, SamplingParams


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
    version: int | None = None         # policy version (RL steps trained) of the weights that
                                       # generated it; None = colocated (always the old policy)


@dataclass
class GroupSummary:
    """A group without its tokens: what every rank needs of every group (dynamic sampling,
    metrics, advantages, the data-parallel plan). `key` names the group within an RL step
    (generation round, position in the round's prompt list); `owner` is the global rank that
    holds its `Group` (the scorer of the engine that generated it)."""
    key: tuple[int, int]
    owner: int
    prompt_index: int
    data_source: str
    prompt_length: int
    response_lengths: list[int]
    finish_reasons: list[str]
    accuracy: list[float]
    reward: list[float]
    timed_out: int = 0
    version: int | None = None

    def sequence_lengths(self) -> list[int]:
        """Tokens of each (prompt + response) sequence."""
        return [self.prompt_length + r for r in self.response_lengths]


def summary_of(group: Group, key: tuple[int, int], owner: int) -> GroupSummary:
    return GroupSummary(key=key, owner=owner, prompt_index=group.prompt_index,
                        data_source=group.data_source, prompt_length=len(group.prompt_ids),
                        response_lengths=[len(r) for r in group.responses],
                        finish_reasons=list(group.finish_reasons), accuracy=list(group.accuracy),
                        reward=list(group.reward), timed_out=group.timed_out,
                        version=group.version)


@dataclass
class Round:
    """One generation round as a rank ends it: every group's summary (the same list on every
    rank, in prompt order) and the payloads this rank owns, by key."""
    summaries: list[GroupSummary]
    local: dict[tuple[int, int], Group]


@dataclass
class ShapingConfig:
    enable: bool
    max_response_length: int
    buffer_len: int
    penalty_factor: float


def share_summaries(local: dict[tuple[int, int], Group]) -> list[GroupSummary]:
    """All-gather the summaries of every rank's `local` groups (keyed (round, position)) on the
    host group: every rank gets the same list, sorted by key. The tokens stay where they are."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [summary_of(g, key, rank) for key, g in local.items()]
    gathered: list[list[GroupSummary]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=host_group())
    return sorted((s for part in gathered for s in part), key=lambda s: s.key)


def gather_groups(summaries: list[GroupSummary],
                  local: dict[tuple[int, int], Group]) -> list[Group]:
    """Every group of `summaries`, tokens included, on every rank, in the summaries' order: the
    old all-gather of the whole batch (world × batch memory). For tests, probes and small tools;
    a collective over all ranks."""
    keys = {s.key for s in summaries}
    mine = [(k, g) for k, g in local.items() if k in keys]
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=host_group())
    by_key = {k: g for part in gathered for k, g in part}
    return [by_key[s.key] for s in summaries]


def engine_shares(indices: list[int], n_engines: int, params: SamplingParams
                  ) -> list[tuple[list[int], SamplingParams]]:
    """Each engine's positions in `indices` (round robin) and its sampling parameters: engine e
    samples with seed + 1_000_003·e, so engines draw independent samples and a disaggregated
    fleet of E engines reproduces E colocated ones."""
    shares = []
    for e in range(n_engines):
        p = params if params.seed is None else \
            dataclasses.replace(params, seed=params.seed + 1_000_003 * e)
        shares.append((list(range(len(indices)))[e::n_engines], p))
    return shares


def score_outputs(outputs: list[tuple[RolloutOutput, list[int], int | None]], dataset,
                  indices: list[int], *, tokenizer, reward_pool, shaping: ShapingConfig,
                  round_index: int) -> dict[tuple[int, int], Group]:
    """Score engines' outputs in one reward call and make their groups, keyed (round, position).
    `outputs`: per engine, (its output, its positions in `indices`, its weight version)."""
    texts, truths = [], []
    for out, positions, _ in outputs:
        for po in out.outputs:
            truth = dataset.records[indices[positions[po.index]]].ground_truth
            for s in po.samples:
                texts.append(tokenizer.decode(s.token_ids, skip_special_tokens=True))
                truths.append(truth)
    results = reward_pool.score(texts, truths) if texts else []
    groups: dict[tuple[int, int], Group] = {}
    k = 0
    for out, positions, version in outputs:
        for po in out.outputs:
            position = positions[po.index]
            rec = dataset.records[indices[position]]
            scored = results[k:k + len(po.samples)]
            k += len(po.samples)
            acc = [r.score for r in scored]
            reward = [a + (overlong_penalty(len(s.token_ids),
                                            max_response_length=shaping.max_response_length,
                                            buffer_len=shaping.buffer_len,
                                            penalty_factor=shaping.penalty_factor)
                           if shaping.enable else 0.0)
                      for a, s in zip(acc, po.samples)]
            groups[(round_index, position)] = Group(
                prompt_index=indices[position], data_source=rec.data_source,
                ground_truth=rec.ground_truth, prompt_ids=po.prompt_token_ids,
                responses=[s.token_ids for s in po.samples],
                rollout_logprobs=[s.logprobs for s in po.samples],
                finish_reasons=[s.finish_reason for s in po.samples],
                accuracy=acc, reward=reward, timed_out=sum(r.timed_out for r in scored),
                version=version)
    return groups


def fleet_groups(fleet, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                 reward_pool, shaping: ShapingConfig, round_index: int = 0
                 ) -> dict[tuple[int, int], Group]:
    """Generate and score the groups of `indices` on a disaggregated fleet (rollout/fleet.py),
    every engine at once; not a collective: trainer rank 0, the fleet's driver, calls it."""
    shares = engine_shares(indices, fleet.num_engines, params)
    results = fleet.generate([[dataset.records[indices[p]].prompt_ids for p in positions]
                              for positions, _ in shares], [p for _, p in shares])
    return score_outputs([(out, positions, version)
                          for (out, version), (positions, _) in zip(results, shares)],
                         dataset, indices, tokenizer=tokenizer, reward_pool=reward_pool,
                         shaping=shaping, round_index=round_index)


def generate_round(engine, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                   reward_pool, shaping: ShapingConfig, vllm_tp: int = 1,
                   round_index: int = 0) -> Round:
    """Generate and score the groups of `indices` (the same list on every rank); all-gather only
    their summaries. Keys are (round_index, position in `indices`). A collective.

    `engine`: this rank's colocated engine (every engine generates its share, its first rank
    scores it); or, disaggregated, the fleet on rank 0 (it generates and scores everything) and
    None on the other ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if engine is None:  # disaggregated, not the driver
        local: dict[tuple[int, int], Group] = {}
    elif hasattr(engine, "num_engines"):  # disaggregated: the fleet's driver
        local = fleet_groups(engine, dataset, indices, params, tokenizer=tokenizer,
                             reward_pool=reward_pool, shaping=shaping, round_index=round_index)
    else:
        engine_id = rank // vllm_tp
        positions, own = engine_shares(indices, world // vllm_tp, params)[engine_id]
        out = engine.generate([dataset.records[indices[p]].prompt_ids for p in positions], own)
        # One scorer per engine: its tensor-parallel peers got the same output.
        local = score_outputs([(out, positions, None)], dataset, indices, tokenizer=tokenizer,
                              reward_pool=reward_pool, shaping=shaping,
                              round_index=round_index) if rank % vllm_tp == 0 else {}
    return Round(share_summaries(local), local)


def generate_groups(engine, dataset, indices: list[int], params: SamplingParams, *, tokenizer,
                    reward_pool, shaping: ShapingConfig, vllm_tp: int = 1) -> list[Group]:
    """Generate, score and all-gather the whole groups of `indices`, tokens included, on every
    rank, in prompt order (the old path: world × batch memory; small runs and tests only)."""
    rnd = generate_round(engine, dataset, indices, params, tokenizer=tokenizer,
                         reward_pool=reward_pool, shaping=shaping, vllm_tp=vllm_tp)
    return gather_groups(rnd.summaries, rnd.local)
