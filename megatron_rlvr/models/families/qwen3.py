"""Qwen3 (Qwen3ForCausalLM): the Llama layout plus per-head RMSNorm on q and k, no QKV bias."""
from megatron_rlvr.models.families.base import Family

FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    qk_norm=True,
    qkv_bias=lambda cfg: bool(cfg.get("attention_bias", False)),
)
