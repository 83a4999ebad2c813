"""No input may destroy data or pass silently (issue 11): a generated suite of bad inputs over the
four entry points, `checkpoint_tools.convert`, `python -m megatron_rlvr train|eval|config|demo`,
the dataset reader (`PromptDataset`) and `examples/data/prepare_math.py`.

Every case asserts: exit code 2 (or, for the reader, a ValueError/OSError), exactly one error
line naming the culprit (file, field or flag), no traceback, every input byte for byte unchanged
(hashed before and after), and no output that looks complete (the output path is absent, or as
it was before). The CLIs run in-process (their `main(argv)`); every refusal happens before
torch.distributed, a model or vLLM starts, which the suite also enforces: reaching training,
evaluation or the conversion's model load fails the case.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_tools import convert
from megatron_rlvr import __main__ as cli
from megatron_rlvr import safety
from megatron_rlvr.data.dataset import PromptDataset
from megatron_rlvr.data.synthetic import write_synthetic_dataset
from megatron_rlvr.models.tiny import save_tiny_model
from torchrun import ROOT

_SPEC = importlib.util.spec_from_file_location("prepare_math",
                                               ROOT / "examples" / "data" / "prepare_math.py")
prep = importlib.util.module_from_spec(_SPEC)
sys.modules["prepare_math"] = prep
_SPEC.loader.exec_module(prep)


# ------------------------------------------------------------------------------ shared inputs

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny HF model, its Megatron checkpoint (converted in-process), a dataset."""
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_model(str(root / "model"), "qwen3", tie=True, seed=1, num_layers=2,
                            hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128,
                            vocab_size=384)
    mcore = str(root / "mcore")
    assert convert.main(["hf-to-mcore", "--hf-dir", model, "--out-dir", mcore]) == 0
    train, val = write_synthetic_dataset(str(root / "data"), num_train=8, num_val=4, seed=1)
    return {"model": model, "mcore": mcore, "train": train, "val": val, "root": root}


