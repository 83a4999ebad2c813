"""Typed run configuration: YAML file + dotted command-line overrides, validated at start-up.

One dataclass per section; every field carries its documentation in `metadata["help"]`, so
`describe_config()` can print a complete reference and the defaults never drift from the docs.
Defaults are the paper's DAPO recipe for Qwen3-14B-Base (DESIGN.md, "The method, precisely").

    cfg = load_config("examples/configs/qwen3_14b_top20.yaml", ["trainer.lr=2e-6"])

Mistakes fail before anything expensive starts, with the dotted path of the field: unknown keys
(with the nearest valid name), wrong types, out-of-range values and inconsistent sizes.
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` (no dot) as a string; learning rates are written that way.
    A key repeated in one mapping is an error (plain YAML keeps the last one silently, so a
    second `trainer:` section would replace the first with defaults)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first}, again on "
                        f"line {line})", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[0-9][0-9_]*[eE][-+]?[0-9]+
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class ConfigError(ValueError):
    """A configuration mistake; the message names the dotted field path."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    hf_dir: str = _f("", "Hugging Face checkpoint directory (config.json, weights, tokenizer). "
                         "Required.")
    dtype: Literal["float32", "bfloat16"] = _f("bfloat16", "Parameter/compute dtype of the policy.")
    recompute_activations: bool = _f(True, "Recompute activations in the backward pass to save "
                                           "memory (the paper's gradient checkpointing).")


@dataclass
class ParallelConfig:
    tp: int = _f(1, "Tensor-parallel size of the policy.")
    pp: int = _f(1, "Pipeline-parallel size of the policy.")
    cp: int = _f(1, "Context-parallel size of the policy. Data parallelism is derived: "
                    "world_size / (tp * pp * cp).")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tp > 1; GPU only).")


@dataclass
class RolloutConfig:
    n: int = _f(16, "Responses sampled per prompt (the GRPO group size G). At least 2.")
    temperature: float = _f(1.0, "Sampling temperature of training rollouts; also the temperature "
                                 "at which token entropies are computed.")
    top_p: float = _f(1.0, "Nucleus sampling threshold of training rollouts.")
    max_prompt_length: int = _f(2048, "Longest prompt in tokens (chat template included).")
    max_response_length: int = _f(20480, "Longest response in tokens.")
    prompt_overflow: Literal["truncate_left", "drop"] = _f(
        "truncate_left", "Prompts longer than max_prompt_length: keep their last tokens, or drop "
                         "them (counted).")
    vllm_tp: int = _f(1, "Tensor-parallel size of each vLLM engine.")
    gpu_memory_utilization: float = _f(0.6, "Fraction of GPU memory vLLM may take (weights + KV "
                                            "cache), shared with the colocated policy.")
    sync_bucket_mb: int = _f(512, "Size of the buckets in which weights stream from Megatron to "
                                  "vLLM after each step (MiB).")
    enforce_eager: bool = _f(False, "Disable CUDA graphs in vLLM (slower, less memory).")
    mode: Literal["colocated", "disaggregated"] = _f(
        "colocated", "colocated: a vLLM engine inside every trainer rank (or every vllm_tp "
                     "ranks), generation and training take turns. disaggregated: rollout.engines "
                     "vLLM engines as Ray actors on their own devices, driven by trainer rank 0; "
                     "weights stream to them over a process group (docs/disaggregated.md).")
    engines: int = _f(1, "disaggregated: number of vLLM engine actors (each on vllm_tp GPUs).")
    ray_address: str = _f("", "disaggregated: the Ray cluster to use ('auto', or host:port of "
                              "its head); empty = trainer rank 0 starts a local Ray and stops it "
                              "at exit.")
    max_staleness: int = _f(0, "disaggregated: how many policy versions a training batch may lag. "
                               "0 = synchronous (generate, train, sync); 1 = one-step-off: the "
                               "rollout of step k+1 runs while step k trains, with the weights "
                               "of step k-1; k = up to k rollouts ahead.")
    cpus_per_engine: float = _f(1.0, "disaggregated: Ray CPUs reserved for each engine actor.")


