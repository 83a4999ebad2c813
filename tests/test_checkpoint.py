"""HF <-> Megatron conversion and the Megatron checkpoint: exact roundtrips, layouts, errors.

The roundtrip across layouts runs tests/dist/checkpoint_roundtrip.py under torchrun (4 processes);
every exported HF directory is compared here with its input, tensor by tensor, bit for bit.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools import convert
from checkpoint_tools.dry_run import dry_run
from megatron_rlvr import checkpoint, planner
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.models.tiny import save_tiny_model
from torchrun import ROOT, torchrun

MODELS = [("qwen3", {"tie": True}), ("qwen3", {"tie": False}), ("qwen2", {"tie": True}),
          ("llama", {"tie": False})]
REAL_CONFIGS = sorted(glob.glob(str(ROOT / "examples/configs/hf/*.json")))


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _tensors(hf_dir):
    out = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_bitwise_equal(original_dir, exported_dir):
    a, b = _tensors(original_dir), _tensors(exported_dir)
    assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), \
            f"{exported_dir}: {name} differs from {original_dir}"
    index = json.load(open(os.path.join(exported_dir, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = []
    for i, (family, kwargs) in enumerate(MODELS):
        d = str(root / f"{family}_{i}")
        save_tiny_model(d, family, seed=10 + i, with_tokenizer=i == 0, **kwargs)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """hf-to-mcore with the CLI, one process each (run side by side)."""
    root = tmp_path_factory.mktemp("mcore")
    outs = [str(root / f"m1_{i}") for i in range(len(models))]
    procs = [subprocess.Popen([sys.executable, "-m", "checkpoint_tools.convert", "hf-to-mcore",
                               "--hf-dir", h, "--out-dir", m], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for h, m in zip(models, outs)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    return outs


# ----------------------------------------------------------------------- single process, CLI

def test_mcore_checkpoint_is_self_contained(models, converted):
    m = converted[0]
    for name in ("COMPLETE", "megatron_rlvr.json", "metadata.json", "hf/config.json",
                 "hf/tokenizer.json", "hf/tokenizer_config.json"):
        assert os.path.isfile(os.path.join(m, name)), name
    info = checkpoint.read_info(m)
    assert info["spec"] == read_model_spec(models[0])
    assert info["saved_layout"] == {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
    assert not glob.glob(m + "*.incomplete")


def test_mcore_to_hf_single_process(models, converted, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "hf")
    _cli("mcore-to-hf", "--mcore-dir", converted[0], "--out-dir", out, "--max-shard-gib", "0.001")
    assert_bitwise_equal(models[0], out)
    shards = glob.glob(os.path.join(out, "model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(os.path.getsize(f) < 1.2 * 2 ** 30 / 1000 for f in shards)
    assert json.load(open(os.path.join(out, "config.json"))) == \
        json.load(open(os.path.join(models[0], "config.json")))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = AutoModelForCausalLM.from_pretrained(models[0])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert AutoTokenizer.from_pretrained(out).encode("What is 1 + 2?") == \
        AutoTokenizer.from_pretrained(models[0]).encode("What is 1 + 2?")

    # Refuses an existing directory; --overwrite replaces it (no stale shards), --dtype is kept.
    assert "already exists; pass --overwrite" in _error(
        capsys, "mcore-to-hf", "--mcore-dir", converted[0], "--out-dir", out)
    _cli("mcore-to-hf", "--mcore-dir", converted[0], "--out-dir", out, "--dtype", "bfloat16",
         "--overwrite")
    assert glob.glob(os.path.join(out, "*.safetensors")) == \
        [os.path.join(out, "model-00001-of-00001.safetensors")]
    exported = _tensors(out)
    for name, t in _tensors(models[0]).items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], t.bfloat16())
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_bfloat16_model_roundtrip(tmp_path):
    """Real checkpoints are bfloat16: the Megatron model is built in it and nothing is rounded."""
    hf, m, out = (str(tmp_path / n) for n in ("hf", "m", "out"))
    save_tiny_model(hf, "qwen2", seed=5, dtype=torch.bfloat16, with_tokenizer=False)
    assert json.load(open(f"{hf}/config.json"))["dtype"] == "bfloat16"
    _cli("hf-to-mcore", "--hf-dir", hf, "--out-dir", m)
    assert json.load(open(f"{m}/megatron_rlvr.json"))["params_dtype"] == "bfloat16"
    _cli("mcore-to-hf", "--mcore-dir", m, "--out-dir", out)
    assert_bitwise_equal(hf, out)
    assert json.load(open(f"{out}/config.json")) == json.load(open(f"{hf}/config.json"))


# ------------------------------------------------------------------------- across layouts

@pytest.mark.slow
def test_roundtrip_across_layouts_bitwise(models, converted, tmp_path):
    """HF -> Megatron (TP1) -> TP2×PP2 -> DP2×CP2 -> HF equals the input bit for bit; so do the
    exports made at TP2×PP2 and DP2×CP2, and a TP2×PP2 conversion; optimizer state resumes."""
    work = str(tmp_path)
    log = torchrun(ROOT / "tests/dist/checkpoint_roundtrip.py", 4, "--work", work,
                   "--hf", *models, "--mcore", *converted)
    assert log.count("parity tp2pp2") == len(models) and log.count("parity dp2cp2") == len(models)
    assert "checkpoint_roundtrip OK" in log
    assert "resume TP2xPP2 -> DP2xCP2: loss" in log and "resume TP2xPP2 -> DP4: loss" in log
    verdict = [line for line in log.splitlines() if line.startswith("verify: logits")]
    assert verdict and verdict[-1].endswith("PASS"), log[-3000:]
    for i, hf in enumerate(models):
        assert_bitwise_equal(hf, f"{work}/hf_tp2pp2_{i}")
        assert_bitwise_equal(hf, f"{work}/hf_cp2_{i}")
        assert checkpoint.read_info(f"{work}/m3_{i}")["saved_layout"] == \
            {"tp": 1, "pp": 1, "cp": 2, "dp": 2}
    assert_bitwise_equal(models[0], f"{work}/hf_from_tp2pp2")
    assert checkpoint.read_info(f"{work}/m_tp2pp2")["saved_layout"]["tp"] == 2
    assert len(glob.glob(f"{work}/hf_tp2pp2_0/model-*.safetensors")) > 1  # 200 kB shards
    assert not os.path.exists(f"{work}/never")
    served = subprocess.run([sys.executable, "tests/dist/checkpoint_vllm.py",
                             f"{work}/hf_tp2pp2_0"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert served.returncode == 0 and "greedy tokens equal transformers'" in served.stdout, \
        (served.stdout + served.stderr)[-4000:]


# ----------------------------------------------------------------------------------- dry run

@pytest.mark.parametrize("path", REAL_CONFIGS, ids=os.path.basename)
def test_dry_run_real_configs(path):
    config = json.load(open(path))
    spec = read_model_spec(config)
    shape = planner.Shape.from_hf_config(config)
    for tp, pp in [(8, 4), (8, 1), (4, 2), (2, 4), (1, 1)]:
        rep = dry_run(spec, config, tp, pp)
        assert rep.ok, (tp, pp, rep.missing[:5], rep.extra[:5], rep.shape_errors[:5])
        assert rep.megatron_total == rep.hf_params == planner.total_params(shape)
        assert rep.stage_params == [planner.stage_params(shape, tp, pp, s) for s in range(pp)]


def test_dry_run_cli_prints_per_stage_counts(capsys):
    path = str(ROOT / "examples/configs/hf/qwen3-14b-base.json")
    assert convert.main(["dry-run", "--hf-config", path, "--tp", "8", "--pp", "4"]) == 0
    out = capsys.readouterr().out
    assert "HF tensors 443: missing 0, extra 0, shape errors 0" in out
    assert out.count("\n    ") >= 4  # one row per stage
    assert "parameters: Megatron layout 14,768,307,200 transformers 14,768,307,200 PASS" in out


def test_dry_run_catches_a_wrong_mapping(monkeypatch):
    """A mapping that put o_proj's input dim first would be caught (shapes vs transformers)."""
    from checkpoint_tools import dry_run as dr
    from megatron_rlvr.models.mapping import hf_shapes

    def wrong(spec, rule):
        shapes = hf_shapes(spec, rule)
        return [s[::-1] for s in shapes] if "linear_proj" in rule.megatron else shapes

    monkeypatch.setattr(dr, "hf_shapes", wrong)
    config = json.load(open(ROOT / "examples/configs/hf/qwen3-32b.json"))  # o_proj not square
    rep = dr.dry_run(read_model_spec(config), config, 8, 4)
    assert not rep.ok and any("o_proj" in e for e in rep.shape_errors)