def _tree_hash(path: str | Path) -> dict[str, str] | None:
    """Path -> sha256 of every file under `path` (or of `path`); None if absent."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    """One bad input. `build(ctx)` prepares files under ctx.dir and returns the argv; the error
    line must contain every string in `culprit`."""
    name: str
    build: Callable[["Ctx"], list[str]]
    culprit: tuple[str, ...]
    kind: str = "cli"  # "cli": exit 2 and one stderr line; "reader": an exception


@dataclass
class Ctx:
    dir: Path
    assets: dict
    monkeypatch: pytest.MonkeyPatch
    inputs: list[str] = field(default_factory=list)   # hashed before/after
    outputs: list[str] = field(default_factory=list)  # must be absent or unchanged after

    def copy(self, key: str, name: str | None = None) -> str:
        dst = self.dir / (name or key)
        shutil.copytree(self.assets[key], dst, symlinks=True)
        return str(dst)


def _run(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _check_one_line(err: str, out: str, culprit) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    line = lines[0]
    assert "error:" in line, line
    for c in culprit:
        assert c in line, f"{c!r} not named in: {line}"
    assert "Traceback" not in err + out
    return line


def _execute(case: Case, main, tmp_path, assets, monkeypatch, capsys):
    monkeypatch.delenv(safety.DEBUG_ENV, raising=False)
    ctx = Ctx(tmp_path, assets, monkeypatch)
    argv = case.build(ctx)
    before_in = {p: _tree_hash(p) for p in ctx.inputs}
    before_out = {p: _tree_hash(p) for p in ctx.outputs}
    code, out, err = _run(main, argv, capsys)
    assert code == 2, f"{case.name}: exit code {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    line = _check_one_line(err, out, case.culprit)
    for p, h in before_in.items():
        assert _tree_hash(p) == h, f"{case.name}: input {p} changed"
    for p, h in before_out.items():
        assert _tree_hash(p) == h, f"{case.name}: output {p} was written"
        for suffix in (".incomplete", ".old"):
            if before_out[p] is None and p + suffix not in before_in:
                assert not os.path.exists(p + suffix), f"{case.name}: left {p + suffix}"
    return line


def _no_heavy_work(monkeypatch):
    """A bad input must be refused before anything heavy starts."""
    def refuse(*a, **k):
        raise AssertionError("reached heavy work (distributed init / model / training)")
    monkeypatch.setattr("megatron_rlvr.parallel.init_distributed", refuse)
    monkeypatch.setattr("megatron_rlvr.trainer.train", refuse)
    monkeypatch.setattr("megatron_rlvr.eval.run", refuse)
    monkeypatch.setattr("megatron_rlvr.demo.run", refuse)


# ------------------------------------------------------------------------------- convert CLI

def _hf_case(relation: str, overwrite: bool) -> Case:
    """hf-to-mcore with an output directory that would destroy the input (or worse)."""
    def build(ctx: Ctx) -> list[str]:
        hf = ctx.copy("model", "hf" + (".incomplete" if relation == "temp_sibling" else ""))
        ctx.inputs.append(hf)
        out = {
            "same": hf, "inside": os.path.join(hf, "sub"), "contains": str(ctx.dir),
            "empty": "", "blank": "  ", "root": "/", "temp_sibling": str(ctx.dir / "hf"),
            "symlink": str(ctx.dir / "link"), "cwd": ".", "parent_of_cwd": "..",
            "home": str(ctx.dir / "home"),
        }[relation]
        if relation == "symlink":
            os.symlink(hf, out)
        if relation == "cwd":
            ctx.monkeypatch.chdir(ctx.dir)
        if relation == "parent_of_cwd":
            os.makedirs(ctx.dir / "work")
            ctx.monkeypatch.chdir(ctx.dir / "work")
        if relation == "home":
            os.makedirs(out)
            shutil.copy(os.path.join(hf, "config.json"), out)
            ctx.monkeypatch.setenv("HOME", out)
        if relation in ("inside", "temp_sibling"):
            ctx.outputs.append(out)       # must not appear
        elif relation not in ("empty", "blank", "root"):
            ctx.inputs.append(out)        # exists: must stay as it was
        return ["hf-to-mcore", "--hf-dir", hf, "--out-dir", out] + \
            (["--overwrite"] if overwrite else [])
    culprit = {"empty": ("--out-dir", "empty"), "blank": ("--out-dir", "empty"),
               "root": ("--out-dir", "root"), "cwd": ("--out-dir", "working directory"),
               "parent_of_cwd": ("--out-dir", "parent of the working directory"),
               "home": ("--out-dir", "home directory")}.get(relation, ("--out-dir", "--hf-dir"))
    return Case(f"hf-to-mcore out {relation}{' --overwrite' if overwrite else ''}", build, culprit)


def _mcore_case(relation: str, overwrite: bool) -> Case:
    def build(ctx: Ctx) -> list[str]:
        m = ctx.copy("mcore", "m")
        ctx.inputs.append(m)
        out = {"same": m, "inside": os.path.join(m, "hf"), "contains": str(ctx.dir),
               "empty": "", "root": "/", "temp_sibling": m.removesuffix(".old"),
               "symlink": str(ctx.dir / "link")}[relation]
        if relation == "temp_sibling":
            os.rename(m, m + ".old")
            ctx.inputs[-1] = m + ".old"
            m = m + ".old"
        if relation == "symlink":
            os.symlink(m, out)
        return ["mcore-to-hf", "--mcore-dir", m, "--out-dir", out] + \
            (["--overwrite"] if overwrite else [])
    culprit = {"empty": ("--out-dir", "empty"), "root": ("--out-dir", "root"),
               "temp_sibling": ("--out-dir", "--mcore-dir")}.get(relation,
                                                                  ("--out-dir", "--mcore-dir"))
    return Case(f"mcore-to-hf out {relation}{' --overwrite' if overwrite else ''}", build,
                culprit)


def _out_state_case(state: str, overwrite: bool) -> Case:
    """An output path that exists as something we may not replace, or cannot be written."""
    def build(ctx: Ctx) -> list[str]:
        hf = ctx.copy("model", "hf")
        ctx.inputs.append(hf)
        out = str(ctx.dir / "out")
        if state == "foreign_dir":
            os.makedirs(out)
            Path(out, "thesis.tex").write_text("years of work")
        elif state == "file":
            Path(out).write_text("a file")
        elif state == "under_file":
            Path(ctx.dir / "f").write_text("a file")
            out = str(ctx.dir / "f" / "out")
        elif state == "unwritable":
            out = "/sys/megatron_rlvr_test_out"
        elif state == "foreign_hf":  # an HF checkpoint someone else wrote
            shutil.copytree(ctx.assets["model"], out)
        if state != "unwritable":
            ctx.inputs.append(out)
        return ["hf-to-mcore", "--hf-dir", hf, "--out-dir", out] + \
            (["--overwrite"] if overwrite else [])
    culprit = {"foreign_dir": ("out",), "foreign_hf": ("out",), "file": ("--out-dir", "out"),
               "under_file": ("--out-dir", "not a directory"),
               "unwritable": ("--out-dir", "cannot write")}[state]
    if state in ("foreign_dir", "foreign_hf"):
        culprit = ("not written by megatron-rlvr",) if overwrite else ("already exists",)
    return Case(f"hf-to-mcore out {state}{' --overwrite' if overwrite else ''}", build, culprit)


def _cfg_edit(name: str, key: str, value, culprit=None) -> Case:
    """hf-to-mcore with one config.json field wrong."""
    def build(ctx: Ctx) -> list[str]:
        hf = ctx.copy("model", "hf")
        ctx.inputs.append(hf)
        path = os.path.join(hf, "config.json")
        cfg = json.load(open(path))
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
        Path(path).write_text(json.dumps(cfg))  # allow_nan: NaN / Infinity as Python writes
        out = str(ctx.dir / "out")
        ctx.outputs.append(out)
        return ["hf-to-mcore", "--hf-dir", hf, "--out-dir", out]
    return Case(f"config.json {name}", build, culprit or ("config.json", key))


_DELETE = object()


def _hf_file_case(name: str, mutate: Callable[[str], None], culprit) -> Case:
    def build(ctx: Ctx) -> list[str]:
        hf = ctx.copy("model", "hf")
        mutate(hf)
        ctx.inputs.append(hf)
        out = str(ctx.dir / "out")
        ctx.outputs.append(out)
        return ["hf-to-mcore", "--hf-dir", hf, "--out-dir", out]
    return Case(f"hf input {name}", build, culprit)


def _retype(name: str, dtype: torch.dtype):
    def mutate(hf):
        path = os.path.join(hf, "model.safetensors")
        t = load_file(path)
        t[name] = (t[name] * 100).to(dtype)
        save_file(t, path, metadata={"format": "pt"})
    return mutate


def _write(rel: str, data: bytes | str):
    def mutate(d):
        p = Path(d, rel)
        if p.is_dir():
            shutil.rmtree(p)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return mutate


def _truncate(rel: str):
    def mutate(d):
        p = Path(d, rel)
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    return mutate


def _sharded_index(weight_map_fn):
    def mutate(hf):
        t = load_file(os.path.join(hf, "model.safetensors"))
        os.remove(os.path.join(hf, "model.safetensors"))
        save_file(t, os.path.join(hf, "model-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": weight_map_fn(sorted(t))}
        Path(hf, "model.safetensors.index.json").write_text(json.dumps(index))
    return mutate


def _flag_case(name: str, argv_tail: list[str], culprit, direction="hf-to-mcore") -> Case:
    def build(ctx: Ctx) -> list[str]:
        src = ctx.copy("model" if direction == "hf-to-mcore" else "mcore", "src")
        ctx.inputs.append(src)
        out = str(ctx.dir / "out")
        ctx.outputs.append(out)
        flag = "--hf-dir" if direction == "hf-to-mcore" else "--mcore-dir"
        return [direction, flag, src, "--out-dir", out, *argv_tail]
    return Case(f"{direction} {name}", build, culprit)


def _mcore_file_case(name: str, mutate: Callable[[str], None], culprit) -> Case:
    def build(ctx: Ctx) -> list[str]:
        m = ctx.copy("mcore", "m")
        mutate(m)
        ctx.inputs.append(m)
        out = str(ctx.dir / "out")
        ctx.outputs.append(out)
        return ["mcore-to-hf", "--mcore-dir", m, "--out-dir", out]
    return Case(f"mcore input {name}", build, culprit)


def _edit_json(rel: str, fn):
    def mutate(d):
        p = Path(d, rel)
        data = json.loads(p.read_text())
        fn(data)
        p.write_text(json.dumps(data))
    return mutate


def _missing_path(ctx: Ctx, flag: str):
    out = str(ctx.dir / "out")
    ctx.outputs.append(out)
    return out


def _convert_cases() -> list[Case]:
    cases = []
    for rel in ("same", "inside", "contains", "empty", "blank", "root", "temp_sibling", "symlink",
                "cwd", "parent_of_cwd", "home"):
        for ow in (False, True):
            cases.append(_hf_case(rel, ow))
    for rel in ("same", "inside", "contains", "empty", "root", "temp_sibling", "symlink"):
        for ow in (False, True):
            cases.append(_mcore_case(rel, ow))
    for state in ("foreign_dir", "foreign_hf", "file", "under_file", "unwritable"):
        for ow in (False, True):
            cases.append(_out_state_case(state, ow))
    nan, inf = float("nan"), float("inf")
    cases += [
        _cfg_edit("vocab_size fractional", "vocab_size", 384.5),
        _cfg_edit("vocab_size string", "vocab_size", "384"),
        _cfg_edit("vocab_size bool", "vocab_size", True),
        _cfg_edit("hidden_size zero", "hidden_size", 0),
        _cfg_edit("num_hidden_layers negative", "num_hidden_layers", -2),
        _cfg_edit("num_attention_heads null", "num_attention_heads", None),
        _cfg_edit("intermediate_size missing", "intermediate_size", _DELETE),
        _cfg_edit("rms_norm_eps NaN", "rms_norm_eps", nan),
        _cfg_edit("rms_norm_eps negative", "rms_norm_eps", -1e-6),
        _cfg_edit("max_position_embeddings Infinity", "max_position_embeddings", inf),
        _cfg_edit("rope_theta Infinity", "rope_theta", inf, ("config.json", "rope_theta")),
        _cfg_edit("rope_theta string", "rope_theta", "1e6"),
        _cfg_edit("tie_word_embeddings string", "tie_word_embeddings", "yes"),
        _cfg_edit("architectures string", "architectures", "Qwen3ForCausalLM"),
        _cfg_edit("head_dim fractional", "head_dim", 31.5),
        _hf_file_case("config.json not JSON", _write("config.json", "{oops"),
                      ("config.json", "not valid JSON")),
        _hf_file_case("config.json undecodable", _write("config.json", b'{"a": "\xff\xfe"}'),
                      ("config.json", "UTF-8")),
        _hf_file_case("config.json a list", _write("config.json", "[1, 2]"),
                      ("config.json", "JSON object")),
        _hf_file_case("config.json a directory",
                      lambda d: (os.remove(f"{d}/config.json"), os.mkdir(f"{d}/config.json")),
                      ("config.json", "directory")),
        _hf_file_case("config.json missing", lambda d: os.remove(f"{d}/config.json"),
                      ("config.json",)),
        _hf_file_case("int64 weights", _retype("model.layers.0.mlp.up_proj.weight", torch.int64),
                      ("model.layers.0.mlp.up_proj.weight", "I64", "floating")),
        _hf_file_case("bool weights", _retype("model.norm.weight", torch.bool),
                      ("model.norm.weight", "BOOL", "floating")),
        _hf_file_case("int8 weights", _retype("model.embed_tokens.weight", torch.int8),
                      ("model.embed_tokens.weight", "floating")),
        _hf_file_case("safetensors truncated", _truncate("model.safetensors"),
                      ("model.safetensors", "truncated")),
        _hf_file_case("safetensors garbage", _write("model.safetensors", b"\x00" * 64),
                      ("model.safetensors",)),
        _hf_file_case("no weights", lambda d: os.remove(f"{d}/model.safetensors"),
                      ("no model.safetensors",)),
        _hf_file_case("index names a missing shard",
                      _sharded_index(lambda names: {n: "model-00002-of-00002.safetensors"
                                                    for n in names}),
                      ("model-00002-of-00002.safetensors", "missing")),
        _hf_file_case("index weight_map is a list", _sharded_index(lambda names: names),
                      ("model.safetensors.index.json", "weight_map")),
        _hf_file_case("index is not JSON",
                      lambda d: Path(d, "model.safetensors.index.json").write_text("{x"),
                      ("model.safetensors.index.json",)),
        _hf_file_case("index escapes the directory",
                      _sharded_index(lambda names: {n: "../elsewhere.safetensors" for n in names}),
                      ("model.safetensors.index.json", "weight_map")),
        Case("hf-dir missing", lambda ctx: ["hf-to-mcore", "--hf-dir", str(ctx.dir / "nope"),
                                            "--out-dir", _missing_path(ctx, "out")],
             ("--hf-dir", "nope")),
        Case("hf-dir is a file", lambda ctx: (Path(ctx.dir / "f").write_text("x"),
                                              ctx.inputs.append(str(ctx.dir / "f")),
                                              ["hf-to-mcore", "--hf-dir", str(ctx.dir / "f"),
                                               "--out-dir", _missing_path(ctx, "out")])[-1],
             ("--hf-dir", "not a directory")),
        Case("hf-dir empty", lambda ctx: ["hf-to-mcore", "--hf-dir", "",
                                          "--out-dir", _missing_path(ctx, "out")],
             ("--hf-dir", "empty")),
        _flag_case("--tp 0", ["--tp", "0"], ("--tp", "positive integer")),
        _flag_case("--pp -1", ["--pp", "-1"], ("--pp", "positive integer")),
        _flag_case("--tp abc", ["--tp", "abc"], ("--tp", "abc")),
        _flag_case("--tp 2 in one process", ["--tp", "2"], ("--tp 2", "torchrun")),
        _flag_case("--dtype float16", ["--dtype", "float16"], ("--dtype", "float16")),
        _flag_case("--tp 0", ["--tp", "0"], ("--tp", "positive integer"), "mcore-to-hf"),
        _flag_case("--max-shard-gib 0", ["--max-shard-gib", "0"], ("--max-shard-gib",),
                   "mcore-to-hf"),
        _flag_case("--max-shard-gib nan", ["--max-shard-gib", "nan"], ("--max-shard-gib",),
                   "mcore-to-hf"),
        _flag_case("--dtype int8", ["--dtype", "int8"], ("--dtype",), "mcore-to-hf"),
        _flag_case("unknown flag", ["--frobnicate"], ("--frobnicate",)),
        _mcore_file_case("config vocab smaller than stored",
                         _edit_json("hf/config.json", lambda c: c.update(vocab_size=380)),
                         ("embedding.word_embeddings.weight", "[384, 64]", "[380, 64]")),
        _mcore_file_case("config vocab larger than stored",
                         _edit_json("hf/config.json", lambda c: c.update(vocab_size=400)),
                         ("embedding.word_embeddings.weight", "[400, 64]")),
        _mcore_file_case("config layers differ",
                         _edit_json("hf/config.json", lambda c: c.update(num_hidden_layers=1)),
                         ("decoder.layers", "config.json")),
        _mcore_file_case("config hidden differs",
                         _edit_json("hf/config.json", lambda c: c.update(intermediate_size=96)),
                         ("linear_fc1.weight",)),
        _mcore_file_case("shard truncated", _truncate("__0_1.distcp"),
                         ("__0_1.distcp", "truncated")),
        _mcore_file_case("shard missing", lambda d: os.remove(f"{d}/__0_0.distcp"),
                         ("__0_0.distcp", "missing")),
        _mcore_file_case("tensor index garbage", _write(".metadata", b"garbage"),
                         (".metadata",)),
        _mcore_file_case("megatron_rlvr.json not JSON", _write("megatron_rlvr.json", "{oops"),
                         ("megatron_rlvr.json", "malformed")),
        _mcore_file_case("megatron_rlvr.json a list", _write("megatron_rlvr.json", "[]"),
                         ("megatron_rlvr.json", "malformed")),
        _mcore_file_case("megatron_rlvr.json undecodable", _write("megatron_rlvr.json", b"\xff"),
                         ("megatron_rlvr.json", "malformed")),
        _mcore_file_case("megatron_rlvr.json no params_dtype",
                         _edit_json("megatron_rlvr.json", lambda c: c.pop("params_dtype")),
                         ("megatron_rlvr.json", "params_dtype")),
        _mcore_file_case("megatron_rlvr.json layout tp 0",
                         _edit_json("megatron_rlvr.json",
                                    lambda c: c["saved_layout"].update(tp=0)),
                         ("megatron_rlvr.json", "saved_layout")),
        _mcore_file_case("megatron_rlvr.json newer version",
                         _edit_json("megatron_rlvr.json", lambda c: c.update(version=99)),
                         ("version 99",)),
        _mcore_file_case("extra.pt garbage", _write("extra.pt", b"garbage"),
                         ("extra.pt", "unreadable")),
        _mcore_file_case("extra.pt not a dict",
                         lambda d: torch.save([1, 2], os.path.join(d, "extra.pt")),
                         ("extra.pt", "malformed")),
        _mcore_file_case("no COMPLETE marker", lambda d: os.remove(f"{d}/COMPLETE"),
                         ("incomplete",)),
        _mcore_file_case("hf/config.json missing", lambda d: os.remove(f"{d}/hf/config.json"),
                         ("hf/config.json",)),
        Case("mcore-to-hf given an HF checkpoint",
             lambda ctx: (ctx.inputs.append(ctx.copy("model", "hf")),
                          ["mcore-to-hf", "--mcore-dir", str(ctx.dir / "hf"),
                           "--out-dir", _missing_path(ctx, "out")])[-1],
             ("looks like a Hugging Face checkpoint",)),
        Case("dry-run --tp 0", lambda ctx: ["dry-run", "--hf-config",
                                            os.path.join(ctx.assets["model"], "config.json"),
                                            "--tp", "0"], ("--tp", "positive integer")),
        Case("dry-run missing config", lambda ctx: ["dry-run", "--hf-config",
                                                    str(ctx.dir / "none.json")],
             ("none.json",)),
        Case("no subcommand", lambda ctx: [], ("required",)),
    ]
    return cases


CONVERT_CASES = _convert_cases()


@pytest.mark.parametrize("case", CONVERT_CASES, ids=[c.name for c in CONVERT_CASES])
def test_convert_refuses(case, assets, tmp_path, monkeypatch, capsys):
    def no_build(*a, **k):
        raise AssertionError("reached the model build")
    monkeypatch.setattr("megatron_rlvr.models.builder.build_model", no_build)
    monkeypatch.setattr("megatron_rlvr.parallel.init_distributed", no_build)
    _execute(case, convert.main, tmp_path, assets, monkeypatch, capsys)


# ---------------------------------------------------------------------- train / eval / config

_BASE = """
model: {{hf_dir: {model}, dtype: float32}}
rollout: {{n: 2, max_prompt_length: 64, max_response_length: 16}}
algorithm: {{overlong_buffer_len: 8}}
trainer: {{train_batch_size: 2, ppo_mini_batch_size: 2, total_steps: 1}}
data: {{train_files: [{train}], val_files: [{val}]}}
eval: {{every_n_steps: 0, at_start: false}}
logging: {{output_dir: {out}, tensorboard: false, plots: false}}
checkpoint: {{save_every: 0, export_hf_at_end: {export}}}
"""


def _train_case(name: str, *, command="train", yaml_text: str | bytes | None = None,
                extra: str = "", overrides=(), culprit=(), setup=None, export=False,
                config_path=None) -> Case:
    def build(ctx: Ctx) -> list[str]:
        out = str(ctx.dir / "run")
        fields = dict(model=ctx.assets["model"], train=ctx.assets["train"],
                      val=ctx.assets["val"], out=out, export=str(export).lower())
        if setup is not None:
            fields.update(setup(ctx) or {})
            out = fields["out"]
        text = yaml_text if yaml_text is not None else _BASE.format(**fields) + extra
        cfg = ctx.dir / "cfg.yaml"
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        ctx.inputs += [str(cfg), ctx.assets["model"], os.path.dirname(ctx.assets["train"])]
        ctx.outputs.append(out)
        path = config_path(ctx) if config_path else str(cfg)
        return [command, "--config", path, *[o.format(**fields) for o in overrides]]
    return Case(f"{command} {name}", build, culprit)


def _train_cases() -> list[Case]:
    cases = [
        _train_case("duplicate section", extra="trainer: {lr: 2.0e-6}\n",
                    culprit=("duplicate key 'trainer'", "line")),
        _train_case("duplicate field", extra="reward: {num_workers: 1, num_workers: 2}\n",
                    culprit=("duplicate key 'num_workers'", "line")),
        _train_case("undecodable bytes",
                    yaml_text=b"trainer: {lr: 1.0e-6}\nlogging: {run_name: \"\xff\xfe\"}\n",
                    culprit=("cfg.yaml", "UTF-8", "line 2")),
        _train_case("config not a mapping", yaml_text="- 1\n- 2\n",
                    culprit=("cfg.yaml", "mapping")),
        _train_case("config missing", config_path=lambda ctx: str(ctx.dir / "nope.yaml"),
                    culprit=("nope.yaml",)),
        _train_case("config is a directory", config_path=lambda ctx: str(ctx.dir),
                    culprit=("cannot read config file",)),
        _train_case("config invalid YAML", yaml_text="trainer: {lr: [1,\n",
                    culprit=("not valid YAML",)),
        _train_case("lr .inf", overrides=["trainer.lr=.inf"], culprit=("trainer.lr", "finite")),
        _train_case("lr .nan", overrides=["trainer.lr=.nan"], culprit=("trainer.lr", "finite")),
        _train_case("timeout .nan in file", extra="reward: {timeout_s: .nan}\n",
                    culprit=("reward.timeout_s", "finite")),
        _train_case("grad_clip -.inf", overrides=["trainer.grad_clip=-.inf"],
                    culprit=("trainer.grad_clip", "finite")),
        _train_case("total_steps 2.5", overrides=["trainer.total_steps=2.5"],
                    culprit=("trainer.total_steps", "2.5")),
        _train_case("total_steps true", overrides=["trainer.total_steps=true"],
                    culprit=("trainer.total_steps", "bool")),
        _train_case("rollout.n string", overrides=["rollout.n='4'"], culprit=("rollout.n",)),
        _train_case("parallel.tp 0", overrides=["parallel.tp=0"], culprit=("parallel.tp",)),
        _train_case("parallel.tp -1", overrides=["parallel.tp=-1"], culprit=("parallel.tp",)),
        _train_case("unknown section", overrides=["trainr.lr=1e-6"],
                    culprit=("trainr", "trainer")),
        _train_case("unknown field", overrides=["trainer.learning_rate=1e-6"],
                    culprit=("trainer.learning_rate",)),
        _train_case("override without =", overrides=["trainer.lr"], culprit=("trainer.lr",)),
        _train_case("override bad YAML", overrides=["trainer.lr=[1,"], culprit=("trainer.lr",)),
        _train_case("top_p 1.5", overrides=["rollout.top_p=1.5"], culprit=("rollout.top_p",)),
        _train_case("hf_dir missing", overrides=["model.hf_dir={out}/nope"],
                    culprit=("model.hf_dir", "nope")),
        _train_case("hf_dir is a file", overrides=["model.hf_dir={train}"],
                    culprit=("model.hf_dir", "not a directory")),
        _train_case("hf_dir without config.json", overrides=["model.hf_dir={val_dir}"],
                    setup=lambda ctx: {"val_dir": os.path.dirname(ctx.assets["val"])},
                    culprit=("config.json",)),
        _train_case("train file missing", overrides=["data.train_files=[{out}/x.parquet]"],
                    culprit=("data.train_files", "x.parquet")),
        _train_case("train file is a directory", overrides=["data.train_files=[{model}]"],
                    culprit=("data.train_files", "not a file")),
        _train_case("val file missing", overrides=["data.val_files=[{out}/v.parquet]"],
                    culprit=("data.val_files", "v.parquet")),
        _train_case("output_dir is a file", overrides=["logging.output_dir={train}"],
                    culprit=("logging.output_dir", "not a directory")),
        _train_case("output_dir under a file", overrides=["logging.output_dir={train}/run"],
                    culprit=("logging.output_dir", "not a directory")),
        _train_case("output_dir unwritable", overrides=["logging.output_dir=/sys/mrlvr_run"],
                    culprit=("logging.output_dir", "cannot write")),
        _train_case("resume path missing", overrides=["checkpoint.resume={out}/ckpt"],
                    culprit=("checkpoint.resume",)),
        _train_case("model inside the export the run replaces", export=True,
                    setup=lambda ctx: {"out": str(ctx.dir / "exp_run"),
                                       "model": _export_model(ctx)},
                    culprit=("model.hf_dir", "hf_export")),
        _train_case("foreign hf_export in output_dir", export=True,
                    setup=lambda ctx: _foreign_export(ctx),
                    culprit=("hf_export", "not written by megatron-rlvr")),
        _train_case("eval with no val files", command="eval", overrides=["data.val_files=[]"],
                    culprit=("data.val_files",)),
        _train_case("eval val file is a directory", command="eval",
                    overrides=["data.val_files=[{model}]"], culprit=("data.val_files",)),
        _train_case("eval hf_dir missing", command="eval", overrides=["model.hf_dir=/nonexistent"],
                    culprit=("model.hf_dir",)),
        _train_case("config dup key", command="config", extra="eval: {n: 2}\n",
                    culprit=("duplicate key 'eval'",)),
        _train_case("config lr inf", command="config", overrides=["trainer.lr=.inf"],
                    culprit=("trainer.lr",)),
        _train_case("config adam_eps nan", command="config", overrides=["trainer.adam_eps=.nan"],
                    culprit=("trainer.adam_eps",)),
        _train_case("config eval.n 1.5", command="config", overrides=["eval.n=1.5"],
                    culprit=("eval.n",)),
    ]
    cases += [
        Case("demo --nproc 0", lambda ctx: ["demo", "--nproc", "0"], ("--nproc",)),
        Case("unknown command", lambda ctx: ["trian"], ("trian",)),
        Case("train unknown option", lambda ctx: ["train", "--confg", "x.yaml"], ("--confg",)),
    ]
    return cases


def _export_model(ctx: Ctx) -> str:
    """A model that lives in <out>/hf_export: a previous run's export, used as the start."""
    export = ctx.dir / "exp_run" / "hf_export"
    shutil.copytree(ctx.assets["model"], export)
    ctx.inputs.append(str(export))
    return str(export)


