"""SFT data: where the "sft" trainer type gets its batches.

Decision: SFT reads a JSONL file named in the trainer config (``trainer.sft.data_file``), not
the pool. SFT is a warm start: it needs reference answers, not the policy's own samples, and
it needs no engine, rollout, dataloader or pool — ``nexrl-node trainer trainer.type=sft
trainer.push_weights=false ...`` runs it alone (engines in the job still get every step's
weights when push_weights is on, so a validator can watch the warm start).

One JSON object per line, either

    {"prompt": "...", "response": "..."}                         plain text, no template
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}

For ``messages`` the prompt is the tokenizer's chat template over every message but the last
(with the generation prompt) and the response is the last message's content, which must be
the assistant's. The tokenizer's eos token is appended to each response (``append_eos``), so
the model learns to stop. Rows longer than ``max_length`` tokens lose the end of their
response; a row whose prompt alone is that long is an error naming the line.

Order and resume: every epoch visits the rows in a permutation drawn from ``seed + epoch``
(or in file order without ``shuffle``); the cursor (epoch, position) is saved in the trainer's
checkpoint, so a resumed run continues with exactly the rows an uninterrupted run would see.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from nexrl.trainer_utils import Sample


@dataclass
class SFTConfig:
    """The `trainer.sft` block (used by trainer.type = "sft" only)."""

    #: JSONL file of {"prompt", "response"} or {"messages"} rows (see nexrl.sft_data).
    data_file: str = ""
    #: Rows per trainer step.
    batch_size: int = 8
    #: Visit rows in a seeded random order each epoch (False: file order).
    shuffle: bool = True
    #: Longest prompt + response in tokens; longer responses are cut at the end.
    max_length: int = 2048
    #: Append the tokenizer's eos token to every response.
    append_eos: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"trainer.sft.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"trainer.sft.max_length must be >= 2, got {self.max_length}")


def _encode_row(row: dict[str, Any], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{where}: 'messages' must be a list ending with an assistant turn")
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                               tokenize=False)
        response = str(msgs[-1].get("content", ""))
    elif "prompt" in row and "response" in row:
        prompt, response = str(row["prompt"]), str(row["response"])
    else:
        raise ValueError(f"{where}: a row needs 'prompt' and 'response', or 'messages' "
                         f"(got keys {sorted(row)})")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(p), list(r)


def load_sft_samples(path: str, tokenizer: Any, cfg: SFTConfig) -> list[Sample]:
    """Tokenize every row of the JSONL file into a Sample (response_mask all ones)."""
    eos = tokenizer.eos_token_id
    out: list[Sample] = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"trainer.sft.data_file {path!r} cannot be read: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"trainer.sft.data_file {path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            p, r = _encode_row(row, tokenizer, where)
            if cfg.append_eos and eos is not None:
                r.append(int(eos))
            if not p:
                raise ValueError(f"{where}: the prompt is empty")
            if len(p) >= cfg.max_length:
                raise ValueError(f"{where}: the prompt has {len(p)} tokens, max_length is "
                                 f"{cfg.max_length}")
            r = r[:cfg.max_length - len(p)]
            out.append(Sample(p, r, [1.0] * len(r)))
    if not out:
        raise ValueError(f"trainer.sft.data_file {path}: no rows")
    return out


class SFTStream:
    """Endless batches over the samples, epoch by epoch, with a resumable cursor."""

    def __init__(self, samples: list[Sample], batch_size: int, shuffle: bool, seed: int):
        self.samples, self.batch_size, self.shuffle, self.seed = samples, batch_size, shuffle, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> tuple[list[Sample], list[str]]:
        """The next batch_size samples and their ids ("sft:<row>"); wraps into the next epoch."""
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.pos:self.pos + self.batch_size - len(picked)]
            picked += take
            self.pos += len(take)
        return [self.samples[i] for i in picked], [f"sft:{i}" for i in picked]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)