# ------------------------------------------------------------------------------------ errors

def _error(capsys, *argv):
    capsys.readouterr()  # drop earlier output
    assert convert.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert: error: ") and "Traceback" not in err
    return err


@pytest.fixture
def copy_of(models, tmp_path):
    def make(i=0):
        d = str(tmp_path / f"copy{i}")
        shutil.copytree(models[i], d)
        return d
    return make


def _rewrite(hf_dir, fn):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_error_unknown_architecture(copy_of, capsys, tmp_path):
    d = copy_of()
    cfg = json.load(open(f"{d}/config.json"))
    cfg["architectures"] = ["MistralForCausalLM"]
    json.dump(cfg, open(f"{d}/config.json", "w"))
    err = _error(capsys, "hf-to-mcore", "--hf-dir", d, "--out-dir", str(tmp_path / "m"))
    assert "unsupported architecture 'MistralForCausalLM'" in err and "Qwen3ForCausalLM" in err
    err = _error(capsys, "dry-run", "--hf-config", f"{d}/config.json")
    assert "MistralForCausalLM" in err


def test_error_missing_and_extra_tensors_are_named(copy_of, capsys, tmp_path):
    d = copy_of(1)
    _rewrite(d, lambda t: (t.pop("model.layers.2.self_attn.k_norm.weight"),
                           t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})))
    err = _error(capsys, "hf-to-mcore", "--hf-dir", d, "--out-dir", str(tmp_path / "m"))
    assert "missing 1 tensor(s): model.layers.2.self_attn.k_norm.weight" in err
    assert "unexpected 1 tensor(s): model.layers.0.mlp.extra.weight" in err
    assert not os.path.exists(tmp_path / "m")


