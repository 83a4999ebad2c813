"""The planner's parameter counts against transformers models, its memory formulas against hand
arithmetic, and the shape of its layout search."""
import json
import math
import os

import pytest
import torch

from megatron_rlvr import planner
from megatron_rlvr.planner import Layout, Shape, Workload

HF_DIR = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "hf")
REAL = {  # file -> publicly stated parameter count (billions)
    "qwen3-8b-base.json": 8.19, "qwen3-14b-base.json": 14.8, "qwen3-32b.json": 32.8,
    "qwen2.5-72b.json": 72.7, "llama-3.1-70b.json": 70.6}


def _load(name):
    with open(os.path.join(HF_DIR, name)) as f:
        return json.load(f)


def _hf_numel(cfg: dict) -> int:
    """Parameters of the transformers model built from cfg, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


TINY = {
    "qwen3": dict(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=False),
    "qwen3-bias-tied": dict(model_type="qwen3", vocab_size=1000, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=16, attention_bias=True,
                            tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", vocab_size=999, hidden_size=48, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  tie_word_embeddings=False),
    "llama-biases-tied": dict(model_type="llama", vocab_size=1001, hidden_size=64,
                              intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                              tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_parameter_count_equals_transformers(name):
    cfg = TINY[name]
    assert planner.total_params(Shape.from_hf_config(cfg)) == _hf_numel(cfg)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_parameter_count_equals_transformers(name):
    cfg = _load(name)
    n = planner.total_params(Shape.from_hf_config(cfg, name))
    assert n == _hf_numel(cfg)
    assert round(n / 1e9, 2 if REAL[name] < 10 else 1) == REAL[name]


def test_training_state_bytes_by_hand():
    """Qwen3-14B at tp=4, pp=2, dp=16: every matrix written out, 6 + 12/dp bytes a parameter."""
    shape = Shape.from_hf_config(_load("qwen3-14b-base.json"))
    h, d, a, g, f, v = 5120, 128, 40, 8, 17408, 151936
    layer = (h * a * d + 2 * h * g * d + a * d * h + 3 * h * f) // 4 + 2 * h + 2 * d
    stage0 = 20 * layer + v * h // 4
    stage1 = 20 * layer + h + v * h // 4
    assert planner.stage_params(shape, tp=4, pp=2, stage=0) == stage0 == 1_846_195_200
    assert planner.stage_params(shape, tp=4, pp=2, stage=1) == stage1
    lay = Layout(tp=4, pp=2, cp=1, dp=16, vllm_tp=2)
    work = Workload(seq_len=22528, rollout_seqs_per_gpu=4)
    m = planner._stage_memory(shape, lay, work, stage=1)
    assert (m.weights, m.grads, m.optimizer) == (2 * stage1, 4 * stage1, math.ceil(12 * stage1 / 16))
    # vLLM: the whole model over 2 GPUs in bf16; K and V of 40 layers x 4 KV heads x 128 per token.
    assert m.vllm_weights == 2 * (40 * ((h * a * d + 2 * h * g * d + a * d * h + 3 * h * f) // 2
                                        + 2 * h + 2 * d) + h + 2 * v * h // 2)
    assert m.kv_per_seq == 2 * 40 * 4 * 128 * 2 * 22528
    assert m.kv_cache == m.kv_per_seq * 4 * 2


def test_vocab_is_padded_to_a_multiple_of_tp():
    shape = Shape.from_hf_config(TINY["qwen2"])  # vocab 999
    assert planner.vocab_rows(shape, 4) == 1000
    assert planner.vocab_rows(shape, 4, vocab_divisor=128) == 1024
    # Padding shows in the sharded embedding (first stage) and output layer (last stage).
    base = planner.stage_params(shape, tp=4, pp=2, stage=0) - shape.layers // 2 * planner.layer_params(shape, 4)
    assert base == 1000 * 48 // 4


def test_tied_embedding_is_copied_to_the_last_stage_only_with_pipeline():
    shape = Shape.from_hf_config(TINY["llama-biases-tied"])
    single = planner.stage_params(shape, tp=1, pp=1)
    split = planner.stage_params(shape, pp=2, stage=0) + planner.stage_params(shape, pp=2, stage=1)
    assert split - single == 1001 * 64


def _act(shape, **kw):
    lay = dict(tp=1, pp=1, cp=1, dp=1, vllm_tp=1)
    work = dict(seq_len=8192, recompute=False)
    for k, val in kw.items():
        (lay if k in lay else work)[k] = val
    return planner.memory(shape, Layout(**lay), Workload(**work)).activations


def test_activation_memory_moves_the_right_way():
    shape = Shape.from_hf_config(_load("qwen3-14b-base.json"))
    base = _act(shape)
    assert _act(shape, tp=2) < base and _act(shape, tp=8) < _act(shape, tp=2)
    assert _act(shape, recompute=True) < base / 5
    assert _act(shape, cp=2) == pytest.approx(base / 2, rel=1e-6)
    assert _act(shape, seq_len=16384) == pytest.approx(2 * base, rel=1e-6)
    assert _act(shape, tp=4, sequence_parallel=False) > _act(shape, tp=4)
    # 1F1B: the first stage holds pp micro-batches of its 1/pp of the layers: the same total.
    assert _act(shape, pp=4) == pytest.approx(base, rel=1e-6)
    assert _act(shape, pp=4, num_microbatches=1) == pytest.approx(base / 4, rel=1e-6)


def test_per_layer_activation_formula_for_a_plain_layer():
    """A Llama layer at tp=1: norm+linear inputs 8h, QKV 2(a+2g)d, out 2ad, LSE 4a, MLP 6f."""
    shape = Shape.from_hf_config(TINY["llama-biases-tied"])
    h, a, g, d, f = 64, 8, 4, 8, 96
    assert planner.activation_bytes_per_token(shape, 1, True) == (
        8 * h + 2 * (a + 2 * g) * d + 2 * a * d + 4 * a + 6 * f)


def test_fits_and_suggestions_agree():
    shape = Shape.from_hf_config(_load("qwen3-14b-base.json"))
    work = Workload(seq_len=22528)
    plans = planner.suggest_layouts(shape, nodes=2, gpus_per_node=8, gpu_memory_gib=80, work=work)
    assert plans
    for p in plans:
        assert p.layout.world == 16 and planner.fits(shape, p.layout, work, 80)
    keys = [(p.layout.tp * p.layout.pp * p.layout.cp, p.layout.pp, p.layout.cp, p.layout.tp)
            for p in plans]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # tp=1, pp=1 cannot hold 14.8B parameters' 6 bytes each in 80 GiB.
    assert not planner.fits(shape, Layout(dp=16, vllm_tp=2), work, 80)
    assert planner.suggest_layouts(shape, 2, 8, 10, work) == []


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        Shape.from_hf_config({"model_type": "gpt2"})
    cfg = dict(TINY["qwen3"])
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match="missing required key 'intermediate_size'"):
        Shape.from_hf_config(cfg, "x.json")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        Shape.from_hf_config(dict(TINY["qwen3"], num_key_value_heads=3))


def test_cli_checks_one_layout_and_suggests(capsys):
    path = os.path.join(HF_DIR, "qwen3-14b-base.json")
    assert planner.main(["--hf-config", path, "--nodes", "16", "--tp", "4", "--vllm-tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "14.77B parameters" in out and "fits" in out
    assert planner.main(["--hf-config", path, "--nodes", "2", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["tp", "pp", "cp", "dp", "vtp"] and len(lines) == 6


@pytest.mark.parametrize("argv, message", [
    (["--hf-config", "/nonexistent.json"], "cannot read --hf-config"),
    (["--gpus-per-node", "6", "--tp", "3"], "num_attention_heads=40 is not divisible by tp=3"),
    (["--tp", "3"], "tp*pp*cp=3 does not divide 16 GPUs"),
    (["--tp", "16"], "tp=16 spans nodes"),
    (["--pp", "0", "--tp", "1"], "--pp must be positive"),
])
def test_cli_errors_name_the_problem(argv, message, capsys):
    if "--hf-config" not in argv:
        argv = ["--hf-config", os.path.join(HF_DIR, "qwen3-14b-base.json"), "--nodes", "2"] + argv
    with pytest.raises(SystemExit) as e:
        planner.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------- disaggregated rollout

def _qwen3_32b():
    return Shape.from_hf_config(_load("qwen3-32b.json"))


def test_disaggregated_trainer_gpus_carry_no_vllm_memory():
    """Disaggregated, a trainer GPU holds training state only: the colocated figures less the
    engine's weights and KV cache, and its peak is the training phase."""
    shape, work = _qwen3_32b(), Workload(seq_len=22528, micro_batch_tokens=22528)
    colocated = planner.memory(shape, Layout(tp=8, dp=4, vllm_tp=4), work)
    m = planner.memory(shape, Layout(tp=8, dp=4, vllm_tp=4, engines=24), work)
    assert (m.vllm_weights, m.kv_cache) == (0, 0)
    assert (m.weights, m.grads, m.optimizer, m.activations, m.logits, m.overhead) == (
        colocated.weights, colocated.grads, colocated.optimizer, colocated.activations,
        colocated.logits, colocated.overhead)
    assert m.peak == m.train == m.weights + m.grads + m.optimizer + m.activations + m.logits \
        + m.overhead
    assert colocated.train - m.train == colocated.vllm_weights > 0
    # What the engines hold is the same as colocated: engine_memory is one formula for both.
    e = planner.engine_memory(shape, 4, work)
    assert (e.weights, e.kv_cache, e.kv_per_seq) == (
        colocated.vllm_weights, colocated.kv_cache, colocated.kv_per_seq)


