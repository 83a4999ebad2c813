"""Memory and layout planner: will this model train at this layout on these GPUs, and which layouts do?

Everything is counted per GPU, in bytes, for the stage of the pipeline that needs the most. The
model (every assumption is a number you can see in the code and in docs/scaling.md):

Parameters: exact counts from the Hugging Face config (embedding, per-layer attention with q/k norms
and biases as the family has them, SwiGLU MLP, norms, untied output layer), split the way
Megatron-Core splits them: linear weights and column-parallel biases over TP, norms and
row-parallel biases replicated, the vocabulary padded to a multiple of tp (x `vocab_divisor`); the
first pipeline stage holds the embedding, the last the final norm and output layer (a tied
embedding is copied onto the last stage when pp > 1, as Megatron does).

Training state (Megatron mixed precision with the distributed optimizer):
  2 bytes/param bf16 weights + 4 bytes/param fp32 gradient buffer (Megatron accumulates and
  reduces bf16 gradients in fp32) + 12 bytes/param (fp32 main weights, Adam m and v) sharded over
  the dp x cp ranks that reduce those gradients: 6 + 12 / (dp * cp) bytes per parameter.

Activations per transformer layer, per token, in bytes (bf16), t = tp when sequence parallelism is
on (Megatron on GPU; norms and residual-path tensors are sharded over TP) and TP-sharded only for
the head/FFN dimensions otherwise. This is Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2) re-derived for what our layer stores: no
dropout, flash attention (TE; no s x s score matrix, a float32 log-sum-exp per head instead),
GQA projections, Qwen3 q/k norms and a SwiGLU MLP:
  attention: norm input 2h + QKV input 2h                     (both /t with SP)
             QKV output 2(a + 2g)d, q/k-norm inputs 2(a + g)d  (Qwen3 only), attention out 2ad,
             log-sum-exp 4a                                     (all /tp)
  MLP:       norm input 2h + FC1 input 2h                       (both /t with SP)
             FC1 output (gate and up) 4f + SwiGLU output 2f    (/tp)
with h hidden, a query heads, g KV heads, d head dim, f FFN size. With full recomputation
(Megatron's "full, uniform, 1 layer") a layer keeps only its input (2h/t per token) and one layer
at a time holds its whole activations during its backward. 1F1B pipelining keeps pp - stage
micro-batches in flight on a stage (fewer if a step has fewer micro-batches); context parallelism
divides the tokens of a sequence by cp.

Log-probs and entropy (ops/entropy.py, fused, chunked over tokens): its float32 working buffers
are about 3 x chunk x V/tp x 4 bytes (the shifted logits and their exponentials in forward, the
log-probs and gradient in backward, plus the bf16 chunk of logits; 3 rounds that up), with
chunk x V/tp = 2^26 elements by default on GPU, plus the final hidden states it keeps for backward
(2h per token) and four float32 statistics per token.

Colocated vLLM engine (one per vllm_tp GPUs): its bf16 weights split over vllm_tp, plus a KV cache
of 2 (K and V) x layers x max(1, g / vllm_tp) x d x 2 bytes per token for rollout_seqs_per_gpu x
vllm_tp sequences of seq_len tokens (a worst case: vLLM pages the cache by actual length, so it
admits more sequences when most responses end early). Two phases share the GPU: training (vLLM keeps its weights, frees its KV cache)
and rollout (training activations freed; weights, gradient buffer and optimizer stay resident).
The peak is the larger phase plus `overhead_gib` for the CUDA context, NCCL buffers and allocator
fragmentation.

Disaggregated (rollout.mode: disaggregated, docs/disaggregated.md): `engines` vLLM engines run as
Ray actors on GPUs of their own, each within one node. The trainer's GPUs (torchrun) hold no vLLM
weights or KV cache: their peak is the training phase plus the overhead. One GPU of an engine
holds the same engine share as above (its bf16 weights over vllm_tp and the KV cache of
rollout_seqs_per_gpu x vllm_tp full-length sequences) plus the overhead, and nothing else.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

GIB = 1024 ** 3
TP_SIZES = (1, 2, 4, 8)
FAMILIES = ("llama", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class Shape:
    """The dimensions and bias/norm switches of a Llama-style decoder, read from config.json."""
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    qkv_bias: bool   # bias on the q, k and v projections
    o_bias: bool     # bias on the attention output projection
    mlp_bias: bool   # bias on gate, up and down projections
    qk_norm: bool    # Qwen3's per-head RMSNorm on q and k

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config") -> "Shape":
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported by the planner "
                             f"(supported: {', '.join(FAMILIES)})")
        try:
            heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
            attention_bias = bool(cfg.get("attention_bias", False))
            shape = cls(
                model_type=model_type, vocab=int(cfg["vocab_size"]), hidden=hidden,
                layers=int(cfg["num_hidden_layers"]), heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                ffn=int(cfg["intermediate_size"]),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and none on o_proj; Llama and Qwen3 put
                # `attention_bias` on all four projections.
                qkv_bias=True if model_type == "qwen2" else attention_bias,
                o_bias=False if model_type == "qwen2" else attention_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
                qk_norm=model_type == "qwen3")
        except KeyError as e:
            raise ValueError(f"{where}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: a dimension is not an integer ({e})") from None
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
            if getattr(shape, name) <= 0:
                raise ValueError(f"{where}: {name} must be positive, got {getattr(shape, name)}")
        if shape.heads % shape.kv_heads:
            raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={shape.kv_heads}")
        return shape

    def layout_problems(self, tp: int, pp: int) -> list[str]:
        """Why Megatron cannot split this model as tp x pp (empty when it can)."""
        out = []
        for name, n in (("num_attention_heads", self.heads), ("num_key_value_heads", self.kv_heads),
                        ("intermediate_size", self.ffn)):
            if n % tp:
                out.append(f"{name}={n} is not divisible by tp={tp}")
        if self.layers % pp:
            out.append(f"num_hidden_layers={self.layers} is not divisible by pp={pp}")
        return out


def vocab_rows(shape: Shape, tp: int, vocab_divisor: int = 1) -> int:
    """Embedding rows: the vocabulary padded to a multiple of tp * vocab_divisor."""
    m = tp * vocab_divisor
    return math.ceil(shape.vocab / m) * m


def layer_params(shape: Shape, tp: int = 1) -> int:
    """Parameters of one transformer layer held by one of tp tensor-parallel ranks."""
    h, d, a, g, f = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads, shape.ffn
    qkv = h * (a + 2 * g) * d + (a + 2 * g) * d * shape.qkv_bias     # column parallel
    out = a * d * h                                                    # row parallel
    mlp = 3 * h * f + 2 * f * shape.mlp_bias                           # gate+up column, down row
    sharded = (qkv + out + mlp) // tp
    replicated = 2 * h + 2 * d * shape.qk_norm + h * shape.o_bias + h * shape.mlp_bias
    return sharded + replicated


def stage_params(shape: Shape, tp: int = 1, pp: int = 1, stage: int = 0,
                 vocab_divisor: int = 1) -> int:
    """Parameters one GPU of pipeline stage `stage` holds (TP rank's share)."""
    rows = vocab_rows(shape, tp, vocab_divisor)
    n = shape.layers // pp * layer_params(shape, tp)
    if stage == 0:
        n += rows * shape.hidden // tp
    if stage == pp - 1:
        n += shape.hidden                                      # final norm
        if not shape.tied or pp > 1:                           # output layer (or tied copy)
            n += rows * shape.hidden // tp
    return n


def total_params(shape: Shape) -> int:
    """The model's parameter count as Hugging Face counts it (no padding, tied weights once)."""
    return stage_params(shape, tp=1, pp=1, stage=0, vocab_divisor=1)


# ---------------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vllm_tp: int = 1
    engines: int = 0   # disaggregated: vLLM engines on GPUs of their own; 0 = colocated

    @property
    def world(self) -> int:
        """Trainer ranks (torchrun); disaggregated engines are not among them."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def colocated(self) -> bool:
        return self.engines == 0


@dataclass(frozen=True)
class Workload:
    seq_len: int                      # prompt + response tokens of one sequence
    micro_batch: int = 1              # sequences per micro-batch
    micro_batch_tokens: int | None = None  # token budget of a packed micro-batch (replaces
                                           # micro_batch x seq_len: trainer.max_tokens_per_micro_batch)
    recompute: bool = True            # Megatron full activation recomputation
    sequence_parallel: bool = True    # Megatron SP whenever tp > 1 (GPU, Transformer-Engine)
    num_microbatches: int | None = None  # per DP rank per optimizer step; None: at least pp
    rollout_seqs_per_gpu: int = 4     # full-length sequences in flight per GPU of a vLLM engine
    overhead_gib: float = 4.0         # CUDA context, NCCL buffers, allocator fragmentation
    vocab_divisor: int = 1
    logits_chunk_elements: int = 1 << 26   # ops/entropy.py's GPU chunk (tokens x V/tp)


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU of the stage that needs the most."""
    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    vllm_weights: int
    kv_cache: int
    kv_per_seq: int
    overhead: int

    @property
    def resident(self) -> int:
        """What stays allocated in both phases."""
        return self.weights + self.grads + self.optimizer + self.vllm_weights + self.overhead

    @property
    def train(self) -> int:
        return self.resident + self.activations + self.logits

    @property
    def rollout(self) -> int:
        return self.resident + self.kv_cache

    @property
    def peak(self) -> int:
        return max(self.train, self.rollout)


@dataclass(frozen=True)
class EngineMemory:
    """Bytes on one GPU of a vLLM engine of vllm_tp GPUs: its share of the bf16 weights and of
    the KV cache (colocated, the same share sits on a trainer GPU; see Memory)."""
    vllm_tp: int
    weights: int
    kv_cache: int      # rollout_seqs_per_gpu x vllm_tp full-length sequences, this GPU's share
    kv_per_seq: int    # one full-length sequence, this GPU's share
    overhead: int

    @property
    def peak(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    def max_seqs(self, gpu_memory: int) -> int:
        """Full-length sequences the engine's KV cache could hold in the GPU memory left."""
        return max(0, (gpu_memory - self.weights - self.overhead) // self.kv_per_seq)


def engine_memory(shape: Shape, vllm_tp: int, work: Workload) -> EngineMemory:
    """One GPU of a vLLM engine (the module docstring's "Colocated vLLM engine" terms)."""
    kv_per_seq = (2 * shape.layers * max(1, shape.kv_heads // vllm_tp) * shape.head_dim * 2
                  * work.seq_len)
    return EngineMemory(vllm_tp=vllm_tp,
                        weights=2 * stage_params(shape, vllm_tp, 1, 0, work.vocab_divisor),
                        kv_cache=kv_per_seq * work.rollout_seqs_per_gpu * vllm_tp,
                        kv_per_seq=kv_per_seq, overhead=int(work.overhead_gib * GIB))


def activation_bytes_per_token(shape: Shape, tp: int, sequence_parallel: bool) -> int:
    """One layer's stored activations per token (no recomputation); see the module docstring."""
    h, d, a, g, f = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads, shape.ffn
    t_sp = tp if sequence_parallel else 1
    residual_path = (2 * h + 2 * h) * 2 // t_sp          # norm input + linear input, attn and MLP
    attention = 2 * (a + 2 * g) * d + 2 * (a + g) * d * shape.qk_norm + 2 * a * d + 4 * a
    mlp = 4 * f + 2 * f
    return residual_path + (attention + mlp) // tp


def memory(shape: Shape, layout: Layout, work: Workload) -> Memory:
    """Per-GPU memory of every pipeline stage; returns the stage with the highest peak."""
    return max((_stage_memory(shape, layout, work, s) for s in range(layout.pp)),
               key=lambda m: m.peak)


def _stage_memory(shape: Shape, lay: Layout, work: Workload, stage: int) -> Memory:
    tp, pp = lay.tp, lay.pp
    p = stage_params(shape, tp, pp, stage, work.vocab_divisor)
    shards = lay.dp * lay.cp
    # One micro-batch on this GPU: its token budget (packed), else micro_batch full-length sequences.
    tokens = (work.micro_batch_tokens or work.micro_batch * work.seq_len) // lay.cp
    in_flight = pp - stage
    if work.num_microbatches is not None:
        in_flight = min(in_flight, work.num_microbatches)
    per_layer = activation_bytes_per_token(shape, tp, work.sequence_parallel) * tokens
    layers = shape.layers // pp
    if work.recompute:
        t_sp = tp if work.sequence_parallel else 1
        kept = layers * in_flight * tokens * 2 * shape.hidden // t_sp
        activations = kept + per_layer
    else:
        activations = layers * in_flight * per_layer
    logits = 0
    if stage == pp - 1:
        v_local = vocab_rows(shape, tp, work.vocab_divisor) // tp
        chunk_tokens = max(1, work.logits_chunk_elements // v_local)
        logits = 3 * min(chunk_tokens, tokens) * v_local * 4 + tokens * (2 * shape.hidden + 16)
    # Colocated, an engine's share of weights and KV cache sits on this GPU; disaggregated, none.
    eng = engine_memory(shape, lay.vllm_tp, work)
    return Memory(stage=stage, params=p, weights=2 * p, grads=4 * p,
                  optimizer=math.ceil(12 * p / shards), activations=activations, logits=logits,
                  vllm_weights=eng.weights if lay.colocated else 0,
                  kv_cache=eng.kv_cache if lay.colocated else 0,
                  kv_per_seq=eng.kv_per_seq, overhead=eng.overhead)


def layout_problems(shape: Shape, layout: Layout, gpus_per_node: int | None = None) -> list[str]:
    """Why a layout cannot run (empty when it can)."""
    out = shape.layout_problems(layout.tp, layout.pp)
    if shape.heads % layout.vllm_tp:
        out.append(f"num_attention_heads={shape.heads} is not divisible by vllm_tp={layout.vllm_tp}")
    if layout.colocated and layout.world % layout.vllm_tp:
        out.append(f"world size {layout.world} is not a multiple of vllm_tp={layout.vllm_tp}")
    if gpus_per_node is not None:
        for name in ("tp", "vllm_tp"):
            if getattr(layout, name) > gpus_per_node:
                out.append(f"{name}={getattr(layout, name)} spans nodes "
                           f"(gpus_per_node={gpus_per_node})")
    return out


def engines_per_node(vllm_tp: int, gpus_per_node: int) -> int:
    """Disaggregated engines one node holds (an engine never spans nodes)."""
    return gpus_per_node // vllm_tp


def engine_nodes_needed(engines: int, vllm_tp: int, gpus_per_node: int) -> int:
    """The fewest nodes that hold `engines` engines of vllm_tp GPUs (0 if one cannot fit)."""
    per_node = engines_per_node(vllm_tp, gpus_per_node)
    return -(-engines // per_node) if per_node else 0


def engine_problems(engines: int, vllm_tp: int, engine_nodes: int, gpus_per_node: int) -> list[str]:
    """Why `engines` vLLM engines of vllm_tp GPUs cannot be placed on engine_nodes nodes of
    gpus_per_node GPUs, each engine within one node (empty when they can)."""
    if vllm_tp > gpus_per_node:
        return [f"vllm_tp={vllm_tp} spans nodes (gpus_per_node={gpus_per_node})"]
    per_node = engines_per_node(vllm_tp, gpus_per_node)
    if engines > engine_nodes * per_node:
        return [f"{engines} engines x vllm_tp {vllm_tp} = {engines * vllm_tp} GPUs do not fit "
                f"on {engine_nodes} engine node(s) x {gpus_per_node} GPUs: {per_node} engine(s) "
                f"a node (an engine stays within one node), {engine_nodes * per_node} at most"]
    return []


def fits(shape: Shape, layout: Layout, work: Workload, gpu_memory_gib: float) -> bool:
    """True when the layout is valid and its peak per-GPU memory is within gpu_memory_gib."""
    return (not layout_problems(shape, layout)
            and memory(shape, layout, work).peak <= gpu_memory_gib * GIB)


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    gpu_memory: int = field(repr=False)

    @property
    def max_rollout_seqs(self) -> int:
        """Full-length sequences one vLLM engine's KV cache could hold in the room left."""
        return max(0, (self.gpu_memory - self.memory.resident) // self.memory.kv_per_seq)


def suggest_layouts(shape: Shape, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                    work: Workload, engines: int = 0, vllm_tp: int = 1) -> list[Plan]:
    """Every layout of nodes x gpus_per_node GPUs that fits, cheapest first.

    tp and vllm_tp range over 1, 2, 4, 8 within a node; pp over divisors of the layer count;
    cp over powers of two; dp takes the rest. Cheapest first means: the smallest model-parallel
    group tp*pp*cp (the most data-parallel replicas and the least communication per token), then
    the smallest pp (pipeline bubbles), then the smallest cp (ring attention traffic), then the
    smallest tp. Each training layout is listed once, with the smallest vllm_tp that fits (more,
    smaller engines generate more tokens per GPU). Disaggregated (engines > 0), the nodes are
    the trainer's, no vLLM memory is on them and vllm_tp stays as given (see engine_memory).
    """
    world = nodes * gpus_per_node
    vtps = [vllm_tp] if engines else [v for v in TP_SIZES if v <= gpus_per_node]
    plans = []
    for tp in (t for t in TP_SIZES if t <= gpus_per_node):
        for pp in (p for p in range(1, shape.layers + 1) if shape.layers % p == 0):
            cp = 1
            while tp * pp * cp <= world:
                if world % (tp * pp * cp) == 0:
                    for vtp in vtps:
                        lay = Layout(tp, pp, cp, world // (tp * pp * cp), vtp, engines)
                        if layout_problems(shape, lay, gpus_per_node):
                            continue
                        mem = memory(shape, lay, work)
                        if mem.peak <= gpu_memory_gib * GIB:
                            plans.append(Plan(lay, mem, int(gpu_memory_gib * GIB)))
                            break
                cp *= 2
    return sorted(plans, key=lambda p: (p.layout.tp * p.layout.pp * p.layout.cp, p.layout.pp,
                                        p.layout.cp, p.layout.tp))


# ------------------------------------------------------------------------------------------- CLI

_COLUMNS = ("tp", "pp", "cp", "dp", "vtp", "weights", "grads", "optim", "activ", "logits",
            "vllm_w", "kv", "train", "rollout", "peak", "max_seqs")


def _row(plan: Plan) -> list[str]:
    lay, m = plan.layout, plan.memory
    gib = [x / GIB for x in (m.weights, m.grads, m.optimizer, m.activations, m.logits,
                             m.vllm_weights, m.kv_cache, m.train, m.rollout, m.peak)]
    return ([str(x) for x in (lay.tp, lay.pp, lay.cp, lay.dp, lay.vllm_tp)]
            + [f"{x:.1f}" for x in gib] + [str(plan.max_rollout_seqs)])


def format_table(plans: list[Plan]) -> str:
    """A fixed-width table; memory columns in GiB per GPU, for the stage with the highest peak."""
    rows = [list(_COLUMNS)] + [_row(p) for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


_TRAINER_COLUMNS = ("tp", "pp", "cp", "dp", "weights", "grads", "optim", "activ", "logits", "peak")
_ENGINE_COLUMNS = ("vtp", "engines", "gpus", "nodes", "weights", "kv", "peak", "max_seqs")


def _fixed_width(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def format_trainer_table(plans: list[Plan]) -> str:
    """Disaggregated: the trainer's GPUs, which hold no vLLM memory (GiB per GPU)."""
    rows = [list(_TRAINER_COLUMNS)]
    for plan in plans:
        lay, m = plan.layout, plan.memory
        rows.append([str(x) for x in (lay.tp, lay.pp, lay.cp, lay.dp)]
                    + [f"{x / GIB:.1f}" for x in (m.weights, m.grads, m.optimizer, m.activations,
                                                  m.logits, m.peak)])
    return _fixed_width(rows)


def format_engine_table(fleets: list[tuple[int, int, EngineMemory]], gpus_per_node: int,
                        gpu_memory: int) -> str:
    """Disaggregated: one GPU of an engine, for each (engines, nodes, memory) (GiB per GPU;
    max_seqs = full-length sequences an engine's KV cache could hold)."""
    rows = [list(_ENGINE_COLUMNS)]
    for engines, nodes, m in fleets:
        rows.append([str(x) for x in (m.vllm_tp, engines, engines * m.vllm_tp, nodes)]
                    + [f"{x / GIB:.1f}" for x in (m.weights, m.kv_cache, m.peak)]
                    + [str(m.max_seqs(gpu_memory))])
    return _fixed_width(rows)


# Built-in values of the knobs a --config file can also set; an explicit flag beats both.
_BUILTIN = dict(tp=None, pp=1, cp=1, vllm_tp=1, prompt_len=2048, response_len=20480, micro_batch=1,
                recompute="full", rollout_mode="colocated")


def _parser() -> argparse.ArgumentParser:
    from megatron_rlvr.safety import OneLineParser

    p = OneLineParser(
        prog="python -m megatron_rlvr plan",
        description="Per-GPU memory of an RLVR run (Megatron policy + colocated vLLM) and the "
                    "layouts that fit. With --config, checks the layout, lengths and batch sizes "
                    "of a trainer config (flags override it); with --tp, checks that one layout; "
                    "otherwise lists the layouts of --nodes x --gpus-per-node that fit, cheapest "
                    "first. A layout that does not fit is followed by the ones that do. With "
                    "--rollout-mode disaggregated, --nodes are the trainer's (no vLLM on them) "
                    "and --engines vLLM engines of --vllm-tp GPUs get --engine-nodes of their own.")
    p.add_argument("--config", help="trainer YAML: layout from parallel.* and rollout.vllm_tp, "
                                    "lengths from rollout.*, micro-batch from trainer.*, rollout "
                                    "mode and engines from rollout.mode/engines, model from "
                                    "model.hf_dir/config.json unless --hf-config is given")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=8")
    p.add_argument("--hf-config", help="the model's Hugging Face config.json")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes of the trainer (torchrun); with colocated rollout, every node")
    p.add_argument("--rollout-mode", choices=("colocated", "disaggregated"),
                   help="colocated (default): a vLLM engine shares the trainer's GPUs; "
                        "disaggregated: the engines have GPUs of their own")
    p.add_argument("--engines", type=int,
                   help="disaggregated: vLLM engines (default: as many as --engine-nodes hold)")
    p.add_argument("--engine-nodes", type=int,
                   help="disaggregated: nodes of --gpus-per-node GPUs for the engines (default: "
                        "the fewest that hold them, each engine within one node)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--tp", type=int, help="check this one layout (with --pp, --cp, --vllm-tp)")
    p.add_argument("--pp", type=int)
    p.add_argument("--cp", type=int)
    p.add_argument("--vllm-tp", type=int)
    p.add_argument("--prompt-len", type=int, help="default 2048")
    p.add_argument("--response-len", type=int, help="default 20480")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    p.add_argument("--max-tokens-per-micro-batch", type=int,
                   help="token budget of a packed micro-batch (default: --micro-batch full-length "
                        "sequences)")
    p.add_argument("--recompute", choices=("full", "none"), help="default full")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--num-microbatches", type=int,
                   help="per DP rank per step (default: from --config's batch sizes, else >= pp)")
    p.add_argument("--rollout-seqs-per-gpu", type=int, default=4,
                   help="full-length sequences in flight per GPU of a vLLM engine (sizes its KV cache)")
    p.add_argument("--overhead-gib", type=float, default=4.0)
    p.add_argument("--suggest", action="store_true",
                   help="after checking a layout, list the layouts that fit even if it fits")
    p.add_argument("--top", type=int, default=15, help="rows to print when suggesting")
    return p


def _positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def _from_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Fill unset flags from the trainer config; return the HF config path to plan."""
    from megatron_rlvr.config import ConfigError, data_parallel_size, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    par, r, t = cfg.parallel, cfg.rollout, cfg.trainer
    given = dict(tp=par.tp, pp=par.pp, cp=par.cp, vllm_tp=r.vllm_tp, rollout_mode=r.mode,
                 prompt_len=r.max_prompt_length, response_len=r.max_response_length,
                 micro_batch=t.micro_batch_size,
                 max_tokens_per_micro_batch=t.max_tokens_per_micro_batch or None,
                 recompute="full" if cfg.model.recompute_activations else "none")
    for name, value in given.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.engines is None and args.rollout_mode == r.mode == "disaggregated":
        args.engines = r.engines
    args.no_sequence_parallel = args.no_sequence_parallel or not par.sequence_parallel
    if args.num_microbatches is None:
        par.tp, par.pp, par.cp = args.tp, args.pp, args.cp      # as the flags say
        try:
            dp = data_parallel_size(cfg, args.nodes * args.gpus_per_node)
        except ConfigError as e:
            p.error(str(e))
        seqs = t.ppo_mini_batch_size * r.n // dp
        if args.max_tokens_per_micro_batch:  # worst case: every sequence full-length
            per_mb = max(1, args.max_tokens_per_micro_batch // (args.prompt_len + args.response_len))
            args.num_microbatches = max(1, -(-seqs // per_mb))
        else:
            args.num_microbatches = seqs // args.micro_batch
    if args.hf_config is not None:
        return args.hf_config
    path = os.path.join(cfg.model.hf_dir, "config.json")
    if not os.path.exists(path):
        p.error(f"model.hf_dir {cfg.model.hf_dir!r} has no config.json here; pass --hf-config "
                "(e.g. examples/configs/hf/qwen3-14b-base.json)")
    return path


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.overrides and args.config is None:
        p.error(f"config overrides {args.overrides} need --config")
    _positive(p, args, "nodes", "gpus_per_node", "gpu_memory_gib", "tp", "pp", "cp", "vllm_tp",
              "prompt_len", "response_len", "micro_batch", "max_tokens_per_micro_batch",
              "num_microbatches", "rollout_seqs_per_gpu", "top", "engines", "engine_nodes")
    hf_config = _from_config(p, args) if args.config else args.hf_config
    if hf_config is None:
        p.error("give --config or --hf-config")
    for name, value in _BUILTIN.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    disaggregated = args.rollout_mode == "disaggregated"
    if not disaggregated and (args.engines is not None or args.engine_nodes is not None):
        p.error("--engines and --engine-nodes need --rollout-mode disaggregated")
    if disaggregated:
        _place_engines(p, args)
    try:
        with open(hf_config) as f:
            cfg = json.load(f)
    except OSError as e:
        p.error(f"cannot read --hf-config {hf_config}: {e.strerror}")
    except ValueError as e:  # bad JSON or undecodable bytes
        p.error(f"--hf-config {hf_config} is not valid JSON: {e}")
    try:
        shape = Shape.from_hf_config(cfg, hf_config)
    except ValueError as e:
        p.error(str(e))
    if disaggregated and shape.heads % args.vllm_tp:
        p.error(f"num_attention_heads={shape.heads} is not divisible by vllm_tp={args.vllm_tp}")
    work = Workload(seq_len=args.prompt_len + args.response_len, micro_batch=args.micro_batch,
                    micro_batch_tokens=args.max_tokens_per_micro_batch,
                    recompute=args.recompute == "full",
                    sequence_parallel=not args.no_sequence_parallel,
                    num_microbatches=args.num_microbatches,
                    rollout_seqs_per_gpu=args.rollout_seqs_per_gpu,
                    overhead_gib=args.overhead_gib)
    world = args.nodes * args.gpus_per_node
    n = total_params(shape)
    gpus = f"{args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_memory_gib:g} GiB"
    if disaggregated:
        gpus = (f"trainer {gpus}, {args.engines} vLLM engines of tp {args.vllm_tp} on "
                f"{args.engine_nodes} x {args.gpus_per_node} more")
    print(f"{hf_config}: {n / 1e9:.2f}B parameters ({n:,}); {gpus}; sequences of "
          f"{work.seq_len} tokens, micro-batch "
          f"{f'of {work.micro_batch_tokens} tokens' if work.micro_batch_tokens else work.micro_batch}"
          f", recompute {args.recompute}, "
          f"sequence parallel {'on' if work.sequence_parallel else 'off'}, "
          f"{work.rollout_seqs_per_gpu} full-length rollout sequences per vLLM GPU")
    engines = args.engines if disaggregated else 0
    table = format_trainer_table if disaggregated else format_table
    if disaggregated:
        print(f"trainer (torchrun, NNODES x GPUS_PER_NODE): {args.nodes} x {args.gpus_per_node} "
              f"= {world} ranks; no vLLM weights or KV cache on them")
    if args.tp is not None:
        mp = args.tp * args.pp * args.cp
        if world % mp:
            p.error(f"tp*pp*cp={mp} does not divide {world} GPUs")
        lay = Layout(args.tp, args.pp, args.cp, world // mp, args.vllm_tp, engines)
        problems = layout_problems(shape, lay, args.gpus_per_node)
        if problems:
            p.error("; ".join(problems))
        plan = Plan(lay, memory(shape, lay, work), int(args.gpu_memory_gib * GIB))
        print(table([plan]))
        ok = plan.memory.peak <= plan.gpu_memory
        print(f"stage {plan.memory.stage}: {plan.memory.params:,} parameters per GPU, "
              f"{work.num_microbatches or 'pp'} micro-batches per DP rank per optimizer step; "
              f"peak {plan.memory.peak / GIB:.1f} GiB -> " + ("fits" if ok else "DOES NOT FIT"))
        if not ok or args.suggest:
            print("layouts that fit:" if not ok else "other layouts that fit:")
            _suggest(shape, args, work, engines)
    else:
        ok = _suggest(shape, args, work, engines) == 0
    if disaggregated:
        ok = _engines_fit(shape, args, work) and ok
    return 0 if ok else 1


def _place_engines(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Disaggregated: fill --engines / --engine-nodes from each other; refuse what cannot be
    placed (an engine within one node, all of them on the engine nodes)."""
    per_node = engines_per_node(args.vllm_tp, args.gpus_per_node)
    if args.engines is None:
        if args.engine_nodes is None:
            p.error("--rollout-mode disaggregated needs --engines or --engine-nodes "
                    "(or rollout.engines in --config)")
        args.engines = args.engine_nodes * per_node
    if args.engine_nodes is None:
        args.engine_nodes = max(1, engine_nodes_needed(args.engines, args.vllm_tp,
                                                       args.gpus_per_node))
    problems = engine_problems(args.engines, args.vllm_tp, args.engine_nodes, args.gpus_per_node)
    if problems:
        p.error("; ".join(problems))


def _engines_fit(shape: Shape, args: argparse.Namespace, work: Workload) -> bool:
    """Disaggregated: print one engine GPU's memory; with --suggest, or if it does not fit, the
    vllm_tp choices on the same engine nodes. True when it fits."""
    gpu_memory = int(args.gpu_memory_gib * GIB)
    gpn, nodes = args.gpus_per_node, args.engine_nodes
    idle = nodes * gpn - args.engines * args.vllm_tp
    print(f"engines (Ray actors, ENGINE_NODES x GPUS_PER_NODE): {args.engines} x vllm_tp "
          f"{args.vllm_tp} = {args.engines * args.vllm_tp} GPUs on {nodes} x {gpn}, "
          f"{engines_per_node(args.vllm_tp, gpn)} engine(s) a node"
          + (f", {idle} GPU(s) idle" if idle else ""))
    mem = engine_memory(shape, args.vllm_tp, work)
    print(format_engine_table([(args.engines, nodes, mem)], gpn, gpu_memory))
    ok = mem.peak <= gpu_memory
    seqs = mem.max_seqs(gpu_memory)
    print(f"engine GPU: peak {mem.peak / GIB:.1f} GiB -> " + ("fits" if ok else "DOES NOT FIT")
          + f"; KV room for {seqs} full-length sequences an engine, {seqs * args.engines} in all")
    if not ok or args.suggest:
        options = []
        for vtp in (v for v in TP_SIZES if v <= gpn and shape.heads % v == 0):
            m = engine_memory(shape, vtp, work)
            if m.peak <= gpu_memory:
                options.append((nodes * engines_per_node(vtp, gpn), nodes, m))
        print(f"engine choices on the same {nodes} node(s) that fit:" if options
              else "no engine choice fits; try fewer rollout sequences per GPU")
        if options:
            print(format_engine_table(options, gpn, gpu_memory))
    return ok


def _suggest(shape: Shape, args: argparse.Namespace, work: Workload, engines: int = 0) -> int:
    plans = suggest_layouts(shape, args.nodes, args.gpus_per_node, args.gpu_memory_gib, work,
                            engines=engines, vllm_tp=args.vllm_tp)
    if not plans:
        print("no layout fits; try recompute, more nodes, a shorter response or fewer "
              "rollout sequences")
        return 1
    if engines:
        print(format_trainer_table(plans[:args.top]))
        print(f"{len(plans)} trainer layouts fit; cheapest first (smallest tp*pp*cp, then pp, "
              "cp, tp)")
        return 0
    print(format_table(plans[:args.top]))
    print(f"{len(plans)} layouts fit; cheapest first (smallest tp*pp*cp, then pp, cp, tp; "
          "each with its smallest vllm_tp that fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
