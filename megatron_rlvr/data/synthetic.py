"""A synthetic verifiable task for the CPU demo: multi-digit integer arithmetic.

"What is 37 + 58?" with ground truth "95", the answer expected in \\boxed{}. Difficulty is set by
the number of digits per operand and the operators. Problems are written in verl's parquet schema
so the demo exercises the same data path as real datasets, and `warm_start_examples` gives correct
worked answers for a short supervised warm start (a random tiny model never emits \\boxed{}, so
without it every reward would be 0 and RL would have no signal).
"""
from __future__ import annotations

import os
import random
from typing import Sequence

DATA_SOURCE = "synthetic_arithmetic"
INSTRUCTION = "Put the final answer in \\boxed{}."
OPERATORS = ("+", "-", "*")


def make_problem(rng: random.Random, digits: int = 2,
                 operators: Sequence[str] = ("+", "-")) -> tuple[int, str, int, int]:
    """Return (a, op, b, value) with 0 <= a, b < 10**digits."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    bad = [op for op in operators if op not in OPERATORS]
    if bad or not operators:
        raise ValueError(f"operators must be a non-empty subset of {OPERATORS}, got {operators}")
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    op = rng.choice(list(operators))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return a, op, b, value


def _question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? {INSTRUCTION}"


def make_rows(num: int, *, digits: int = 2, operators: Sequence[str] = ("+", "-"),
              seed: int = 0, split: str = "train") -> list[dict]:
    """`num` rows in verl's schema."""
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for i in range(num):
        a, op, b, value = make_problem(rng, digits, operators)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": _question(a, op, b)}],
            "reward_model": {"style": "rule", "ground_truth": str(value)},
            "extra_info": {"split": split, "index": i},
        })
    return rows


def write_synthetic_dataset(out_dir: str, *, num_train: int = 2048, num_val: int = 128,
                            digits: int = 2, operators: Sequence[str] = ("+", "-"),
                            seed: int = 0) -> tuple[str, str]:
    """Write train.parquet and val.parquet under `out_dir`; return their paths.

    Train and val draw from the same distribution with different random streams (small digit
    counts have few distinct problems, so they may overlap: this is a plumbing demo, not a
    generalisation benchmark).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, num in (("train", num_train), ("val", num_val)):
        path = os.path.join(out_dir, f"{split}.parquet")
        rows = make_rows(num, digits=digits, operators=operators, seed=seed, split=split)
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(path)
    return paths[0], paths[1]


def warm_start_examples(num: int, *, digits: int = 2, operators: Sequence[str] = ("+", "-"),
                        seed: int = 0, boxed_fraction: float = 1.0) -> list[dict]:
    """Supervised examples: {"messages": [user turn], "response": worked answer}.

    The response states the operation and ends in the value: boxed (`\\boxed{v}`, the format the
    reward reads) in a `boxed_fraction` of the examples, plain ("The answer is v.") in the rest.
    A model warm-started on a mix knows the arithmetic but uses the rewarded format only some of
    the time: the behaviour RL with a verifier is good at fixing, fast, on every prompt at once.
    """
    if not 0.0 <= boxed_fraction <= 1.0:
        raise ValueError(f"boxed_fraction must be in [0, 1], got {boxed_fraction}")
    rng = random.Random(f"{seed}:sft")
    out = []
    for _ in range(num):
        a, op, b, value = make_problem(rng, digits, operators)
        answer = f"\\boxed{{{value}}}" if rng.random() < boxed_fraction else str(value)
        out.append({
            "messages": [{"role": "user", "content": _question(a, op, b)}],
            "response": f"{a} {op} {b} = {value}. The answer is {answer}.",
        })
    return out
