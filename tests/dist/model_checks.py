"""Run under torchrun: parity with transformers, export roundtrip and training, for each layout.

    torchrun --nproc_per_node=N tests/dist/model_checks.py --layouts TxPxC[:I+J],... --out DIR DIRS

The layouts (tensor x pipeline x context parallel sizes) run in turn in one launch, the parallel
groups re-formed between them; every line a layout prints starts with its tag, `[tp2 pp2 cp1]`,
and so do its assertion messages. For each layout and every HF model directory: build our
Megatron model at the layout, load the weights, compare logits and next-token log-probs with
transformers (float32) at 1e-4; stream the weights back to HF names and compare them bitwise
with the safetensors files. For the first model, also train 5 steps with Megatron DDP +
distributed optimizer on a fixed batch and write the losses to DIR/losses_tp{T}_pp{P}_cp{C}.json
so the test can compare trajectories across layouts. For the models a layout's `:I+J` suffix
names (positions in DIRS; --step-models without a suffix; tests/test_models.py: the tied Qwen3,
and the untied Llama at TP2), one optimizer step against transformers autograd: the weights
after the step equal, to 1e-5, w - lr·g/(|g| + eps) with g the float64 gradient of the same
token-mean cross-entropy in transformers (Adam's first step without weight decay, bias-corrected;
eps = 1 makes it a smooth function of the gradient rather than its sign; no clipping).
"""
import argparse
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_rlvr import platform
from megatron_rlvr.models.builder import build_model
from megatron_rlvr.models.convert import iter_hf_weights, load_hf_weights
from megatron_rlvr.models.pipeline import cp_gather, cp_slice, gather_vocab, run_micro_batches
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now


def reference(hf_dir, tokens):
    """transformers' logits on the host (float64), for host `tokens`."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def check_parity(hf_dir, spec, tokens):
    from megatron.core import parallel_state
    model = build_model(spec, dtype=torch.float32)
    load_hf_weights(model, spec, hf_dir)
    model.eval()
    with torch.no_grad():
        out = run_micro_batches([model], [{"input_ids": tokens}], lambda mb, lg: lg,
                                vocab_size=spec.vocab_size, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        # Our logits come back from the device; transformers runs on the host.
        logits = cp_gather(gather_vocab(out[0], spec.vocab_size)).double().cpu()
        tokens = tokens.cpu()
        ref = reference(hf_dir, tokens)
        d = (logits - ref).abs().max().item()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])
        lp_ref = torch.log_softmax(ref[:, :-1], -1).gather(-1, tokens[:, 1:, None])
        d_lp = (lp - lp_ref).abs().max().item()
        assert d < 1e-4 and d_lp < 1e-4, f"{TAG}{hf_dir}: logits diff {d}, logprob diff {d_lp}"
        print(f"{TAG}parity {spec.architecture} tie={spec.tie_embeddings}: logits {d:.2e} "
              f"logprobs {d_lp:.2e}", flush=True)
    return model


def check_export(hf_dir, spec, model):
    original = load_file(f"{hf_dir}/model.safetensors")
    seen = set()
    for name, tensor in iter_hf_weights(model, spec):
        assert name not in seen, f"{TAG}{name} exported twice"
        seen.add(name)
        assert name in original, f"{TAG}exported unexpected tensor {name}"
        tensor = tensor.cpu()  # exported from the device; the safetensors file is on the host
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), \
            f"{TAG}{name} differs after the roundtrip"
    missing = set(original) - seen
    assert not missing, f"{TAG}not exported: {sorted(missing)}"


def ce_loss(mb, logits):
    """Token-mean cross-entropy of the next token, vocab-parallel (Megatron's own op)."""
    from megatron.core import tensor_parallel
    labels = cp_slice(mb["labels"])
    mask = cp_slice(mb["loss_mask"])
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                          labels.transpose(0, 1).contiguous())
    losses = losses.transpose(0, 1)
    num = (losses * mask).sum()
    den = mask.sum().to(torch.int)
    return num, den, {"numerator": num.detach(), "denominator": den}


def train(hf_dir, spec, tokens, steps=5):
    from megatron.core import parallel_state
    policy = Policy(spec, hf_dir, dtype=torch.float32, optim=OptimConfig(lr=1e-3, weight_decay=0.0))
    labels = torch.roll(tokens, -1, dims=1)
    mask = loss_mask(tokens)
    # Split the batch into micro-batches of one sequence over the data-parallel ranks.
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    mine = [i for i in range(tokens.shape[0]) if i % dp == dp_rank]
    mbs = [{"input_ids": tokens[i:i + 1], "labels": labels[i:i + 1], "loss_mask": mask[i:i + 1]}
           for i in mine]
    losses, norms = [], []
    for _ in range(steps):
        r = policy.train_step(mbs, ce_loss)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return losses, norms


