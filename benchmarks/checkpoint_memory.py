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
"""
from __future__ import annotations

import argparse
import os
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=4, metavar=("MODE", "MCORE", "HF", "OUT"))
    args = p.parse_args()
    if args.child:
        return child(*args.child)

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
