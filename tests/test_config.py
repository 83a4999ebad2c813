import glob
import os

import pytest
import yaml

from megatron_rlvr.config import (Config, ConfigError, config_to_dict, data_parallel_size,
                                  describe_config, load_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["model.hf_dir=/m", "data.train_files=[/t.parquet]", "data.val_files=[/v.parquet]"]


def _load(*overrides):
    return load_config(None, [*REQUIRED, *overrides])


def test_defaults_are_the_papers_dapo_recipe():
    c = _load()
    assert (c.rollout.n, c.rollout.max_response_length, c.rollout.max_prompt_length) == (16, 20480, 2048)
    assert (c.algorithm.clip_ratio_low, c.algorithm.clip_ratio_high, c.algorithm.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (c.algorithm.overlong_buffer_len, c.algorithm.max_num_gen_batches) == (4096, 10)
    assert (c.trainer.train_batch_size, c.trainer.ppo_mini_batch_size, c.trainer.lr) == (512, 32, 1e-6)
    assert (c.eval.top_p, c.eval.temperature) == (0.7, 1.0)
    assert c.algorithm.entropy_top_ratio == 1.0 and c.algorithm.entropy_top_scope == "global"
    # derived defaults are filled in at load
    assert (c.trainer.gen_batch_size, c.eval.max_response_length) == (512, 20480)


def test_yaml_then_overrides_applied(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hf_dir: /a}\ntrainer: {lr: 2e-6, total_steps: 7}\n"
                    "data: {train_files: [x.parquet], val_files: [v.parquet]}\n")
    c = load_config(str(path), ["trainer.lr=1e-5", "algorithm.entropy_top_ratio=0.2",
                                "data.train_files=/one.parquet", "trainer.gen_batch_size=null",
                                "eval.max_response_length=1024", "rollout.temperature=1"])
    assert c.trainer.lr == 1e-5 and c.trainer.total_steps == 7   # override wins, yaml kept
    assert c.algorithm.entropy_top_ratio == 0.2
    assert c.data.train_files == ["/one.parquet"]                   # a bare string -> one-item list
    assert c.trainer.gen_batch_size == 512 and c.eval.max_response_length == 1024
    assert c.rollout.temperature == 1.0 and isinstance(c.rollout.temperature, float)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `1e-6` as a string by default; learning rates are written exactly like that.
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 1e-6\n  adam_eps: 1e-8\n")
    c = load_config(str(path), REQUIRED)
    assert (c.trainer.lr, c.trainer.adam_eps) == (1e-6, 1e-8)


@pytest.mark.parametrize("override, expected", [
    ("trainer.lrr=1e-6", "unknown field trainer.lrr; did you mean 'lr'?"),
    ("algorithm.entropy_top_ration=0.2", "did you mean 'entropy_top_ratio'?"),
    ("trainr.lr=1e-6", "unknown section 'trainr'; did you mean 'trainer'?"),
    ("trainer.train_batch_size=abc", "trainer.train_batch_size: expected int, got str 'abc'"),
    ("trainer.train_batch_size=1.5", "trainer.train_batch_size: expected int, got float 1.5"),
    ("model.recompute_activations=1", "model.recompute_activations: expected bool, got int 1"),
    ("data.train_files=[1, 2]", "data.train_files[0]: expected str, got int 1"),
    ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode: 'mean' is not one of 'token-mean'"),
    ("algorithm.entropy_top_ratio=1.5", "algorithm.entropy_top_ratio must be in (0, 1], got 1.5"),
    ("algorithm.entropy_top_ratio=0", "algorithm.entropy_top_ratio must be in (0, 1], got 0"),
    ("trainer.ppo_mini_batch_size=30",
     "trainer.train_batch_size (512) must be divisible by trainer.ppo_mini_batch_size (30)"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size must be > 0, got 0"),
    ("rollout.n=1", "rollout.n must be >= 2"),
    ("algorithm.overlong_buffer_len=30000", "must be <= rollout.max_response_length (20480)"),
    ("trainer.gen_batch_size=10", "cannot reach trainer.train_batch_size (512)"),
    ("trainer.lr", "bad override 'trainer.lr': expected section.field=value"),
    ("lr=1e-6", "bad override 'lr=1e-6'"),
    ("trainer.optim.lr=1", "bad override 'trainer.optim.lr=1'"),
    ("trainer.lr=[1", "bad override 'trainer.lr=[1': value is not valid YAML"),
])
def test_config_errors_name_the_field(override, expected):
    with pytest.raises(ConfigError) as e:
        _load(override)
    assert expected in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.top_p=0", "trainer.lr=-1"])
    msg = str(e.value)
    for part in ("model.hf_dir is required", "data.train_files is required",
                 "rollout.top_p must be in (0, 1]", "trainer.lr must be > 0"):
        assert part in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"), [])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load_config(str(tmp_path / "list.yaml"), [])
    (tmp_path / "bad.yaml").write_text("trainer: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"), [])
    (tmp_path / "sect.yaml").write_text("trainer: 5\n")
    with pytest.raises(ConfigError, match="trainer: expected a mapping of fields, got int"):
        load_config(str(tmp_path / "sect.yaml"), [])


def test_round_trip_through_yaml(tmp_path):
    c = _load("trainer.lr=3e-6", "algorithm.entropy_select=random", "checkpoint.resume=/ck/step5")
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(c)))
    assert load_config(str(path), []) == c


