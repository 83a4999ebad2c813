"""Launch `python -m megatron_rlvr train` on this node with torchrun, after checking the run.

    NNODES=16 NODE_RANK=3 MASTER_ADDR=node0 MASTER_PORT=29500 \
        python examples/launch.py --config examples/configs/qwen3_14b_top20.yaml \
            --hf-config examples/configs/hf/qwen3-14b-base.json model.hf_dir=/models/Qwen3-14B-Base

Run the same command on every node (only NODE_RANK differs). Rendezvous is torchrun's static one
from the usual variables: NNODES (default 1), NODE_RANK (0), MASTER_ADDR (required when
NNODES > 1), MASTER_PORT (29500), GPUS_PER_NODE (8), GPU_MEMORY_GIB (80, for the memory check).

With rollout.mode: disaggregated, NNODES counts the trainer's nodes only; the vLLM engines run as
Ray actors on ENGINE_NODES other nodes of GPUS_PER_NODE GPUs (default: the fewest that hold
rollout.engines engines of rollout.vllm_tp GPUs), which must already form a Ray cluster that
node 0 has joined (`ray start`; the dry run prints the commands, docs/disaggregated.md).

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
    engine_nodes: int | None = None   # disaggregated: nodes of the Ray engines (None: the fewest)

    @property
    def world(self) -> int:
        return self.nnodes * self.gpus_per_node

    @classmethod
    def from_env(cls, env: dict) -> "Cluster":
        c = cls(nnodes=_env_int(env, "NNODES", 1), node_rank=_env_int(env, "NODE_RANK", 0),
                gpus_per_node=_env_int(env, "GPUS_PER_NODE", 8),
                master_addr=env.get("MASTER_ADDR") or None,
                master_port=_env_int(env, "MASTER_PORT", 29500),
                gpu_memory_gib=float(env.get("GPU_MEMORY_GIB", "80")),
                engine_nodes=_env_int(env, "ENGINE_NODES", 0) or None)
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


def ray_commands(ray_address: str, gpus_per_node: int) -> list[str]:
    """Disaggregated: the `ray start` commands that make the engines' cluster, which trainer
    node 0 joins without resources so that it can be the driver and no actor lands on it."""
    host, _, port = ray_address.rpartition(":") if ":" in ray_address else ("", "", "")
    head = f"{host}:{port}" if host and port.isdigit() else "$RAY_HEAD:6379"
    port = port if host and port.isdigit() else "6379"
    return ["every node first:    the same Ray auth token at ~/.ray/auth_token "
            "(ray get-auth-token --generate once, then copy; docs/disaggregated.md)",
            f"first engine node:   ray start --head --port={port} --num-gpus={gpus_per_node}",
            f"other engine nodes:  ray start --address={head} --num-gpus={gpus_per_node}",
            f"trainer node 0:      ray start --address={head} --num-gpus=0 --num-cpus=0"]


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
    disaggregated = r.mode == "disaggregated"
    lay = planner.Layout(p.tp, p.pp, p.cp, dp, r.vllm_tp, r.engines if disaggregated else 0)
    problems = planner.layout_problems(shape, lay, cluster.gpus_per_node)
    if problems:
        raise LaunchError(f"parallel layout {lay.tp}x{lay.pp}x{lay.cp}x{lay.dp} "
                          f"(vllm_tp {r.vllm_tp}): " + "; ".join(problems))
    engine_nodes = cluster.engine_nodes or max(1, planner.engine_nodes_needed(
        r.engines, r.vllm_tp, cluster.gpus_per_node))
    if disaggregated:
        problems = planner.engine_problems(r.engines, r.vllm_tp, engine_nodes,
                                           cluster.gpus_per_node)
        if problems:
            raise LaunchError(f"rollout.engines={r.engines} x rollout.vllm_tp={r.vllm_tp} on "
                              f"ENGINE_NODES={engine_nodes}: " + "; ".join(problems))
        if launching and not r.ray_address:
            raise LaunchError("rollout.ray_address is empty: trainer rank 0 would start a Ray of "
                              "its own node, whose GPUs the trainer holds; start the engines' "
                              "Ray cluster and set RAY_ADDRESS=<head>:6379 "
                              "(docs/disaggregated.md)")
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
    gpu_memory = int(cluster.gpu_memory_gib * planner.GIB)
    fits = mem.peak <= gpu_memory
    a = cfg.algorithm
    world = f"world: {cluster.nnodes} nodes x {cluster.gpus_per_node} GPUs = {cluster.world} ranks"
    rounds = (f"{t.gen_batch_size} prompts x {r.n} responses a round, up to "
              f"{r.max_prompt_length} + {r.max_response_length} tokens")
    if disaggregated:
        world += " (the trainer, under torchrun; the engines are not among them)"
        idle = engine_nodes * cluster.gpus_per_node - r.engines * r.vllm_tp
        per_node = planner.engines_per_node(r.vllm_tp, cluster.gpus_per_node)
        per_engine = -(-t.gen_batch_size // r.engines) * r.n  # prompts go round robin
        pace = {0: "synchronous", 1: "one-step-off"}.get(r.max_staleness,
                                                        f"up to {r.max_staleness} steps ahead")
        c = cfg.reward
        scoring = (f"{c.ray_actors} Ray reward actors x {c.num_workers} workers"
                   if c.backend == "ray" else f"{c.num_workers} reward workers on trainer rank 0")
        rollout = [
            f"rollout: disaggregated, {r.engines} vLLM engines of tp {r.vllm_tp} as Ray actors "
            f"on {engine_nodes} engine nodes x {cluster.gpus_per_node} GPUs ({per_node} a node"
            + (f", {idle} GPUs idle" if idle else "") + f"); max_staleness {r.max_staleness} "
            f"({pace}); {rounds} (up to {per_engine} sequences an engine); {scoring}",
            "off-policy correction: " + (
                f"on ({a.rollout_correction.level} level, {a.rollout_correction.method}, cap "
                f"{a.rollout_correction.cap:g})"
                if a.rollout_correction.active(off_policy=r.max_staleness > 0) else "off")
            + f" (algorithm.rollout_correction.enabled={a.rollout_correction.enabled})",
            "ray: " + (f"trainer rank 0 is the driver of the Ray cluster at {r.ray_address}; "
                       "trainer node 0 must have joined it (see the ray commands below)"
                       if r.ray_address else
                       "rollout.ray_address is empty: rank 0 would start a local Ray on its own "
                       "node; set RAY_ADDRESS to the engines' cluster (docs/disaggregated.md)")]
    else:
        rollout = [f"rollout: {cluster.world // r.vllm_tp} vLLM engines of tp {r.vllm_tp}, "
                   + rounds]
    engine_mem = []
    if disaggregated:
        e = planner.engine_memory(shape, r.vllm_tp, work)
        engine_mem = [
            f"memory (planner estimate, engine GPU): peak {e.peak / planner.GIB:.1f} GiB of "
            f"{cluster.gpu_memory_gib:g} (weights {e.weights / planner.GIB:.1f}, KV cache "
            f"{e.kv_cache / planner.GIB:.1f} for {work.rollout_seqs_per_gpu * r.vllm_tp} "
            f"full-length sequences; room for {e.max_seqs(gpu_memory)}) -> "
            + ("fits" if e.peak <= gpu_memory else "DOES NOT FIT; see `python -m megatron_rlvr "
                                                     "plan --config ...`")]
    return [
        f"model: {spec.architecture}, {planner.total_params(shape):,} parameters "
        f"({planned_with})",
        world,
        f"layout: TP{p.tp} x PP{p.pp} x CP{p.cp} x DP{dp} (ranks TP-fastest, then CP, DP, PP); "
        f"sequence parallel {'on' if p.sequence_parallel else 'off'}",
        *rollout,
        f"update: {t.train_batch_size} prompts a step = {t.train_batch_size // t.ppo_mini_batch_size}"
        f" optimizer steps of {seqs} sequences; {micro_desc}",
        f"algorithm: entropy_top_ratio {a.entropy_top_ratio}, lr {t.lr:g}, clip "
        f"[{a.clip_ratio_low}, {a.clip_ratio_high}], dual clip {a.clip_ratio_c:g}",
        "objective: " + describe_objective(a.entropy_top_ratio, a.entropy_top_scope,
                                           a.entropy_loss_norm, a.entropy_select, a.loss_agg_mode),
        f"memory (planner estimate, stage {mem.stage}): peak {mem.peak / planner.GIB:.1f} GiB of "
        f"{cluster.gpu_memory_gib:g}"
        + (" (no vLLM on the trainer's GPUs)" if disaggregated else "")
        + " -> " + ("fits" if fits else "DOES NOT FIT; see "
                                         "`python -m megatron_rlvr plan --config ...`"),
        *engine_mem,
        f"fault handling: a rank stalled {t.collective_timeout_s:g} s ends the run, named by the "
        f"watchdog" + ("; so does a rollout engine dead or silent as long, named by the fleet"
                       if disaggregated else "") + f"; checkpoint.resume={cfg.checkpoint.resume}",
        *notes]


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="trainer YAML")
    ap.add_argument("--hf-config", help="the config.json this recipe was planned with")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate and print the torchrun command; start nothing")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.lr=1e-6")
    args = ap.parse_intermixed_args(argv)  # the run scripts put overrides before "$@"
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
    cfg = load_config(args.config, args.overrides)
    if cfg.rollout.mode == "disaggregated":
        print("ray commands (before torchrun, from the same image; docs/disaggregated.md):\n  "
              + "\n  ".join(ray_commands(cfg.rollout.ray_address, cluster.gpus_per_node)))
    print("torchrun command:\n  " + shlex.join(cmd))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    path = [ROOT] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
    os.execve(sys.executable, cmd, {**env, "PYTHONPATH": os.pathsep.join(path)})


if __name__ == "__main__":
    sys.exit(main())
