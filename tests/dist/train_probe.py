"""Run under torchrun: `python -m megatron_rlvr train ...`, unchanged, plus a record of what an outside
check needs and the trainer does not report. Rank 0 writes <logging.output_dir>/probe/step_NNNNNN.json
after every RL step with:
  groups     the step's training groups (prompt ids, response ids, vLLM's log-probs, rewards,
             accuracies) of the groups `Trainer._rollout` chose, gathered from the ranks that hold them;
  optimizer  each optimizer param group's `lr` and `weight_decay` as the optimizer holds them
             during the step (not the trainer's own `lr` metric).
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


def _recording_rollout(self):
    result = _rollout(self)
    # The trainer keeps each group's tokens on the rank that scored it; the probe gathers them all
    # (the old all-gather, fine for a test run).
    groups = gather_groups(result[0], result[3])
    self._probe_groups = [{"prompt_ids": list(g.prompt_ids), "responses": [list(r) for r in g.responses],
                           "rollout_logprobs": [list(lp) for lp in g.rollout_logprobs],
                           "reward": list(g.reward), "accuracy": list(g.accuracy)} for g in groups]
    return result


def _recording_train_step(self):
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

if __name__ == "__main__":
    sys.exit(main())
