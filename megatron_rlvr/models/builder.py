"""A Megatron-Core GPTModel for a `ModelSpec`, on this rank's pipeline stage.

Transformer-Engine's layer spec where TE imports (GPU images); otherwise Megatron's local spec with
our context-parallel core attention (`platform.attention`). Fusions that need CUDA kernels are off
on CPU; everything else is Megatron's own code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rlvr import platform
from megatron_rlvr.models.spec import ModelSpec, check_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transformer_config(spec: ModelSpec, *, tp: int = 1, pp: int = 1, cp: int = 1,
                       dtype: torch.dtype = torch.float32, recompute: bool = False,
                       sequence_parallel: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = platform.has_cuda()
    if sequence_parallel and not platform.has_transformer_engine():
        raise ValueError("parallel.sequence_parallel needs Transformer-Engine (GPU image); "
                         "Megatron's torch RMSNorm does not support it")
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Weights come from the HF checkpoint, but initialisation must still run: it is where
        # Megatron marks tensor-parallel weights (`tensor_model_parallel`), which the optimizer's
        # grad norm and the checkpoint sharding rely on.
        perform_initialization=True,
        # Parameters are created where they compute: on the host only when the device is the host.
        # A meta build (`with torch.device("meta")`: counting parameters, no memory) takes the
        # host path too: the device path names the device explicitly, which overrides the meta
        # context (real allocation) and needs the CUDA RNG tracker seeded.
        use_cpu_initialization=platform.host_device() or torch.get_default_device().type == "meta",
        # Per-token loss accounting: our loss functions return (numerator, denominator) and
        # finalize_model_grads divides once by the global denominator (see models/train_step.py).
        calculate_per_token_loss=True,
        # CUDA-only fusions.
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        batch_p2p_comm=on_gpu,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def layer_spec(spec: ModelSpec):
    if platform.has_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_rlvr.platform.attention import ContextParallelAttention

    layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return layer


def build_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, recompute: bool = False,
                sequence_parallel: bool = False):
    """This rank's GPTModel stage (parallel groups must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    check_layout(spec, tp, pp, cp)
    config = transformer_config(spec, tp=tp, pp=pp, cp=cp, dtype=dtype, recompute=recompute,
                                sequence_parallel=sequence_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec),
        vocab_size=spec.padded_vocab_size(tp),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
    )
    if not platform.host_device() and torch.get_default_device().type != "meta":
        model.to(platform.device())  # a no-op for what Megatron already made on the device
    return model