def _foreign_export(ctx: Ctx) -> dict:
    out = ctx.dir / "run"
    (out / "hf_export").mkdir(parents=True)
    (out / "hf_export" / "notes.txt").write_text("mine")
    return {"out": str(out)}


TRAIN_CASES = _train_cases()


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.name for c in TRAIN_CASES])
def test_train_eval_config_refuse(case, assets, tmp_path, monkeypatch, capsys):
    _no_heavy_work(monkeypatch)
    _execute(case, cli.main, tmp_path, assets, monkeypatch, capsys)


# ------------------------------------------------------------------------------ dataset reader

def _row(**over):
    row = {"data_source": "t", "prompt": [{"role": "user", "content": "What is 1+1?"}],
           "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"i": 0}}
    row.update(over)
    return row


def _gt(value):
    return _row(reward_model={"ground_truth": value, "style": "rule"})


READER_CASES = [
    ("missing file", None, ("nope.parquet", "not found")),
    ("a directory", "dir", ("is a directory",)),
    ("not parquet", b"hello", ("cannot read as parquet",)),
    ("truncated parquet", "truncate", ("cannot read as parquet",)),
    ("no reward_model column", [{"data_source": "t", "prompt": "x"}], ("reward_model",)),
    ("empty prompt", [_row(prompt=[])], ("row 0", "prompt")),
    ("prompt is a string", [_row(prompt="What?")], ("row 0", "prompt")),
    ("message without role", [_row(prompt=[{"content": "hi"}])], ("row 0", "prompt[0]")),
    ("ground truth null", [_row(), _gt(None)], ("row 1", "ground_truth")),
    ("ground truth empty", [_gt("")], ("row 0", "ground_truth")),
    ("ground truth blank", [_gt("   ")], ("row 0", "ground_truth")),
    ("ground truth NaN", [_gt(float("nan"))], ("row 0", "ground_truth", "nan")),
    ("ground truth inf", [_gt(float("-inf"))], ("row 0", "ground_truth", "inf")),
    ("ground truth 'nan' text", [_gt("nan")], ("row 0", "ground_truth", "nan")),
    ("ground truth 'Infinity' text", [_gt("Infinity")], ("row 0", "ground_truth")),
    ("ground truth bool", [_gt(True)], ("row 0", "ground_truth")),
    ("ground truth list", [_gt(["1", "2"])], ("row 0", "ground_truth")),
    ("data_source missing", [_row(data_source=None)], ("row 0", "data_source")),
    ("extra_info not a mapping", [_row(extra_info="x")], ("row 0", "extra_info")),
    ("undecodable strings", "badutf8", ("UTF-8",)),
]


def _write_reader_input(path: Path, spec):
    if spec is None:
        return
    if spec == "dir":
        path.mkdir()
    elif isinstance(spec, bytes):
        path.write_bytes(spec)
    elif spec == "truncate":
        pq.write_table(pa.Table.from_pylist([_row()] * 50), path)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif spec == "badutf8":
        prompt = pa.array([[{"role": "user", "content": "hi"}]])
        gt = pa.array([b"\xff\xfe"], pa.binary()).view(pa.string())
        rm = pa.StructArray.from_arrays([gt], names=["ground_truth"])
        pq.write_table(pa.table({"data_source": ["t"], "prompt": prompt, "reward_model": rm}),
                       path)
    else:
        pq.write_table(pa.Table.from_pylist(spec), path)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.mark.parametrize("name,spec,culprit", READER_CASES, ids=[c[0] for c in READER_CASES])
@pytest.mark.parametrize("position", ["only", "second"])
def test_dataset_reader_refuses(name, spec, culprit, position, tokenizer, tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([_row()]), good)
    bad = tmp_path / ("nope.parquet" if spec is None else "bad.parquet")
    _write_reader_input(bad, spec)
    files = [str(bad)] if position == "only" else [str(good), str(bad)]
    before = {f: _tree_hash(f) for f in files}
    with pytest.raises((ValueError, OSError)) as e:
        PromptDataset(files, tokenizer, max_prompt_length=64)
    message = str(e.value)
    assert "\n" not in message, message
    assert str(bad) in message, message
    for c in culprit:
        assert c in message, f"{c!r} not in {message}"
    assert {f: _tree_hash(f) for f in files} == before
    # As a user meets it: one line from the CLI's reporter, exit 2.
    assert safety.is_user_error(e.value)


# ------------------------------------------------------------------------------- prepare_math

def _guru(i=0, answer="2"):
    return {"data_source": "math", "prompt": [{"content": f"Q{i}", "role": "user"}],
            "ability": "math", "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": i}}