@dataclass
class RolloutCorrectionConfig:
    """`algorithm.rollout_correction`: train/inference mismatch correction (TIS / MIS).

    The rollout engine (vLLM) samples with its own numerics and, off-policy, with older weights;
    the importance weight w = exp(logp_old - logp_rollout) corrects the policy gradient for it
    (`algos/rollout_correction.py`, docs/method.md)."""
    enabled: bool | Literal["auto"] = _f(
        "auto", "Apply the correction: true, false, or auto = on when rollouts are off-policy "
                "(rollout.max_staleness > 0: batches made with older weights), off for "
                "synchronous rollouts (colocated, or disaggregated at max_staleness 0, where the "
                "engines hold the old policy's weights). Off = no weights and no mask are "
                "applied.")
    level: Literal["token", "sequence", "geometric"] = _f(
        "token", "Where the weight is taken: per token (w_t); per sequence (the product of its "
                 "tokens' w_t, the exact sequence likelihood ratio); or per sequence as the "
                 "geometric mean of its w_t (length-independent; wants a cap near 1, e.g. 1.01).")
    method: Literal["truncate", "mask"] = _f(
        "truncate", "truncate = TIS: weight min(w, cap), every token trains. mask = MIS: tokens "
                    "(or whole sequences) with w outside [1/cap, cap] leave the loss, numerator "
                    "and denominator; the rest keep weight w.")
    cap: float = _f(2.0, "C: the truncation cap (TIS) or the bounds [1/C, C] (MIS). > 1.")

    def active(self, off_policy: bool) -> bool:
        """Whether the correction applies: `enabled`, with auto resolved by `off_policy` (True
        when rollouts may come from other weights than the old policy's)."""
        return off_policy if self.enabled == "auto" else bool(self.enabled)


@dataclass
class AlgorithmConfig:
    clip_ratio_low: float = _f(0.2, "PPO clip: ratio lower bound is 1 - clip_ratio_low.")
    clip_ratio_high: float = _f(0.28, "PPO clip-higher: ratio upper bound is 1 + clip_ratio_high.")
    clip_ratio_c: float = _f(10.0, "Dual clip for negative advantages: loss <= -A * c. > 1.")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = _f(
        "token-mean", "How token losses are averaged: over all tokens of the mini-batch "
                      "(DAPO), or per sequence first.")
    overlong_buffer_enable: bool = _f(True, "DAPO overlong shaping: penalise responses longer "
                                            "than max_response_length - overlong_buffer_len.")
    overlong_buffer_len: int = _f(4096, "Tokens over which the overlong penalty ramps from 0 "
                                        "to -overlong_penalty_factor.")
    overlong_penalty_factor: float = _f(1.0, "Penalty at max_response_length.")
    dynamic_sampling: bool = _f(True, "DAPO dynamic sampling: drop prompts whose responses all "
                                      "got the same accuracy and generate more.")
    max_num_gen_batches: int = _f(10, "Generation rounds allowed per step before dynamic "
                                      "sampling gives up with an error.")
    entropy_top_ratio: float = _f(1.0, "Fraction rho of response tokens that receive policy "
                                       "gradient, chosen by entropy. 1.0 = full-token DAPO; "
                                       "0.2 = the paper's method. In (0, 1].")
    entropy_top_scope: Literal["micro_batch", "global"] = _f(
        "global", "Where the top-rho threshold is taken: over the whole mini-batch across ranks, "
                  "loss = token-mean over the mini-batch (the paper); or per micro-batch on each "
                  "rank, loss = the micro-batch's masked mean weighted by its sequences (the seed "
                  "code; use micro-batches of ~16-32 responses as its token budgets hold). At "
                  "rho = 1 both are DAPO's token-mean. See docs/method.md.")
    entropy_loss_norm: Literal["kept_tokens", "all_tokens"] = _f(
        "kept_tokens", "Loss denominator under entropy selection: the kept tokens (seed code) "
                       "or all response tokens.")
    entropy_select: Literal["top", "bottom", "random"] = _f(
        "top", "Which tokens are kept: highest entropy (the method), lowest entropy, or a "
               "random rho fraction (the paper's ablations).")
    rollout_correction: RolloutCorrectionConfig = field(
        default_factory=RolloutCorrectionConfig,
        metadata={"help": "Train/inference mismatch correction between vLLM's and the old "
                          "policy's log-probs (TIS/MIS); fields below, overridden as "
                          "algorithm.rollout_correction.FIELD=value."})