def test_engine_gpu_memory_by_hand():
    """One GPU of a Qwen3-32B engine at vllm_tp 4: a quarter of the bf16 weights (norms whole),
    K and V of 64 layers x 2 of the 8 KV heads x 128 per token, plus the 4 GiB overhead."""
    h, d, a, g, f, v, layers = 5120, 128, 64, 8, 25600, 151936, 64
    layer = (h * a * d + 2 * h * g * d + a * d * h + 3 * h * f) // 4 + 2 * h + 2 * d
    params = layers * layer + v * h // 4 + h + v * h // 4       # untied embedding and output
    e = planner.engine_memory(_qwen3_32b(), 4, Workload(seq_len=22528, rollout_seqs_per_gpu=4))
    assert e.weights == 2 * params == 16_382_076_928
    assert e.kv_per_seq == 2 * 64 * 2 * 128 * 2 * 22528 == 1_476_395_008
    assert e.kv_cache == e.kv_per_seq * 4 * 4                   # 16 sequences an engine
    assert e.peak == e.weights + e.kv_cache + 4 * planner.GIB
    assert round(e.peak / planner.GIB, 1) == 41.3
    assert e.max_seqs(80 * planner.GIB) == (80 * planner.GIB - e.weights - 4 * planner.GIB) \
        // e.kv_per_seq == 44
    # vllm_tp 8 > 8 KV heads / 8: one KV head per GPU, never less.
    e8 = planner.engine_memory(_qwen3_32b(), 8, Workload(seq_len=22528))
    assert e8.kv_per_seq == 2 * 64 * 1 * 128 * 2 * 22528


