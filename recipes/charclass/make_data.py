"""Write the charclass task's train and validation sets (seeded, reproducible).

    python recipes/charclass/make_data.py            # -> recipes/charclass/data/{train,val}.jsonl

Each row: {"prompt": [{"role": "user", "content": "[qfzt] Write 4 capitals."}],
"answer": "capitals", "length": 4, "data_source": "charclass"}. The bracketed tag is random
noise, so prompts are (almost) all distinct and the validation prompts never occur in the
training set (tags are drawn disjoint): validation measures whether the model reads the class
word in prompts it has not seen, not whether it memorised strings.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from evaluator import CLASSES  # the recipe directory is on sys.path when run as a script


def make_rows(n: int, rng: random.Random, length: int, used_tags: set[str]) -> list[dict]:
    rows = []
    classes = sorted(CLASSES)
    while len(rows) < n:
        tag = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        if tag in used_tags:
            continue
        used_tags.add(tag)
        cls = rng.choice(classes)
        rows.append({"prompt": [{"role": "user", "content": f"[{tag}] Write {length} {cls}."}],
                     "answer": cls, "length": length, "data_source": "charclass"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--train", type=int, default=2048, help="training rows")
    ap.add_argument("--val", type=int, default=128, help="validation rows")
    ap.add_argument("--length", type=int, default=4, help="characters asked for (max_tokens)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, used = random.Random(args.seed), set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", args.train), ("val", args.val)):
        rows = make_rows(n, rng, args.length, used)
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(rows)} rows to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
