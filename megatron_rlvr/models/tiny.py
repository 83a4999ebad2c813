"""Tiny random Hugging Face models and a local tokenizer, made on the spot.

The machines that run our tests and the CPU demo have no access to a model hub, so every model we
test against is created here with transformers from a config and saved like a real checkpoint
(config.json + safetensors + tokenizer files). The shapes are small but keep every feature the
real families have: GQA, Qwen3 q/k norms, Qwen2 QKV bias, tied or untied embeddings, and a head
dim of 32 (the smallest vLLM's CPU attention accepts).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

FAMILIES = ("qwen3", "qwen2", "llama")

# A Qwen-style chat template: the demo and the tests format prompts exactly as Qwen models do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _default_corpus() -> list[str]:
    """Text that gives the BPE merges for arithmetic, LaTeX answers and chat roles."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(2000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        op = rng.choice(["+", "-", "*"])
        val = eval(f"{a}{op}{b}")  # noqa: S307 - our own integers
        lines.append(f"What is {a} {op} {b}? The answer is \\boxed{{{val}}}.")
    lines += ["system user assistant Answer: Let me think step by step. </think> <think>"] * 50
    return lines


def build_tokenizer(out_dir: str | None = None, vocab_size: int = 512,
                    corpus: Iterable[str] | None = None, split_digits: bool = False):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template.

    Returns a `PreTrainedTokenizerFast`; saves it to `out_dir` when given. `vocab_size` is the
    size of the learned vocabulary including the special tokens (at most: a small corpus may
    run out of merges first). `split_digits` makes every digit its own token, as Qwen's
    tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level]) if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or _default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    if out_dir:
        fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str, *, vocab_size: int = 512, hidden_size: int = 128,
                num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int = 32, intermediate_size: int = 256, tie: bool | None = None,
                rope_theta: float = 1_000_000.0, rms_norm_eps: float = 1e-6,
                max_position_embeddings: int = 2048, **extra):
    """A transformers config for a tiny model of `family` (qwen3, qwen2 or llama)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")
    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, rms_norm_eps=rms_norm_eps,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=(family != "llama") if tie is None else tie,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    if family in ("qwen3", "llama"):
        kwargs["head_dim"] = head_dim
    elif head_dim != hidden_size // num_heads:
        raise ValueError("qwen2 derives head_dim from hidden_size // num_attention_heads")
    kwargs.update(extra)
    cfg = cls(**kwargs)
    cfg.architectures = [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                          "llama": "LlamaForCausalLM"}[family]]
    return cfg


def save_tiny_model(out_dir: str, family: str = "qwen3", *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, with_tokenizer: bool = True,
                    init_std: float = 0.02, **config_kwargs) -> str:
    """Create a random tiny model of `family`, save it (and a tokenizer) to `out_dir`.

    Norm weights are randomised too (transformers initialises them to one), so a mapping bug that
    swaps or drops a norm weight cannot hide behind identical values.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config_kwargs)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if with_tokenizer:
        build_tokenizer(out_dir, vocab_size=min(cfg.vocab_size, 512))
    return out_dir