def test_engine_placement():
    assert planner.engine_nodes_needed(24, 4, 8) == 12
    assert planner.engine_nodes_needed(25, 4, 8) == 13
    assert planner.engine_nodes_needed(3, 8, 8) == 3
    assert planner.engine_nodes_needed(3, 4, 6) == 3         # one engine a 6-GPU node
    assert planner.engine_problems(24, 4, 12, 8) == []
    assert planner.engine_problems(25, 4, 12, 8) == [
        "25 engines x vllm_tp 4 = 100 GPUs do not fit on 12 engine node(s) x 8 GPUs: 2 engine(s) "
        "a node (an engine stays within one node), 24 at most"]
    assert planner.engine_problems(1, 16, 4, 8) == ["vllm_tp=16 spans nodes (gpus_per_node=8)"]
    # The trainer's world need not be a multiple of vllm_tp when the engines are elsewhere.
    shape = _qwen3_32b()
    assert "world size 2 is not a multiple of vllm_tp=4" in planner.layout_problems(
        shape, Layout(tp=2, vllm_tp=4), 8)
    assert planner.layout_problems(shape, Layout(tp=2, vllm_tp=4, engines=1), 8) == []


def test_disaggregated_suggestions_keep_vllm_tp_and_fit_more():
    shape, work = _qwen3_32b(), Workload(seq_len=22528)
    colocated = planner.suggest_layouts(shape, 2, 8, 80, work)
    apart = planner.suggest_layouts(shape, 2, 8, 80, work, engines=4, vllm_tp=4)
    assert {p.layout.vllm_tp for p in apart} == {4} and {p.layout.engines for p in apart} == {4}
    assert all(p.memory.vllm_weights == p.memory.kv_cache == 0 for p in apart)
    trainer = {(p.layout.tp, p.layout.pp, p.layout.cp) for p in apart}
    assert {(p.layout.tp, p.layout.pp, p.layout.cp) for p in colocated} < trainer


