"""`python -m torch.distributed.run ARGS`, ended without the interpreter's teardown on success.

tests/torchrun.py launches every multi-process test through this file: torchrun's own `main`,
unchanged (a failed worker still raises ChildFailedError: traceback and exit code 1), then
`fast_exit.exit_now(0)` once it has returned, which saves the launcher about half a CPU second.
"""
from torch.distributed.run import main

from megatron_rlvr.fast_exit import exit_now

if __name__ == "__main__":
    main()
    exit_now(0)
