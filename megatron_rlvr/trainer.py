"""The RL loop: DAPO on Megatron-Core with vLLM rollouts, training on the top-ρ entropy tokens.

One step:
  1. rollout   every rank's vLLM engine samples n responses for its share of the prompts; rewards
               are scored in a process pool; DAPO dynamic sampling repeats rounds until
               train_batch_size prompts have responses that disagree. Only the groups' summaries
               (scores, lengths) are all-gathered; their tokens stay with the scoring rank until
               the plan of the step is known, then go point to point to the data-parallel replica
               that trains on them (generation.py, exchange.py);
  2. old pass  the policy computes log-probs (the PPO ratio's denominator) and entropies of the
               batch; vLLM's log-probs are compared with them (rollout/logprob_mismatch_*).
               Skipped when the step makes a single optimizer step whose selection needs no
               entropies beforehand (ρ = 1 or the micro-batch scope): the update's own detached
               log-probs are then the old ones, exactly;
  3. update    one optimizer step per mini-batch of ppo_mini_batch_size prompts: clip-higher PPO
               loss on the selected tokens (algos/high_entropy.py), Megatron DDP + distributed
               optimizer;
  4. sync      the new weights stream to vLLM as HF-named tensors;
  5. report    metrics.jsonl / tensorboard / wandb, periodic validation, checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr import checkpoint as ckpt
from megatron_rlvr import platform, watchdog
from megatron_rlvr.algos.objective import describe_objective
from megatron_rlvr.algos.high_entropy import (LossSettings, dapo_loss, select_mini_batch,
                                              token_stats)
from megatron_rlvr.algos.rollout_correction import METRIC_KEYS, finalize_metrics
from megatron_rlvr.config import Config, config_to_dict, data_parallel_size
from megatron_rlvr.data.dataset import PromptDataset, PromptSampler
from megatron_rlvr.eval import evaluate
from megatron_rlvr.exchange import (build_micro_batches, data_parallel_ranks, exchange_payloads,
                                    plan_step)
from megatron_rlvr.generation import (Round, ShapingConfig, fleet_groups, generate_round,
                                      summary_of)
from megatron_rlvr.logging import MetricsLogger
from megatron_rlvr.models.builder import DTYPES
from megatron_rlvr.models.pipeline import local_tokens, sequence_length_multiple
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, host_group, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.rewards.scorer import build_scorer
from megatron_rlvr.rollout.base import SamplingParams
from megatron_rlvr.step_rollout import (RolloutNotReady, RolloutProducer, StepBatch,
                                        collect_step)


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row)."""


