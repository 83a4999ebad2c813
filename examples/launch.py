"""Launch `python -m megatron_rlvr train` on this node with torchrun, after checking the run.

    NNODES=16 NODE_RANK=3 MASTER_ADDR=node0 MASTER_PORT=29500 \
        python examples/launch.py --config examples/configs/qwen3_14b_top20.yaml \
            --hf-config examples/configs/hf/qwen3-14b-base.json model.hf_dir=/models/Qwen3-14B-Base

Run the same command on every node (only NODE_RANK differs). Rendezvous is torchrun's static one
from the usual variables: NNODES (default 1), NODE_RANK (0), MASTER_ADDR (required when
NNODES > 1), MASTER_PORT (29500), GPUS_PER_NODE (8), GPU_MEMORY_GIB (80, for the memory check).

Before anything starts it validates, without a GPU, what `train` would reject at start-up: the
config, the world size NNODES x GPUS_PER_NODE against tp x pp x cp and the batch sizes, the model
config against the layout (heads, KV heads, FFN and layers divisible; vLLM engines within a node),
and prints the layout and the planner's per-GPU memory for it. `--dry-run` stops there, after
printing the torchrun command. `--hf-config` names the config.json the recipe was planned with:
it stands in for model.hf_dir where that does not exist (a login node), and when it does exist
the two must describe the same architecture.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_rlvr import planner  # noqa: E402
from megatron_rlvr.algos.objective import describe_objective  # noqa: E402
from megatron_rlvr.config import ConfigError, data_parallel_size, load_config  # noqa: E402
from megatron_rlvr.models.spec import check_layout, read_model_spec  # noqa: E402


class LaunchError(Exception):
    """Something that would make the run fail at start-up; the message says what and where."""


def _env_int(env: dict, name: str, default: int | None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < 0 or (value == 0 and name != "NODE_RANK"):
        raise LaunchError(f"{name}={value} must be {'>= 0' if name == 'NODE_RANK' else '> 0'}")
    return value


@dataclasses.dataclass
class Cluster:
    nnodes: int
    node_rank: int
    gpus_per_node: int
    master_addr: str | None
    master_port: int
    gpu_memory_gib: float

    @property
    def world(self) -> int:
        return self.nnodes * self.gpus_per_node

    @classmethod
    def from_env(cls, env: dict) -> "Cluster":
        c = cls(nnodes=_env_int(env, "NNODES", 1), node_rank=_env_int(env, "NODE_RANK", 0),
                gpus_per_node=_env_int(env, "GPUS_PER_NODE", 8),
                master_addr=env.get("MASTER_ADDR") or None,
                master_port=_env_int(env, "MASTER_PORT", 29500),
                gpu_memory_gib=float(env.get("GPU_MEMORY_GIB", "80")))
        if c.node_rank >= c.nnodes:
            raise LaunchError(f"NODE_RANK={c.node_rank} must be < NNODES={c.nnodes}")
        return c


def torchrun_command(cluster: Cluster, config: str, overrides: list[str]) -> list[str]:
    addr = cluster.master_addr or ("127.0.0.1" if cluster.nnodes == 1 else "$MASTER_ADDR")
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={cluster.nnodes}", f"--node-rank={cluster.node_rank}",
            f"--nproc-per-node={cluster.gpus_per_node}",
            f"--master-addr={addr}", f"--master-port={cluster.master_port}",
            "-m", "megatron_rlvr", "train", "--config", config, *overrides]


def _same_architecture(a, b) -> list[str]:
    """Fields in which two ModelSpecs differ, ignoring what does not change the weights' shapes
    or the numerics (dtype in the file, positions limit)."""
    ignore = {"torch_dtype", "max_position_embeddings"}
    return [f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}"
            for f in dataclasses.fields(a)
            if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]


def check(config: str, overrides: list[str], cluster: Cluster, hf_config: str | None,
          launching: bool) -> list[str]:
    """Validate the run; return the report lines. Raises LaunchError/ConfigError."""
    cfg = load_config(config, overrides)
    dp = data_parallel_size(cfg, cluster.world)
    p, r, t = cfg.parallel, cfg.rollout, cfg.trainer
    notes = []
    hf_dir_config = os.path.join(cfg.model.hf_dir, "config.json")
    if os.path.exists(hf_dir_config):
        spec, planned_with = read_model_spec(cfg.model.hf_dir), hf_dir_config
        if hf_config is not None:
            diff = _same_architecture(read_model_spec(hf_config), spec)
            if diff:
                raise LaunchError(f"{hf_dir_config} is not the model this recipe was planned for "
                                  f"({hf_config}): " + "; ".join(diff))
    elif launching:
        raise LaunchError(f"model.hf_dir={cfg.model.hf_dir}: no config.json there; set "
                          "model.hf_dir=/path/to/the/checkpoint")
    elif hf_config is not None:
        spec, planned_with = read_model_spec(hf_config), hf_config
        notes.append(f"note: model.hf_dir {cfg.model.hf_dir} does not exist here; checked the "
                     f"model from {hf_config}")
    else:
        raise LaunchError(f"model.hf_dir={cfg.model.hf_dir}: no config.json there; pass "
                          "--hf-config to check the layout against a config.json")
    check_layout(spec, p.tp, p.pp, p.cp)
    with open(planned_with) as f:
        shape = planner.Shape.from_hf_config(json.load(f), planned_with)
    lay = planner.Layout(p.tp, p.pp, p.cp, dp, r.vllm_tp)
    problems = planner.layout_problems(shape, lay, cluster.gpus_per_node)
    if problems:
        raise LaunchError(f"parallel layout {lay.tp}x{lay.pp}x{lay.cp}x{lay.dp} "
                          f"(vllm_tp {r.vllm_tp}): " + "; ".join(problems))
    missing = [f for f in cfg.data.train_files + cfg.data.val_files if not os.path.exists(f)]
    if missing:
        if launching:
            raise LaunchError(f"data files not found: {', '.join(missing)}")
        notes.append(f"note: data files not found here: {', '.join(missing)}")

    seqs = t.ppo_mini_batch_size * r.n
    seq_len = r.max_prompt_length + r.max_response_length
    budget = t.max_tokens_per_micro_batch
    if budget:  # at most this many (every sequence full-length); short ones pack more per budget
        micro = -(-(seqs // dp) // max(1, budget // seq_len))
        micro_desc = (f"up to {micro} packed micro-batches of <= {budget} tokens, balanced, "
                      f"per DP rank per optimizer step")
    else:
        micro = seqs // (dp * t.micro_batch_size)
        micro_desc = (f"{micro} {'packed' if t.packing else 'padded'} micro-batches of "
                      f"{t.micro_batch_size} per DP rank per optimizer step")
    work = planner.Workload(seq_len=seq_len, micro_batch=t.micro_batch_size,
                            micro_batch_tokens=budget or None,
                            recompute=cfg.model.recompute_activations,
                            sequence_parallel=p.sequence_parallel, num_microbatches=micro)
    mem = planner.memory(shape, lay, work)
    fits = mem.peak <= cluster.gpu_memory_gib * planner.GIB
    a = cfg.algorithm
    return [
        f"model: {spec.architecture}, {planner.total_params(shape):,} parameters "
        f"({planned_with})",
        f"world: {cluster.nnodes} nodes x {cluster.gpus_per_node} GPUs = {cluster.world} ranks",
        f"layout: TP{p.tp} x PP{p.pp} x CP{p.cp} x DP{dp} (ranks TP-fastest, then CP, DP, PP); "
        f"sequence parallel {'on' if p.sequence_parallel else 'off'}",
        f"rollout: {cluster.world // r.vllm_tp} vLLM engines of tp {r.vllm_tp}, "
        f"{t.gen_batch_size} prompts x {r.n} responses a round, up to "
        f"{r.max_prompt_length} + {r.max_response_length} tokens",
        f"update: {t.train_batch_size} prompts a step = {t.train_batch_size // t.ppo_mini_batch_size}"
        f" optimizer steps of {seqs} sequences; {micro_desc}",
        f"algorithm: entropy_top_ratio {a.entropy_top_ratio}, lr {t.lr:g}, clip "
        f"[{a.clip_ratio_low}, {a.clip_ratio_high}], dual clip {a.clip_ratio_c:g}",
        "objective: " + describe_objective(a.entropy_top_ratio, a.entropy_top_scope,
                                           a.entropy_loss_norm, a.entropy_select, a.loss_agg_mode),
        f"memory (planner estimate, stage {mem.stage}): peak {mem.peak / planner.GIB:.1f} GiB of "
        f"{cluster.gpu_memory_gib:g} -> " + ("fits" if fits else "DOES NOT FIT; see "
                                               "`python -m megatron_rlvr plan --config ...`"),
        f"fault handling: a rank stalled {t.collective_timeout_s:g} s ends the run, named by the "
        f"watchdog; checkpoint.resume={cfg.checkpoint.resume}",
        *notes]


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="trainer YAML")
    ap.add_argument("--hf-config", help="the config.json this recipe was planned with")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate and print the torchrun command; start nothing")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.lr=1e-6")
    args = ap.parse_args(argv)
    env = os.environ if env is None else env
    try:
        cluster = Cluster.from_env(env)
        if not args.dry_run and cluster.nnodes > 1 and not cluster.master_addr:
            raise LaunchError("MASTER_ADDR is not set (the address of node 0, same on every node)")
        report = check(args.config, args.overrides, cluster, args.hf_config,
                       launching=not args.dry_run)
    except (LaunchError, ConfigError, ValueError, OSError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    if cluster.nnodes > 1 and not cluster.master_addr:
        report.append("note: MASTER_ADDR is not set; every node needs it (node 0's address)")
    cmd = torchrun_command(cluster, args.config, args.overrides)
    print("\n".join(report))
    print("torchrun command:\n  " + shlex.join(cmd))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    path = [ROOT] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
    os.execve(sys.executable, cmd, {**env, "PYTHONPATH": os.pathsep.join(path)})


if __name__ == "__main__":
    sys.exit(main())
