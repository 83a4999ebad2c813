"""Run under torchrun: `python -m megatron_rlvr train ...`, unchanged, plus a record of what an outside
check needs and the trainer does not report. Rank 0 writes <logging.output_dir>/probe/step_NNNNNN.json
after every RL step with:
  groups     the step's training groups (prompt ids, response ids, vLLM's log-probs, rewards,
             accuracies) of the groups `Trainer._rollout` chose, gathered from the ranks that hold them;
  optimizer  each optimizer param group's `lr` and `weight_decay` as the optimizer holds them
             during the step (not the trainer's own `lr` metric).
In the global entropy scope, every last-pipeline-stage rank with TP rank 0 also writes
probe/select_step_NNNNNN_mb_I_rank_R.json after each mini-batch's selection: per micro-batch its
token ids, response mask, the chosen `keep` mask (flattened), and `cu_seqlens` when packed; an
outside check recovers each sequence from these and recomputes its entropies itself.
Nothing the trainer computes is changed: the wrappers call the originals and copy their results.

    torchrun --nproc_per_node=N tests/dist/train_probe.py train --config CFG [key=value ...]
"""
import json
import os
import sys

import torch.distributed as dist

from megatron_rlvr import trainer
from megatron_rlvr.__main__ import main
from megatron_rlvr.generation import gather_groups

_rollout, _train_step = trainer.Trainer._rollout, trainer.Trainer.train_step
_select_mini_batch = trainer.select_mini_batch
_state = {"step": 0, "mini_batch": 0, "out": ""}


def _recording_rollout(self):
    result = _rollout(self)
    # The trainer keeps each group's tokens on the rank that scored it; the probe gathers them all
    # (the old all-gather, fine for a test run).
    groups = gather_groups(result[0], result[3])
    self._probe_groups = [{"prompt_ids": list(g.prompt_ids), "responses": [list(r) for r in g.responses],
                           "rollout_logprobs": [list(lp) for lp in g.rollout_logprobs],
                           "reward": list(g.reward), "accuracy": list(g.accuracy)} for g in groups]
    return result


def _recording_select(policy, micro_batches, s, generator, entropies=None):
    _select_mini_batch(policy, micro_batches, s, generator, entropies=entropies)
    from megatron.core import parallel_state as ps

    i = _state["mini_batch"]
    _state["mini_batch"] += 1
    if "keep_local" not in micro_batches[0] or ps.get_tensor_model_parallel_rank() != 0:
        return
    record = [{"input_ids": mb["input_ids"].reshape(-1).tolist(),
               "response_mask": mb["response_mask"].reshape(-1).tolist(),
               "keep": mb["keep_local"].reshape(-1).tolist(),
               "row_length": mb["input_ids"].shape[-1],
               "cu_seqlens": [int(x) for x in mb["cu_seqlens"]] if "cu_seqlens" in mb else None}
              for mb in micro_batches]
    folder = os.path.join(_state["out"], "probe")
    os.makedirs(folder, exist_ok=True)
    name = f"select_step_{_state['step']:06d}_mb_{i}_rank_{dist.get_rank()}.json"
    with open(os.path.join(folder, name), "w") as f:
        json.dump(record, f)


def _recording_train_step(self):
    _state.update(step=self.step, mini_batch=0, out=self.cfg.logging.output_dir)
    metrics = _train_step(self)
    if dist.get_rank() == 0:
        record = {"step": self.step, "groups": self._probe_groups,
                  "optimizer": [{"lr": g["lr"], "weight_decay": g["weight_decay"]}
                                for g in self.policy.optimizer.param_groups]}
        folder = os.path.join(self.cfg.logging.output_dir, "probe")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step_{self.step:06d}.json"), "w") as f:
            json.dump(record, f)
    return metrics


trainer.Trainer._rollout = _recording_rollout
trainer.Trainer.train_step = _recording_train_step
trainer.select_mini_batch = _recording_select

if __name__ == "__main__":
    sys.exit(main())
