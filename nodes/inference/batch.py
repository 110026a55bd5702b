"""The running batch: the sequences decoded together, their KV cache, and one decode step.

Every row's state between steps is "all tokens but the last are in the KV cache; the last one
is the next input". A newly admitted (or retracted) sequence therefore prefills
``prompt + output[:-1]`` and then joins the same decode step as every other row -- there is
no separate "first token from the prefill" path, and a retracted row resumes exactly where it
stopped. Prefills of several joining rows are batched (left-padded, see kv.py), in chunks of
at most ``max_prefill_tokens`` padded tokens.

The engine (engine.py) owns the locking; everything here runs on the scheduler thread, or
under the engine's ``step_lock``.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass, field

import torch

from .kv import BatchKV, left_pad
from .sampling import SamplingParams, sample_rows


@dataclass(eq=False)
class Sequence:
    """One choice being generated; its fields are final once ``future`` is resolved."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    """Per-sequence RNG when the request has a seed, else None (engine's shared one)."""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Logprob of each output token under its sampling distribution (sampling.py)."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per output token: [(token id, logprob)] of the most likely alternatives."""
    versions: list[str] = field(default_factory=list)
    """Weight version that produced each output token."""
    finish_reason: str | None = None
    """"stop", "length", "abort"; None while running (or when the engine failed)."""
    matched_stop: int | str | None = None
    """Stop string or token id (eos included) that ended the sequence."""
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    """Resolved with the sequence itself when it finishes (or with the engine's error)."""
    finished: bool = False
    """Set by the engine when it is done with the sequence (its future may have been
    cancelled by a waiter that gave up, so the engine never reads the future's state)."""
    seq_id: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def context_but_last(self) -> list[int]:
        """Tokens whose keys/values must be in the cache before the next decode step."""
        return (self.prompt_ids + self.output_ids)[:-1]


class RunningBatch:
    """Rows decoded together plus their left-padded KV cache."""

    def __init__(self, model, *, pad_id: int, eos_ids: frozenset[int], stop_tokenizer,
                 max_model_len: int, max_prefill_tokens: int,
                 stats: collections.Counter) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id, self.eos_ids = pad_id, eos_ids
        self.stop_tokenizer = stop_tokenizer  # used only on the scheduler thread
        self.max_model_len, self.max_prefill_tokens = max_model_len, max_prefill_tokens
        self.stats = stats
        self.rows: list[Sequence] = []
        self.kv = BatchKV.empty(0, self.device)

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> list[Sequence]:
        """Drop every row and the KV cache; returns the rows (in batch order)."""
        rows, self.rows, self.kv = self.rows, [], BatchKV.empty(0, self.device)
        return rows

    def remove(self, drop: set[Sequence]) -> None:
        keep = [i for i, s in enumerate(self.rows) if s not in drop]
        if len(keep) != len(self.rows):
            self.kv.select(keep)
            self.rows = [self.rows[i] for i in keep]

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs`` (chunked by padded size) and merge them into the batch."""
        chunk: list[Sequence] = []
        for s in sorted(seqs, key=lambda s: s.num_tokens):
            if chunk and (len(chunk) + 1) * s.num_tokens > self.max_prefill_tokens:
                self._prefill(chunk)
                chunk = []
            chunk.append(s)
        if chunk:
            self._prefill(chunk)
        self.stats["max_running"] = max(self.stats["max_running"], len(self.rows))

    def _prefill(self, seqs: list[Sequence]) -> None:
        ctx = [s.context_but_last() for s in seqs]
        part = BatchKV.empty(len(seqs), self.device)
        if any(ctx):
            ids, mask, pos = left_pad(ctx, self.pad_id, self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=part.forward_cache(), use_cache=True,
                             logits_to_keep=1)
            part = BatchKV(out.past_key_values, mask)
            self.stats["prefill_tokens"] += int(mask.sum())
        self.kv.merge(part)
        self.rows.extend(seqs)
        self.stats["prefills"] += 1

    def decode(self, version: str, shared_gen: torch.Generator) -> list[Sequence]:
        """One decode step for every row; returns the rows that finished (already removed)."""
        rows = self.rows
        ids = torch.tensor([[s.last_token()] for s in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[s.num_tokens - 1] for s in rows], dtype=torch.long,
                           device=self.device)
        mask = torch.cat([self.kv.mask, self.kv.mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=self.kv.forward_cache(), use_cache=True,
                         logits_to_keep=1)
        self.kv = BatchKV(out.past_key_values, mask)
        top_n = max(s.params.top_logprobs for s in rows)
        tokens, logps, top = sample_rows(out.logits[:, -1, :], [s.params for s in rows],
                                         [s.generator for s in rows], shared_gen, top_n)
        tokens, logps = tokens.tolist(), logps.tolist()  # the step's one device sync
        top_lists = (top[0].tolist(), top[1].tolist()) if top is not None else None
        keep, done = [], []
        for i, s in enumerate(rows):
            s.output_ids.append(tokens[i])
            s.logprobs.append(logps[i])
            s.versions.append(version)
            if top_lists is not None and s.params.top_logprobs:
                k = s.params.top_logprobs
                s.top_logprobs.append(list(zip(top_lists[1][i][:k], top_lists[0][i][:k])))
            s.finish_reason = self._stop_reason(s)
            (done if s.finish_reason else keep).append(i)
        self.stats["steps"] += 1
        self.stats["tokens"] += len(rows)
        if done:
            self.kv.select(keep)
            self.rows = [rows[i] for i in keep]
        return [rows[i] for i in done]

    def _stop_reason(self, s: Sequence) -> str | None:
        tok, p = s.output_ids[-1], s.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            s.matched_stop = tok
            return "stop"
        if p.stop:
            # a stop string ends inside the last few tokens (every token is >= 1 byte)
            window = max(len(x.encode()) for x in p.stop) + 8
            tail = self.stop_tokenizer.decode(s.output_ids[-window:], skip_special_tokens=True)
            hit = next((x for x in p.stop if x in tail), None)
            if hit is not None:
                s.matched_stop = hit
                return "stop"
        if len(s.output_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len:
            return "length"
        return None
