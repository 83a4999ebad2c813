"""The Qwen3-14B/32B launch recipes: the paper's hyperparameters, `--dry-run` on CPU, and clear
failures for layouts, batch sizes and clusters that cannot run; `plan --config` on the recipes;
the disaggregated 32B recipe's trainer/engine split."""
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_rlvr import planner
from megatron_rlvr.config import config_to_dict, load_config
from torchrun import ROOT

EXAMPLES = ROOT / "examples"
RECIPES = {  # script -> (config, layout line, entropy_top_ratio, HF config it was planned with)
    "run_qwen3_14b_dapo.sh": ("qwen3_14b_dapo.yaml", "TP4 x PP1 x CP2 x DP16", 1.0,
                              "qwen3-14b-base.json"),
    "run_qwen3_14b_top20.sh": ("qwen3_14b_top20.yaml", "TP4 x PP1 x CP2 x DP16", 0.2,
                               "qwen3-14b-base.json"),
    "run_qwen3_32b_top20.sh": ("qwen3_32b_top20.yaml", "TP8 x PP1 x CP1 x DP16", 0.2,
                               "qwen3-32b.json"),
}
# Disaggregated rollout: script -> (config, the colocated recipe it must equal outside the keys
# that place the rollout, HF config).
DISAGGREGATED = {
    "run_qwen3_32b_top20_disaggregated.sh": ("qwen3_32b_top20_disaggregated.yaml",
                                             "qwen3_32b_top20.yaml", "qwen3-32b.json"),
}
# DESIGN.md, "The method, precisely": the paper's Qwen3-14B-Base DAPO recipe, written out here
# independently of the YAML files.
PAPER = {
    "rollout.n": 16, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
    "rollout.max_prompt_length": 2048, "rollout.max_response_length": 20480,
    "algorithm.clip_ratio_low": 0.2, "algorithm.clip_ratio_high": 0.28,
    "algorithm.clip_ratio_c": 10.0, "algorithm.loss_agg_mode": "token-mean",
    "algorithm.overlong_buffer_enable": True, "algorithm.overlong_buffer_len": 4096,
    "algorithm.overlong_penalty_factor": 1.0, "algorithm.dynamic_sampling": True,
    "algorithm.max_num_gen_batches": 10, "trainer.train_batch_size": 512,
    "trainer.gen_batch_size": 1536, "trainer.ppo_mini_batch_size": 32, "trainer.lr": 1e-6,
    "trainer.lr_warmup_steps": 10, "trainer.weight_decay": 0.1, "trainer.grad_clip": 1.0,
    "eval.temperature": 1.0, "eval.top_p": 0.7, "reward.format": "boxed",
}


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                             "GPUS_PER_NODE", "GPU_MEMORY_GIB", "ENGINE_NODES", "RAY_ADDRESS")}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(EXAMPLES / script), "--dry-run", *args],
                          capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script", sorted(RECIPES) + sorted(DISAGGREGATED))
def test_recipe_has_the_papers_hyperparameters(script):
    config, _, ratio, _ = RECIPES.get(script) or (DISAGGREGATED[script][0], None, 0.2, None)
    cfg = load_config(str(EXAMPLES / "configs" / config))
    for key, value in PAPER.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key
    assert cfg.algorithm.entropy_top_ratio == ratio
    assert cfg.algorithm.entropy_select == "top"
    text = (EXAMPLES / script).read_text()
    assert f"configs/{config}" in text and "launch.py" in text


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_dry_run_prints_layout_and_torchrun_command(script):
    config, layout, ratio, hf = RECIPES[script]
    proc = _dry_run(script, "trainer.total_steps=300", NODE_RANK="5", MASTER_ADDR="10.0.0.1",
                    MASTER_PORT="29511")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "world: 16 nodes x 8 GPUs = 128 ranks" in out
    assert f"layout: {layout} (ranks TP-fastest" in out
    assert "16 optimizer steps of 512 sequences" in out
    assert f"entropy_top_ratio {ratio}" in out
    n = planner.total_params(planner.Shape.from_hf_config(
        json.loads((EXAMPLES / "configs" / "hf" / hf).read_text())))
    assert f"{n:,} parameters" in out
    assert re.search(r"peak [\d.]+ GiB of 80 -> fits", out)
    cmd = out.split("torchrun command:\n", 1)[1].split()
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=16", "--node-rank=5", "--nproc-per-node=8", "--master-addr=10.0.0.1",
            "--master-port=29511"} <= set(cmd)
    assert cmd[-6:] == ["-m", "megatron_rlvr", "train", "--config",
                        str(EXAMPLES / "configs" / config), "trainer.total_steps=300"]