@dataclass
class TrainerConfig:
    train_batch_size: int = _f(512, "Prompts per RL step (after dynamic sampling).")
    gen_batch_size: int | None = _f(None, "Prompts per generation round; null = "
                                          "train_batch_size (filled in at load). The paper "
                                          "uses 3 x 512.")
    ppo_mini_batch_size: int = _f(32, "Prompts per optimizer step; an RL step makes "
                                      "train_batch_size / ppo_mini_batch_size optimizer steps.")
    micro_batch_size: int = _f(1, "Sequences per forward/backward on each data-parallel rank "
                                   "(when max_tokens_per_micro_batch is 0).")
    packing: bool = _f(True, "Concatenate a micro-batch's sequences without padding (THD, "
                             "cu_seqlens; each padded only to the parallel layout's length "
                             "multiple). false = pad every sequence to the batch's longest.")
    max_tokens_per_micro_batch: int = _f(
        0, "Token budget of a micro-batch on each data-parallel rank (the seed's "
           "ppo_max_token_len_per_gpu): sequences are spread over data-parallel ranks balanced on "
           "work, then packed into micro-batches of at most this many tokens, the same number on "
           "every rank. 0 = micro_batch_size sequences per micro-batch. Needs packing; must hold "
           "the longest sequence (max_prompt_length + max_response_length).")
    total_steps: int = _f(1000, "RL steps to train.")
    lr: float = _f(1e-6, "AdamW learning rate (constant after warm-up).")
    lr_warmup_steps: int = _f(10, "Linear warm-up length, in RL steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Gradient-norm clip; 0 disables.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_nonfinite_steps: int = _f(3, "Abort after this many consecutive optimizer steps with a "
                                     "NaN/inf loss or gradient (such steps are skipped).")
    seed: int = _f(42, "Seed of model-side randomness (init, sampling, random token selection).")
    collective_timeout_s: float = _f(
        1800.0, "A rank that waits this long without progress (in a collective whose peer died "
                "or hung) ends the run, naming the stalled rank (megatron_rlvr/watchdog.py). "
                "Must exceed the longest wait between ranks, e.g. rollout imbalance.")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "Training parquet files in verl's schema (data_source, "
                                    "prompt, reward_model.ground_truth, extra_info). Required.")
    val_files: list[str] = _f([], "Validation parquet files; each is reported separately.")
    prompt_key: str = _f("prompt", "Column holding the chat messages.")
    shuffle: bool = _f(True, "Shuffle the training prompts each epoch.")
    seed: int = _f(42, "Seed of the epoch permutations.")
    bad_rows: Literal["error", "skip"] = _f("error", "Malformed rows: stop with an error naming "
                                                     "file/row/field, or skip and count them.")


