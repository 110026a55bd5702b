"""The embedded engine: one HF causal LM, one scheduler thread, continuous batching.

Who waits for what (all waits have timeouts)::

    HTTP handlers ──submit()──▶ waiting deque ──admit (≤ max_batch_size rows)──▶ running batch
      │   (Future per sequence)      ▲   │ prefill, merge into batch KV               │
      │                              │   └──────────────────────────────────────┐     │
      │                     retract (flush_cache, apply_weights, pause retract) │     │
      │                              │                                          ▼     ▼
      └◀──── future resolved ◀─── finished rows retire ◀── sample ◀── one decode step (all rows)

    scheduler thread: sleeps on `_cond` while paused or idle; woken by submit(), resume(),
                      abort(), close(). Each iteration holds `step_lock` for one step:
                      process aborts -> admit/prefill -> decode -> sample -> retire.
    pause(mode), apply_weights(), flush_cache() take `step_lock`, so they run only between
    steps and never see a half-finished step.

Sequences join and leave the running batch at decode-step boundaries; the batch KV cache is
left-padded (see kv.py), so a newly admitted row is prefilled once and then decoded together
with every other row. One request with n choices is n sequences.

Weight versions and in-flight requests (the rules the rollout side relies on):
- weights change only between decode steps, under ``step_lock``;
- every generated token records the weight version that produced it (``Sequence.versions``);
  a completion that spans an update therefore reports both versions per token, never a
  silent mix; ``/pause_generation`` before an update avoids spanning altogether;
- after ``apply_weights`` (and ``flush_cache``) no row continues on keys/values computed by
  older weights: running rows are *retracted* -- their KV is dropped and prompt + tokens so
  far are prefilled again with the new weights at the next step (sglang instead keeps the
  stale KV of in_place-paused requests; recomputing costs one prefill and keeps logprobs
  exact for the new version);
- pause modes (sglang's): ``abort`` finishes every running and waiting sequence with
  finish_reason "abort" (partial tokens are returned); ``retract`` holds them and drops their
  KV; ``in_place`` holds them with their KV. Requests submitted while paused wait in the queue.
  ``resume()`` continues all of them.

Interface for the weight-transfer module (``weights.py``), kept stable:
``engine.model`` (torch module), ``engine.device``, ``engine.dtype``, ``engine.pause(mode)``,
``engine.resume()``, ``engine.paused``, ``engine.apply_weights(named_tensors, version)``,
``engine.weight_version``, ``engine.flush_cache()``, ``engine.abort_all()``,
``engine.step_lock`` (re-entrant: hold it across several ``apply_weights`` calls to keep
generation still between buckets; ``abort_all()`` inside it aborts in-flight requests
without touching the pause state a caller may have set).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import itertools
import logging
import threading
import time
from typing import Iterable

import torch

from .batch import RunningBatch, Sequence
from .sampling import SamplingParams

__all__ = ["Engine", "EngineClosed", "EngineFull", "Sequence", "load_model", "PAUSE_MODES"]

log = logging.getLogger("nexrl.inference")

PAUSE_MODES = ("abort", "retract", "in_place")
_WAKE_S = 1.0  # longest the scheduler sleeps before re-checking its state


class EngineFull(RuntimeError):
    """The waiting queue is at ``max_queue_size``."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or its scheduler thread died."""


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_path: str, tokenizer_path: str | None, device: str, dtype: str):
    """Load (model, tokenizer) from local directories via ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    model.requires_grad_(False)  # inference only: updates copy into parameters in place
    return model.to(device).eval(), tokenizer


class Engine:
    """Continuous-batching generator over one HF causal LM (see module docstring)."""

    def __init__(self, model, tokenizer, *, weight_version: str = "0", max_batch_size: int = 64,
                 max_queue_size: int = 4096, max_model_len: int | None = None,
                 max_prefill_tokens: int = 8192, model_path: str = "",
                 num_threads: int = 0) -> None:
        layer_types = getattr(model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError("inference engine: only full-attention models are supported, "
                             f"config has layer types {sorted(set(layer_types))}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.weight_version = str(weight_version)
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_model_len = max_model_len or int(model.config.max_position_embeddings)
        self.max_prefill_tokens = max_prefill_tokens
        self.num_threads = num_threads  # torch intra-op threads of the scheduler (0: default)
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.step_lock = threading.RLock()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._aborts: set[Sequence] = set()
        self.stats: collections.Counter = collections.Counter()
        # the scheduler gets its own tokenizer copy: HF fast tokenizers are not thread-safe
        self._batch = RunningBatch(model, pad_id=self.pad_id, eos_ids=self.eos_ids,
                                   stop_tokenizer=copy.deepcopy(tokenizer),
                                   max_model_len=self.max_model_len,
                                   max_prefill_tokens=max_prefill_tokens, stats=self.stats)
        self._paused = False
        self.pause_mode: str | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._ids = itertools.count(1)
        self._shared_gen = torch.Generator(device=self.device)
        self._shared_gen.seed()
        self._thread = threading.Thread(target=self._loop, name="nexrl-engine", daemon=True)

    @staticmethod
    def _eos_ids(model, tokenizer) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(model, "generation_config", None), model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(ids)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler (in-flight sequences finish with "abort") and join it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"inference engine: scheduler did not stop in {timeout}s")
        with self.step_lock:
            self._abort_everything("abort")

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._closing

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def num_running(self) -> int:
        return len(self._batch)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is running or waiting; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._batch and not self._waiting,
                                       timeout=timeout)

    # ----------------------------------------------------------------- requests
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Sequence]:
        """Queue ``n`` sequences for ``prompt_ids``; each resolves its own ``future``.

        Raises ValueError for bad input, EngineFull when the queue is full, EngineClosed
        when the engine is stopping or dead. With a seed, choice i uses seed ``seed + i``.
        """
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; this model's maximum "
                             f"context length is {self.max_model_len} tokens")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        seqs = []
        for i in range(n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((params.seed + i) % (1 << 63))
            seqs.append(Sequence(list(prompt_ids), params, gen, seq_id=next(self._ids)))
        with self._cond:
            if self._closing or self._error is not None:
                raise EngineClosed(f"inference engine is not accepting requests "
                                   f"({self._error or 'shutting down'})")
            if len(self._waiting) + n > self.max_queue_size:
                raise EngineFull(f"inference engine queue is full ({self.max_queue_size} "
                                 "sequences waiting)")
            self._waiting.extend(seqs)
            self._cond.notify_all()
        return seqs

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
                 timeout: float = 600.0) -> list[Sequence]:
        """Blocking convenience: submit and wait for all ``n`` sequences."""
        seqs = self.submit(prompt_ids, params, n)
        deadline = time.monotonic() + timeout
        for s in seqs:
            s.future.result(timeout=max(0.0, deadline - time.monotonic()))
        return seqs

    def abort(self, seqs: Iterable[Sequence]) -> None:
        """Finish these sequences with "abort" at the next step boundary (even when paused)."""
        with self._cond:
            self._aborts.update(s for s in seqs if not s.finished)
            self._cond.notify_all()

    # ----------------------------------------------------------------- control
    def pause(self, mode: str = "abort") -> int:
        """Stop generating after the current step; returns the number of sequences affected."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self.step_lock:
            with self._cond:
                self._paused, self.pause_mode = True, mode
            if mode == "abort":
                return self._abort_everything("abort")
            if mode == "retract":
                return self._retract_running()
            return len(self._batch)

    def abort_all(self) -> int:
        """Finish every running and waiting sequence with "abort" now; returns how many."""
        with self.step_lock:
            return self._abort_everything("abort")

    def resume(self) -> None:
        with self._cond:
            self._paused, self.pause_mode = False, None
            self._cond.notify_all()

    def flush_cache(self) -> int:
        """Drop the running batch's KV (rows are prefilled again); returns rows retracted.

        NexRL has no prefix cache, so this is the only cache there is; flushing never loses
        work, it only costs a prefill.
        """
        with self.step_lock:
            return self._retract_running()

    def apply_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                      version: str | None = None) -> None:
        """Copy tensors into the model's parameters by name, between decode steps.

        Validates every name and shape first and applies nothing if any is wrong. Running
        rows are retracted (their KV came from the old weights). Sets ``weight_version``
        when ``version`` is given.
        """
        items = list(named_tensors)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unknown = [n for n, _ in items if n not in params]
        wrong = [f"{n}: got {tuple(t.shape)}, model has {tuple(params[n].shape)}"
                 for n, t in items if n in params and tuple(t.shape) != tuple(params[n].shape)]
        if unknown or wrong:
            raise ValueError("inference engine: weight update rejected, nothing applied; "
                             f"unknown names {unknown[:10]} ({len(unknown)} total); "
                             f"shape mismatches {wrong[:10]} ({len(wrong)} total)")
        with self.step_lock, torch.no_grad():
            for name, tensor in items:
                params[name].copy_(tensor)
            self._retract_running()
            if version is not None:
                self.weight_version = str(version)
            self.stats["weight_updates"] += 1

    def load_weights_from_disk(self, model_path: str, version: str | None = None) -> int:
        """Read an HF checkpoint from disk (same architecture) and apply it; returns #tensors."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        named = list(fresh.named_parameters())
        self.apply_weights(named, version)
        self.model_path = model_path
        return len(named)

    def info(self) -> dict:
        """Counters and state for ``/get_server_info`` (plain JSON types)."""
        return {"weight_version": self.weight_version, "paused": self._paused,
                "pause_mode": self.pause_mode, "running": len(self._batch),
                "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                "max_model_len": self.max_model_len, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), **dict(self.stats)}

    # ----------------------------------------------------------------- scheduler
    def _has_work(self) -> bool:
        return bool(self._aborts) or (not self._paused and bool(self._batch or self._waiting))

    def _loop(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)  # set on the thread that runs the model
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._closing and not self._has_work():
                            self._cond.wait(timeout=_WAKE_S)
                        if self._closing:
                            return
                    with self.step_lock:
                        self._step()
        except BaseException as exc:  # noqa: BLE001 -- recorded, surfaced, then re-raised
            self._error = exc
            log.exception("inference engine: scheduler thread died")
            with self.step_lock:
                self._abort_everything(None, exc)
            raise

    def _step(self) -> None:
        self._process_aborts()
        if self._paused:
            return
        new: list[Sequence] = []
        with self._cond:
            while self._waiting and len(self._batch) + len(new) < self.max_batch_size:
                new.append(self._waiting.popleft())
        try:
            if new:
                self._batch.add(new)
            if self._batch:
                for s in self._batch.decode(self.weight_version, self._shared_gen):
                    self._finish(s, s.finish_reason)
        except torch.OutOfMemoryError as exc:
            log.error("inference engine: out of memory in a step; failing the batch and the "
                      "sequences being admitted: %s", exc)
            for s in self._batch.clear() + new:
                self._finish(s, None, exc)

    def _process_aborts(self) -> None:
        with self._cond:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            self._waiting = collections.deque(s for s in self._waiting if s not in aborts)
        self._batch.remove(aborts)
        for s in aborts:
            self._finish(s, "abort")

    # ----------------------------------------------------------------- helpers (step_lock held)
    def _finish(self, s: Sequence, reason: str | None, exc: BaseException | None = None) -> None:
        if s.finished:  # an abort that raced with a normal finish: keep the first
            return
        s.finished, s.finish_reason = True, reason
        try:
            if exc is not None:
                s.future.set_exception(exc)
            else:
                s.future.set_result(s)
        except concurrent.futures.InvalidStateError:
            log.debug("inference engine: sequence %d finished after its waiter gave up",
                      s.seq_id)
        with self._cond:
            self._cond.notify_all()  # wakes wait_idle()

    def _retract_running(self) -> int:
        rows = self._batch.clear()
        with self._cond:
            self._waiting.extendleft(reversed(rows))
        self.stats["retracted"] += len(rows)
        return len(rows)

    def _abort_everything(self, reason: str | None, exc: BaseException | None = None) -> int:
        with self._cond:
            seqs = list(self._waiting) + list(self._aborts)
            self._waiting.clear()
            self._aborts.clear()
        seqs = self._batch.clear() + seqs
        for s in seqs:
            self._finish(s, reason, exc)
        return len({id(s) for s in seqs})
