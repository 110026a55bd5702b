"""Convert a GSM8K-style dataset you already have into the dataloader's JSONL rows.

    python recipes/gsm8k_qwen2.5/prepare_data.py --train /data/gsm8k/train.parquet \
        --test /data/gsm8k/test.parquet --out-dir /data/gsm8k-nexrl

Reads local .parquet or .jsonl files only; it never downloads anything (fetch GSM8K yourself,
e.g. the `main` config's train/test parquet files). Each input row needs a question and a
worked solution whose final answer follows "####" (GSM8K's format). Each output row
(<out-dir>/train.jsonl, <out-dir>/test.jsonl):

    {"prompt": [{"role": "user", "content": "<question>\\n<instruction>"}],
     "answer": "72", "data_source": "gsm8k", "index": 0}

Why these choices:
- `prompt` is a chat list, so the rollout applies the model's own chat template (Qwen2.5
  Instruct's, with its default system message) instead of a hand-made prompt format;
- the instruction asks for the answer in \\boxed{}, the format Qwen2.5 models were tuned to
  produce for math, which the built-in `math` evaluator extracts first;
- `answer` is only the final number (thousands separators dropped), so the evaluator compares
  values and the (long) worked solution does not travel with every lease;
- `data_source` names the per-source validation metrics (validation/gsm8k/accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(ValueError):
    """An input file or row that cannot be converted; the text names the file and the row."""


def final_answer(solution: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last "####", first line,
    without thousands separators or a trailing period; None if there is no "####"."""
    if "####" not in solution:
        return None
    tail = solution.rsplit("####", 1)[1].strip()
    if not tail:
        return None
    answer = tail.splitlines()[0].strip().rstrip(".").strip()
    return answer.replace(",", "") or None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local .parquet or .jsonl file."""
    if not path.is_file():
        raise DataError(f"prepare_data: input file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only parquet inputs need pyarrow

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise DataError(f"prepare_data: cannot read parquet file {path}: {e}") from e
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"prepare_data: {path} line {lineno} is not JSON: {e}") from e
        return rows
    raise DataError(f"prepare_data: {path} is neither .parquet nor .jsonl")


def convert_rows(rows: Iterable[dict[str, Any]], *, where: str = "input",
                 question_key: str = "question", answer_key: str = "answer",
                 instruction: str = DEFAULT_INSTRUCTION, data_source: str = "gsm8k",
                 limit: int = 0) -> list[dict[str, Any]]:
    """The dataloader rows for GSM8K-style `rows` (see the module docstring); `where` names
    the source in errors. A row without a question or a "####" answer is an error."""
    out = []
    for i, row in enumerate(rows):
        if limit and len(out) >= limit:
            break
        q, sol = row.get(question_key), row.get(answer_key)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"prepare_data: {where} row {i} has no text in {question_key!r} "
                            f"(fields: {', '.join(sorted(map(str, row)))})")
        ans = final_answer(sol) if isinstance(sol, str) else None
        if ans is None:
            raise DataError(f"prepare_data: {where} row {i}: {answer_key!r} has no final "
                            f"answer after '####' (got {str(sol)[-80:]!r})")
        content = f"{q.strip()}\n{instruction}" if instruction else q.strip()
        out.append({"prompt": [{"role": "user", "content": content}], "answer": ans,
                    "data_source": data_source, "index": i})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a crash never leaves a half-written file under the final name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, type=Path, help="GSM8K-style train .parquet/.jsonl")
    ap.add_argument("--test", required=True, type=Path, help="GSM8K-style test .parquet/.jsonl")
    ap.add_argument("--out-dir", required=True, type=Path, help="writes train.jsonl, test.jsonl")
    ap.add_argument("--question-key", default="question")
    ap.add_argument("--answer-key", default="answer", help="column with the '#### x' solution")
    ap.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                    help="appended to every question on a new line ('' = none)")
    ap.add_argument("--data-source", default="gsm8k")
    ap.add_argument("--limit", type=int, default=0, help="first N rows of each split (0 = all)")
    args = ap.parse_args(argv)
    try:
        for split, src in (("train", args.train), ("test", args.test)):
            rows = convert_rows(read_rows(src), where=str(src), question_key=args.question_key,
                                answer_key=args.answer_key, instruction=args.instruction,
                                data_source=args.data_source, limit=args.limit)
            if not rows:
                raise DataError(f"prepare_data: {src} has no rows")
            dest = args.out_dir / f"{split}.jsonl"
            write_jsonl(rows, dest)
            print(f"wrote {len(rows)} rows to {dest}")
    except DataError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
