import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory):
    """The README demo's starting point, made once per session (about a minute and a half): the
    data, the tokenizer and the warm-started tiny Qwen3, as `python -m megatron_rlvr demo` makes
    them (full settings). Returns the folder, which `demo --out-dir` reuses, and `prepare`'s
    result (model_dir, train_file, val_file, start accuracy)."""
    from megatron_rlvr import demo

    out = tmp_path_factory.mktemp("demo")
    return out, demo.prepare(str(out))
