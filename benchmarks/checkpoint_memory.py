"""Peak memory of checkpoint conversion: streaming export vs holding the model twice.

Run: .venv/bin/python benchmarks/checkpoint_memory.py [--layers 8 --hidden 1024 --repeats 3]

Builds a random float32 Qwen3 (about 0.75 GB at the defaults), converts it HF -> Megatron once,
then measures the peak resident memory (ru_maxrss of a fresh process) of:
- model only: build the Megatron model and load the checkpoint, nothing else (the floor any
  export pays);
- mcore-to-hf (ours): the same, then stream the weights into 64 MiB safetensors shards;
- gather then save (naive): the same, then collect every HF tensor in a dict and write it with
  one `safetensors.save_file`, as a one-shot exporter does;
- hf-to-mcore (ours): build, read the HF safetensors, save the Megatron checkpoint.
The table reports each peak minus "model only", as a fraction of the model's size. Median of
`--repeats` fresh processes.

`--trainer-save` measures the trainer's checkpoint save instead (issue 16, finding 8): under
torchrun at `--tp` (2) ranks, a bf16 Policy (Megatron DDP + distributed optimizer) of a random
Qwen3-shaped model (`--layers --hidden --vocab --heads --kv-heads --head-dim --ffn`; the defaults
of this mode are Qwen3-0.6B's: 28 layers, hidden 1024, 16/8 heads of 128, ffn 3072, vocab 151,936,
tied embeddings) takes one optimizer step on one short sequence, then `save_checkpoint` writes
model + optimizer. Per rank it reports the peak resident memory of the step and of the save
(Linux VmHWM, reset before each through /proc/self/clear_refs), the save's wall time, and the
target from the issue: save peak - step peak <= the rank's own optimizer shard (fp32 master +
2 moments) + one gradient bucket (fp32). Once for each `--save-modes` (by_owner: ours, per-owner
without gather; gather: Megatron's `fully_reshardable` save, the previous setting), each in fresh
processes, same model. The gather mode is skipped, with its estimated need, when it would not fit
in the memory available (`--force` runs it anyway).

    .venv/bin/python benchmarks/checkpoint_memory.py --trainer-save               # Qwen3-0.6B
    .venv/bin/python benchmarks/checkpoint_memory.py --trainer-save --layers 4    # both modes
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(mode: str, mcore: str, hf: str, out: str) -> None:
    from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf
    from megatron_rlvr.checkpoint import load_checkpoint, read_info
    from megatron_rlvr.models.builder import build_model
    from megatron_rlvr.models.convert import iter_hf_weights
    from megatron_rlvr.parallel import init_distributed

    if mode == "ours_export":
        mcore_to_hf(mcore, out, max_shard_bytes=64 * 2 ** 20, overwrite=True)
    elif mode == "ours_import":
        hf_to_mcore(hf, out, overwrite=True)
    else:
        init_distributed()
        spec = read_info(mcore)["spec"]
        model = build_model(spec)
        load_checkpoint(mcore, [model], spec=spec)
        if mode == "naive_export":
            from safetensors.torch import save_file
            os.makedirs(out, exist_ok=True)
            save_file({n: t.contiguous() for n, t in iter_hf_weights(model, spec)},
                      os.path.join(out, "model.safetensors"))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes (Linux: KiB)


def peak(mode, mcore, hf, out) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, mcore, hf, out],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stdout + proc.stderr)
    return int(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- the trainer's save

def _vm(field: str) -> int:
    """VmHWM / VmRSS of this process, bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


