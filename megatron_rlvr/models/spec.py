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
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a config.json file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        cfg = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (undecodable byte at offset {e.start})") \
            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a JSON object expected, found {type(cfg).__name__}")
    return cfg, path


def _positive_int(cfg: dict, key: str, where: str, default=None) -> int:
    """An integer field >= 1 (JSON `true` or `12.5` or `"12"` are mistakes, not sizes)."""
    value = cfg.get(key, default)
    if value is None:
        if default is None and key not in cfg:
            raise ValueError(f"{where}: missing required key {key!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(cfg: dict, key: str, where: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """rope_theta and the llama3 scaling factor, from either the transformers<5 keys
    (`rope_theta`, `rope_scaling`) or the transformers>=5 `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ValueError(f"{where}: rope_parameters / rope_scaling must be mappings")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{where}: rope_theta must be a number, got {theta!r:.80}")
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
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"{where}: rope scaling factor must be a number, got {factor!r:.80}")
        return float(theta), float(factor)
    raise UnsupportedModelError(f"{where}: rope scaling type {kind!r} is not supported "
                                "(supported: none, llama3)")


def read_model_spec(config: str | dict) -> ModelSpec:
    """Parse a Hugging Face config (a directory, a config.json path, or its dict)."""
    from megatron_rlvr.models.families import family_for_architecture

    cfg, where = _load_json(config)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UnsupportedModelError(f"{where}: 'architectures' must be a list of names, got "
                                    f"{archs!r:.80}")
    if not archs:
        raise UnsupportedModelError(f"{where}: no 'architectures' entry; cannot tell the model family")
    family = family_for_architecture(archs[0], where)
    heads = _positive_int(cfg, "num_attention_heads", where)
    hidden = _positive_int(cfg, "hidden_size", where)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if not isinstance(dtype, str):
        raise ValueError(f"{where}: torch_dtype must be a string, got {dtype!r}")
    try:
        theta, scaling = _rope(cfg, where)
        if not (math.isfinite(theta) and theta > 0) or \
                (scaling is not None and not (math.isfinite(scaling) and scaling > 0)):
            raise ValueError(f"{where}: rope_theta / rope scaling factor must be finite numbers "
                             f"> 0, got {theta!r} / {scaling!r}")
        spec = ModelSpec(
            family=family.name,
            architecture=archs[0],
            vocab_size=_positive_int(cfg, "vocab_size", where),
            hidden_size=hidden,
            num_layers=_positive_int(cfg, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=_positive_int(cfg, "num_key_value_heads", where, default=heads),
            head_dim=_positive_int(cfg, "head_dim", where, default=hidden // heads or None),
            ffn_hidden_size=_positive_int(cfg, "intermediate_size", where),
            rope_theta=theta,
            rms_norm_eps=_positive_float(cfg, "rms_norm_eps", where, 1e-6),
            tie_embeddings=tie,
            qkv_bias=family.qkv_bias(cfg),
            qk_norm=family.qk_norm,
            max_position_embeddings=_positive_int(cfg, "max_position_embeddings", where,
                                                  default=4096),
            rope_scaling_factor=scaling,
            torch_dtype=dtype,
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing required key {e.args[0]!r}") from None
    except (TypeError, AttributeError) as e:  # e.g. rope_scaling that is not a mapping
        raise ValueError(f"{where}: malformed rope settings ({e})") from None
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
