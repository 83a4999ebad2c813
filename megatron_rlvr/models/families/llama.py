"""Llama 2/3/3.1 (LlamaForCausalLM): the base layout; optional attention bias, llama3 rope scaling."""
from megatron_rlvr.models.families.base import Family

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    qk_norm=False,
    qkv_bias=lambda cfg: bool(cfg.get("attention_bias", False)),
)
