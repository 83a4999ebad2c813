"""What every Llama-style family shares: the rule tables and the ordered list of parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_rlvr.models.mapping import Layout, Rule
from megatron_rlvr.models.spec import ModelSpec

EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Layout.VOCAB)
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Layout.REPLICATED)
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), Layout.VOCAB)

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
LLAMA_LAYER_RULES = (
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), Layout.REPLICATED),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
          _H + "self_attn.v_proj.weight"), Layout.QKV),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Layout.ROW),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
         Layout.REPLICATED),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         Layout.GATED_FC1),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Layout.ROW),
)
QKV_BIAS_RULE = Rule(_L + "self_attention.linear_qkv.bias",
                     (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias",
                      _H + "self_attn.v_proj.bias"), Layout.QKV)
QK_NORM_RULES = (
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
         Layout.REPLICATED),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
         Layout.REPLICATED),
)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    qk_norm: bool
    qkv_bias: Callable[[dict], bool]  # read from the HF config dict

    def layer_rules(self, spec: ModelSpec) -> tuple[Rule, ...]:
        rules = LLAMA_LAYER_RULES
        if spec.qkv_bias:
            rules = rules[:2] + (QKV_BIAS_RULE,) + rules[2:]
        if spec.qk_norm:
            rules = rules + QK_NORM_RULES
        return rules

    def rules(self, spec: ModelSpec) -> list[Rule]:
        """Every Megatron parameter of the model in a fixed global order: embedding, layers,
        final norm, output layer (absent when embeddings are tied)."""
        out = [EMBEDDING]
        for i in range(spec.num_layers):
            out += [r.for_layer(i) for r in self.layer_rules(spec)]
        out.append(FINAL_NORM)
        if not spec.tie_embeddings:
            out.append(OUTPUT)
        return out
