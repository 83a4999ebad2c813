"""Per-GPU parameter counts of our Megatron model (built on the meta device, no memory) against the
planner's, for real HF configs at given layouts. One process plays every pipeline stage in turn
through torch's fake process group, so a 32B model at tp=8 needs neither 8 processes nor memory.

usage: python tests/dist/planner_meta_params.py CONFIG.json:TP:PP ...   (exits 1 on a mismatch)
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_rlvr import planner, platform
from megatron_rlvr.models.builder import build_model
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.fast_exit import exit_now

platform.setup()
from megatron.core import parallel_state as ps  # noqa: E402

failed = False
for case in sys.argv[1:]:
    path, tp, pp = case.rsplit(":", 2)
    tp, pp = int(tp), int(pp)
    spec = read_model_spec(path)
    with open(path) as f:
        shape = planner.Shape.from_hf_config(json.load(f), path)
    for stage in range(pp):
        dist.init_process_group("fake", store=FakeStore(), rank=stage * tp, world_size=tp * pp)
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        with torch.device("meta"):
            model = build_model(spec, dtype=torch.bfloat16)
        ours = sum(p.numel() for p in model.parameters())
        planned = planner.stage_params(shape, tp, pp, stage)
        ok = ours == planned
        failed |= not ok
        print(f"{'OK' if ok else 'MISMATCH'} {path} tp={tp} pp={pp} stage={stage}: "
              f"megatron {ours:,} planner {planned:,}", flush=True)
        ps.destroy_model_parallel()
        dist.destroy_process_group()
exit_now(1 if failed else 0)  # without the interpreter's teardown
