"""The trainable policy on this rank: a GPTModel stage in Megatron DDP with the distributed optimizer.

Loss accounting: a loss function returns `(numerator, denominator, logs)` per micro-batch; Megatron
(with `calculate_per_token_loss`) sums numerators into the gradients, all-reduces the denominators
over data- and context-parallel ranks and divides the gradients once by that global sum. Any
"sum over the mini-batch / count over the mini-batch" loss is therefore exact whatever the micro-batch
and data-parallel split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.models.builder import build_model
from megatron_rlvr.models.convert import iter_hf_weights, load_hf_weights
from megatron_rlvr.models.pipeline import run_micro_batches
from megatron_rlvr.models.spec import ModelSpec


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class StepResult:
    loss: float          # sum of numerators / sum of denominators over the whole mini-batch
    grad_norm: float     # before clipping; nan when the step was skipped
    skipped: bool        # True when the loss or a gradient was not finite: no update was made
    logs: list           # the loss function's per-micro-batch logs (last pipeline stage only)


class Policy:
    def __init__(self, spec: ModelSpec, hf_dir: str, *, dtype: torch.dtype, optim: OptimConfig,
                 recompute: bool = False, sequence_parallel: bool = False):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.spec = spec
        model = build_model(spec, dtype=dtype, recompute=recompute,
                            sequence_parallel=sequence_parallel)
        load_hf_weights(model, spec, hf_dir)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True)
        self.model = [DistributedDataParallel(config=model.config, ddp_config=ddp_config,
                                              module=model)]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            adam_eps=optim.adam_eps, clip_grad=optim.grad_clip,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype,
                            use_distributed_optimizer=True),
            self.model)
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model[0].no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        self._offloaded = False

    def offload(self) -> None:
        """GPU: free the training-only memory while the colocated engine generates: gradient
        buffers (re-allocated, zeroed, by `restore`) and the optimizer's state and master weights
        (moved to host memory). The model's weights stay: the engine's weight sync reads them.
        CPU: nothing to free (host memory either way)."""
        if not platform.has_cuda() or self._offloaded:
            return
        for m in self.model:
            m.offload_grad_buffers(synchronize=True, empty_cache=False)
        self.optimizer.offload_to_cpu()  # ends with torch.cuda.empty_cache()
        self._offloaded = True

    def restore(self) -> None:
        """Undo `offload` before the next forward or optimizer step."""
        if not self._offloaded:
            return
        for m in self.model:
            m.restore_grad_buffers(synchronize=False)
        self.optimizer.restore_from_cpu()
        self._offloaded = False

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, micro_batches: list[dict], fn: Callable) -> list:
        """Forward only; `fn(micro_batch, logits)` runs on the last stage and its results are
        returned there (an empty list on other stages)."""
        self.restore()
        for m in self.model:
            m.eval()
        with torch.no_grad():
            return run_micro_batches(self.model, micro_batches, fn,
                                     vocab_size=self.spec.vocab_size, forward_only=True)

    def train_step(self, micro_batches: list[dict], loss_fn: Callable) -> StepResult:
        """One optimizer step over `micro_batches` (this rank's share of a mini-batch)."""
        from megatron.core import parallel_state

        self.restore()
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        logs = run_micro_batches(self.model, micro_batches, loss_fn,
                                 vocab_size=self.spec.vocab_size, forward_only=False)
        # Mini-batch loss from the logs (last stage), shared with every rank.
        totals = torch.zeros(2, dtype=torch.float64, device=platform.device())
        for entry in logs:
            totals += torch.stack([entry["numerator"].double(), entry["denominator"].double()])
        if parallel_state.is_pipeline_last_stage():
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=pp_group)  # only last stage nonzero
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        # A finite loss can still have non-finite gradients (bf16 overflow in the backward): the
        # step is skipped when either is, on every rank alike (the flag is all-reduced).
        if not math.isfinite(loss) or not self._grads_finite():
            self.optimizer.zero_grad()
            return StepResult(loss=loss, grad_norm=float("nan"), skipped=True, logs=logs)
        _, grad_norm, _ = self.optimizer.step()
        return StepResult(loss=loss, grad_norm=float(grad_norm), skipped=False, logs=logs)

    def _grads_finite(self) -> bool:
        """True when every rank's reduced gradients are finite (a collective over the world).

        Checked on Megatron's gradient buffers in slices of 64M elements, so the check needs no
        full-size temporary."""
        bad = torch.zeros(1, dtype=torch.float32, device=platform.device())
        for chunk in self.model:
            for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
                for piece in buffer.grad_data.view(-1).split(1 << 26):
                    bad += (~torch.isfinite(piece)).any()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def hf_weights(self, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the current weights as full HF-named tensors (a collective; see models.convert)."""
        return iter_hf_weights(self.model[0], self.spec, **kwargs)
