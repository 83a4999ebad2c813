"""Packed token-budget micro-batches vs padded fixed-size ones: the old-pass + update phase of one
RL step (issue 13, "Must show" 2).

Run (one process; a plain `python` run is world 1):

    .venv/bin/python benchmarks/packing.py       # defaults: a 23M-parameter Qwen3, cap 1,024
    torchrun --standalone --nproc_per_node=2 benchmarks/packing.py --threads 1   # DP2

The phase, timed from the micro-batches on the device to the optimizer step's end:
`Policy.forward` with `token_stats` over the mini-batch's micro-batches (old log-probs and
entropies), `select_mini_batch` in the global scope at ρ = 0.2, `Policy.train_step` with
`dapo_loss`. Both layouts run it from the same initial weights on the same sequences:
  padded  `build_batch` + `micro_batches`: every sequence right-padded to the batch's longest,
          `--micro-batch-size` sequences per micro-batch, contiguous data-parallel shares (the
          baseline, what the trainer did before packing);
  packed  `sequences_of` + `token_budget_plan` + `pack`: sequences concatenated (THD), at most
          `--max-tokens` tokens per micro-batch, shares balanced on work L(1 + L/6h).
The global top-ρ objective does not depend on how sequences are grouped, so both must report the
same loss (printed as a check).

Lengths are shaped like long-CoT RL: prompts uniform in [--prompt-min, --prompt-max], responses
log-normal (σ = --sigma) with the median set so that 10% exceed the cap, clipped at the cap;
drawn by stratified quantiles (sequence i gets the (i + ½)/n quantile, then shuffled), so even a
small batch has the distribution's shape (≈ 10% at the cap) rather than a lucky draw.

Reported: tokens through the model per pass (input positions, padding included), wall time of
the phase (slowest rank; median of --repeats, layouts alternating), peak RSS of the phase (Linux
VmHWM reset before it; per rank, max over ranks), and the data-parallel imbalance, max / mean of
the work per rank (`partition.imbalance` on work(padded length)), of the packed plan vs the padded
baseline's contiguous shares (counted on real tokens; in the padded layout itself every rank
computes the same padded length, so its ranks keep step by all computing padding), at several DP
sizes:
for the benchmark's batch, for a larger batch from the same distribution (--plan-prompts), and,
with --paper-scale, for the 14B recipe's mini-batch and whole batch (cap 20,480, DP16). The plans
are pure Python: no processes are needed for DP > 1.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, select_mini_batch, token_stats
from megatron_rlvr.batch import build_batch, micro_batches, pack, sequences_of
from megatron_rlvr.generation import Group
from megatron_rlvr.models.pipeline import sequence_length_multiple
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.partition import fixed_plan, imbalance, padded_length, token_budget_plan, work
from megatron_rlvr.policy import OptimConfig, Policy

Z90 = 1.2815515655446004  # standard normal 90% quantile: 10% of responses reach the cap


# ------------------------------------------------------------------------- lengths and data

def response_lengths(n: int, cap: int, sigma: float, rng: random.Random) -> list[int]:
    """Stratified draw from min(LogNormal(μ, σ), cap) with P(L ≥ cap) = 10%."""
    mu = math.log(cap) - Z90 * sigma
    normal = statistics.NormalDist(mu, sigma)
    out = [min(cap, max(1, int(math.exp(normal.inv_cdf((i + 0.5) / n))))) for i in range(n)]
    rng.shuffle(out)
    return out


def make_groups(args, vocab: int) -> list[Group]:
    rng = random.Random(args.seed)
    k = args.responses_per_prompt
    lengths = response_lengths(args.prompts * k, args.cap, args.sigma, rng)
    groups = []
    for i in range(args.prompts):
        n_prompt = rng.randint(args.prompt_min, args.prompt_max)
        prompt = [rng.randrange(1, vocab) for _ in range(n_prompt)]
        responses = [[rng.randrange(1, vocab) for _ in range(n)]
                     for n in lengths[i * k:(i + 1) * k]]
        rewards = [float(j % 2) for j in range(k)]  # every group mixed: nonzero advantages
        rng.shuffle(rewards)
        groups.append(Group(prompt_index=i, data_source="bench", ground_truth="0",
                            prompt_ids=prompt, responses=responses,
                            rollout_logprobs=[[-1.0] * len(r) for r in responses],
                            finish_reasons=["length" if len(r) == args.cap else "stop"
                                            for r in responses],
                            accuracy=rewards, reward=rewards))
    return groups


def padded_layout(groups, *, multiple, dp, dp_rank, mbs):
    n = sum(len(g.responses) for g in groups)
    return micro_batches(build_batch(groups, pad_id=0, length_multiple=multiple), 0, n,
                         dp_rank=dp_rank, dp=dp, micro_batch_size=mbs)


def packed_layout(groups, *, multiple, dp, dp_rank, max_tokens, hidden):
    seqs = sequences_of(groups)
    lengths = [padded_length(len(q), multiple) for q in seqs]
    plan = token_budget_plan(lengths, dp=dp, max_tokens=max_tokens, hidden_size=hidden)[dp_rank]
    return [pack([seqs[i] for i in mb], length_multiple=multiple) for mb in plan]


# ------------------------------------------------------------------------------- the phase

def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that RSS before the phase is
    the live data (not the previous run's freed buffers) and its peak starts from there."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": peak RSS := current RSS
            f.write("5")
        return True
    except OSError:
        return False


def run_phase(args, spec, hf_dir, groups, layout: str, s: LossSettings) -> dict:
    from megatron.core import parallel_state as ps

    policy = Policy(spec, hf_dir, dtype=torch.float32, optim=OptimConfig(lr=1e-6))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    multiple = sequence_length_multiple(tp=1, cp=1, sequence_parallel=False)
    dist.barrier()
    t0 = time.perf_counter()
    if layout == "padded":
        mbs = padded_layout(groups, multiple=multiple, dp=dp, dp_rank=dp_rank,
                            mbs=args.micro_batch_size)
    else:
        mbs = packed_layout(groups, multiple=multiple, dp=dp, dp_rank=dp_rank,
                            max_tokens=args.max_tokens, hidden=spec.hidden_size)
    t_build = time.perf_counter() - t0
    tokens = sum(mb["input_ids"].numel() for mb in mbs)
    _release_free_memory()
    dist.barrier()
    rss_before = _vm("VmRSS")
    peak_ok = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    outs = policy.forward(mbs, partial(token_stats, s=s))
    for mb, out in zip(mbs, outs):
        mb["old_logprobs_local"] = out["logprobs"]
    select_mini_batch(policy, mbs, s, None, entropies=[o["entropy"] for o in outs])
    result = policy.train_step(mbs, partial(dapo_loss, s=s))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _vm("VmHWM") if peak_ok else float("nan")
    stats = torch.tensor([elapsed, t_build, float(peak), float(peak - rss_before), cpu],
                         dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    tok = torch.tensor([float(tokens), float(len(mbs))], dtype=torch.float64)
    dist.all_reduce(tok)
    assert not result.skipped
    del policy
    return {"time": stats[0].item(), "cpu": stats[4].item(), "build": stats[1].item(),
            "peak": stats[2].item(),
            "peak_extra": stats[3].item(), "tokens": tok[0].item(), "micro_batches": tok[1].item(),
            "loss": result.loss, "grad_norm": result.grad_norm}


# ------------------------------------------------------------------------------ plan balance

def plan_rows(lengths, *, dps, mbs, max_tokens, hidden) -> list[tuple]:
    """(dp, contiguous shares' max/mean (None: the batch does not split into dp shares of whole
    micro-batches), packed plan's max/mean, packed micro-batches per rank, fullest packed
    micro-batch) on work(padded length)."""
    costs = [work(n, hidden) for n in lengths]
    rows = []
    for dp in dps:
        if len(lengths) < 4 * dp:  # too few sequences for a rank to have a choice
            continue
        contiguous = None if len(lengths) % (dp * mbs) else \
            imbalance(fixed_plan(len(lengths), dp=dp, micro_batch_size=mbs), costs)
        plan = token_budget_plan(lengths, dp=dp, max_tokens=max_tokens, hidden_size=hidden)
        fullest = max(sum(lengths[i] for i in mb) for rank in plan for mb in rank)
        rows.append((dp, contiguous, imbalance(plan, costs), len(plan[0]), fullest))
    return rows


def paper_lengths(prompts: int, seed: int) -> list[int]:
    """The paper's setting: 16 responses a prompt, responses ≤ 20,480 tokens (σ = 1, 10% at the
    cap), prompts uniform in [100, 1,000] (the recipe's max_prompt_length is 2,048)."""
    rng = random.Random(seed)
    resp = response_lengths(prompts * 16, 20480, 1.0, rng)
    out = []
    for g in range(prompts):
        p = rng.randint(100, 1000)
        out += [padded_length(p + r, 4) for r in resp[g * 16:(g + 1) * 16]]  # CP2: multiple 4
    return out


# ------------------------------------------------------------------------------------ main

def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--responses-per-prompt", type=int, default=4)
    p.add_argument("--prompt-min", type=int, default=50)
    p.add_argument("--prompt-max", type=int, default=200)
    p.add_argument("--cap", type=int, default=1024, help="max response tokens")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal σ of response lengths")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="padded: sequences per micro-batch")
    p.add_argument("--max-tokens", type=int, default=4096, help="packed: tokens per micro-batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per layout (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: leave)")
    p.add_argument("--plan-dp", default="2,4,8,16", help="DP sizes for the plan-balance table")
    p.add_argument("--plan-prompts", type=int, default=128,
                   help="the plan-balance table also draws a batch of this many prompts (× "
                        "--responses-per-prompt) from the same distribution (no model run)")
    p.add_argument("--paper-scale", action="store_true",
                   help="also the plan balance of the 14B recipe's mini-batch and batch (cap "
                        "20,480, DP16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="reuse / keep the random model here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(1, 1, 1)
    from megatron.core import parallel_state as ps
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = ps.get_data_parallel_world_size()

    model_dir = [args.model_dir
                 or (tempfile.mkdtemp(prefix="packing_bench_") if rank == 0 else None)]
    if rank == 0 and not os.path.exists(os.path.join(model_dir[0], "config.json")):
        save_tiny_model(model_dir[0], "qwen3", hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                        intermediate_size=args.ffn, vocab_size=args.vocab,
                        max_position_embeddings=max(2048, args.prompt_max + args.cap),
                        with_tokenizer=False)
    dist.broadcast_object_list(model_dir, src=0)
    spec = read_model_spec(model_dir[0])
    groups = make_groups(args, spec.vocab_size)
    s = LossSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                     loss_agg_mode="token-mean", ratio=0.2, scope="global", norm="kept_tokens",
                     select="top")

    seqs = sequences_of(groups)
    lengths = [len(q) for q in seqs]
    resp = [len(r) for g in groups for r in g.responses]
    if rank == 0:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(model_dir[0])
        emb = cfg.vocab_size * cfg.hidden_size
        layer = (cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads
                                                   + 2 * cfg.num_key_value_heads)
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
        params = emb + cfg.num_hidden_layers * layer
        print(f"model: Qwen3, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim}, "
              f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, tied: ≈{params / 1e6:.1f}M "
              f"params; float32, world {world} (DP {dp}), {torch.get_num_threads()} threads/rank")
        print(f"batch: {len(seqs)} sequences ({args.prompts} prompts × "
              f"{args.responses_per_prompt}), prompts {args.prompt_min}-{args.prompt_max}, "
              f"responses log-normal σ={args.sigma} capped at {args.cap}: median "
              f"{statistics.median(resp):.0f}, mean {statistics.mean(resp):.0f}, "
              f"{sum(r == args.cap for r in resp)} at the cap; sequences mean "
              f"{statistics.mean(lengths):.0f}, longest {max(lengths)}")
        print(f"padded: micro_batch_size {args.micro_batch_size}; packed: max_tokens "
              f"{args.max_tokens}; global top-0.2, DAPO loss, one optimizer step", flush=True)

    # Warm-up (untimed): both layouts once on the same batch cut to a few tokens per sequence, so
    # the first timed run pays no one-time costs (lazy imports, kernel selection, allocator).
    short = [Group(**{**g.__dict__, "prompt_ids": g.prompt_ids[:8],
                      "responses": [r[:8] for r in g.responses],
                      "rollout_logprobs": [lp[:8] for lp in g.rollout_logprobs]}) for g in groups]
    for layout in ("padded", "packed"):
        run_phase(args, spec, model_dir[0], short, layout, s)

    results: dict[str, list[dict]] = {"padded": [], "packed": []}
    for rep in range(args.repeats):
        order = ("padded", "packed") if rep % 2 == 0 else ("packed", "padded")
        for layout in order:
            r = run_phase(args, spec, model_dir[0], groups, layout, s)
            results[layout].append(r)
            if rank == 0:
                print(f"  run {rep + 1} {layout}: {r['time']:.2f} s ({r['cpu']:.2f} CPU s), "
                      f"loss {r['loss']:.6f}, grad norm {r['grad_norm']:.6f}", flush=True)

    if rank == 0:
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in results.items()}
        pad, pk = med["padded"], med["packed"]
        gib = 2 ** 30
        print()
        print("| layout | micro-batches (all ranks) | tokens / pass | phase s | phase CPU s | "
              "peak RSS GiB | peak − before GiB | loss |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, m in (("padded (baseline)", pad), ("packed (token budget)", pk)):
            print(f"| {name} | {m['micro_batches']:.0f} | {m['tokens']:,.0f} | {m['time']:.2f} | "
                  f"{m['cpu']:.2f} | "
                  f"{m['peak'] / gib:.2f} | {m['peak_extra'] / gib:.2f} | {m['loss']:.6f} |")
        print()
        print(f"tokens padded/packed: {pad['tokens'] / pk['tokens']:.2f}× "
              f"(real tokens {sum(lengths):,}: padded layout {sum(lengths) / pad['tokens']:.0%} "
              f"real, packed {sum(lengths) / pk['tokens']:.0%})")
        runs = {k: ", ".join(f"{r['time']:.2f}" for r in v) for k, v in results.items()}
        print(f"time padded/packed: {pad['time'] / pk['time']:.2f}×  "
              f"(runs: padded {runs['padded']}; packed {runs['packed']})")
        print(f"CPU time padded/packed: {pad['cpu'] / pk['cpu']:.2f}× (process CPU seconds, all "
              "threads; less sensitive than wall time to other jobs on the machine)")
        print(f"phase peak − before, padded/packed: {pad['peak_extra'] / pk['peak_extra']:.2f}×")
        print(f"loss |padded − packed| = {abs(pad['loss'] - pk['loss']):.2e}, grad norm "
              f"|padded − packed| = {abs(pad['grad_norm'] - pk['grad_norm']):.2e}")
        print(f"layout build (host) s: padded {pad['build']:.3f}, packed {pk['build']:.3f}")

        dps = [int(x) for x in args.plan_dp.split(",") if x]
        print()
        print("data-parallel balance, max/mean work per rank (work = L(1 + L/6h), L padded to the "
              "length multiple):")
        print("| batch | DP | contiguous shares (padded baseline's split) | packed plan | "
              "packed micro-batches per rank | fullest micro-batch tokens |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in plan_rows(lengths, dps=dps, mbs=args.micro_batch_size,
                             max_tokens=args.max_tokens, hidden=spec.hidden_size):
            print(f"| this run ({len(lengths)} seqs, cap {args.cap}) | {row[0]} | {_f(row[1])} | "
                  f"{row[2]:.3f} | {row[3]} | {row[4]:,} |")
        if args.plan_prompts:
            more = argparse.Namespace(**{**vars(args), "prompts": args.plan_prompts,
                                         "seed": args.seed + 1})
            big = [len(q) for q in sequences_of(make_groups(more, spec.vocab_size))]
            for row in plan_rows(big, dps=dps, mbs=args.micro_batch_size,
                                 max_tokens=args.max_tokens, hidden=spec.hidden_size):
                print(f"| same distribution, {len(big)} seqs | {row[0]} | {_f(row[1])} | "
                      f"{row[2]:.3f} | {row[3]} | {row[4]:,} |")
        if args.paper_scale:
            # examples/configs/qwen3_14b_top20.yaml: Qwen3-14B (h 5120), TP4 x CP2 x DP16, a
            # mini-batch of 32 prompts (16 optimizer steps a step), budget 45,056 tokens.
            for prompts in (32, 512):
                big = paper_lengths(prompts, args.seed)
                t0 = time.perf_counter()
                rows = plan_rows(big, dps=[16], mbs=1, max_tokens=45056, hidden=5120)
                t_plan = time.perf_counter() - t0
                for row in rows:
                    print(f"| paper recipe, {len(big):,} seqs (cap 20,480, h 5120, budget 45,056; "
                          f"plan {t_plan:.1f} s) | {row[0]} | {_f(row[1])} | {row[2]:.3f} | "
                          f"{row[3]} | {row[4]:,} |")
    destroy_distributed()
    if rank == 0 and args.model_dir is None:
        shutil.rmtree(model_dir[0], ignore_errors=True)  # the random model made for this run


if __name__ == "__main__":
    main()
