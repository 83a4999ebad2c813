"""Turn the paper's math data (Reasoning360 "guru" parquet files) into our training/eval parquet files.

Input: local copies of three files of the LLM360/guru-RL-92k dataset (downloading is your step;
the URLs are in --help). They are in verl's schema already (data_source, prompt as chat messages,
ability, reward_model {ground_truth, style}, extra_info, plus other columns such as pass rates);
this script keeps only the four columns the trainer reads, validates every row, and duplicates the
AIME 2024 problems 32 times so that one validation pass scores avg@32 (30 problems -> 960 rows).
The AIME file is published already repeated 8 times (240 rows); it is first collapsed to its
distinct problems, so any repetition of it gives the same output.

Every dropped row is reported with its file, row index and reason, with a count per reason, on
stdout and in <out-dir>/prepare_math_report.json. Every input is read and checked before anything
is written; each output is written under a temporary name and renamed when complete. No output may
replace an input, and an existing file in --out-dir is replaced only when megatron-rlvr wrote the
directory (it carries the `.megatron_rlvr_output` marker, set when this script creates it). Numbers given as ground truth (AIME answers
are integers) are written as strings; any other non-string answer drops the row.

    python examples/data/prepare_math.py --train math__combined_54.4k.parquet \
        --aime math__aime_repeated_8x_240.parquet --math500 math__math_500.parquet --out-dir data
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_rlvr import safety

BASE_URL = "https://huggingface.co/datasets/LLM360/guru-RL-92k/resolve/main"
URLS = {
    "train": f"{BASE_URL}/train/math__combined_54.4k.parquet",
    "aime": f"{BASE_URL}/offline_eval/math__aime_repeated_8x_240.parquet",
    "math500": f"{BASE_URL}/offline_eval/math__math_500.parquet",
}
OUTPUT_NAMES = {  # the file names the seed paper's run scripts use
    "train": "math__combined_54.4k.parquet",
    "aime": "math__aime_repeated_32x_960.parquet",
    "math500": "math__math_500.parquet",
}
REPORT_NAME = "prepare_math_report.json"
MAX_AIME_REPEAT = 1024
REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
ROLES = ("system", "user", "assistant")

SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()),
                              ("repeat", pa.int64()), ("source_extra_info", pa.string())])),
])


class InputError(Exception):
    """A problem with an input file as a whole (missing, unreadable, wrong columns)."""


@dataclass
class Report:
    """What happened to one input file."""
    name: str
    path: str
    rows_read: int = 0
    rows_written: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (row index, reason)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.dropped).most_common())


def read_rows(path: str, name: str) -> list[dict]:
    if os.path.isdir(path):
        raise InputError(f"--{name}: {path} is a directory, not a parquet file")
    if not os.path.isfile(path):
        raise InputError(f"--{name}: file not found: {path} (download it from {URLS[name]})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"--{name}: {path} is not a readable parquet file: "
                         + " ".join(str(e).split())) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"--{name}: {path} lacks required column(s) {missing}; "
                         f"it has {table.column_names}")
    keep = [c for c in (*REQUIRED_COLUMNS, "extra_info") if c in table.column_names]
    try:
        return table.select(keep).to_pylist()
    except UnicodeDecodeError as e:
        raise InputError(f"--{name}: {path}: a string column holds bytes that are not UTF-8 "
                         f"({e.reason} at byte {e.start})") from None


def _messages(prompt) -> list[dict[str, str]]:
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt is not a non-empty list of chat messages")
    out = []
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt[{j}] is not a {{role: system|user|assistant, content: str}} "
                             "message")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise ValueError("prompt has no non-empty user message")
    return out


def _ground_truth(reward_model) -> str:
    if not isinstance(reward_model, dict):
        raise ValueError("reward_model is not a mapping")
    gt = reward_model.get("ground_truth")
    if gt is None:
        raise ValueError("reward_model.ground_truth is missing")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        if isinstance(gt, float) and not math.isfinite(gt):
            raise ValueError("reward_model.ground_truth is not a finite number")
        gt = str(gt)
    if not isinstance(gt, str):
        raise ValueError(f"reward_model.ground_truth has type {type(gt).__name__}, not a string")
    if not gt.strip():
        raise ValueError("reward_model.ground_truth is empty")
    if gt.strip().lower() in ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity",
                              "+infinity", "-infinity"):
        raise ValueError("reward_model.ground_truth is not a finite number")
    return gt.strip()


def clean_row(row: dict, split: str, index: int) -> dict:
    """The row in our schema, or ValueError naming what is wrong with it."""
    source = row.get("data_source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("data_source is missing or not a non-empty string")
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError("extra_info is neither a mapping nor null")
    return {
        "data_source": source,
        "prompt": _messages(row.get("prompt")),
        "reward_model": {"style": "rule", "ground_truth": _ground_truth(row.get("reward_model"))},
        "extra_info": {"split": split, "index": index, "repeat": 0,
                       "source_extra_info": json.dumps(extra or {}, default=str, sort_keys=True)},
    }


def clean_file(path: str, name: str, split: str) -> tuple[list[dict], Report]:
    report = Report(name, path)
    rows = read_rows(path, name)
    report.rows_read = len(rows)
    kept = []
    for i, row in enumerate(rows):
        try:
            kept.append(clean_row(row, split, i))
        except ValueError as e:
            report.dropped.append((i, str(e)))
    return kept, report


def repeat_problems(rows: list[dict], times: int, report: Report) -> list[dict]:
    """Collapse rows to distinct (prompt, answer) problems, then repeat the list `times` times."""
    distinct: dict[str, dict] = {}
    for row in rows:
        key = json.dumps([row["prompt"], row["reward_model"]["ground_truth"]], sort_keys=True)
        distinct.setdefault(key, row)
    problems = list(distinct.values())
    report.notes.append(f"{len(rows)} valid rows are {len(problems)} distinct problems; "
                        f"repeated {times}x -> {len(problems) * times} rows")
    return [{**p, "extra_info": {**p["extra_info"], "repeat": r}}
            for r in range(times) for p in problems]


def write(rows: list[dict], path: str) -> None:
    """Write `path` whole or not at all (a temporary name, renamed once complete)."""
    tmp = path + ".incomplete"
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def print_report(report: Report, limit: int = 20) -> None:
    print(f"[{report.name}] {report.path}: read {report.rows_read}, wrote {report.rows_written}, "
          f"dropped {len(report.dropped)}")
    for reason, n in report.counts().items():
        print(f"    {n:6d} x {reason}")
    for i, reason in report.dropped[:limit]:
        print(f"    row {i}: {reason}")
    if len(report.dropped) > limit:
        print(f"    ... {len(report.dropped) - limit} more in the JSON report")
    for note in report.notes:
        print(f"    note: {note}")


def _parser() -> argparse.ArgumentParser:
    epilog = "Download the inputs first (no network access is made here), e.g.:\n" + "".join(
        f"  wget -O {os.path.basename(url)} {url}\n" for url in URLS.values())
    p = safety.OneLineParser(
        prog="prepare_math.py", description=__doc__.split("\n\n")[0], epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="math__combined_54.4k.parquet (guru math training split)")
    p.add_argument("--aime", help="math__aime_repeated_8x_240.parquet (AIME 2024, any repetition)")
    p.add_argument("--math500", help="math__math_500.parquet")
    p.add_argument("--out-dir", required=True, help="where to write the prepared parquet files")
    p.add_argument("--aime-repeat", type=safety.positive_int, default=32,
                   help="copies of each AIME problem in the output (avg@N), default 32")
    return p


def check_outputs(out_dir: str, inputs: dict[str, str]) -> list[str]:
    """Refuse an --out-dir whose writing could destroy data (before any input is read); returns
    the paths that will be written."""
    if not out_dir or not out_dir.strip():
        raise safety.UnsafeOutputError("--out-dir is empty; give the directory to write to")
    if os.path.realpath(out_dir) == os.path.realpath(os.sep):
        raise safety.UnsafeOutputError(f"--out-dir {out_dir} is the file system root")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise safety.UnsafeOutputError(f"--out-dir {out_dir} exists and is not a directory")
    outputs = [os.path.join(out_dir, OUTPUT_NAMES[name]) for name in inputs] + \
        [os.path.join(out_dir, REPORT_NAME)]
    real_inputs = {os.path.realpath(path): name for name, path in inputs.items()}
    for out in outputs:
        for candidate in (out, out + ".incomplete"):
            name = real_inputs.get(os.path.realpath(candidate))
            if name:
                raise safety.UnsafeOutputError(
                    f"--out-dir {out_dir}: the output {candidate} is the input --{name} "
                    f"{inputs[name]}; writing it would destroy the input: choose another "
                    "--out-dir")
    ours = os.path.isdir(out_dir) and safety.is_ours(out_dir)
    for out in outputs:
        if os.path.lexists(out) and not ours:
            raise safety.UnsafeOutputError(
                f"--out-dir {out_dir}: {out} already exists and this directory was not written "
                f"by megatron-rlvr (no {safety.MARKER}); remove the file or choose another "
                "--out-dir")
        if os.path.isdir(out):
            raise safety.UnsafeOutputError(f"--out-dir {out_dir}: {out} is a directory")
    safety.check_writable(out_dir, "--out-dir")
    return outputs


def _run(p: argparse.ArgumentParser, args) -> int:
    inputs = {name: getattr(args, name) for name in URLS if getattr(args, name) is not None}
    if not inputs:
        p.error("give at least one of --train, --aime, --math500")
    for name, path in inputs.items():
        if not path.strip():
            p.error(f"--{name} is empty")
    if args.aime_repeat > MAX_AIME_REPEAT:
        p.error(f"--aime-repeat must be at most {MAX_AIME_REPEAT}, got {args.aime_repeat}")
    check_outputs(args.out_dir, inputs)
    # Read and check every input before writing anything: a bad later file leaves no output.
    cleaned = []
    for name, path in inputs.items():
        try:
            rows, report = clean_file(path, name, "train" if name == "train" else "test")
        except InputError as e:
            p.exit(2, f"{p.prog}: error: {e} (nothing was written)\n")
        if name == "aime":
            rows = repeat_problems(rows, args.aime_repeat, report)
        cleaned.append((name, rows, report))
    created = not os.path.isdir(args.out_dir) or not os.listdir(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    if created:
        safety.write_marker(args.out_dir, "prepare_math.py")
    reports, written = [], []
    try:
        for name, rows, report in cleaned:
            out = os.path.join(args.out_dir, OUTPUT_NAMES[name])
            if not rows:
                report.notes.append("no valid rows: nothing written")
            else:
                write(rows, out)
                written.append(out)
                report.notes.append(f"wrote {out}")
            report.rows_written = len(rows)
            print_report(report)
            reports.append(report)
        write_report(reports, os.path.join(args.out_dir, REPORT_NAME))
    except OSError as e:
        done = ", ".join(written) if written else "nothing"
        p.exit(2, f"{p.prog}: error: writing in --out-dir {args.out_dir} failed: "
                  f"{safety.one_line(e)}; already written: {done}\n")
    return 0 if all(r.rows_written for r in reports) else 1


def write_report(reports: list[Report], path: str) -> None:
    tmp = path + ".incomplete"
    with open(tmp, "w") as f:
        json.dump([{"input": r.name, "path": r.path, "rows_read": r.rows_read,
                    "rows_written": r.rows_written, "dropped_per_reason": r.counts(),
                    "dropped": [{"row": i, "reason": why} for i, why in r.dropped],
                    "notes": r.notes} for r in reports], f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """A user's mistake ends with one `prepare_math.py: error: ...` line and exit code 2."""
    p = _parser()
    args = p.parse_args(argv)
    return safety.run_cli(p.prog, _run, p, args)


if __name__ == "__main__":
    sys.exit(main())
