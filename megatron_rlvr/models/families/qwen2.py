"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): the Llama layout plus a bias on q, k and v."""
from megatron_rlvr.models.families.base import Family

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    qk_norm=False,
    qkv_bias=lambda cfg: True,
)