STEP_LR, STEP_EPS = 0.05, 1.0


def loss_mask(tokens):
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    mask[1, 40:] = 0  # an uneven mask: token-mean must weigh sequences by their tokens
    return mask


def check_one_step(hf_dir, spec, tokens):
    """Weights after one step of our policy (this layout) against transformers autograd."""
    import time

    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    start = time.time()
    policy = Policy(spec, hf_dir, dtype=torch.float32,
                    optim=OptimConfig(lr=STEP_LR, weight_decay=0.0, grad_clip=1e9,
                                      adam_eps=STEP_EPS))
    labels = torch.roll(tokens, -1, dims=1)
    mask = loss_mask(tokens)
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    mbs = [{"input_ids": tokens[i:i + 1], "labels": labels[i:i + 1], "loss_mask": mask[i:i + 1]}
           for i in range(tokens.shape[0]) if i % dp == dp_rank]
    r = policy.train_step(mbs, ce_loss)
    assert not r.skipped
    got = {n: t.cpu() for n, t in policy.hf_weights()}

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).double()
    ids, lab, m = tokens.cpu(), labels.cpu(), mask.cpu().double()
    logp = torch.log_softmax(hf(input_ids=ids).logits, -1).gather(-1, lab[..., None])[..., 0]
    loss = -(logp * m).sum() / m.sum()
    loss.backward()
    assert abs(loss.item() - r.loss) < 1e-5, (TAG, loss.item(), r.loss)
    worst, moved = 0.0, 0.0
    for name, p in hf.named_parameters():
        if name not in got:  # a tied lm_head is the embedding
            continue
        want = p.detach() - STEP_LR * p.grad / (p.grad.abs() + STEP_EPS)
        worst = max(worst, (got[name].double() - want).abs().max().item())
        moved = max(moved, (want - p.detach()).abs().max().item())
    assert len(got) == len({n for n, _ in hf.named_parameters()} & set(got))
    assert worst < 1e-5 and moved > 1e-3, f"{TAG}{hf_dir}: weights off by {worst} (step {moved})"
    if dist.get_rank() == 0:
        print(f"{TAG}one step {spec.architecture} tie={spec.tie_embeddings}: weights within "
              f"{worst:.1e} of transformers autograd (largest change {moved:.1e}; "
              f"{time.time() - start:.1f} s)", flush=True)
    del policy


TAG = ""  # the layout being checked, "[tp2 pp2 cp1] ": prefixes its lines and messages


def main():
    global TAG
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="1x1x1",
                   help="comma-separated TPxPPxCP layouts, checked in turn in this launch, each "
                        "optionally with :I+J, its --step-models")
    p.add_argument("--out", required=True, help="directory for losses_tp{T}_pp{P}_cp{C}.json")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--step-models", default="0", help="comma-separated positions in DIR...")
    p.add_argument("dirs", nargs="+")
    args = p.parse_args()
    for layout in args.layouts.split(","):
        layout, _, steps = layout.partition(":")
        steps = steps.replace("+", ",") if steps else args.step_models
        step_models = {int(x) for x in steps.split(",") if x}
        tp, pp, cp = (int(x) for x in layout.split("x"))
        TAG = f"[tp{tp} pp{pp} cp{cp}] "
        check_layout(tp, pp, cp, args, step_models)
    destroy_distributed()


def check_layout(tp, pp, cp, args, step_models):
    from megatron.core import parallel_state

    init_distributed(tp, pp, cp, seed=0)
    if dist.get_rank() == 0:
        print(f"{TAG}begins", flush=True)
    dev = platform.device()  # the inputs live where the model does (cuda:<local rank> on a GPU)
    tokens = None
    result = {}
    for k, hf_dir in enumerate(args.dirs):
        spec = read_model_spec(hf_dir)
        gen = torch.Generator().manual_seed(7)
        # 1..: id 0 is the pad token. Drawn on the host (the same ids on every device), then moved.
        tokens = torch.randint(1, spec.vocab_size, (4, 48), generator=gen).to(dev)
        model = check_parity(hf_dir, spec, tokens)
        if not args.no_export:
            check_export(hf_dir, spec, model)
        del model
        if k == 0:
            result["losses"], result["grad_norms"] = train(hf_dir, spec, tokens)
        if k in step_models:
            check_one_step(hf_dir, spec, tokens)
    if dist.get_rank() == 0:
        with open(f"{args.out}/losses_tp{tp}_pp{pp}_cp{cp}.json", "w") as f:
            json.dump(result, f)
        print(f"{TAG}losses", result["losses"], flush=True)
    dist.barrier()
    parallel_state.destroy_model_parallel()  # the next layout forms its own groups


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
