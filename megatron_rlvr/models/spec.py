"""What a Hugging Face config.json says about a decoder-only model, in one typed record.

Every model family we support is a Llama-style decoder (RMSNorm, SwiGLU, rotary, GQA); the families
differ in a few switches (QKV bias, q/k RMSNorm, tied embeddings, rope scaling). `ModelSpec` holds
exactly those switches and dimensions; the family modules under `models/families/` say which
architecture names map to which switches.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The config names an architecture or a feature we do not convert."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    rope_scaling_factor: float | None = None  # Llama-3.1 style ("llama3") scaling, else None
    torch_dtype: str = "float32"

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rows in Megatron's embedding: the smallest multiple of `tp` >= vocab_size.

        Megatron splits the embedding and output layer over TP ranks by vocabulary rows. Real
        vocabularies (151,936 for Qwen, 128,256 for Llama-3) divide by 8, so this is normally
        the identity; padded rows are zero and their logits are masked to -inf.
        """
        return int(math.ceil(self.vocab_size / tp) * tp)


def _load_json(config: str | dict) -> tuple[dict, str]:
    if isinstance(config, dict):
        return config, "<dict>"
    path = os.path.join(config, "config.json") if os.path.isdir(config) else config
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    with open(path) as f:
        try:
            return json.load(f), path
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """rope_theta and the llama3 scaling factor, from either the transformers<5 keys
    (`rope_theta`, `rope_scaling`) or the transformers>=5 `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        # Megatron-Core's llama3 scaling hard-codes these three; refuse anything else.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
        for key, val in fixed.items():
            if float(scaling.get(key, val)) != float(val):
                raise UnsupportedModelError(
                    f"{where}: rope scaling llama3 with {key}={scaling[key]} is not supported "
                    f"(Megatron-Core implements {key}={val})")
        return float(theta), float(scaling["factor"])
    raise UnsupportedModelError(f"{where}: rope scaling type {kind!r} is not supported "
                                "(supported: none, llama3)")


def read_model_spec(config: str | dict) -> ModelSpec:
    """Parse a Hugging Face config (a directory, a config.json path, or its dict)."""
    from megatron_rlvr.models.families import family_for_architecture

    cfg, where = _load_json(config)
    archs = cfg.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(f"{where}: no 'architectures' entry; cannot tell the model family")
    family = family_for_architecture(archs[0], where)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope(cfg, where)
        spec = ModelSpec(
            family=family.name,
            architecture=archs[0],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            rope_theta=theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias(cfg),
            qk_norm=family.qk_norm,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling_factor=scaling,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing required key {e.args[0]!r}") from None
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {cfg['hidden_act']!r} (only silu)")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"{where}: num_attention_heads={spec.num_heads} is not a multiple of "
                         f"num_key_value_heads={spec.num_kv_heads}")
    return spec


def check_layout(spec: ModelSpec, tp: int, pp: int, cp: int = 1, *, pad_vocab: bool = True) -> None:
    """Raise a clear error when the model cannot be split as asked."""
    problems = []
    if spec.num_heads % tp:
        problems.append(f"num_attention_heads={spec.num_heads} is not divisible by tp={tp}")
    if spec.num_kv_heads % tp:
        problems.append(f"num_key_value_heads={spec.num_kv_heads} is not divisible by tp={tp} "
                        "(each tensor-parallel rank needs whole query groups)")
    if spec.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={spec.ffn_hidden_size} is not divisible by tp={tp}")
    if not pad_vocab and spec.vocab_size % tp:
        problems.append(f"vocab_size={spec.vocab_size} is not divisible by tp={tp} "
                        "(enable vocabulary padding or pick another tp)")
    if spec.num_layers % pp:
        problems.append(f"num_hidden_layers={spec.num_layers} is not divisible by pp={pp}")
    if problems:
        raise ValueError(f"cannot split {spec.architecture} as tp={tp} pp={pp} cp={cp}: "
                         + "; ".join(problems))