@pytest.mark.parametrize("script, args, env, message", [
    ("run_qwen3_14b_top20.sh", ["parallel.tp=16"], {},
     "num_attention_heads=40 is not divisible by tp=16"),
    ("run_qwen3_14b_top20.sh", ["parallel.pp=3"], {},
     "world size 128 is not divisible by parallel.tp * pp * cp = 24"),
    ("run_qwen3_32b_top20.sh", ["parallel.tp=2", "parallel.pp=3"], {"GPUS_PER_NODE": "6"},
     "num_hidden_layers=64 is not divisible by pp=3"),
    ("run_qwen3_14b_dapo.sh", ["trainer.max_tokens_per_micro_batch=0",
                               "trainer.micro_batch_size=3"], {},
     "cannot be split into micro-batches of trainer.micro_batch_size = 3"),
    ("run_qwen3_14b_dapo.sh", ["trainer.max_tokens_per_micro_batch=16384"], {},
     "max_tokens_per_micro_batch (16384) must hold the longest sequence"),
    ("run_qwen3_14b_dapo.sh", ["rollout.vllm_tp=8"], {"GPUS_PER_NODE": "4"},
     "vllm_tp=8 spans nodes (gpus_per_node=4)"),
    # Fixed-size micro-batches need whole shares per DP rank (a token budget does not).
    ("run_qwen3_32b_top20.sh", ["trainer.max_tokens_per_micro_batch=0"], {"NNODES": "3"},
     "a mini-batch of trainer.ppo_mini_batch_size * rollout.n = 512 sequences cannot be split"),
    ("run_qwen3_14b_dapo.sh", [], {"NODE_RANK": "16"}, "NODE_RANK=16 must be < NNODES=16"),
    ("run_qwen3_14b_dapo.sh", [], {"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE='eight'"),
    ("run_qwen3_14b_dapo.sh", ["trainer.lr=-1"], {}, "trainer.lr must be > 0"),
])
def test_dry_run_rejects_what_cannot_run(script, args, env, message):
    proc = _dry_run(script, *args, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "torchrun command" not in proc.stdout


def test_downloaded_model_must_match_the_planned_one(tmp_path):
    """Pointing the 14B recipe at another model's checkpoint fails, naming the differences;
    at the planned model it checks the real directory instead of the stand-in."""
    other = tmp_path / "Qwen3-8B-Base"
    other.mkdir()
    (other / "config.json").write_text((EXAMPLES / "configs" / "hf" / "qwen3-8b-base.json")
                                       .read_text())
    proc = _dry_run("run_qwen3_14b_top20.sh", f"model.hf_dir={other}")
    assert proc.returncode == 2
    assert "is not the model this recipe was planned for" in proc.stderr
    assert "hidden_size: 5120 vs 4096" in proc.stderr
    same = tmp_path / "Qwen3-14B-Base"
    same.mkdir()
    (same / "config.json").write_text((EXAMPLES / "configs" / "hf" / "qwen3-14b-base.json")
                                      .read_text())
    proc = _dry_run("run_qwen3_14b_top20.sh", f"model.hf_dir={same}")
    assert proc.returncode == 0, proc.stderr
    assert f"({same / 'config.json'})" in proc.stdout and "does not exist here" not in proc.stdout


def test_launch_without_dry_run_needs_the_checkpoint_and_master_addr():
    """A real launch refuses placeholders before starting torchrun."""
    proc = _dry_run("run_qwen3_14b_dapo.sh")    # --dry-run is added; drop it below
    assert proc.returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "MASTER_ADDR")}
    run = subprocess.run(["bash", str(EXAMPLES / "run_qwen3_14b_dapo.sh")], capture_output=True,
                         text=True, env={**env, "PYTHON": sys.executable}, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "MASTER_ADDR is not set" in run.stderr
    run = subprocess.run(["bash", str(EXAMPLES / "run_qwen3_14b_dapo.sh")], capture_output=True,
                         text=True, env={**env, "PYTHON": sys.executable, "NNODES": "1"},
                         cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert "model.hf_dir=/path/to/Qwen3-14B-Base: no config.json there" in run.stderr


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_plan_reads_the_recipe(script, capsys):
    """`plan --config` checks the recipe's own layout, lengths and micro-batch count."""
    config, layout, _, hf = RECIPES[script]
    argv = ["--config", str(EXAMPLES / "configs" / config), "--nodes", "16",
            "--hf-config", str(EXAMPLES / "configs" / "hf" / hf)]
    assert planner.main(argv) == 0
    out = capsys.readouterr().out
    tp, pp, cp, dp = map(int, re.findall(r"\d+", layout))
    row = out.splitlines()[2].split()
    assert row[:4] == [str(tp), str(pp), str(cp), str(dp)]
    # The recipes' token budgets: the most full-length (22,528-token) sequences a micro-batch can
    # hold, 32 sequences per DP rank per optimizer step.
    budget = load_config(str(EXAMPLES / "configs" / config)).trainer.max_tokens_per_micro_batch
    assert budget >= 22528
    expected = -(-32 // (budget // 22528))
    assert "sequences of 22528 tokens" in out and f"micro-batch of {budget} tokens" in out
    assert f"{expected} micro-batches per DP rank" in out
    assert planner.main(argv + ["--gpu-memory-gib", "40"]) == 1     # too small: suggestions
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "layouts that fit:" in out


def test_planner_counts_equal_megatron_meta_models():
    """Every GPU's parameter count at the recipes' layouts (and pipelined ones) equals the
    Megatron model our builder makes on the meta device, for all the real HF configs."""
    hf = EXAMPLES / "configs" / "hf"
    cases = [f"{hf / name}:{tp}:{pp}" for name, tp, pp in (
        ("qwen3-14b-base.json", 4, 1), ("qwen3-14b-base.json", 4, 2), ("qwen3-32b.json", 8, 1),
        ("qwen3-32b.json", 2, 4), ("qwen3-8b-base.json", 2, 2), ("qwen2.5-72b.json", 8, 2),
        ("llama-3.1-70b.json", 8, 2))]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "planner_meta_params.py"),
                           *cases], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          # strict device mode: the meta build must not take the device path
                          # (an explicit device= overrides the meta context; models/builder.py)
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "MEGATRON_RLVR_STRICT_DEVICE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("OK ") == 1 + 2 + 1 + 4 + 2 + 2 + 2   # one line per stage


# ------------------------------------------------------------------------- disaggregated rollout

def test_disaggregated_recipe_differs_from_its_colocated_one_only_in_placement():
    """The disaggregated 32B recipe is the colocated one with the rollout moved to Ray engines:
    the same model, layout, algorithm and batches; one-step-off, with the correction on."""
    config, colocated, _ = DISAGGREGATED["run_qwen3_32b_top20_disaggregated.sh"]
    a = config_to_dict(load_config(str(EXAMPLES / "configs" / config)))
    b = config_to_dict(load_config(str(EXAMPLES / "configs" / colocated)))
    differ = {f"{sec}.{k}" for sec in a for k in a[sec] if a[sec][k] != b[sec][k]}
    assert differ == {"rollout.mode", "rollout.engines", "rollout.max_staleness",
                      "rollout.gpu_memory_utilization", "reward.backend", "reward.ray_actors",
                      "reward.num_workers", "logging.output_dir", "logging.run_name"}
    cfg = load_config(str(EXAMPLES / "configs" / config))
    assert (cfg.rollout.mode, cfg.rollout.max_staleness, cfg.reward.backend) == (
        "disaggregated", 1, "ray")
    assert cfg.rollout.ray_address == ""      # set from RAY_ADDRESS by the run script
    assert cfg.algorithm.rollout_correction.active(off_policy=cfg.rollout.max_staleness > 0)


def test_disaggregated_dry_run_prints_the_split_and_both_sides_commands():
    script = "run_qwen3_32b_top20_disaggregated.sh"
    config, _, hf = DISAGGREGATED[script]
    proc = _dry_run(script, "trainer.total_steps=300", NODE_RANK="3", MASTER_ADDR="10.0.0.1",
                    RAY_ADDRESS="10.0.9.9:6379")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # The trainer: 4 nodes under torchrun, no vLLM on its GPUs.
    assert "world: 4 nodes x 8 GPUs = 32 ranks (the trainer, under torchrun" in out
    assert "layout: TP8 x PP1 x CP1 x DP4 (ranks TP-fastest" in out
    # The engines: 24 of tp 4 on 12 other nodes, one-step-off, rewards on Ray.
    assert ("rollout: disaggregated, 24 vLLM engines of tp 4 as Ray actors on 12 engine nodes x 8 "
            "GPUs (2 a node); max_staleness 1 (one-step-off)") in out
    assert "(up to 1024 sequences an engine); 12 Ray reward actors x 8 workers" in out
    assert "off-policy correction: on (token level, truncate, cap 2)" in out
    assert "trainer rank 0 is the driver of the Ray cluster at 10.0.9.9:6379" in out
    # Both memory plans, as the planner computes them.
    shape = planner.Shape.from_hf_config(json.loads((EXAMPLES / "configs" / "hf" / hf).read_text()))
    work = planner.Workload(seq_len=22528, micro_batch_tokens=22528, num_microbatches=128)
    trainer = planner.memory(shape, planner.Layout(8, 1, 1, 4, 4, engines=24), work)
    engine = planner.engine_memory(shape, 4, work)
    assert (f"memory (planner estimate, stage 0): peak {trainer.peak / planner.GIB:.1f} GiB of 80 "
            "(no vLLM on the trainer's GPUs) -> fits") in out
    assert (f"memory (planner estimate, engine GPU): peak {engine.peak / planner.GIB:.1f} GiB of "
            "80 (weights 15.3, KV cache 22.0 for 16 full-length sequences; room for 44) -> fits"
            ) in out
    # The engine nodes' and trainer node 0's ray commands, then torchrun for the trainer only.
    ray = out.split("ray commands", 1)[1].split("torchrun command:", 1)[0]
    assert "ray start --head --port=6379 --num-gpus=8" in ray
    assert "ray start --address=10.0.9.9:6379 --num-gpus=8" in ray
    assert "trainer node 0:      ray start --address=10.0.9.9:6379 --num-gpus=0 --num-cpus=0" in ray
    cmd = out.split("torchrun command:\n", 1)[1].split()
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=4", "--node-rank=3", "--nproc-per-node=8", "--master-addr=10.0.0.1"} \
        <= set(cmd)
    assert cmd[-7:] == ["-m", "megatron_rlvr", "train", "--config",
                        str(EXAMPLES / "configs" / config),
                        "rollout.ray_address=10.0.9.9:6379", "trainer.total_steps=300"]
    # Without RAY_ADDRESS the dry run says what is missing; an override beats RAY_ADDRESS.
    proc = _dry_run(script)
    assert proc.returncode == 0, proc.stderr
    assert "rollout.ray_address is empty" in proc.stdout and "$RAY_HEAD:6379" in proc.stdout
    proc = _dry_run(script, "rollout.ray_address=head2:6380", RAY_ADDRESS="10.0.9.9:6379")
    assert "the Ray cluster at head2:6380" in proc.stdout
    assert "ray start --head --port=6380 --num-gpus=8" in proc.stdout


@pytest.mark.parametrize("args, env, message", [
    (["rollout.engines=25"], {}, "rollout.engines=25 x rollout.vllm_tp=4 on ENGINE_NODES=12: 25 "
     "engines x vllm_tp 4 = 100 GPUs do not fit on 12 engine node(s) x 8 GPUs: 2 engine(s) a "
     "node (an engine stays within one node), 24 at most"),
    ([], {"ENGINE_NODES": "8"}, "24 engines x vllm_tp 4 = 96 GPUs do not fit on 8 engine node(s)"),
    (["rollout.vllm_tp=16"], {}, "vllm_tp=16 spans nodes (gpus_per_node=8)"),
    (["rollout.vllm_tp=3"], {}, "num_attention_heads=64 is not divisible by vllm_tp=3"),
    # The trainer's world is NNODES x GPUS_PER_NODE alone: the engine nodes are not in it.
    (["parallel.pp=2"], {"NNODES": "3"},
     "world size 24 is not divisible by parallel.tp * pp * cp = 16"),
    ([], {"ENGINE_NODES": "x"}, "ENGINE_NODES='x' is not an integer"),
    (["rollout.max_staleness=-1"], {}, "rollout.max_staleness"),
])
def test_disaggregated_dry_run_refuses_a_bad_split(args, env, message):
    proc = _dry_run("run_qwen3_32b_top20_disaggregated.sh", *args, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "torchrun command" not in proc.stdout


def test_disaggregated_launch_needs_the_engines_ray_cluster(tmp_path):
    """A real launch with no Ray address would start a Ray on trainer node 0, whose GPUs the
    trainer holds: refused before torchrun starts."""
    model = tmp_path / "Qwen3-32B-Base"
    model.mkdir()
    (model / "config.json").write_text((EXAMPLES / "configs" / "hf" / "qwen3-32b.json").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ENGINE_NODES")}
    run = subprocess.run(["bash", str(EXAMPLES / "run_qwen3_32b_top20_disaggregated.sh"),
                          f"model.hf_dir={model}"], capture_output=True, text=True,
                         env={**env, "PYTHON": sys.executable, "NNODES": "1"}, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "rollout.ray_address is empty" in run.stderr and "RAY_ADDRESS=<head>:6379" in run.stderr


def test_plan_reads_the_disaggregated_recipe(capsys):
    config, _, hf = DISAGGREGATED["run_qwen3_32b_top20_disaggregated.sh"]
    argv = ["--config", str(EXAMPLES / "configs" / config), "--nodes", "4",
            "--hf-config", str(EXAMPLES / "configs" / "hf" / hf)]
    assert planner.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trainer 4 x 8 GPUs of 80 GiB, 24 vLLM engines of tp 4 on 12 x 8 more" in lines[0]
    assert lines[3].split() == ["8", "1", "1", "4", "7.6", "15.3", "11.4", "2.4", "1.0", "41.7"]
    assert "128 micro-batches per DP rank" in lines[4] and lines[4].endswith("-> fits")
    assert lines[7].split() == ["4", "24", "96", "12", "15.3", "22.0", "41.3", "44"]
    with pytest.raises(SystemExit) as e:
        planner.main(argv + ["--engine-nodes", "11"])
    assert e.value.code == 2
    assert "24 engines x vllm_tp 4 = 96 GPUs do not fit on 11 engine node(s)" in \
        capsys.readouterr().err


def test_docs_show_the_planners_output_for_the_disaggregated_recipe(capsys, monkeypatch):
    """docs/disaggregated.md quotes `plan` on the recipe: it must be what the planner prints."""
    doc = (ROOT / "docs" / "disaggregated.md").read_text()
    block = doc.split("$ python -m megatron_rlvr plan ", 1)[1].split("\n```", 1)[0]
    argv, expected = block.split("\n", 1)
    monkeypatch.chdir(ROOT)
    assert planner.main(argv.split()) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
