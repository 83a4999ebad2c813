"""Run under torchrun (4 processes): Megatron checkpoints across layouts, conversion, resume.

    torchrun --nproc_per_node=4 tests/dist/checkpoint_roundtrip.py --work W --hf H... --mcore M...

`--mcore` are the checkpoints `hf-to-mcore` wrote from `--hf` at TP1 (one process). This script:

TP2×PP2: loads each, checks the model's parameter names/shapes against the dry run's formulas and
its logits against transformers (1e-4), saves it again (W/m2_i) and exports it (W/hf_tp2pp2_i);
converts the first model HF -> Megatron at TP2×PP2 (W/m_tp2pp2); trains a Policy 2 steps, saves
model + optimizer (W/policy) and a weights-only copy (W/policy_weights), takes step 3 (reference).

DP2×CP2 (TP1, PP1): loads W/m2_i, checks logits, saves W/m3_i, exports W/hf_cp2_i and
W/hf_from_tp2pp2; resumes the Policy from W/policy and takes step 3, which must equal the reference
(and differ from a resume with a fresh optimizer); refuses a checkpoint of another model.
Finally runs checkpoint_tools.verify on W/hf_cp2_0 at TP2×PP2.

The test compares every exported HF directory with its input bitwise.
"""
import argparse
import os
import shutil
from megatron_rlvr.fast_exit import exit_now


def last_stage_logits(model, spec, tokens):
    """Full logits on every rank of the last stage (None elsewhere)."""
    import torch
    from megatron.core import parallel_state

    from megatron_rlvr.models.pipeline import cp_gather, gather_vocab, run_micro_batches

    model.eval()
    with torch.no_grad():
        out = run_micro_batches([model], [{"input_ids": tokens}], lambda mb, lg: lg,
                                vocab_size=spec.vocab_size, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return cp_gather(gather_vocab(out[0], spec.vocab_size)).double()


def check_parity(model, spec, hf_dir, tokens, label):
    """`tokens` on the host: the model gets a device copy, transformers (host) the tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.core import parallel_state as ps
    from megatron_rlvr import platform

    logits = last_stage_logits(model, spec, tokens.to(platform.device()))
    if logits is None or ps.get_tensor_model_parallel_rank() or ps.get_data_parallel_rank() \
            or ps.get_context_parallel_rank():
        return  # one rank of the last stage checks
    logits = logits.cpu()
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = ref(input_ids=tokens).logits.double()
    d = (logits - ref_logits).abs().max().item()
    assert d < 1e-4, f"{label} {hf_dir}: logits differ from transformers by {d}"
    print(f"parity {label} {spec.architecture} tie={spec.tie_embeddings}: {d:.2e}", flush=True)


def check_shapes_against_dry_run(model, spec):
    """The dry run's Megatron shape formulas and stage split, against a real GPTModel stage."""
    from megatron.core import parallel_state

    from checkpoint_tools.dry_run import megatron_shape, stage_rules
    from megatron_rlvr.models.convert import _local_params

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    expected = {r.megatron: megatron_shape(spec, r.megatron, tp)
                for r in stage_rules(spec, pp, stage)}
    actual = {n: tuple(p.shape) for n, p in _local_params(model).items()}
    assert actual == expected, f"stage {stage}: dry run {expected} vs model {actual}"


def ce_loss(mb, logits):
    import torch
    from megatron.core import tensor_parallel

    from megatron_rlvr.models.pipeline import cp_slice

    labels, mask = cp_slice(mb["labels"]), cp_slice(mb["loss_mask"])
    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous())
    num = (losses.transpose(0, 1) * mask).sum()
    den = mask.sum().to(torch.int)
    return num, den, {"numerator": num.detach(), "denominator": den}


def micro_batches(tokens):
    """This DP rank's micro-batches of the host `tokens`, on the device."""
    import torch
    from megatron.core import parallel_state

    from megatron_rlvr import platform

    tokens = tokens.to(platform.device())
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    return [{"input_ids": tokens[i:i + 1], "labels": labels[i:i + 1], "loss_mask": mask[i:i + 1]}
            for i in range(tokens.shape[0]) if i % dp == rank]


def make_policy(spec, hf_dir):
    import torch

    from megatron_rlvr.policy import OptimConfig, Policy
    return Policy(spec, hf_dir, dtype=torch.float32,
                  optim=OptimConfig(lr=1e-3, weight_decay=0.1))


