"""The rollout engine interface: what the trainer needs from a generator, and nothing of vLLM.

The trainer hands over token-id prompts (the data module has applied the chat template) and our
own `SamplingParams`; it gets back, per prompt, n samples with their token ids, the log-probs of
the sampled tokens and why each sample ended. Between generations it streams new weights in as
`(hf_name, tensor)` pairs and, on a GPU, lets the engine give its memory to training.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch

from megatron_rlvr.data.prompts import PromptOverflow, fit_prompts  # noqa: F401  (re-exported)

FinishReason = Literal["stop", "length"]


class RolloutError(RuntimeError):
    """Generation failed; the message names the prompt index when one prompt is to blame."""


class WeightSyncError(ValueError):
    """A weight update named, shaped or typed a tensor unlike the engine's checkpoint."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy.

    `seed` makes a call reproducible: prompt i of the call samples its n responses with seeds
    seed + i*n ... seed + i*n + n-1, so equal prompts in one batch still get different samples.
    Give each data-parallel rank its own seed.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Sample:
    """One response. `logprobs[t]` = log softmax(logits / T)[token_ids[t]] (T = 1 when greedy)."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class PromptOutput:
    """The n samples of the input prompt number `index`, and the prompt as it was generated from
    (shorter than the input when it was truncated from the left)."""
    index: int
    prompt_token_ids: list[int]
    samples: list[Sample]


@dataclass
class GenerateStats:
    num_prompts: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    num_generated_tokens: int = 0
    seconds: float = 0.0


@dataclass
class RolloutOutput:
    """`outputs` in input order, one per kept prompt; `dropped` lists the input indices that
    were too long under the `drop` policy, so the caller can drop their ground truths."""
    outputs: list[PromptOutput]
    dropped: list[int] = field(default_factory=list)
    stats: GenerateStats = field(default_factory=GenerateStats)


@dataclass
class WeightSyncStats:
    bytes: int = 0
    seconds: float = 0.0
    tensors: int = 0
    buckets: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


class RolloutEngine(abc.ABC):
    """A generator the trainer drives. Implementations: `VLLMEngine`."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutOutput:
        """Sample `params.n` responses for every prompt (lists of token ids)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightSyncStats:
        """Replace every weight with the streamed HF-named full tensors; validated, bucketed."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) for training."""

    @abc.abstractmethod
    def wake_up(self) -> None:
        """Take the memory back before the next weight update and generation."""
