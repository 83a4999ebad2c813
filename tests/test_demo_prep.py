"""The demo's starting point: data, tokenizer, warm-started HF checkpoint; and `run`'s errors.

`prepare` runs once with a reduced budget (a smaller model, a few dozen warm-start steps): enough
for greedy answers to take the trained format, not for the arithmetic.
"""
import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_rlvr import demo
from megatron_rlvr.data.synthetic import warm_start_examples
from megatron_rlvr.rewards.math import extract_answer

SMALL = demo.DemoSettings(num_train=64, num_val=16, hidden_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, intermediate_size=128, sft_batch_size=32, sft_lr=5e-3,
                          sft_warmup_steps=5, boxed_fraction=1.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.prepare(str(out), settings=SMALL, sft_steps=60, measure_start=False)


def test_checkpoint_loads_in_transformers_with_the_settings(prepared):
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"])
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.head_dim >= 32 and cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (SMALL.hidden_size, SMALL.num_layers)
    assert cfg.vocab_size % 2 == 0
    tok = AutoTokenizer.from_pretrained(prepared["model_dir"])
    assert len(tok) <= cfg.vocab_size and cfg.eos_token_id == tok.eos_token_id
    assert prepared["sft_loss_last"] < prepared["sft_loss_first"] / 3, prepared


def test_tokenizer_round_trips_the_chat_template(prepared):
    tok = AutoTokenizer.from_pretrained(prepared["model_dir"])
    row = pq.read_table(prepared["train_file"]).to_pylist()[0]
    question = row["prompt"][0]["content"]
    text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    answer = "37 + 58 = 95. The answer is \\boxed{95}.<|im_end|>"
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.decode(answer_ids) == answer and answer_ids[-1] == tok.eos_token_id
    pieces = [tok.decode([i]) for i in answer_ids]
    assert pieces[:2] == ["3", "7"], pieces  # one token per digit


def test_greedy_answers_take_the_trained_format(prepared):
    model = AutoModelForCausalLM.from_pretrained(prepared["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(prepared["model_dir"])
    examples = warm_start_examples(4, digits=SMALL.digits, operators=SMALL.operators, seed=0)
    for ex in examples:  # prompts the warm start trained on
        ids = tok.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        response = out[0, len(ids):].tolist()
        assert tok.eos_token_id in response, tok.decode(response)
        text = tok.decode(response, skip_special_tokens=True)
        answer = extract_answer(text)
        assert answer is not None and answer.lstrip("-").isdigit(), text
        assert text.endswith(f"The answer is \\boxed{{{answer}}}."), text


def test_data_files_hold_the_task(prepared):
    rows = pq.read_table(prepared["val_file"]).to_pylist()
    assert len(rows) == SMALL.num_val
    for row in rows:
        a, op, b = row["prompt"][0]["content"].split("?")[0].split(" ")[2:5]
        assert op in SMALL.operators
        assert int(row["reward_model"]["ground_truth"]) == eval(f"{a}{op}{b}")  # noqa: S307


def test_run_names_unknown_configs():
    with pytest.raises(FileNotFoundError, match="demo_top20"):
        demo.run("demo_nope", out_dir="unused")


def test_run_reuses_the_preparation_and_propagates_trainer_failure(prepared, capfd):
    out = str(demo.Path(prepared["model_dir"]).parent)
    before = json.loads((demo.Path(out) / "prepare.json").read_text())
    rc = demo.run("demo_top20", out_dir=out, nproc=1, extra_overrides=["trainer.no_such_field=1"])
    assert rc != 0
    err = capfd.readouterr()
    assert "reusing the prepared model" in err.out
    assert "no_such_field" in err.out + err.err  # the trainer's own error reached the user
    assert f"exit code {rc}" in err.err
    assert json.loads((demo.Path(out) / "prepare.json").read_text()) == before