def _prep_case(name, build, culprit) -> Case:
    return Case(f"prepare_math {name}", build, culprit)


def _prep_inputs(ctx: Ctx, where: Path | None = None, **names) -> dict[str, str]:
    where = where or ctx.dir / "downloads"
    where.mkdir(parents=True, exist_ok=True)
    paths = {}
    for flag, fname in names.items():
        p = where / fname
        if not p.exists():
            pq.write_table(pa.Table.from_pylist([_guru(i) for i in range(3)]), p)
        paths[flag] = str(p)
        ctx.inputs.append(str(p))
    return paths


def _argv(paths: dict[str, str], out: str, *extra) -> list[str]:
    argv = []
    for flag, p in paths.items():
        argv += [f"--{flag}", p]
    return argv + ["--out-dir", out, *extra]


def _prep_cases() -> list[Case]:
    def same_as_input(flag, fname):
        def build(ctx):
            paths = _prep_inputs(ctx, ctx.dir / "data", **{flag: fname})
            return _argv(paths, str(ctx.dir / "data"))
        return build

    def out_is(kind):
        def build(ctx):
            paths = _prep_inputs(ctx, train="train.parquet")
            out = {"empty": "", "blank": " ", "root": "/", "file": paths["train"],
                   "under_file": paths["train"] + "/out", "unwritable": "/sys/mrlvr_prep"}[kind]
            return _argv(paths, out)
        return build

    def foreign(fname):
        def build(ctx):
            paths = _prep_inputs(ctx, train="train.parquet", math500="m500.parquet")
            out = ctx.dir / "shared"
            out.mkdir()
            (out / fname).write_text("someone else's")
            ctx.inputs.append(str(out))
            return _argv(paths, str(out))
        return build

    def flag(*extra, inputs=True):
        def build(ctx):
            paths = _prep_inputs(ctx, train="train.parquet") if inputs else {}
            out = str(ctx.dir / "out")
            ctx.outputs.append(out)
            return _argv(paths, out, *extra)
        return build

    def bad_input(which, content):
        def build(ctx):
            paths = _prep_inputs(ctx, train="train.parquet", aime="aime.parquet")
            p = Path(paths[which])
            if content == "missing":
                p.unlink()
                ctx.inputs.remove(str(p))
            elif content == "dir":
                p.unlink()
                p.mkdir()
            elif content == "badutf8":
                _write_reader_input(p.with_suffix(".tmp"), "badutf8")
                p.unlink()
                p.with_suffix(".tmp").rename(p)
            elif content == "nocol":
                pq.write_table(pa.Table.from_pylist([{"data_source": "x", "prompt": "y"}]), p)
            else:
                p.write_bytes(content)
            out = str(ctx.dir / "out")
            ctx.outputs.append(out)
            return _argv(paths, out)
        return build

    return [
        _prep_case("train output is the train input",
                   same_as_input("train", "math__combined_54.4k.parquet"),
                   ("--out-dir", "--train", "destroy")),
        _prep_case("math500 output is the math500 input",
                   same_as_input("math500", "math__math_500.parquet"),
                   ("--out-dir", "--math500", "destroy")),
        _prep_case("aime output is the aime input",
                   same_as_input("aime", "math__aime_repeated_32x_960.parquet"),
                   ("--out-dir", "--aime", "destroy")),
        _prep_case("report is the input", same_as_input("train", "prepare_math_report.json"),
                   ("--out-dir", "--train")),
        _prep_case("out-dir empty", out_is("empty"), ("--out-dir", "empty")),
        _prep_case("out-dir blank", out_is("blank"), ("--out-dir", "empty")),
        _prep_case("out-dir root", out_is("root"), ("--out-dir", "root")),
        _prep_case("out-dir is a file", out_is("file"), ("--out-dir", "not a directory")),
        _prep_case("out-dir under a file", out_is("under_file"), ("--out-dir",)),
        _prep_case("out-dir unwritable", out_is("unwritable"), ("--out-dir", "cannot write")),
        _prep_case("foreign train output", foreign("math__combined_54.4k.parquet"),
                   ("math__combined_54.4k.parquet", "not written by megatron-rlvr")),
        _prep_case("foreign report", foreign("prepare_math_report.json"),
                   ("prepare_math_report.json", "not written by megatron-rlvr")),
        _prep_case("--aime-repeat 0", flag("--aime-repeat", "0"), ("--aime-repeat",)),
        _prep_case("--aime-repeat -3", flag("--aime-repeat", "-3"), ("--aime-repeat",)),
        _prep_case("--aime-repeat huge", flag("--aime-repeat", "1000000"), ("--aime-repeat",)),
        _prep_case("--aime-repeat x", flag("--aime-repeat", "x"), ("--aime-repeat",)),
        _prep_case("no inputs", flag(inputs=False), ("--train",)),
        _prep_case("empty --train", lambda ctx: ["--train", "", "--out-dir",
                                                 _missing_path(ctx, "out")], ("--train",)),
        _prep_case("no --out-dir", lambda ctx: ["--train", "x.parquet"], ("--out-dir",)),
        _prep_case("later input missing", bad_input("aime", "missing"),
                   ("--aime", "not found", "nothing was written")),
        _prep_case("later input a directory", bad_input("aime", "dir"),
                   ("--aime", "directory", "nothing was written")),
        _prep_case("later input junk", bad_input("aime", b"junk"),
                   ("--aime", "not a readable parquet", "nothing was written")),
        _prep_case("later input lacks columns", bad_input("aime", "nocol"),
                   ("--aime", "reward_model", "nothing was written")),
        _prep_case("input undecodable", bad_input("train", "badutf8"), ("--train", "UTF-8")),
    ]


