"""verl-schema parquet loading (validation, chat template, overflow), sampler, synthetic task."""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rlvr.data.dataset import BadRow, PromptDataset, PromptSampler
from megatron_rlvr.data.synthetic import (make_rows, warm_start_examples,
                                          write_synthetic_dataset)
from megatron_rlvr.models.tiny import build_tokenizer
from megatron_rlvr.rewards.math import extract_answer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _row(content="What is 1 + 2?", gt="3", **over):
    row = {"data_source": "t", "prompt": [{"role": "user", "content": content}],
           "reward_model": {"ground_truth": gt}, "extra_info": {"i": 1}}
    row.update(over)
    return row


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_prompt_ids_are_the_chat_template_tokens(tokenizer, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 6?"}]
    path = _write(tmp_path / "a.parquet", [_row(), _row(prompt=msgs, gt="42")])
    ds = PromptDataset([path], tokenizer, max_prompt_length=512)
    assert len(ds) == 2
    rec = ds[1]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n"
            "<|im_start|>assistant\n")                         # written out by hand
    assert tokenizer.decode(rec.prompt_ids) == text
    assert rec.prompt_ids == tokenizer.encode(text, add_special_tokens=False)
    assert (rec.ground_truth, rec.data_source, rec.messages) == ("42", "t", msgs)
    assert rec.source == f"{path}:1" and ds[0].extra_info == {"i": 1}


def test_numeric_ground_truth_and_missing_extra_info_are_accepted(tokenizer, tmp_path):
    rows = [_row(extra_info=None) for _ in range(2)]
    rows[0]["reward_model"] = {"ground_truth": 3.5}          # a numeric column in the file
    rows[1]["reward_model"] = {"ground_truth": 7}
    ds = PromptDataset([_write(tmp_path / "n.parquet", rows)], tokenizer, max_prompt_length=512)
    assert ds[0].ground_truth == "3.5" and ds[1].ground_truth == "7.0"
    assert ds[0].extra_info == {}


@pytest.mark.parametrize("bad, field", [
    (dict(data_source=None), "field 'data_source'"),
    (dict(prompt=[]), "field 'prompt': expected a non-empty list"),
    (dict(prompt=[{"role": "user", "content": None}]), "field 'prompt[0]'"),
    (dict(prompt=[{"role": "", "content": "x"}]), "field 'prompt[0]'"),
    (dict(reward_model={"ground_truth": ""}), "field 'reward_model.ground_truth'"),
    (dict(reward_model={"style": "rule", "ground_truth": None}), "field 'reward_model.ground_truth'"),
])
def test_malformed_row_named_by_file_row_field(tokenizer, tmp_path, bad, field):
    rows = [_row(), _row(), _row(**bad), _row()]
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(BadRow) as e:
        PromptDataset([path], tokenizer, max_prompt_length=512)
    assert f"{path}: row 2: {field}" in str(e.value)
    assert "data.bad_rows=skip" in str(e.value)


def test_skip_mode_counts_bad_rows(tokenizer, tmp_path):
    a = _write(tmp_path / "a.parquet", [_row(), _row(data_source=None), _row()])
    b = _write(tmp_path / "b.parquet", [_row(reward_model={"ground_truth": ""}), _row(gt="9")])
    ds = PromptDataset([a, b], tokenizer, max_prompt_length=512, bad_rows="skip")
    assert len(ds) == 3 and ds.stats.rows == 5 and ds.stats.bad_rows_skipped == 2
    assert [r.source for r in ds.records] == [f"{a}:0", f"{a}:2", f"{b}:1"]


def test_file_level_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found: .*nope.parquet"):
        PromptDataset([str(tmp_path / "nope.parquet")], tokenizer, max_prompt_length=8)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="x.parquet: cannot read as parquet"):
        PromptDataset([str(tmp_path / "x.parquet")], tokenizer, max_prompt_length=8)
    path = _write(tmp_path / "q.parquet", [{"data_source": "t", "question": "hi"}])
    with pytest.raises(ValueError, match=r"q.parquet: missing column\(s\) \['prompt', 'reward_model'\]"):
        PromptDataset([path], tokenizer, max_prompt_length=8)
    path = _write(tmp_path / "all_bad.parquet", [_row(data_source=None)])
    with pytest.raises(ValueError, match="no usable prompts"):
        PromptDataset([path], tokenizer, max_prompt_length=8, bad_rows="skip")


