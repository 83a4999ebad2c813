"""Rollout: the engine interface the trainer uses, and the vLLM engine behind it."""
from .base import (GenerateStats, PromptOutput, RolloutEngine, RolloutError, RolloutOutput, Sample,
                   SamplingParams, WeightSyncError, WeightSyncStats, fit_prompts)
from .parity import logprob_mismatch
from .vllm_engine import CheckpointIndex, VLLMEngine, VLLMEngineConfig

__all__ = ["GenerateStats", "PromptOutput", "RolloutEngine", "RolloutError", "RolloutOutput",
           "Sample", "SamplingParams", "WeightSyncError", "WeightSyncStats", "fit_prompts",
           "logprob_mismatch", "CheckpointIndex", "VLLMEngine", "VLLMEngineConfig"]
