"""Is this a GPU image with one torch, and vLLM, Transformer-Engine and apex built for it?

    python tests/gpu/image_check.py --imports-only   # docker build (no GPU there): imports only
    python tests/gpu/image_check.py                  # container start (tests/gpu/entrypoint.sh):
                                                     # imports + a tiny forward through each

Exit code 1 (and a FAIL line) on the first problem. `import vllm` alone proves nothing: the
package is lazy, its compiled kernels live in `vllm._C`, which fails to load (undefined symbols)
or misbehaves when built against another torch. The same holds for Transformer-Engine's
`transformer_engine_torch` extension and apex's `amp_C` / `fused_layer_norm_cuda`.
"""
from __future__ import annotations

import argparse
import sys


def fail(msg: str) -> None:
    print(f"FAIL image_check: {msg}", flush=True)
    sys.exit(1)


def check_one_torch() -> str:
    from importlib.metadata import PackageNotFoundError, distributions, requires

    from packaging.requirements import Requirement
    import torch

    torches = [d for d in distributions() if (d.metadata["Name"] or "").lower() == "torch"]
    if len(torches) != 1:
        fail(f"{len(torches)} torch distributions installed: "
             f"{[d.version for d in torches]}; the image must have exactly one")
    for pkg in ("vllm",):
        try:
            lines = requires(pkg) or []
        except PackageNotFoundError:
            fail(f"{pkg} is not installed")
        for line in lines:
            req = Requirement(line)
            if req.name.lower() == "torch" and (req.marker is None or req.marker.evaluate()) \
                    and not req.specifier.contains(torch.__version__, prereleases=True):
                fail(f"{pkg} requires {req} but the image has torch {torch.__version__}")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def imports() -> list[str]:
    found = [check_one_torch()]
    steps = [
        ("vllm._C", "import vllm, vllm._C; v = vllm.__version__"),
        ("transformer_engine.pytorch",
         "import transformer_engine, transformer_engine.pytorch; v = transformer_engine.__version__"),
        ("apex (amp_C, fused_layer_norm_cuda)",
         "import apex, amp_C, fused_layer_norm_cuda; v = 'ok'"),
        ("megatron.core", "import megatron.core; v = megatron.core.__version__"),
        ("megatron_rlvr", "import megatron_rlvr.policy, megatron_rlvr.rollout.vllm_engine; v = 'ok'"),
    ]
    for name, code in steps:
        scope: dict = {}
        try:
            exec(code, scope)  # noqa: S102 - our own fixed strings
        except Exception as e:
            fail(f"import {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        found.append(f"{name} {scope['v']}")
    return found


def forwards() -> list[str]:
    """One small computation through each compiled extension, against plain torch."""
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA device visible (run the container with --gpus)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = []

    import transformer_engine.pytorch as te
    layer = te.Linear(256, 512, bias=True, params_dtype=torch.bfloat16, device=dev)
    x = torch.randn(32, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    err = (y.float() - ref).abs().max().item()
    y.float().sum().backward()
    if not err < 0.1 or x.grad is None or not torch.isfinite(x.grad).all():
        fail(f"transformer_engine Linear: forward error {err} or bad gradient")
    out.append(f"TE Linear bf16 fwd+bwd max err {err:.1e}")

    x32 = torch.randn(16, 256, device=dev)
    w = torch.rand(256, device=dev) + 0.5
    ref = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    res = torch.empty_like(x32)
    torch.ops._C.rms_norm(res, x32, w, 1e-6)  # vLLM's own CUDA kernel
    err = (res - ref).abs().max().item()
    if not err < 1e-3:
        fail(f"vllm._C rms_norm: max error {err}")
    out.append(f"vLLM rms_norm kernel max err {err:.1e}")

    from apex.normalization import FusedRMSNorm
    norm = FusedRMSNorm(256, eps=1e-6).to(dev)
    with torch.no_grad():
        norm.weight.copy_(w)
    err = (norm(x32) - ref).abs().max().item()
    if not err < 1e-3:
        fail(f"apex FusedRMSNorm: max error {err}")
    out.append(f"apex FusedRMSNorm max err {err:.1e}")
    torch.cuda.synchronize()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--imports-only", action="store_true",
                   help="no GPU (docker build): import checks only")
    args = p.parse_args()
    found = imports()
    if not args.imports_only:
        found += forwards()
    print("PASS image_check: " + "; ".join(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
