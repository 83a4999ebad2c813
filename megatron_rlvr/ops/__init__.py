"""Fused numerical ops of the policy update."""
from .entropy import logprobs_and_entropy, logprobs_and_entropy_from_hidden

__all__ = ["logprobs_and_entropy", "logprobs_and_entropy_from_hidden"]