def weights(policy):
    return {n: t.clone() for n, t in policy.hf_weights()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--hf", nargs="+", required=True)
    p.add_argument("--mcore", nargs="+", required=True)
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from checkpoint_tools.convert import hf_to_mcore, mcore_to_hf
    from megatron_rlvr.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rlvr.models.builder import build_model
    from megatron_rlvr.models.hf_checkpoint import CheckpointError
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.parallel import init_distributed

    W = args.work
    specs = [read_model_spec(h) for h in args.hf]
    tokens = torch.randint(1, min(s.vocab_size for s in specs), (4, 32),
                           generator=torch.Generator().manual_seed(3))

    # ---------------------------------------------------------------- TP2 x PP2
    init_distributed(2, 2, 1)
    for i, (spec, hf, m1) in enumerate(zip(specs, args.hf, args.mcore)):
        model = build_model(spec)
        assert load_checkpoint(m1, [model], spec=spec) == {}
        check_shapes_against_dry_run(model, spec)
        check_parity(model, spec, hf, tokens, "tp2pp2")
        save_checkpoint(f"{W}/m2_{i}", [model], hf_dir=f"{m1}/hf")
        mcore_to_hf(m1, f"{W}/hf_tp2pp2_{i}", tp=2, pp=2, max_shard_bytes=200_000)
    hf_to_mcore(args.hf[0], f"{W}/m_tp2pp2", tp=2, pp=2)
    policy = make_policy(specs[0], args.hf[0])
    mbs = micro_batches(tokens)
    for _ in range(2):
        policy.train_step(mbs, ce_loss)
    save_checkpoint(f"{W}/policy", policy.model, hf_dir=args.hf[0], optimizer=policy.optimizer,
                    extra={"step": 2, "sampler": {"epoch": 0, "index": 8}})
    save_checkpoint(f"{W}/policy_weights", policy.model, hf_dir=args.hf[0])
    ref_loss = policy.train_step(mbs, ce_loss).loss
    ref_weights = weights(policy)
    del policy
    parallel_state.destroy_model_parallel()

    # ---------------------------------------------------------------- DP2 x CP2
    init_distributed(1, 1, 2)
    for i, (spec, hf) in enumerate(zip(specs, args.hf)):
        model = build_model(spec)
        load_checkpoint(f"{W}/m2_{i}", [model], spec=spec)
        check_shapes_against_dry_run(model, spec)
        check_parity(model, spec, hf, tokens, "dp2cp2")
        save_checkpoint(f"{W}/m3_{i}", [model], hf_dir=f"{W}/m2_{i}/hf")
        mcore_to_hf(f"{W}/m3_{i}", f"{W}/hf_cp2_{i}", cp=2)
    mcore_to_hf(f"{W}/m_tp2pp2", f"{W}/hf_from_tp2pp2", cp=2)

    def resume(label):
        policy = make_policy(specs[0], args.hf[0])
        mbs = micro_batches(tokens)
        extra = load_checkpoint(f"{W}/policy", policy.model, spec=specs[0],
                                optimizer=policy.optimizer)
        assert extra == {"step": 2, "sampler": {"epoch": 0, "index": 8}}, extra
        loss = policy.train_step(mbs, ce_loss).loss
        resumed = max_diff(weights(policy), ref_weights)
        if dist.get_rank() == 0:
            print(f"resume {label}: loss {loss:.6f} (reference {ref_loss:.6f}), weights max "
                  f"diff {resumed:.2e}", flush=True)
        return loss, resumed, mbs

    # Saved at TP2×PP2: the optimizer state reshards (the gradients' reduction order differs
    # between layouts, hence a tolerance).
    loss, resumed, mbs = resume("TP2xPP2 -> DP2xCP2")
    assert abs(loss - ref_loss) < 1e-5, f"resumed step 3 loss {loss} vs {ref_loss}"
    assert resumed < 1e-5, f"resumed step 3 weights differ by {resumed}"
    fresh = make_policy(specs[0], args.hf[0])
    load_checkpoint(f"{W}/policy_weights", fresh.model, spec=specs[0], optimizer=fresh.optimizer)
    assert abs(fresh.train_step(mbs, ce_loss).loss - ref_loss) < 1e-5  # same weights at step 2
    restarted = max_diff(weights(fresh), ref_weights)
    assert restarted > 100 * max(resumed, 1e-7), \
        f"a fresh optimizer gave the same step as the resumed one ({restarted} vs {resumed})"
    if dist.get_rank() == 0:
        print(f"resume with a fresh optimizer instead: weights max diff {restarted:.2e}",
              flush=True)
    del fresh

    # A checkpoint of another model: refused before any tensor is read.
    other = build_model(specs[1])
    try:
        load_checkpoint(f"{W}/m3_0", [other], spec=specs[1])
        raise AssertionError("loaded a checkpoint of another model")
    except CheckpointError as e:
        assert "checkpoint is for model" in str(e) and "you are loading" in str(e), e
    # A checkpoint whose stored config names another model than its tensors: clear error.
    bad = f"{W}/mismatched"
    if dist.get_rank() == 0:
        shutil.copytree(f"{W}/m3_0", bad)
        shutil.copy(os.path.join(args.hf[-1], "config.json"), f"{bad}/hf/config.json")
    dist.barrier()
    try:
        mcore_to_hf(bad, f"{W}/never", cp=2)
        raise AssertionError("exported a checkpoint whose tensors do not fit its config")
    except CheckpointError as e:
        assert "its tensors do not fit" in str(e), e
        if dist.get_rank() == 0:
            print(f"mismatched checkpoint error: {str(e)[:300]}", flush=True)
    parallel_state.destroy_model_parallel()

    # ---------------------------------------------------------------- DP4
    init_distributed(1, 1, 1)
    loss, resumed, _ = resume("TP2xPP2 -> DP4")
    assert abs(loss - ref_loss) < 1e-5 and resumed < 1e-5, (loss, ref_loss, resumed)
    if dist.get_rank() == 0:
        print("checkpoint_roundtrip OK", flush=True)

    # checkpoint_tools.verify on the export written at DP2×CP2, run at TP2×PP2 (it ends the
    # process group).
    from checkpoint_tools import verify
    parallel_state.destroy_model_parallel()
    assert verify.main(["--hf-dir", f"{W}/hf_cp2_0", "--tp", "2", "--pp", "2"]) == 0


if __name__ == "__main__":  # Megatron's checkpoint save starts a helper that re-imports this file
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