@dataclass
class RewardConfig:
    num_workers: int = _f(4, "Reward worker processes (math-verify is CPU-bound; ~100 MB each).")
    timeout_s: float = _f(5.0, "Per-response verification time limit; a response over it "
                               "scores 0 and its worker is replaced.")
    memory_limit_mb: int = _f(2048, "Address-space limit of each reward worker, so a "
                                    "pathological answer fails instead of exhausting RAM.")
    format: Literal["boxed", "answer", "auto"] = _f(
        "boxed", "Where the answer is read: the last \\boxed{} (the paper), DAPO's last "
                 "'Answer: ...' line, or \\boxed{} with 'Answer:' as fallback.")
    grader: Literal["math_verify", "seed"] = _f(
        "math_verify", "Answer checker: math-verify (LaTeX -> sympy), or the seed code's rules "
                       "(verl naive_dapo: string normalisation + sympy + math_equal; no box -> "
                       "the whole text after </think> is graded; needs format 'boxed'). "
                       "docs/method.md has their measured agreement.")
    backend: Literal["local", "ray"] = _f(
        "local", "Where responses are scored: local = worker processes of the scoring trainer "
                 "rank; ray = ray_actors Ray CPU actors (each with num_workers workers) beside "
                 "the engines; needs rollout.mode=disaggregated.")
    ray_actors: int = _f(1, "reward.backend=ray: number of reward actors.")


@dataclass
class EvalConfig:
    every_n_steps: int = _f(5, "Evaluate on data.val_files every this many steps; 0 = off.")
    n: int = _f(1, "Samples per prompt (avg@n and pass@n). The paper duplicates AIME24 32x "
                   "in the file instead.")
    temperature: float = _f(1.0, "Validation sampling temperature.")
    top_p: float = _f(0.7, "Validation nucleus sampling threshold.")
    max_response_length: int | None = _f(None, "Longest validation response; null = "
                                                "rollout.max_response_length (filled in at "
                                                "load).")
    at_start: bool = _f(True, "Evaluate once before training.")


@dataclass
class LoggingConfig:
    output_dir: str = _f("outputs/run", "Directory for metrics (JSONL), plots, tensorboard and "
                                        "checkpoints.")
    run_name: str = _f("megatron-rlvr", "Run name shown in wandb and tensorboard.")
    wandb: bool = _f(False, "Log to Weights & Biases.")
    wandb_project: str = _f("megatron-rlvr", "wandb project.")
    wandb_mode: Literal["online", "offline"] = _f("online", "wandb mode; offline needs no "
                                                            "network (sync later).")
    tensorboard: bool = _f(True, "Write tensorboard event files.")
    plots: bool = _f(True, "Write PNG plots of the main curves to output_dir.")


@dataclass
class CheckpointConfig:
    save_every: int = _f(5, "Save a checkpoint every this many steps (and at the end); 0 = off.")
    resume: str = _f("auto", "'auto' resumes from the latest checkpoint in output_dir if any, "
                             "'never' starts fresh, anything else is a checkpoint path.")
    keep_last: int = _f(2, "Checkpoints kept on disk; older ones are deleted. 0 = keep all.")
    export_hf_at_end: bool = _f(True, "Export the final policy as a Hugging Face checkpoint.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file at `path` (if any) <- `overrides` ("section.field=value", the value
    parsed as a YAML scalar/list), then validated. Raises ConfigError on any mistake."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ConfigError(f"config file {path!r} is not UTF-8 text: undecodable byte "
                              f"0x{data[e.start]:02x} on line {line}") from None
        try:
            stream = io.StringIO(text)
            stream.name = path  # named in YAML's error marks
            loaded = yaml.load(stream, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: "
                              + " ".join(str(e).split())) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r}: expected a mapping of sections, "
                              f"got {type(loaded).__name__}")
        raw = loaded or {}
    for ov in overrides:
        parts, value = _parse_override(ov)
        node = raw
        for depth, key in enumerate(parts[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:depth + 1])}: expected a mapping, "
                                  f"got {type(child).__name__}")
            node = child
        node[parts[-1]] = value
    cfg = _build(raw, source=path or "<overrides>")
    # Fill in derived defaults, so the trainer and the saved config see plain numbers.
    if cfg.trainer.gen_batch_size is None:
        cfg.trainer.gen_batch_size = cfg.trainer.train_batch_size
    if cfg.eval.max_response_length is None:
        cfg.eval.max_response_length = cfg.rollout.max_response_length
    validate(cfg)
    return cfg


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`section.field=value`, or `section.group.field=value` where `group` is a field holding a
    nested dataclass (e.g. algorithm.rollout_correction.cap=3): the key path and the value."""
    key, sep, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"bad override {text!r}: expected section.field=value, "
                          f"e.g. trainer.lr=1e-6")
    if len(parts) > 2:  # every inner name must be a group of fields
        cls = _field_types(Config).get(parts[0])
        for depth, name in enumerate(parts[1:-1], start=1):
            inner = _field_types(cls).get(name) if _is_group(cls) else None
            if not _is_group(inner):
                raise ConfigError(
                    f"bad override {text!r}: {'.'.join(parts[:depth + 1])} is not a group of "
                    f"fields; expected section.field=value (e.g. trainer.lr=1e-6) or "
                    f"section.group.field=value (e.g. algorithm.rollout_correction.cap=3)")
            cls = inner
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML "
                          f"({' '.join(str(e).split())})") from None
    return parts, parsed


def _is_group(tp: Any) -> bool:
    """A nested dataclass type (a section, or a group of fields inside one)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls) if _is_group(cls) else {}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"