def test_cli_disaggregated_prints_the_trainer_and_the_engines(capsys):
    path = os.path.join(HF_DIR, "qwen3-32b.json")
    argv = ["--hf-config", path, "--nodes", "4", "--tp", "8", "--rollout-mode", "disaggregated",
            "--engines", "24", "--vllm-tp", "4"]
    assert planner.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trainer 4 x 8 GPUs of 80 GiB, 24 vLLM engines of tp 4 on 12 x 8 more" in lines[0]
    assert lines[1] == ("trainer (torchrun, NNODES x GPUS_PER_NODE): 4 x 8 = 32 ranks; no vLLM "
                        "weights or KV cache on them")
    assert lines[2].split() == ["tp", "pp", "cp", "dp", "weights", "grads", "optim", "activ",
                                "logits", "peak"]
    assert lines[3].split()[:4] == ["8", "1", "1", "4"]
    assert lines[4].endswith("-> fits")
    assert lines[5].startswith("engines (Ray actors, ENGINE_NODES x GPUS_PER_NODE): 24 x vllm_tp 4"
                               " = 96 GPUs on 12 x 8, 2 engine(s) a node")
    assert lines[7].split() == ["4", "24", "96", "12", "15.3", "22.0", "41.3", "44"]
    assert lines[8] == ("engine GPU: peak 41.3 GiB -> fits; KV room for 44 full-length sequences "
                        "an engine, 1056 in all")
    # An engine that does not fit (vllm_tp 1: 61 GiB of weights) fails and lists the choices.
    argv[-1] = "1"
    argv[argv.index("--engines") + 1] = "8"
    assert planner.main(argv) == 1
    out = capsys.readouterr().out
    assert "engine GPU: peak 87.0 GiB -> DOES NOT FIT" in out
    assert "engine choices on the same 1 node(s) that fit:" in out


@pytest.mark.parametrize("argv, message", [
    (["--engines", "2"], "--engines and --engine-nodes need --rollout-mode disaggregated"),
    (["--rollout-mode", "disaggregated"], "needs --engines or --engine-nodes"),
    (["--rollout-mode", "disaggregated", "--engines", "5", "--engine-nodes", "2", "--vllm-tp",
      "4"], "5 engines x vllm_tp 4 = 20 GPUs do not fit on 2 engine node(s) x 8 GPUs"),
    (["--rollout-mode", "disaggregated", "--engines", "1", "--vllm-tp", "16"],
     "vllm_tp=16 spans nodes"),
    (["--rollout-mode", "disaggregated", "--engines", "1", "--vllm-tp", "3", "--gpus-per-node",
      "6"], "num_attention_heads=40 is not divisible by vllm_tp=3"),
    (["--rollout-mode", "disaggregated", "--engines", "0"], "--engines must be positive"),
])
def test_cli_disaggregated_errors(argv, message, capsys):
    argv = ["--hf-config", os.path.join(HF_DIR, "qwen3-14b-base.json"), "--nodes", "2"] + argv
    with pytest.raises(SystemExit) as e:
        planner.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
