"""Moved to `megatron_rlvr.hf_export` (the library must not import `checkpoint_tools`); these
names stay importable from here for scripts written against the old location."""
from megatron_rlvr.hf_export import INDEX_FILE, plan_shards, write_sharded  # noqa: F401