def test_prompt_overflow_truncate_left_and_drop(tokenizer, tmp_path):
    long_text = " ".join(str(i) for i in range(200))
    path = _write(tmp_path / "l.parquet", [_row(), _row(content=long_text), _row()])
    full = tokenizer.apply_chat_template([{"role": "user", "content": long_text}], tokenize=True,
                                         add_generation_prompt=True)
    full = full["input_ids"] if hasattr(full, "keys") else full   # BatchEncoding in transformers 5
    limit = len(full) - 10
    ds = PromptDataset([path], tokenizer, max_prompt_length=limit)
    assert ds.stats.prompts_truncated == 1 and len(ds) == 3
    assert ds[1].prompt_ids == list(full[-limit:])            # the generation prompt is kept
    assert tokenizer.decode(ds[1].prompt_ids).endswith("<|im_start|>assistant\n")
    dropped = PromptDataset([path], tokenizer, max_prompt_length=limit, prompt_overflow="drop")
    assert dropped.stats.prompts_dropped == 1 and len(dropped) == 2
    assert [r.source for r in dropped.records] == [f"{path}:0", f"{path}:2"]


def test_sampler_epochs_are_permutations_and_cross_boundaries():
    s = PromptSampler(10, seed=3)
    first = s.next_indices(7) + s.next_indices(3)
    second = s.next_indices(10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second and s.epoch == 2 and s.position == 0
    s2 = PromptSampler(10, seed=3)
    assert s2.next_indices(13) == first + second[:3]        # a batch continues into the next epoch
    assert PromptSampler(5, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]
    assert PromptSampler(10, seed=4).next_indices(10) != first


def test_sampler_resume_gives_exactly_the_same_future_batches():
    rng = random.Random(0)
    sizes = [rng.randint(1, 9) for _ in range(30)]
    ref = PromptSampler(17, seed=11)
    uninterrupted = [ref.next_indices(k) for k in sizes]
    run = PromptSampler(17, seed=11)
    for k in sizes[:12]:
        run.next_indices(k)
    state = dict(run.state_dict())
    resumed = PromptSampler(17, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_indices(k) for k in sizes[12:]] == uninterrupted[12:]
    with pytest.raises(ValueError, match="saved num_items=17, now 18"):
        PromptSampler(18, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="saved seed=11, now 12"):
        PromptSampler(17, seed=12).load_state_dict(state)


def test_synthetic_dataset_is_verifiable_and_loads(tokenizer, tmp_path):
    train, val = write_synthetic_dataset(str(tmp_path / "syn"), num_train=64, num_val=16,
                                         digits=3, operators=("+", "-", "*"), seed=5)
    ds = PromptDataset([train], tokenizer, max_prompt_length=128)
    assert len(ds) == 64 and len(PromptDataset([val], tokenizer, max_prompt_length=128)) == 16
    for rec in ds.records:
        q = rec.messages[0]["content"]
        a, op, b = q.removeprefix("What is ").split("?")[0].split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert rec.ground_truth == str(value) and "\\boxed{}" in q
        assert max(int(a), int(b)) < 1000
    ops = {r.messages[0]["content"].split()[3] for r in ds.records}
    assert ops == {"+", "-", "*"}
    # deterministic in the seed, different between splits and seeds
    assert make_rows(8, seed=5) == make_rows(8, seed=5)
    assert make_rows(8, seed=5) != make_rows(8, seed=6)
    assert make_rows(8, seed=5, split="train") != make_rows(8, seed=5, split="val")
    with pytest.raises(ValueError, match="operators must be"):
        make_rows(1, operators=("/",))


def test_warm_start_examples_end_in_the_correct_boxed_answer():
    examples = warm_start_examples(20, digits=2, operators=("+", "*"), seed=1)
    for ex in examples:
        a, op, b = ex["messages"][0]["content"].removeprefix("What is ").split("?")[0].split()
        value = int(a) + int(b) if op == "+" else int(a) * int(b)
        assert extract_answer(ex["response"]) == str(value)
        assert ex["response"].endswith(f"\\boxed{{{value}}}.")