def _build(raw: dict[str, Any], source: str) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for sname, values in raw.items():
        if sname not in sections:
            raise ConfigError(f"{source}: unknown section {sname!r}"
                              f"{_suggest(str(sname), list(sections))}")
        kwargs[sname] = _build_group(sname, sections[sname].default_factory, values)
    return Config(**kwargs)


def _build_group(path: str, cls: Any, values: Any) -> Any:
    """A section's (or nested group's) dataclass from its mapping; `path` is its dotted name."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for fname, value in values.items():
        if fname not in hints:
            raise ConfigError(f"unknown field {path}.{fname}{_suggest(str(fname), fields)}")
        checked[fname] = _check_type(f"{path}.{fname}", value, hints[fname])
    return cls(**checked)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a)
                          for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` where lossless (int -> float, str -> [str]), else raise."""
    if _is_group(tp):
        return value if isinstance(value, tp) else _build_group(path, tp, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(path, value, a)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {_type_name(tp)}")
    elif origin is list:
        if isinstance(value, str):  # `data.train_files=/x.parquet` from a command line
            value = [value]
        if isinstance(value, list):
            return [_check_type(f"{path}[{i}]", v, typing.get_args(tp)[0])
                    for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # `total_steps: 1e3`
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"{path}: unsupported field type {tp}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check ranges and cross-field consistency; raise ConfigError listing every problem."""
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    def positive(path: str, value: float) -> None:
        need(value > 0, f"{path} must be > 0, got {value}")

    def non_negative(path: str, value: float) -> None:
        need(value >= 0, f"{path} must be >= 0, got {value}")

    def unit(path: str, value: float, low_open: bool = False) -> None:
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
        need(ok, f"{path} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")

    m, p, r, a, t = cfg.model, cfg.parallel, cfg.rollout, cfg.algorithm, cfg.trainer
    need(bool(m.hf_dir), "model.hf_dir is required (a Hugging Face checkpoint directory)")
    for name in ("tp", "pp", "cp"):
        positive(f"parallel.{name}", getattr(p, name))
    need(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")

    need(r.n >= 2, f"rollout.n must be >= 2 (GRPO normalises within a group), got {r.n}")
    positive("rollout.temperature", r.temperature)
    unit("rollout.top_p", r.top_p, low_open=True)
    positive("rollout.max_prompt_length", r.max_prompt_length)
    positive("rollout.max_response_length", r.max_response_length)
    positive("rollout.vllm_tp", r.vllm_tp)
    unit("rollout.gpu_memory_utilization", r.gpu_memory_utilization, low_open=True)
    positive("rollout.sync_bucket_mb", r.sync_bucket_mb)

    unit("algorithm.clip_ratio_low", a.clip_ratio_low)
    non_negative("algorithm.clip_ratio_high", a.clip_ratio_high)
    need(a.clip_ratio_c > 1, f"algorithm.clip_ratio_c must be > 1, got {a.clip_ratio_c}")
    if a.overlong_buffer_enable:
        positive("algorithm.overlong_buffer_len", a.overlong_buffer_len)
        need(a.overlong_buffer_len <= r.max_response_length,
             f"algorithm.overlong_buffer_len ({a.overlong_buffer_len}) must be <= "
             f"rollout.max_response_length ({r.max_response_length})")
        non_negative("algorithm.overlong_penalty_factor", a.overlong_penalty_factor)
    positive("algorithm.max_num_gen_batches", a.max_num_gen_batches)
    unit("algorithm.entropy_top_ratio", a.entropy_top_ratio, low_open=True)

    positive("trainer.train_batch_size", t.train_batch_size)
    if t.gen_batch_size is not None:
        positive("trainer.gen_batch_size", t.gen_batch_size)
    gen = t.gen_batch_size or t.train_batch_size
    need(gen * a.max_num_gen_batches >= t.train_batch_size,
         f"trainer.gen_batch_size ({gen}) * algorithm.max_num_gen_batches "
         f"({a.max_num_gen_batches}) cannot reach trainer.train_batch_size "
         f"({t.train_batch_size}) even if no prompt is dropped")
    positive("trainer.ppo_mini_batch_size", t.ppo_mini_batch_size)
    positive("trainer.micro_batch_size", t.micro_batch_size)
    non_negative("trainer.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch)
    if t.max_tokens_per_micro_batch > 0:
        need(t.packing, "trainer.max_tokens_per_micro_batch needs trainer.packing: true")
        # Each sequence is padded to 2·cp (·tp with sequence parallelism): models/pipeline.py.
        multiple = (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)
        longest = -(-(r.max_prompt_length + r.max_response_length) // multiple) * multiple
        need(t.max_tokens_per_micro_batch >= longest,
             f"trainer.max_tokens_per_micro_batch ({t.max_tokens_per_micro_batch}) must hold the "
             f"longest sequence: rollout.max_prompt_length + max_response_length padded to a "
             f"multiple of {multiple} = {longest}")
    if t.train_batch_size > 0 and t.ppo_mini_batch_size > 0:
        need(t.train_batch_size % t.ppo_mini_batch_size == 0,
             f"trainer.train_batch_size ({t.train_batch_size}) must be divisible by "
             f"trainer.ppo_mini_batch_size ({t.ppo_mini_batch_size})")
    positive("trainer.total_steps", t.total_steps)
    positive("trainer.lr", t.lr)
    non_negative("trainer.lr_warmup_steps", t.lr_warmup_steps)
    non_negative("trainer.weight_decay", t.weight_decay)
    non_negative("trainer.grad_clip", t.grad_clip)
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(t, name)
        need(0 <= v < 1, f"trainer.{name} must be in [0, 1), got {v}")
    positive("trainer.adam_eps", t.adam_eps)
    positive("trainer.max_nonfinite_steps", t.max_nonfinite_steps)
    positive("trainer.collective_timeout_s", t.collective_timeout_s)

    need(r.mode == "disaggregated" or (r.max_staleness == 0 and cfg.reward.backend == "local"),
         "rollout.max_staleness > 0 and reward.backend=ray need rollout.mode=disaggregated "
         f"(got mode={r.mode!r}, max_staleness={r.max_staleness}, "
         f"reward.backend={cfg.reward.backend!r})")
    positive("rollout.engines", r.engines)
    non_negative("rollout.max_staleness", r.max_staleness)
    positive("rollout.cpus_per_engine", r.cpus_per_engine)
    positive("reward.ray_actors", cfg.reward.ray_actors)
    rc = a.rollout_correction
    need(rc.cap > 1, f"algorithm.rollout_correction.cap must be > 1 (the weights' bounds are "
                     f"[1/cap, cap]), got {rc.cap}")

    need(bool(cfg.data.train_files), "data.train_files is required (a list of parquet paths)")
    need(bool(cfg.data.prompt_key), "data.prompt_key must not be empty")

    positive("reward.num_workers", cfg.reward.num_workers)
    positive("reward.timeout_s", cfg.reward.timeout_s)
    need(cfg.reward.memory_limit_mb >= 256,
         f"reward.memory_limit_mb must be >= 256 (a worker needs ~100 MB to import "
         f"math-verify), got {cfg.reward.memory_limit_mb}")
    need(cfg.reward.grader != "seed" or cfg.reward.format == "boxed",
         f"reward.grader=seed reads answers as the seed does (the last \\boxed{{}}, else the "
         f"whole text); set reward.format=boxed, got {cfg.reward.format!r}")

    e = cfg.eval
    non_negative("eval.every_n_steps", e.every_n_steps)
    positive("eval.n", e.n)
    positive("eval.temperature", e.temperature)
    unit("eval.top_p", e.top_p, low_open=True)
    if e.max_response_length is not None:
        positive("eval.max_response_length", e.max_response_length)
    need((e.every_n_steps == 0 and not e.at_start) or bool(cfg.data.val_files),
         "eval is on (eval.every_n_steps > 0 or eval.at_start) but data.val_files is empty")

    need(bool(cfg.logging.output_dir), "logging.output_dir must not be empty")
    non_negative("checkpoint.save_every", cfg.checkpoint.save_every)
    non_negative("checkpoint.keep_last", cfg.checkpoint.keep_last)
    need(bool(cfg.checkpoint.resume), "checkpoint.resume must be 'auto', 'never' or a path")

    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """The data-parallel size for `world_size` ranks, checking that the batch sizes divide.

    Each optimizer step consumes ppo_mini_batch_size * n sequences, split evenly over the DP
    ranks in micro-batches of micro_batch_size sequences (with a token budget, micro-batches are
    cut by tokens and only the world size must divide).
    """
    p, t = cfg.parallel, cfg.trainer
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * pp * cp "
                          f"= {model_parallel}")
    dp = world_size // model_parallel
    seqs = t.ppo_mini_batch_size * cfg.rollout.n
    if t.max_tokens_per_micro_batch == 0 and seqs % (dp * t.micro_batch_size):
        raise ConfigError(
            f"a mini-batch of trainer.ppo_mini_batch_size * rollout.n = {seqs} sequences cannot "
            f"be split into micro-batches of trainer.micro_batch_size = {t.micro_batch_size} on "
            f"each of {dp} data-parallel ranks; make {seqs} divisible by "
            f"{dp * t.micro_batch_size}")
    return dp


# --------------------------------------------------------------------------- output


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (YAML/JSON serialisable) that `load_config` reads back identically."""
    return dataclasses.asdict(cfg)


def describe_config() -> str:
    """Every field with its type, default and documentation, section by section."""
    lines: list[str] = []

    def group(cls: Any, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_group(hints[f.name]):  # a nested group: its doc, then its fields indented
                lines.append(f"{indent}{f.name}: group (fields below)")
                lines.append(f"{indent}    {f.metadata['help']}")
                group(hints[f.name], indent + "  ")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            default_text = yaml.safe_dump(default, default_flow_style=True).strip()
            default_text = default_text.removesuffix("\n...").removesuffix(" ...")
            lines.append(f"{indent}{f.name}: {_type_name(hints[f.name])} = {default_text}")
            lines.append(f"{indent}    {f.metadata['help']}")

    for sect in dataclasses.fields(Config):
        lines.append(f"{sect.name}:")
        group(sect.default_factory, "  ")
    return "\n".join(lines)