def test_describe_lists_every_field_with_docs():
    text = describe_config()
    d = config_to_dict(Config())
    for section, fields in d.items():
        assert f"\n{section}:\n" in f"\n{text}\n"
        for name in fields:
            assert f"  {name}: " in text
    assert "entropy_top_ratio: float = 1.0\n      Fraction rho" in text
    assert "loss_agg_mode: 'token-mean' | 'seq-mean-token-sum' | 'seq-mean-token-mean'" in text
    # one doc line per field; a nested group (algorithm.rollout_correction) has one for itself
    # and one per field inside it
    def docs(fields):
        return sum(1 + (docs(v) if isinstance(v, dict) else 0) for v in fields.values())
    assert len([l for l in text.splitlines() if l.startswith("      ")]) == \
        sum(docs(f) for f in d.values())


def test_data_parallel_size():
    c = _load("parallel.tp=2", "parallel.pp=2", "trainer.ppo_mini_batch_size=2",
              "rollout.n=4", "trainer.micro_batch_size=2")
    assert data_parallel_size(c, 8) == 2          # 8 / (2*2); 2*4 seqs = 2 ranks x 2 micro x 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        data_parallel_size(c, 6)
    with pytest.raises(ConfigError, match="8 sequences cannot be split"):
        data_parallel_size(c, 12)                 # dp 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples/configs/*.yaml"))))
def test_example_configs_load(path):
    c = load_config(path, [])
    if "top20" in os.path.basename(path):
        assert c.algorithm.entropy_top_ratio == 0.2
    if "qwen3_14b" in os.path.basename(path):
        assert (c.trainer.train_batch_size, c.trainer.gen_batch_size, c.rollout.n) == (512, 1536, 16)
        assert (c.rollout.max_response_length, c.algorithm.overlong_buffer_len) == (20480, 4096)


def test_example_pairs_differ_only_in_entropy_selection():
    def load(name):
        d = config_to_dict(load_config(os.path.join(ROOT, "examples/configs", name), []))
        d.pop("logging")
        return d
    for full, top in (("demo_full.yaml", "demo_top20.yaml"),
                      ("qwen3_14b_dapo.yaml", "qwen3_14b_top20.yaml")):
        a, b = load(full), load(top)
        assert a["algorithm"].pop("entropy_top_ratio") == 1.0
        assert b["algorithm"].pop("entropy_top_ratio") == 0.2
        assert a == b