def seed_for(*parts) -> int:
    """A stable 31-bit seed from any parts (run seed, step, round, ...)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def selection_generator(run_seed: int, step: int, mini_batch: int) -> torch.Generator:
    """The random-selection stream of one mini-batch on this rank: seeded by (step, mini-batch,
    data- and context-parallel rank), so tensor-parallel peers, which hold the same tokens, draw
    the same mask, and pipeline stages agree."""
    from megatron.core import parallel_state as ps

    return platform.generator(seed_for(run_seed, "select", step, mini_batch,
                                       ps.get_data_parallel_rank(),
                                       ps.get_context_parallel_rank()))


def _batch_ranks_only(values: torch.Tensor, op) -> torch.Tensor:
    """Reduce per-rank statistics over the ranks that each hold distinct tokens of the batch
    (last pipeline stage, tensor-parallel rank 0); the result is known on every rank."""
    from megatron.core import parallel_state as ps

    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    neutral = 0.0 if op == dist.ReduceOp.SUM else float("-inf")
    t = values.double() if owner else torch.full_like(values, neutral, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.cpu()  # for metrics: read on the host


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = data_parallel_size(cfg, world)
        p = cfg.parallel
        init_distributed(p.tp, p.pp, p.cp, seed=cfg.trainer.seed,
                         timeout_s=cfg.trainer.collective_timeout_s, watchdog=True)
        from megatron.core import parallel_state as ps
        from transformers import AutoTokenizer

        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        spec = read_model_spec(cfg.model.hf_dir)
        r, d = cfg.rollout, cfg.data
        data_kwargs = dict(max_prompt_length=r.max_prompt_length, prompt_key=d.prompt_key,
                           prompt_overflow=r.prompt_overflow, bad_rows=d.bad_rows)
        self.train_set = PromptDataset(d.train_files, self.tokenizer, **data_kwargs)
        self.val_set = PromptDataset(d.val_files, self.tokenizer, **data_kwargs) \
            if d.val_files else None
        self.sampler = PromptSampler(len(self.train_set.records), seed=d.seed, shuffle=d.shuffle)
        self.disaggregated = r.mode == "disaggregated"
        self.fleet = self.producer = None
        # Colocated: an engine in this rank. Disaggregated: Ray engine actors, driven by rank 0
        # (started below, once the policy exists).
        self.engine = None if self.disaggregated else self._make_engine(spec)
        torch.manual_seed(cfg.trainer.seed)  # vLLM reseeds torch when it starts: seed after it
        t = cfg.trainer
        self.policy = Policy(spec, cfg.model.hf_dir, dtype=DTYPES[cfg.model.dtype],
                             recompute=cfg.model.recompute_activations,
                             sequence_parallel=p.sequence_parallel,
                             optim=OptimConfig(lr=t.lr, weight_decay=t.weight_decay,
                                               grad_clip=t.grad_clip, adam_beta1=t.adam_beta1,
                                               adam_beta2=t.adam_beta2, adam_eps=t.adam_eps))
        a = cfg.algorithm
        self.loss_settings = LossSettings(
            temperature=r.temperature, clip_ratio_low=a.clip_ratio_low,
            clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c,
            loss_agg_mode=a.loss_agg_mode, ratio=a.entropy_top_ratio, scope=a.entropy_top_scope,
            norm=a.entropy_loss_norm, select=a.entropy_select,
            # Colocated, synchronous rollouts: vLLM samples with the old policy's weights.
            correction=(a.rollout_correction.level, a.rollout_correction.method,
                        a.rollout_correction.cap)
            if a.rollout_correction.active(off_policy=r.max_staleness > 0) else None)
        self.shaping = ShapingConfig(enable=a.overlong_buffer_enable,
                                     max_response_length=r.max_response_length,
                                     buffer_len=a.overlong_buffer_len,
                                     penalty_factor=a.overlong_penalty_factor)
        self.step = 0
        self.nonfinite_in_row = 0
        resume_dir = self._resume_dir()
        lg = cfg.logging
        self.log = MetricsLogger(lg.output_dir, enabled=self.rank == 0, run_name=lg.run_name,
                                 total_steps=t.total_steps, tensorboard=lg.tensorboard,
                                 wandb=lg.wandb, wandb_project=lg.wandb_project,
                                 wandb_mode=lg.wandb_mode, config=config_to_dict(cfg),
                                 resume=resume_dir is not None)
        self.log.info("objective: " + describe_objective(
            a.entropy_top_ratio, a.entropy_top_scope, a.entropy_loss_norm, a.entropy_select,
            a.loss_agg_mode))
        if a.entropy_top_scope == "micro_batch" and a.entropy_top_ratio < 1.0 \
                and t.max_tokens_per_micro_batch == 0 and t.micro_batch_size < 8:
            self.log.info(f"warning: entropy_top_scope=micro_batch with trainer.micro_batch_size="
                          f"{t.micro_batch_size}: each top-k pool is {t.micro_batch_size} "
                          "response(s); the seed code's pools hold ~16-32: set "
                          "trainer.max_tokens_per_micro_batch (docs/method.md)")
        if self.disaggregated and self.rank == 0:
            self.fleet = self._make_fleet()  # starts (or joins) Ray before the reward actors
        self.rewards = self._make_rewards()
        if resume_dir is not None:
            self._load(resume_dir)
        if self.disaggregated and self.rank == 0:
            self.producer = RolloutProducer(self._produce_step, self.sampler,
                                            first_step=self.step + 1,
                                            max_staleness=r.max_staleness,
                                            synced_version=self.step).start()
        if not self.disaggregated:
            self.policy.offload()  # GPU: the first (colocated) rollout comes before any training

    # ----------------------------------------------------------------------------- setup
    def _engine_config(self):
        from megatron_rlvr.rollout.vllm_engine import VLLMEngineConfig

        r, e = self.cfg.rollout, self.cfg.eval
        longest = max(r.max_response_length, e.max_response_length or 0)
        return VLLMEngineConfig(
            model_path=self.cfg.model.hf_dir, tensor_parallel_size=r.vllm_tp,
            dtype=self.cfg.model.dtype, max_model_len=r.max_prompt_length + longest,
            max_prompt_tokens=r.max_prompt_length, prompt_overflow=r.prompt_overflow,
            bucket_mb=r.sync_bucket_mb, seed=self.cfg.trainer.seed,
            enforce_eager=r.enforce_eager, gpu_memory_utilization=r.gpu_memory_utilization)

    def _make_engine(self, spec):
        from megatron_rlvr.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(self._engine_config())

    def _make_rewards(self):
        """The reward scorer of this rank: a local worker pool, or Ray actors; disaggregated,
        only rank 0 scores (and its producer thread and evaluation share the scorer)."""
        c = self.cfg.reward
        if self.disaggregated and self.rank != 0:
            return None
        pool = build_scorer(c, ray_address=self.cfg.rollout.ray_address)
        return _Serialized(pool) if self.disaggregated else pool

    def _make_fleet(self):
        """Rank 0, disaggregated: the Ray engine actors (rollout/fleet.py)."""
        from megatron_rlvr.rollout.fleet import FleetConfig, RolloutFleet

        r, c = self.cfg.rollout, self.cfg.reward
        return RolloutFleet(FleetConfig(
            engine=self._engine_config(), engines=r.engines, vllm_tp=r.vllm_tp,
            ray_address=r.ray_address, cpus_per_engine=r.cpus_per_engine,
            timeout_s=self.cfg.trainer.collective_timeout_s,
            extra_cpus=c.ray_actors if c.backend == "ray" else 0))

    def _resume_dir(self) -> str | None:
        c = self.cfg.checkpoint
        if c.resume == "never":
            return None
        if c.resume == "auto":
            return ckpt.latest_checkpoint(self._checkpoint_root())
        if not os.path.isdir(c.resume):
            raise FileNotFoundError(f"checkpoint.resume: {c.resume} is not a directory")
        return c.resume

    def _checkpoint_root(self) -> str:
        return os.path.join(self.cfg.logging.output_dir, "checkpoints")

    # ----------------------------------------------------------------------------- the loop
    def fit(self) -> None:
        t = self.cfg.trainer
        if self.step == 0 and self.cfg.eval.at_start and self.val_set is not None:
            self.log.log(0, self._evaluate())
        while self.step < t.total_steps:
            self.step += 1
            metrics = self.train_step()
            if self._due(self.cfg.eval.every_n_steps) and self.val_set is not None:
                metrics.update(self._evaluate())
            self.log.log(self.step, metrics)
            self.log.line(self.step, metrics)
            if self._due(self.cfg.checkpoint.save_every):
                self._save()
        if self.cfg.checkpoint.export_hf_at_end:
            from megatron_rlvr.hf_export import write_hf

            out = os.path.join(self.cfg.logging.output_dir, "hf_export")
            write_hf(self.policy.model[0], self.policy.spec, self.cfg.model.hf_dir, out,
                     dtype=self.cfg.model.dtype)
            self.log.info(f"exported the final policy to {out}")

    def _due(self, every: int) -> bool:
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.trainer.total_steps)

    def train_step(self) -> dict[str, float]:
        t0 = time.time()
        self.policy.set_lr(self._lr())
        groups, generated, gen_stats, local = self._rollout()
        t_rollout = time.time() - t0

        t1 = time.time()
        mini_batches, layout_stats = self._micro_batches(groups, local)
        del local  # this rank's payloads: in its micro-batches now, or sent to their trainers
        old_stats = self._old_pass(mini_batches) \
            if self._old_pass_needed(len(mini_batches)) else None
        update_stats = self._update(mini_batches, old_stats.pop("entropies") if old_stats else None)
        # The old policy's entropy and mismatch: the old pass's, or the update's own when it was
        # skipped (the same policy then).
        own = {k: update_stats.pop(k) for k in ("entropy/mean", "rollout/logprob_mismatch_mean",
                                                "rollout/logprob_mismatch_max")}
        old_stats = old_stats or own
        update_stats.update(layout_stats)
        t_train = time.time() - t1

        t2 = time.time()
        sync_gb = self._sync_weights()
        t_sync = time.time() - t2

        acc = [a for g in generated for a in g.accuracy]
        rew = [x for g in generated for x in g.reward]
        lengths = [n for g in generated for n in g.response_lengths]
        return {
            "reward/mean": sum(rew) / len(rew),
            "reward/acc": sum(acc) / len(acc),
            "reward/acc_train_batch": sum(a for g in groups for a in g.accuracy)
            / sum(len(g.accuracy) for g in groups),
            "reward/timeouts": float(sum(g.timed_out for g in generated)),
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/clip_fraction": sum(
                f == "length" for g in generated for f in g.finish_reasons) / len(lengths),
            **old_stats, **update_stats,
            "lr": self._lr(),
            "dynamic_sampling/gen_batches": float(gen_stats.rounds),
            "dynamic_sampling/kept_prompts": float(gen_stats.kept),
            "dynamic_sampling/dropped_all_correct": float(gen_stats.dropped_all_correct),
            "dynamic_sampling/dropped_all_wrong": float(gen_stats.dropped_all_wrong),
            "weight_sync/gb": sync_gb,
            **self._staleness(groups),
            "timing/rollout_s": t_rollout, "timing/train_s": t_train,
            "timing/weight_sync_s": t_sync, "timing/step_s": time.time() - t0,
        }

    def _sync_weights(self) -> float:
        """Send the new weights (policy version self.step) to the rollout engines; returns GB.
        Colocated, with the GPU memory choreography (no-ops on CPU): training state leaves the
        GPU, the engine's weights come back and are overwritten, then its KV cache returns for
        the next rollout. Disaggregated, every rank gathers (hf_weights is a collective) and
        rank 0 streams them to the fleet, which waits for the engines' current round."""
        weights = self.policy.hf_weights(include_tied_lm_head=True)
        if not self.disaggregated:
            self.policy.offload()
            self.engine.wake_up(tags=["weights"])
            sync = self.engine.update_weights(weights)
            self.engine.wake_up(tags=["kv_cache"])
            return sync.bytes / 1e9
        if self.rank != 0:
            for _ in weights:  # the gathers are collectives: take part, keep nothing
                pass
            return 0.0
        sync = self.fleet.sync_weights(weights, version=self.step,
                                       bucket_mb=self.cfg.rollout.sync_bucket_mb)
        if self.producer is not None:  # None while resuming: it starts after the load
            self.producer.weights_synced(self.step)
        return sync.bytes / 1e9

    def _staleness(self, groups) -> dict[str, float]:
        """Versions between the weights that generated the batch and the policy it trains
        (disaggregated; 0 in a synchronous run)."""
        lags = [self.step - 1 - g.version for g in groups if g.version is not None]
        if not lags:
            return {}
        return {"rollout/staleness_mean": sum(lags) / len(lags),
                "rollout/staleness_max": float(max(lags))}

    def _micro_batches(self, groups, local) -> tuple[list[list[dict]], dict]:
        """This rank's micro-batches of every mini-batch (on the device), and what the layout
        costs: tokens through the model over all data-parallel ranks, and the padding share.

        `groups` are the step's summaries (the same on every rank), `local` the payloads this
        rank owns: every rank computes the same plan from the summaries, then the tokens move
        from their owners to the data-parallel replica that trains on them (exchange.py)."""
        t, p = self.cfg.trainer, self.cfg.parallel
        multiple = sequence_length_multiple(tp=p.tp, cp=p.cp, sequence_parallel=p.sequence_parallel)
        plan = plan_step(groups, dp=self.dp, mini_batch=t.ppo_mini_batch_size * self.cfg.rollout.n,
                         packing=t.packing, micro_batch_size=t.micro_batch_size,
                         max_tokens=t.max_tokens_per_micro_batch,
                         hidden_size=self.policy.spec.hidden_size, multiple=multiple)
        if getattr(self, "_dp_of_rank", None) is None:
            self._dp_of_rank = data_parallel_ranks()
        seqs, _ = exchange_payloads(plan, local, rank=self.rank, dp_of_rank=self._dp_of_rank)
        out = build_micro_batches(plan, seqs, self.dp_rank, multiple=multiple, pad_id=self.pad_id,
                                  micro_batch_size=t.micro_batch_size)
        real, through = sum(plan.lengths), plan.tokens_through
        return out, {"batch/tokens": float(through), "batch/pad_fraction": 1 - real / through}

    def _old_pass_needed(self, n_mini_batches: int) -> bool:
        """False when the old policy is the one the (single) update runs with and nothing must be
        known before the update: the loss then takes the update's detached log-probs as the old
        ones (ratio 1, as an old pass would give) and reports the entropy and mismatch itself."""
        a = self.cfg.algorithm
        selects_first = a.entropy_top_scope == "global" and a.entropy_top_ratio < 1.0
        return n_mini_batches > 1 or selects_first

    def _lr(self) -> float:
        """Linear warm-up over lr_warmup_steps RL steps (step 1 gets lr/W), then constant."""
        t = self.cfg.trainer
        return t.lr * min(1.0, self.step / max(t.lr_warmup_steps, 1))

    # ----------------------------------------------------------------------------- phases
    def _rollout(self):
        """(the step's groups, every generated group, sampling stats, this rank's payloads):
        summaries (the same on every rank) and the tokens of the chosen groups this rank owns."""
        if self.disaggregated:
            batch = self._take_step_batch()
        else:
            batch = collect_step(partial(generate_round, self.engine, self.train_set,
                                         vllm_tp=self.cfg.rollout.vllm_tp,
                                         **self._round_kwargs()), self.sampler,
                                 **self._collect_kwargs())
            self.engine.sleep()
        return batch.chosen, batch.generated, batch.stats, batch.local

    def _round_kwargs(self) -> dict:
        return dict(tokenizer=self.tokenizer, reward_pool=self.rewards, shaping=self.shaping)

    def _collect_kwargs(self, step: int | None = None) -> dict:
        r, t, a = self.cfg.rollout, self.cfg.trainer, self.cfg.algorithm
        step = self.step if step is None else step
        return dict(train_batch_size=t.train_batch_size, gen_batch_size=t.gen_batch_size,
                    max_rounds=a.max_num_gen_batches, dynamic_sampling=a.dynamic_sampling,
                    params_for_round=lambda i: SamplingParams(
                        n=r.n, temperature=r.temperature, top_p=r.top_p,
                        max_tokens=r.max_response_length,
                        seed=seed_for(t.seed, "rollout", step, i)))

    def _produce_step(self, step: int) -> StepBatch:
        """Rank 0's producer thread, disaggregated: one step's rollout on the fleet, with the same
        prompts, rounds and seeds as a colocated run (not a collective)."""
        def make_round(indices, params, round_index):
            local = fleet_groups(self.fleet, self.train_set, indices, params,
                                 round_index=round_index, **self._round_kwargs())
            return Round(sorted((summary_of(g, k, 0) for k, g in local.items()),
                                key=lambda g: g.key), local)

        return collect_step(make_round, self.sampler, **self._collect_kwargs(step))

    def _take_step_batch(self) -> StepBatch:
        """Disaggregated: rank 0 takes the step's batch from its producer and broadcasts the
        summaries (or the producer's error, so that every rank stops with it); the payloads stay
        on rank 0 until the exchange sends them to the ranks that train on them. While the
        rollout runs, rank 0 broadcasts a heartbeat every quarter of the collective timeout: a
        step's rollout may take longer than one collective may wait, and a hung engine is caught
        by the fleet's own deadline on each call, which names it."""
        poll = self.cfg.trainer.collective_timeout_s / 4
        while True:
            payload = [None]
            if self.rank == 0:
                try:
                    batch = self.producer.take(self.step, poll)
                    payload = [("ok", (batch.chosen, batch.generated, batch.stats))]
                except RolloutNotReady:
                    payload = [("wait", None)]
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                    payload = [("error", e)]
            dist.broadcast_object_list(payload, src=0, group=host_group())
            watchdog.progress()
            kind, value = payload[0]
            if kind == "error":
                raise value
            if kind == "ok":
                break
        if self.rank == 0:
            return batch
        chosen, generated, stats = value
        return StepBatch(chosen, generated, stats, {})

    def _old_pass(self, mini_batches) -> dict:
        """Log-probs and entropies of the policy that generated the batch (before any update)."""
        s = self.loss_settings
        dev = platform.device()
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # entropy, tokens, |diff| sums
        diff_max = torch.full((1,), float("-inf"), dtype=torch.float64, device=dev)
        entropies = []
        for mbs in mini_batches:
            outs = self.policy.forward(mbs, partial(token_stats, s=s))
            ents = []
            for mb, out in zip(mbs, outs):
                mask = local_tokens(mb, mb["response_mask"])
                mb["old_logprobs_local"] = out["logprobs"]
                ents.append(out["entropy"])
                diff = (out["logprobs"] - local_tokens(mb, mb["rollout_logprobs"])).abs()[mask]
                diff = diff.double()
                sums += torch.stack([out["entropy"][mask].double().sum(), mask.sum().double(),
                                     diff.sum()])
                if diff.numel():
                    diff_max = torch.maximum(diff_max, diff.max().reshape(1))
            entropies.append(ents)
        sums = _batch_ranks_only(sums, dist.ReduceOp.SUM)
        diff_max = _batch_ranks_only(diff_max, dist.ReduceOp.MAX)
        tokens = max(sums[1].item(), 1.0)
        return {"entropy/mean": sums[0].item() / tokens,
                "rollout/logprob_mismatch_mean": sums[2].item() / tokens,
                "rollout/logprob_mismatch_max": diff_max.item(),
                "entropies": entropies}

    def _update(self, mini_batches, old_entropies) -> dict:
        s = self.loss_settings
        names = ("kept_count", "response_count", "tokens_count", "clip_high_count",
                 "clip_low_count", "dual_clip_count", "ratio_sum", "approx_kl_sum",
                 "entropy_sum", "mismatch_sum") + (METRIC_KEYS if s.correction else ())
        dev = platform.device()
        sums = torch.zeros(len(names), dtype=torch.float64, device=dev)
        # Per mini-batch, the lowest entropy that received gradient (τ in the global scope).
        lowest_kept = torch.full((len(mini_batches),), float("inf"), dtype=torch.float64,
                                 device=dev)
        mismatch_max = torch.full((1,), float("-inf"), dtype=torch.float64, device=dev)
        losses, norms, skipped = [], [], 0
        for i, mbs in enumerate(mini_batches):
            gen = selection_generator(self.cfg.trainer.seed, self.step, i)
            # The policy before mini-batch 0 is the old policy: its entropies are known.
            select_mini_batch(self.policy, mbs, s, gen,
                              entropies=old_entropies[i] if i == 0 and old_entropies else None)
            result = self.policy.train_step(mbs, partial(dapo_loss, s=s, generator=gen))
            if result.skipped:
                skipped += 1
                self.nonfinite_in_row += 1
                if self.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
                    raise TrainingAborted(
                        f"{self.nonfinite_in_row} optimizer steps in a row had a non-finite loss "
                        f"or gradient (last loss: {result.loss}) at RL step {self.step}; stopping "
                        "(trainer.max_nonfinite_steps). Lower trainer.lr or check the data.")
                if self.rank == 0:
                    print(f"warning: step {self.step} mini-batch {i}: non-finite loss or "
                          f"gradient (loss {result.loss}); update skipped", flush=True)
                continue
            self.nonfinite_in_row = 0
            losses.append(result.loss)
            norms.append(result.grad_norm)
            for log in result.logs:
                sums += torch.stack([torch.as_tensor(log[k], device=dev).double() for k in names])
                lowest_kept[i] = torch.minimum(lowest_kept[i], log["kept_entropy_min"].double())
                mismatch_max = torch.maximum(mismatch_max, log["mismatch_max"].reshape(1))
        sums = _batch_ranks_only(sums, dist.ReduceOp.SUM)
        mismatch_max = _batch_ranks_only(mismatch_max, dist.ReduceOp.MAX)
        lowest_kept = -_batch_ranks_only(-lowest_kept, dist.ReduceOp.MAX)
        lowest_kept = lowest_kept[torch.isfinite(lowest_kept)]
        v = dict(zip(names, sums.tolist()))
        tokens = max(v["tokens_count"], 1.0)
        responses = max(v["response_count"], 1.0)
        correction = finalize_metrics(v) if s.correction else {}
        return {
            **correction,
            # The update's own view (the old pass's when it is skipped; see train_step).
            "entropy/mean": v["entropy_sum"] / responses,
            "rollout/logprob_mismatch_mean": v["mismatch_sum"] / responses,
            "rollout/logprob_mismatch_max": mismatch_max.item(),
            "loss/pg": sum(losses) / len(losses) if losses else float("nan"),
            "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            "tokens/kept_fraction": v["kept_count"] / max(v["response_count"], 1.0),
            "tokens/kept": v["kept_count"], "tokens/response": v["response_count"],
            "entropy/threshold": lowest_kept.mean().item() if lowest_kept.numel() else float("nan"),
            "actor/clip_high_fraction": v["clip_high_count"] / tokens,
            "actor/clip_low_fraction": v["clip_low_count"] / tokens,
            "actor/dual_clip_fraction": v["dual_clip_count"] / tokens,
            "actor/ratio_mean": v["ratio_sum"] / tokens,
            "actor/approx_kl": v["approx_kl_sum"] / tokens,
            "actor/skipped_updates": float(skipped),
        }

    def _evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        t0 = time.time()
        # Disaggregated: rank 0 generates on the fleet (between the producer's rounds), the
        # other ranks only receive the summaries.
        metrics = evaluate(self.fleet if self.disaggregated else self.engine, self.val_set, n=e.n, temperature=e.temperature,
                           top_p=e.top_p, max_tokens=e.max_response_length,
                           seed=seed_for(self.cfg.trainer.seed, "eval", self.step),
                           tokenizer=self.tokenizer, reward_pool=self.rewards,
                           vllm_tp=self.cfg.rollout.vllm_tp)
        metrics["timing/eval_s"] = time.time() - t0
        if self.rank == 0:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "@" in k)
            print(f"eval at step {self.step}: {shown}", flush=True)
        return metrics

    # ----------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        # Disaggregated, rollouts made ahead are not in the checkpoint: resume redraws their
        # prompts (step_rollout.py). Only rank 0's state is saved, and rank 0 drives the fleet.
        sampler = self.producer.resume_state(self.step + 1) if self.producer \
            else self.sampler.state_dict()
        return {"step": self.step, "sampler": sampler,
                "nonfinite_in_row": self.nonfinite_in_row, "config": config_to_dict(self.cfg)}

    def _save(self) -> None:
        root = self._checkpoint_root()
        # GPU: the optimizer state is in host memory and the engine holds its KV cache; the save
        # needs the first on the device and room for it, so the engine sleeps and is synced anew.
        on_gpu = platform.has_cuda() and not self.disaggregated
        if on_gpu:
            self.engine.sleep()
            self.policy.restore()
        path = ckpt.save_checkpoint(ckpt.step_dir(root, self.step), self.policy.model,
                                    hf_dir=self.cfg.model.hf_dir,
                                    optimizer=self.policy.optimizer, extra=self._state(),
                                    overwrite=True)
        if on_gpu:
            self.policy.offload()
            self.engine.wake_up(tags=["weights"])
            self.engine.update_weights(self.policy.hf_weights(include_tied_lm_head=True))
            self.engine.wake_up(tags=["kv_cache"])
        keep = self.cfg.checkpoint.keep_last
        if keep > 0 and self.rank == 0:
            done = sorted(d for d in os.listdir(root) if ckpt.is_complete(os.path.join(root, d)))
            for old in done[:-keep]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        self.log.info(f"saved checkpoint {path}")

    def _load(self, path: str) -> None:
        extra = ckpt.load_checkpoint(path, self.policy.model, spec=self.policy.spec,
                                     optimizer=self.policy.optimizer)
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        self.nonfinite_in_row = int(extra.get("nonfinite_in_row", 0))
        self.log.truncate_after(self.step)
        self._sync_weights()  # the engines start from model.hf_dir: give them the checkpoint's
        self.log.info(f"resumed from {path} at step {self.step}")

    def close(self) -> None:
        """Shut down in order: the stall watchdog first (its thread must be gone before the
        process groups and the interpreter, see watchdog.stop), then the reward workers, vLLM
        (its cleanup also destroys the default process group), the loggers."""
        watchdog.stop()
        if self.producer is not None:
            self.producer.stop(timeout_s=0)
        if self.rewards is not None:
            self.rewards.close()
        if self.fleet is not None:
            self.fleet.shutdown()  # ends the producer's call in flight; stops a Ray it started
        if self.producer is not None:
            self.producer.stop()
        if self.engine is not None:
            self.engine.shutdown()  # before the process groups it uses are destroyed
        self.log.close(plots=self.cfg.logging.plots)


class _Serialized:
    """A reward scorer shared by threads (rank 0's producer and evaluation), one call at a time."""

    def __init__(self, pool):
        self._pool, self._lock = pool, threading.Lock()

    def score(self, responses, ground_truths):
        with self._lock:
            return self._pool.score(responses, ground_truths)

    def close(self) -> None:
        self._pool.close()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def train(cfg: Config) -> None:
    # torchrun stops the ranks with SIGTERM when one of them fails: unwind, so that close() runs
    # (it stops the Ray cluster a disaggregated rank 0 started, and the reward workers).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
        destroy_distributed()