def test_error_shape_mismatch_names_both_shapes(copy_of, capsys, tmp_path):
    d = copy_of(3)
    _rewrite(d, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(255, 128)}))
    err = _error(capsys, "hf-to-mcore", "--hf-dir", d, "--out-dir", str(tmp_path / "m"))
    assert "model.layers.1.mlp.up_proj.weight has shape [255, 128], expected [256, 128]" in err


def test_error_truncated_safetensors(copy_of, capsys, tmp_path):
    d = copy_of()
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = _error(capsys, "hf-to-mcore", "--hf-dir", d, "--out-dir", str(tmp_path / "m"))
    assert "model.safetensors" in err and "truncated" in err


def test_error_existing_output_and_wrong_inputs(models, converted, capsys, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    err = _error(capsys, "hf-to-mcore", "--hf-dir", models[0], "--out-dir", str(existing))
    assert f"output directory {existing} already exists; pass --overwrite" in err
    err = _error(capsys, "mcore-to-hf", "--mcore-dir", models[0], "--out-dir", str(tmp_path / "x"))
    assert "looks like a Hugging Face checkpoint, not a Megatron checkpoint" in err
    half = str(tmp_path / "half")
    shutil.copytree(converted[0], half)
    os.remove(os.path.join(half, checkpoint.COMPLETE_MARKER))
    err = _error(capsys, "mcore-to-hf", "--mcore-dir", half, "--out-dir", str(tmp_path / "x"))
    assert "checkpoint is incomplete" in err


def test_cli_exit_code_and_help(copy_of, tmp_path, capsys):
    d = copy_of()
    _rewrite(d, lambda t: t.pop("model.norm.weight"))
    proc = _cli("hf-to-mcore", "--hf-dir", d, "--out-dir", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing 1 tensor(s): model.norm.weight" in proc.stderr
    for sub, flag in (("hf-to-mcore", "--hf-dir"), ("mcore-to-hf", "--max-shard-gib"),
                      ("dry-run", "--hf-config")):
        with pytest.raises(SystemExit) as done:
            convert.main([sub, "--help"])
        assert done.value.code == 0 and flag in capsys.readouterr().out


# ------------------------------------------------------------------------------ directories

def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = str(tmp_path)
    assert checkpoint.latest_checkpoint(root) is None
    for step, complete in ((5, True), (7, True), (10, False)):
        d = checkpoint.step_dir(root, step)
        os.makedirs(d)
        if complete:
            open(os.path.join(d, checkpoint.COMPLETE_MARKER), "w").close()
    os.makedirs(checkpoint.step_dir(root, 12) + checkpoint.INCOMPLETE_SUFFIX)
    os.makedirs(os.path.join(root, "step_000099_backup"))
    assert checkpoint.latest_checkpoint(root) == checkpoint.step_dir(root, 7)
    assert checkpoint.step_dir(root, 7).endswith("step_000007")


# ------------------------------------------------------- torch-Adam resume fix (every device)

def test_adam_step_fix_is_installed_without_the_cpu_layer():
    """The torch-Adam `step` restore fix comes from platform.setup() on every device: here with
    has_cuda() forced true, so cpu_compat is not applied (a GPU install without TE/Apex)."""
    code = (
        "from megatron_rlvr.platform import device\n"
        "import megatron_rlvr.platform as platform\n"
        "platform.has_cuda = device.has_cuda = lambda: True\n"
        "platform.setup()\n"
        "from megatron_rlvr.platform import cpu_compat, megatron_fixes\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D\n"
        "assert not cpu_compat._APPLIED\n"
        "assert D._set_main_param_and_optimizer_states is "
        "megatron_fixes._set_main_param_and_optimizer_states\n"
        "print('fix installed')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0 and "fix installed" in proc.stdout, proc.stdout + proc.stderr


def _fake_distrib_optimizer(inner):
    """The attributes of a DistributedOptimizer that the restore reads, around one parameter."""
    from types import SimpleNamespace
    model_param = torch.nn.Parameter(torch.zeros(4))
    main = inner.param_groups[0]["params"][0]
    return model_param, main, SimpleNamespace(
        optimizer=inner, model_param_group_index_map={model_param: (0, 0)},
        config=SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))


def test_adam_step_fix_restores_torch_adam_and_defers_to_megatron_otherwise(monkeypatch):
    from megatron_rlvr.platform import megatron_fixes

    calls = []
    monkeypatch.setattr(megatron_fixes, "_ORIGINAL_SET_STATES",
                        lambda self, p, tensors: calls.append(sorted(tensors)))
    saved = {"param": torch.full((4,), 1.0), "exp_avg": torch.full((4,), 2.0),
             "exp_avg_sq": torch.full((4,), 3.0)}  # what Megatron passes: no "step"
    # torch's Adam (Megatron's fallback without TE/Apex): its state has a `step` the checkpoint
    # does not supply; Megatron's own restore raised KeyError: 'step' here.
    main = torch.nn.Parameter(torch.zeros(4))
    adam = torch.optim.AdamW([main])
    adam.state[main].update(step=torch.tensor(5.0), exp_avg=torch.zeros(4),
                            exp_avg_sq=torch.zeros(4))
    model_param, main, self = _fake_distrib_optimizer(adam)
    with torch.no_grad():  # as in Megatron's load
        megatron_fixes._set_main_param_and_optimizer_states(self, model_param, saved)
    assert calls == [] and torch.equal(main.detach(), saved["param"])
    assert torch.equal(adam.state[main]["exp_avg_sq"], saved["exp_avg_sq"])
    assert adam.state[main]["step"].item() == 5.0  # left to Megatron's param-group restore

    # A fused Adam as TE or Apex provide (a torch.optim.Optimizer that is not torch's Adam; a
    # stand-in, neither is installed here): Megatron's original restore runs, unchanged.
    class FusedAdamLike(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

    model_param, main, self = _fake_distrib_optimizer(FusedAdamLike([torch.nn.Parameter(
        torch.zeros(4))]))
    megatron_fixes._set_main_param_and_optimizer_states(self, model_param, saved)
    assert calls == [["exp_avg", "exp_avg_sq", "param"]] and not main.detach().any()


# ------------------------------------------- optimizer save without gather; TE `_extra_state`

def test_optimizer_save_without_gather_and_extra_state_tolerance(tmp_path):
    """At DP2 (a parameter split between the ranks): our per-owner optimizer save writes the same
    tensors as Megatron's gathering save, bit for bit, and resumes exactly; checkpoints load
    between a model with and one without TE-style `_extra_state` entries (a mock of what TE adds),
    while any other missing key is still refused."""
    hf = str(tmp_path / "hf")
    save_tiny_model(hf, "qwen3", tie=True, with_tokenizer=False)
    log = torchrun(ROOT / "tests/dist/checkpoint_optimizer_save.py", 2, "--work",
                   str(tmp_path), "--hf", hf)
    assert "equal to Megatron's gathered save; 1 split parameters" in log, log[-3000:]
    assert "resume from the per-owner save: step equal" in log
    assert "TE-only _extra_state keys tolerated both ways" in log
    assert "checkpoint_optimizer_save OK" in log