def save_child(mode: str, hf: str, out: str, tp: int) -> None:
    """One torchrun rank: Policy step, then the checkpoint save; writes OUT.rank<r>.json."""
    import time

    import torch
    import torch.distributed as dist

    from megatron_rlvr import checkpoint, platform
    from megatron_rlvr.checkpoint import save_checkpoint
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.parallel import init_distributed
    from megatron_rlvr.policy import OptimConfig, Policy

    init_distributed(tp, 1, 1)
    checkpoint.OPTIMIZER_SAVE = mode
    spec = read_model_spec(hf)
    policy = Policy(spec, hf, dtype=torch.bfloat16, optim=OptimConfig(lr=1e-5))
    tokens = torch.randint(1, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(platform.device())

    def loss_fn(mb, logits):
        num = logits.float().mean()
        den = torch.tensor(1, dtype=torch.int, device=num.device)
        return num, den, {"numerator": num.detach(), "denominator": den}

    _reset_peak()
    t0 = time.perf_counter()
    policy.train_step([{"input_ids": tokens}], loss_fn)
    step_s = time.perf_counter() - t0
    step_peak, before_save = _vm("VmHWM"), _vm("VmRSS")
    opt = policy.optimizer
    shard = sum(t.numel() * t.element_size()
                for o in checkpoint._distributed_optimizers(opt)
                for g in o.optimizer.param_groups for prm in g["params"]
                for t in [prm, *(v for k, v in o.optimizer.state[prm].items() if k != "step")])
    bucket = max(b.grad_data.numel() * b.grad_data.element_size()
                 for buf in policy.model[0].buffers for b in buf.buckets)
    n_buckets = sum(len(buf.buckets) for buf in policy.model[0].buffers)
    dist.barrier()
    _reset_peak()
    t0 = time.perf_counter()
    save_checkpoint(out, policy.model, hf_dir=hf, optimizer=opt, overwrite=True)
    save_s = time.perf_counter() - t0
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({
        "mode": mode, "rank": dist.get_rank(), "step_peak": step_peak, "before_save": before_save,
        "save_peak": _vm("VmHWM"), "shard": shard, "bucket": bucket, "buckets": n_buckets,
        "params": sum(prm.numel() for prm in policy.model[0].parameters()),
        "step_s": step_s, "save_s": save_s}, f)
    dist.barrier()


def _available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def trainer_save(args) -> None:
    import shutil
    import time

    from megatron_rlvr.models.tiny import save_tiny_model

    GiB = 2 ** 30
    tmp = args.workdir or tempfile.mkdtemp(prefix="ckpt_mem_")
    hf, out = os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt")
    t0 = time.perf_counter()
    save_tiny_model(hf, "qwen3", tie=True, with_tokenizer=False, dtype=__import__("torch").bfloat16,
                    vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                    intermediate_size=args.ffn, max_position_embeddings=4096)
    print(f"random Qwen3-shaped bf16 model: {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads}/{args.kv_heads} heads of {args.head_dim}, ffn {args.ffn}, vocab "
          f"{args.vocab}, tied ({time.perf_counter() - t0:.0f} s to make); TP{args.tp}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           "MEGATRON_RLVR_STRICT_DEVICE": "0"}
    results = {}
    try:
        for mode in args.save_modes:
            if mode == "gather" and "by_owner" in results and not args.force:
                # Megatron's gather holds the whole model-parallel slice's fp32 state twice over
                # (world buffers + the local copies) and one fp32 buffer in transit per rank.
                r = results["by_owner"]
                need = sum(x["step_peak"] + 2 * x["shard"] + x["bucket"] for x in r)
                if need > 0.9 * _available():
                    print(f"gather: skipped, needs about {need / GiB:.1f} GiB for {len(r)} ranks, "
                          f"{_available() / GiB:.1f} GiB available (--force to run it)",
                          flush=True)
                    continue
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.tp}", __file__, "--save-child", mode, hf, out,
                   "--tp", str(args.tp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            rows = []
            for r in range(args.tp):
                if os.path.isfile(f"{out}.rank{r}.json"):
                    with open(f"{out}.rank{r}.json") as f:
                        rows.append(json.load(f))
                    os.remove(f"{out}.rank{r}.json")
            if proc.returncode or len(rows) != args.tp:
                print(f"{mode}: failed (exit {proc.returncode}; -9 = killed, out of memory)\n"
                      + (proc.stdout + proc.stderr)[-3000:], flush=True)
                continue
            results[mode] = sorted(rows, key=lambda x: x["rank"])
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\nper-rank peak RSS (GiB); allowance = own optimizer shard + one bucket "
          "(target: save - step <= allowance)")
    print(f"{'save':<9}{'rank':>5}{'params M':>9}{'step':>7}{'save':>7}{'save-step':>10}"
          f"{'shard':>7}{'bucket':>7}{'(save-step)/allow':>18}{'step s':>8}{'save s':>8}")
    for mode, rows in results.items():
        for x in rows:
            extra = x["save_peak"] - x["step_peak"]
            allow = x["shard"] + x["bucket"]
            print(f"{mode:<9}{x['rank']:>5}{x['params'] / 1e6:>9.0f}{x['step_peak'] / GiB:>7.2f}"
                  f"{x['save_peak'] / GiB:>7.2f}{extra / GiB:>10.2f}{x['shard'] / GiB:>7.2f}"
                  f"{x['bucket'] / GiB:>7.2f}{extra / allow:>18.2f}{x['step_s']:>8.1f}"
                  f"{x['save_s']:>8.1f}")
    if len(results) == 2:
        a, b = results["by_owner"], results["gather"]
        for x, y in zip(a, b):
            print(f"rank {x['rank']}: save peak by_owner / gather = "
                  f"{x['save_peak'] / y['save_peak']:.2f}; memory added by the save "
                  f"{(x['save_peak'] - x['step_peak']) / GiB:.2f} vs "
                  f"{(y['save_peak'] - y['step_peak']) / GiB:.2f} GiB; save time "
                  f"{x['save_s']:.1f} vs {y['save_s']:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=4, metavar=("MODE", "MCORE", "HF", "OUT"))
    p.add_argument("--trainer-save", action="store_true")
    p.add_argument("--save-child", nargs=3, metavar=("MODE", "HF", "OUT"))
    p.add_argument("--save-modes", nargs="+", default=["by_owner", "gather"])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--force", action="store_true")
    p.add_argument("--workdir")
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    if args.save_child:
        return save_child(*args.save_child, args.tp)
    if args.trainer_save:
        args.layers, args.hidden = args.layers or 28, args.hidden or 1024
        args.vocab = args.vocab or 151936
        return trainer_save(args)
    args.layers, args.hidden = args.layers or 8, args.hidden or 1024
    args.vocab = args.vocab or 32768

    from checkpoint_tools.convert import hf_to_mcore  # noqa: F401  (fails early if broken)
    from megatron_rlvr.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        hf, mcore, out = (os.path.join(tmp, n) for n in ("hf", "mcore", "out"))
        save_tiny_model(hf, "qwen3", tie=False, with_tokenizer=False, vocab_size=args.vocab,
                        hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                        num_kv_heads=8, head_dim=64, intermediate_size=3 * args.hidden)
        model_bytes = os.path.getsize(os.path.join(hf, "model.safetensors"))
        peak("ours_import", mcore, hf, mcore)
        modes = ["model_only", "ours_export", "naive_export", "ours_import"]
        runs = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                runs[m].append(peak(m, mcore, hf, out if m != "ours_import" else out + "_m"))
        med = {m: statistics.median(v) for m, v in runs.items()}
    base = med["model_only"]
    print(f"model: {model_bytes / 2 ** 20:.0f} MiB float32; peak RSS, median of {args.repeats}")
    print(f"{'run':<26}{'peak MiB':>10}{'over model-only MiB':>21}{'÷ model size':>14}")
    for m, label in (("model_only", "model only (floor)"), ("ours_export", "mcore-to-hf (ours)"),
                     ("naive_export", "gather then save (naive)"),
                     ("ours_import", "hf-to-mcore (ours)")):
        extra = med[m] - base
        print(f"{label:<26}{med[m] / 2 ** 20:>10.0f}{extra / 2 ** 20:>21.0f}"
              f"{extra / model_bytes:>14.2f}")


if __name__ == "__main__":  # the checkpoint save re-imports this module in a helper process
    main()