PREP_CASES = _prep_cases()


@pytest.mark.parametrize("case", PREP_CASES, ids=[c.name for c in PREP_CASES])
def test_prepare_math_refuses(case, assets, tmp_path, monkeypatch, capsys):
    _execute(case, prep.main, tmp_path, assets, monkeypatch, capsys)


def test_suite_size():
    total = len(CONVERT_CASES) + len(TRAIN_CASES) + 2 * len(READER_CASES) + len(PREP_CASES)
    assert total >= 100, total


# ------------------------------------------------------------------- what is still allowed

def test_overwrite_replaces_only_our_directories(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "old.safetensors").write_text("x")
    safety.write_marker(str(ours), "test")
    assert safety.check_output_dir(str(ours), flag="--out-dir", inputs=[("--in", str(inp))],
                                   overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert safety.check_output_dir(str(empty), flag="--out-dir", overwrite=True)
    ckpt = tmp_path / "ckpt"  # a Megatron checkpoint we saved carries megatron_rlvr.json
    ckpt.mkdir()
    (ckpt / "megatron_rlvr.json").write_text("{}")
    assert safety.check_output_dir(str(ckpt), flag="--out-dir", overwrite=True)
    assert safety.check_output_dir(str(tmp_path / "new" / "deep"), flag="--out-dir")


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(safety.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="--out-dir is empty"):
        convert.main(["hf-to-mcore", "--hf-dir", str(tmp_path), "--out-dir", ""])


def test_prepare_math_reruns_in_its_own_directory(tmp_path, capsys):
    """The marker makes a second run into the same --out-dir fine (it replaces its own files)."""
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([_guru(i) for i in range(3)]), src)
    out = tmp_path / "prepared"
    assert prep.main(["--train", str(src), "--out-dir", str(out)]) == 0
    assert (out / safety.MARKER).exists()
    assert prep.main(["--train", str(src), "--out-dir", str(out)]) == 0
    assert len(pq.read_table(out / "math__combined_54.4k.parquet")) == 3
