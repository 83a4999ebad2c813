"""The CPU demo: a warm-started tiny Qwen3 on synthetic arithmetic, then DAPO under torchrun.

`prepare` makes the starting point RL needs. A random model never writes `\\boxed{}`, so every
reward would be 0 and no gradient would flow; a fully trained one is always right, so every group
would be dropped by dynamic sampling. In between is what we want: a short supervised warm start
teaches the answer format and most of the arithmetic, so sampled at temperature 1 the model is
right on a minority of samples and nearly right on many more. Groups then have mixed outcomes and
RL has a signal and room to climb.

`run` prepares (once) and launches the RL trainer under torchrun.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_rlvr.data.synthetic import warm_start_examples, write_synthetic_dataset
from megatron_rlvr.models.tiny import build_tokenizer, tiny_config


@dataclass(frozen=True)
class DemoSettings:
    """Task difficulty, model size and warm-start budget of the demo's starting point.

    One-digit addition and subtraction: a 2-layer model learns the 200 facts in a few hundred
    steps. Only `boxed_fraction` of the warm-start answers use `\\boxed{}` (the rest say "The
    answer is 7."), so the warm-started model is right about the arithmetic but rewarded only
    when it happens to box its answer: accuracy starts near `boxed_fraction` and RL has a clear,
    prompt-independent behaviour to learn (measured: 0.23 -> 0.91 in 20 steps of DAPO top-20%).
    """
    digits: int = 1
    operators: tuple[str, ...] = ("+", "-")
    num_train: int = 2048           # RL prompts
    num_val: int = 64               # held-out prompts (RL validation, starting accuracy)
    # model
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32              # vLLM's CPU attention needs >= 32
    intermediate_size: int = 384
    # supervised warm start
    sft_examples: int = 4000
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_warmup_steps: int = 20
    boxed_fraction: float = 0.3     # share of warm-start answers in the rewarded format
    # starting-accuracy measurement (the RL rollout settings)
    eval_n: int = 8
    eval_temperature: float = 1.0
    max_new_tokens: int = 48


def _example_text(messages: list[dict], response: str, eos: str) -> str:
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{prompt}<|im_start|>assistant\n{response}{eos}\n"


def make_tokenizer(out_dir: str | None, settings: DemoSettings, seed: int = 0):
    """A tokenizer trained on the task's own prompts and answers, digits split one per token
    (as Qwen's tokenizer does: place-value arithmetic is learnable, multi-digit tokens are not)."""
    examples = warm_start_examples(2000, digits=settings.digits, operators=settings.operators,
                                   seed=seed + 1)
    corpus = [_example_text(e["messages"], e["response"], "<|im_end|>") for e in examples]
    return build_tokenizer(out_dir, vocab_size=512, corpus=corpus, split_digits=True)


def _model_vocab_size(tokenizer) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64 (even, so it splits
    over TP=2 without padding; the spare rows are never targets, so warm start drives their
    probability to ~0, as in Qwen's own checkpoints)."""
    return int(math.ceil(len(tokenizer) / 64) * 64)


def build_model(settings: DemoSettings, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3", vocab_size=vocab_size, hidden_size=settings.hidden_size,
                      num_layers=settings.num_layers, num_heads=settings.num_heads,
                      num_kv_heads=settings.num_kv_heads, head_dim=settings.head_dim,
                      intermediate_size=settings.intermediate_size, tie=True,
                      max_position_embeddings=512)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _encode_examples(tokenizer, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) pairs, tokenized exactly as RL sees them: the prompt
    through the chat template, the response as the continuation the model must generate."""
    out = []
    for e in examples:
        prompt = tokenizer.apply_chat_template(e["messages"], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        response = tokenizer(e["response"] + tokenizer.eos_token, add_special_tokens=False)
        out.append((list(prompt), response["input_ids"]))
    return out


def warm_start(model, tokenizer, examples: list[dict], *, steps: int, batch_size: int, lr: float,
               warmup_steps: int, seed: int = 0, log_every: int = 0) -> list[float]:
    """Supervised fine-tuning on the response tokens only (prompt and padding masked out).

    AdamW, linear warm-up then cosine decay to 10% of `lr`. Returns the loss of every step.
    """
    data = _encode_examples(tokenizer, examples)
    pad = tokenizer.pad_token_id
    gen = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            order += gen.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        length = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), length), pad)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (p, r) in enumerate(batch):
            seq = p + r
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, len(p):len(seq)] = torch.tensor(r)
            mask[row, :len(seq)] = 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  warm start step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def sample_responses(model, tokenizer, rows: list[dict], *, n: int, temperature: float,
                     max_new_tokens: int, seed: int = 0) -> list[list[list[int]]]:
    """n sampled responses (token ids, up to and including eos) per row, with transformers.

    Prompts of equal token length are generated together, so no padding is needed (left padding
    would shift rotary positions unless every model handled it identically)."""
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for r in rows]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[list[int]]] = [[] for _ in rows]
    torch.manual_seed(seed)
    for length, idx in sorted(by_length.items()):
        ids = torch.tensor([prompts[i] for i in idx])
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
            if temperature > 0 else dict(do_sample=False)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             num_return_sequences=n, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        for k, seq in enumerate(gen[:, length:].tolist()):
            if eos in seq:
                seq = seq[:seq.index(eos) + 1]
            out[idx[k // n]].append(seq)
    return out


def score_samples(tokenizer, rows: list[dict], samples: list[list[list[int]]], pool) -> dict:
    """Accuracy (the RL reward), share of prompts with mixed outcomes (the groups dynamic
    sampling keeps), format rate (responses with a \\boxed{}), mean response length."""
    texts, truths = [], []
    for row, group in zip(rows, samples):
        for s in group:
            texts.append(tokenizer.decode(s, skip_special_tokens=True))
            truths.append(row["reward_model"]["ground_truth"])
    results = pool.score(texts, truths)
    n = len(samples[0])
    scores = [r.score for r in results]
    groups = [scores[i:i + n] for i in range(0, len(scores), n)]
    return {
        "accuracy": sum(scores) / len(scores),
        "mixed_fraction": sum(0 < sum(g) < n for g in groups) / len(groups),
        "pass_at_n": sum(sum(g) > 0 for g in groups) / len(groups),
        "format_rate": sum(r.answer is not None for r in results) / len(results),
        "mean_response_tokens": sum(len(s) for g in samples for s in g) / len(scores),
        "num_prompts": len(groups), "n": n,
    }


def measure(model, tokenizer, rows: list[dict], settings: DemoSettings, pool, seed: int = 0
            ) -> dict:
    """Sampled (the RL rollout settings) and greedy metrics on `rows`."""
    sampled = sample_responses(model, tokenizer, rows, n=settings.eval_n,
                               temperature=settings.eval_temperature,
                               max_new_tokens=settings.max_new_tokens, seed=seed)
    greedy = sample_responses(model, tokenizer, rows, n=1, temperature=0.0,
                              max_new_tokens=settings.max_new_tokens)
    out = score_samples(tokenizer, rows, sampled, pool)
    out["greedy_accuracy"] = score_samples(tokenizer, rows, greedy, pool)["accuracy"]
    return out


def prepare(out_dir: str, *, seed: int = 0, settings: DemoSettings | None = None,
            sft_steps: int | None = None, measure_start: bool = True, threads: int = 2) -> dict:
    """Write the data, the tokenizer and the warm-started model under `out_dir`.

    Layout: `out_dir/data/{train,val}.parquet`, `out_dir/model/` (an HF checkpoint: config.json,
    model.safetensors, tokenizer files), `out_dir/prepare.json` (what is returned). `sft_steps`
    overrides the warm-start length (tests use a few steps). `threads`: torch CPU threads (2, the
    demo's budget; 1 where other processes share the cores, since idle OpenMP threads spin).
    """
    settings = settings or DemoSettings()
    if sft_steps is not None:
        settings = dataclasses.replace(settings, sft_steps=sft_steps)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Path(out_dir)
    train, val = write_synthetic_dataset(
        str(out / "data"), num_train=settings.num_train, num_val=settings.num_val,
        digits=settings.digits, operators=settings.operators, seed=seed)
    model_dir = out / "model"
    tokenizer = make_tokenizer(None, settings, seed)
    model = build_model(settings, _model_vocab_size(tokenizer), seed)
    examples = warm_start_examples(settings.sft_examples, digits=settings.digits,
                                   operators=settings.operators, seed=seed,
                                   boxed_fraction=settings.boxed_fraction)
    sft_start = time.perf_counter()
    losses = warm_start(model, tokenizer, examples, steps=settings.sft_steps,
                        batch_size=settings.sft_batch_size, lr=settings.sft_lr,
                        warmup_steps=min(settings.sft_warmup_steps, settings.sft_steps),
                        seed=seed, log_every=50)
    sft_seconds = time.perf_counter() - sft_start
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    result = {"model_dir": str(model_dir), "train_file": train, "val_file": val,
              "settings": dataclasses.asdict(settings), "sft_seconds": round(sft_seconds, 1),
              "sft_loss_first": losses[0] if losses else None,
              "sft_loss_last": losses[-1] if losses else None}
    if measure_start:
        from megatron_rlvr.rewards.pool import RewardPool

        import pyarrow.parquet as pq
        rows = pq.read_table(val).to_pylist()
        with RewardPool(num_workers=2, timeout_s=5.0) as pool:
            result["start"] = measure(model, tokenizer, rows, settings, pool, seed=seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "prepare.json").write_text(json.dumps(result, indent=2))
    return result


CONFIG_DIR = Path(__file__).resolve().parent.parent / "examples" / "configs"


def _config_path(cfg_name: str) -> Path:
    """`demo_top20`, `demo_full` (files in examples/configs) or a path to a YAML file."""
    path = Path(cfg_name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = CONFIG_DIR / f"{cfg_name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("demo*.yaml"))
        raise FileNotFoundError(f"demo config {cfg_name!r} not found: expected a YAML file or one "
                                f"of {names} in {CONFIG_DIR}")
    return path


def _prepared(out: Path) -> dict | None:
    """The result of an earlier `prepare` under `out`, if its files are all still there."""
    try:
        result = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        return None
    needed = [Path(result.get(k, "")) for k in ("train_file", "val_file")]
    model_dir = Path(result.get("model_dir", ""))
    needed += [model_dir / "config.json", model_dir / "model.safetensors",
               model_dir / "tokenizer.json"]
    return result if all(p.is_file() for p in needed) else None


def run(cfg_name: str = "demo_top20", out_dir: str = "outputs/demo", nproc: int = 2,
        extra_overrides: Sequence[str] = ()) -> int:
    """Prepare the starting point (once; reused while `out_dir` holds it), then run the RL
    trainer under torchrun with `nproc` processes. Returns the trainer's exit code."""
    config = _config_path(cfg_name)
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    out = Path(out_dir).resolve()
    prepared = _prepared(out)
    if prepared is None:
        print(f"demo: preparing data, tokenizer and warm-started model in {out}", flush=True)
        prepared = prepare(str(out))
        start = prepared.get("start", {})
        print(f"demo: prepared in {prepared['seconds']:.0f}s (warm start "
              f"{prepared['sft_seconds']:.0f}s); starting accuracy at T=1 "
              f"{start.get('accuracy', float('nan')):.1%} (greedy "
              f"{start.get('greedy_accuracy', float('nan')):.1%})", flush=True)
    else:
        print(f"demo: reusing the prepared model in {prepared['model_dir']} "
              f"(delete {out / 'prepare.json'} to redo it)", flush=True)
    log_dir = out / config.stem.removeprefix("demo_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megatron_rlvr", "train", "--config", str(config),
           f"model.hf_dir={prepared['model_dir']}",
           f"data.train_files={json.dumps([prepared['train_file']])}",
           f"data.val_files={json.dumps([prepared['val_file']])}",
           f"logging.output_dir={log_dir}", *extra_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    print("demo: " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)  # inherits stdout/stderr: the trainer's lines stream
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()  # torchrun forwards it to its workers
        rc = proc.wait()
    if rc != 0:
        print(f"demo: the RL trainer failed (exit code {rc}); its output is above. Command:\n  "
              + " ".join(cmd), file=sys.stderr, flush=True)
        return rc
    plots = sorted(str(p) for p in log_dir.glob("*.png"))
    print(f"demo: done. Metrics: {log_dir / 'metrics.jsonl'}"
          + (f"\ndemo: plots: {', '.join(plots)}" if plots else ""), flush=True)
    return 0
