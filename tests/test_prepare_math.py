"""examples/data/prepare_math.py on small parquet files in the guru-RL-92k layouts, good and bad."""
import importlib.util
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "prepare_math", os.path.join(os.path.dirname(__file__), "..", "examples", "data",
                                 "prepare_math.py"))
prep = importlib.util.module_from_spec(_SPEC)
sys.modules["prepare_math"] = prep  # dataclasses look their module up there
_SPEC.loader.exec_module(prep)

SUFFIX = " Please output the final answer within \\boxed{}."


def _row(i, question, answer, source="math__combined", **over):
    """One row as guru-RL-92k publishes it (extra columns included)."""
    row = {
        "data_source": source,
        "prompt": [{"content": question + SUFFIX, "role": "user"}],
        "ability": "math",
        "apply_chat_template": True,
        "qwen2.5_7b_pass_rate": 0.5,
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": i, "original_question": question, "split": "train"},
    }
    row.update(over)
    return row


def _write(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def _read(path):
    return pq.read_table(path).to_pylist()


def test_train_rows_validated_and_reported(tmp_path, capsys):
    rows = [
        _row(0, "What is 1+1?", "2"),
        _row(1, "Q1", None),                                            # missing ground truth
        _row(2, "Q2", "   "),                                           # empty ground truth
        _row(3, "Q3", "3", prompt=[]),                                  # empty prompt
        _row(4, "Q4", "4", prompt=[{"content": "  ", "role": "user"}]),  # blank user message
        _row(5, "Q5", "5", prompt=[{"content": "hi", "role": "robot"}]),  # bad role
        _row(6, "Q6", "6", data_source=None),                           # no data source
        _row(7, "Q7", "\\frac{1}{2}"),
    ]
    train = _write(tmp_path / "train.parquet", rows)
    out = tmp_path / "out"
    assert prep.main(["--train", train, "--out-dir", str(out)]) == 0
    got = _read(out / "math__combined_54.4k.parquet")
    assert [r["reward_model"]["ground_truth"] for r in got] == ["2", "\\frac{1}{2}"]
    assert set(got[0]) == {"data_source", "prompt", "reward_model", "extra_info"}
    assert got[0]["prompt"] == [{"role": "user", "content": "What is 1+1?" + SUFFIX}]
    assert got[1]["extra_info"]["index"] == 7 and got[1]["extra_info"]["split"] == "train"
    assert json.loads(got[1]["extra_info"]["source_extra_info"])["original_question"] == "Q7"

    report = json.load(open(out / "prepare_math_report.json"))[0]
    assert report["rows_read"] == 8 and report["rows_written"] == 2
    assert {d["row"]: d["reason"] for d in report["dropped"]} == {
        1: "reward_model.ground_truth is missing",
        2: "reward_model.ground_truth is empty",
        3: "prompt is not a non-empty list of chat messages",
        4: "prompt has no non-empty user message",
        5: "prompt[0] is not a {role: system|user|assistant, content: str} message",
        6: "data_source is missing or not a non-empty string",
    }
    assert sum(report["dropped_per_reason"].values()) == 6
    printed = capsys.readouterr().out
    assert "read 8, wrote 2, dropped 6" in printed and "row 3: prompt is not" in printed


def test_aime_collapsed_and_repeated_32x(tmp_path):
    problems = [_row(i, f"AIME problem {i}", i * 7, source="aime") for i in range(30)]
    # Published layout: integer answers, the 30 problems repeated 8x (240 rows).
    aime = _write(tmp_path / "aime.parquet", problems * 8)
    out = tmp_path / "out"
    assert prep.main(["--aime", aime, "--out-dir", str(out)]) == 0
    got = _read(out / "math__aime_repeated_32x_960.parquet")
    assert len(got) == 960
    for r in range(32):
        block = got[30 * r:30 * (r + 1)]
        assert [g["reward_model"]["ground_truth"] for g in block] == [str(i * 7) for i in range(30)]
        assert {g["extra_info"]["repeat"] for g in block} == {r}
    report = json.load(open(out / "prepare_math_report.json"))[0]
    assert report["dropped"] == [] and "30 distinct problems" in report["notes"][0]


def test_wrong_types_drop_rows_without_crashing(tmp_path):
    list_answers = _write(tmp_path / "lists.parquet",
                          [_row(0, "Q", ["1", "2"]), _row(1, "Q2", ["3"])])
    string_prompts = _write(tmp_path / "strprompt.parquet",
                            [_row(0, "Q", "1", prompt="What is 1+1?")])
    bool_answers = _write(tmp_path / "bools.parquet", [_row(0, "Q", True)])
    nan_answers = _write(tmp_path / "nan.parquet", [_row(0, "Q", float("nan")), _row(1, "Q", 0.5)])
    out = tmp_path / "out"
    code = prep.main(["--train", list_answers, "--math500", string_prompts, "--out-dir", str(out)])
    assert code == 1  # nothing valid in either file
    reports = {r["input"]: r for r in json.load(open(out / "prepare_math_report.json"))}
    assert reports["train"]["dropped_per_reason"] == {
        "reward_model.ground_truth has type list, not a string": 2}
    assert reports["math500"]["dropped_per_reason"] == {
        "prompt is not a non-empty list of chat messages": 1}
    assert not (out / "math__combined_54.4k.parquet").exists()

    assert prep.main(["--train", bool_answers, "--aime", nan_answers, "--out-dir", str(out)]) == 1
    reports = {r["input"]: r for r in json.load(open(out / "prepare_math_report.json"))}
    assert reports["train"]["dropped"][0]["reason"] == (
        "reward_model.ground_truth has type bool, not a string")
    assert reports["aime"]["dropped"] == [
        {"row": 0, "reason": "reward_model.ground_truth is not a finite number"}]
    kept = _read(out / "math__aime_repeated_32x_960.parquet")
    assert len(kept) == 32 and kept[0]["reward_model"]["ground_truth"] == "0.5"


def test_missing_file_and_missing_columns_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prep.main(["--math500", str(tmp_path / "nope.parquet"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "file not found" in err and prep.URLS["math500"] in err

    no_rm = _write(tmp_path / "norm.parquet", [{"data_source": "x", "prompt": "y"}])
    with pytest.raises(SystemExit) as e:
        prep.main(["--train", no_rm, "--out-dir", str(tmp_path)])
    assert "lacks required column(s) ['reward_model']" in capsys.readouterr().err

    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(SystemExit):
        prep.main(["--train", str(tmp_path / "junk.parquet"), "--out-dir", str(tmp_path)])
    assert "not a readable parquet file" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        prep.main(["--out-dir", str(tmp_path)])
    assert "give at least one of" in capsys.readouterr().err


def test_help_lists_download_urls(capsys):
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    out = capsys.readouterr().out
    assert all(url in out for url in prep.URLS.values())
