"""Token-in/token-out generation against a set of OpenAI-compatible engines, with retries.

    EnginePool.generate(prompt_ids, n, sampling) --POST /v1/completions {prompt: [ids], n, ...}-->
        the least-loaded engine (fewest sequences in flight from this worker; ties round-robin)
    <-- n choices, each with the engine's extension fields: token_ids (completion ids),
        token_logprobs (logprob of each, under the sampling distribution), weight_version and
        token_weight_versions (the version that produced each token)

Nothing is re-tokenized: the prompt goes out as ids and the response comes back as ids, so
the trainer sees exactly the tokens the engine sampled, with the engine's own logprobs.

Failures, and what happens (every wait is bounded):
- connection refused / reset, no reply within request_timeout_s, HTTP 408/429/5xx, a reply
  that lacks the fields above: retried on another engine if there is one, after an
  exponential backoff (retry_backoff_s * 2^k, capped), at most `retries` times; then
  `EngineUnavailable` (the rollout worker gives the lease back by not acknowledging it).
- HTTP 400/404/422 (the request itself is wrong, e.g. a prompt longer than the context):
  `EngineRequestError` at once; retrying cannot help.
- finish_reason "abort" (an engine paused with mode=abort for a weight update, or shutting
  down): only the aborted samples are generated again, from scratch, at most `abort_retries`
  times (aborts are expected during syncs, so they have their own, larger budget).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

_VERSION = re.compile(r"-?\d+")


class EngineUnavailable(RuntimeError):
    """Every attempt at a generation failed with a transient error."""


class EngineRequestError(ValueError):
    """The engine refused the request as invalid (HTTP 4xx); retrying cannot help."""


class EngineReplyError(RuntimeError):
    """The engine's reply lacks or garbles a field NexRL needs (retried like a 5xx)."""


@dataclass
class Sample:
    """One completion: the engine's token ids, logprobs and weight versions."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str               # "stop" | "length"
    weight_version: int              # oldest version that produced a token
    weight_version_max: int          # newest one
    text: str = ""                   # the engine's decoded text (for logs; rewards decode ids)
    engine: str = ""                 # base URL of the engine that produced it
    generate_s: float = 0.0          # wall time of the request that produced it


@dataclass
class SamplingConfig:
    """Sampling fields sent with every request (OpenAI names)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off (not sent)
    stop: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(max_tokens=self.max_tokens, temperature=self.temperature,
                                   top_p=self.top_p)
        if self.top_k:
            out["top_k"] = self.top_k
        if self.stop:
            out["stop"] = list(self.stop)
        return out


def _version(value: Any, url: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _VERSION.fullmatch(value.strip()):
        return int(value)
    raise EngineReplyError(f"engine {url}: weight_version {value!r} is not an integer "
                           f"(weight_sync sets it to the trainer step)")


def parse_choice(choice: dict[str, Any], url: str, response_version: Any = None) -> Sample:
    """A Sample from one completion choice (the embedded engine's extension fields).

    sglang reports the weight version once per response (`metadata.weight_version`), not per
    choice: `response_version` is that value, used when the choice carries none."""
    ids, lps = choice.get("token_ids"), choice.get("token_logprobs")
    if lps is None and isinstance(choice.get("logprobs"), dict):  # standard OpenAI logprobs
        lps = choice["logprobs"].get("token_logprobs")
    if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
        raise EngineReplyError(f"engine {url}: a choice lacks token_ids/token_logprobs of equal "
                               f"length (is it NexRL's engine, or asked with logprobs?)")
    versions = (choice.get("token_weight_versions")
                or [choice.get("weight_version", response_version)])
    vs = [_version(v, url) for v in versions]
    return Sample(response_ids=[int(t) for t in ids], logprobs=[float(x) for x in lps],
                  finish_reason=str(choice.get("finish_reason") or ""),
                  weight_version=min(vs), weight_version_max=max(vs),
                  text=str(choice.get("text") or ""), engine=url)


class EnginePool:
    """Async clients for several engines; see the module docstring. Runs on one event loop."""

    def __init__(self, urls: list[str], *, request_timeout_s: float, retries: int,
                 abort_retries: int, retry_backoff_s: float, max_backoff_s: float,
                 model: str = "", standard_logprobs: bool = False,
                 on_retry: Callable[[str, str], None] | None = None):
        from openai import AsyncOpenAI  # imported with the worker, not with the config

        if not urls:
            raise ValueError("rollout: no inference engines (no peers of role 'inference' and "
                             "no rollout.engine_urls)")
        self.urls = [normalize_url(u) for u in urls]
        self.clients = [AsyncOpenAI(base_url=u + "/v1", api_key="nexrl", max_retries=0,
                                    timeout=request_timeout_s) for u in self.urls]
        self.inflight = [0] * len(self.urls)
        self.down_until = [0.0] * len(self.urls)   # monotonic time before which i is avoided
        self.retries, self.abort_retries = retries, abort_retries
        self.backoff, self.max_backoff = retry_backoff_s, max_backoff_s
        self.model, self.standard_logprobs = model, standard_logprobs
        self.on_retry = on_retry or (lambda kind, why: None)
        self._rr = 0
        self.counts = dict(requests=0, retries=0, aborts=0)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()

    async def wait_ready(self, timeout_s: float) -> list[str]:
        """Wait (up to timeout_s) until every engine answers GET /v1/models, and learn the
        model name if not set. Engines still silent then are marked down for a while and
        tried again later; raises EngineUnavailable only if none answered. Returns them."""
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        last = ""
        while len(ready) < len(self.urls):
            for i, (url, client) in enumerate(zip(self.urls, self.clients)):
                if i in ready:
                    continue
                try:
                    models = await client.models.list(timeout=max(1.0, min(10.0, timeout_s)))
                except Exception as e:  # noqa: BLE001 -- any failure means "not up yet"
                    last = f"{url}: {type(e).__name__}: {e}"
                    continue
                ready.add(i)
                if not self.model and models.data:
                    self.model = models.data[0].id
            if len(ready) < len(self.urls):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        if not ready:
            raise EngineUnavailable(f"rollout: no engine answered within {timeout_s:.0f}s "
                                    f"(last error {last})")
        silent = [u for i, u in enumerate(self.urls) if i not in ready]
        for i in range(len(self.urls)):
            if i not in ready:
                self.down_until[i] = time.monotonic() + self.max_backoff
        self.model = self.model or "default"
        return silent

    def _pick(self, avoid: int | None) -> int:
        """Least loaded engine, skipping `avoid` (the one that just failed) and engines marked
        down after a connection failure, unless nothing else is left."""
        now = time.monotonic()
        order = list(range(len(self.urls)))
        order = order[self._rr:] + order[:self._rr]
        self._rr = (self._rr + 1) % len(self.urls)
        up = [i for i in order if self.down_until[i] <= now and i != avoid]
        if not up:
            up = [i for i in order if i != avoid] or order
        return min(up, key=lambda i: self.inflight[i])

    async def _sleep_backoff(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * (2 ** attempt))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _request(self, i: int, prompt_ids: list[int], n: int, body: dict[str, Any]
                       ) -> list[Sample]:
        import openai

        url = self.urls[i]
        extra = {"return_token_ids": True}
        if self.standard_logprobs:
            body = dict(body, logprobs=0)
        self.inflight[i] += n
        self.counts["requests"] += 1
        t0 = time.monotonic()
        try:
            resp = await self.clients[i].completions.create(
                model=self.model, prompt=prompt_ids, n=n, extra_body=extra, **body)
        except openai.APIStatusError as e:
            if e.status_code in (400, 404, 413, 422):
                raise EngineRequestError(f"engine {url} refused the request: HTTP "
                                         f"{e.status_code}: {str(e.message)[:300]}") from e
            raise EngineReplyError(f"engine {url}: HTTP {e.status_code}: {str(e.message)[:300]}") from e
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            if not isinstance(e, openai.APITimeoutError):  # refused/reset: avoid it a while
                self.down_until[i] = time.monotonic() + self.max_backoff
            raise EngineReplyError(f"engine {url}: {type(e).__name__}: {e}") from e
        finally:
            self.inflight[i] -= n
        dt = time.monotonic() - t0
        choices = sorted((c.model_dump() for c in resp.choices), key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise EngineReplyError(f"engine {url}: asked for {n} choices, got {len(choices)}")
        meta = (resp.model_dump().get("metadata") or {}) if hasattr(resp, "model_dump") else {}
        samples = [parse_choice(c, url, meta.get("weight_version")) for c in choices]
        for s in samples:
            s.generate_s = dt
        return samples

    async def generate(self, prompt_ids: list[int], n: int, sampling: dict[str, Any]
                       ) -> list[Sample]:
        """n samples for one prompt (see the module docstring for the retry rules)."""
        done: list[Sample | None] = [None] * n
        errors = aborts = 0
        last: int | None = None
        while True:
            todo = [k for k, s in enumerate(done) if s is None]
            if not todo:
                return done  # type: ignore[return-value]
            i = self._pick(last)
            try:
                got = await self._request(i, prompt_ids, len(todo), sampling)
            except EngineReplyError as e:
                errors += 1
                last = i
                if errors > self.retries:
                    raise EngineUnavailable(f"rollout: generation failed after {errors} attempts; "
                                            f"last error: {e}") from e
                self.counts["retries"] += 1
                self.on_retry("engine_retry", str(e))
                await self._sleep_backoff(errors - 1)
                continue
            aborted = 0
            for k, s in zip(todo, got):
                if s.finish_reason == "abort":
                    aborted += 1
                else:
                    done[k] = s
            if aborted:
                aborts += 1
                self.counts["aborts"] += aborted
                if aborts > self.abort_retries:
                    raise EngineUnavailable(f"rollout: {aborted} samples still aborted by the "
                                            f"engine after {aborts} attempts")
                await asyncio.sleep(min(self.max_backoff, self.backoff) * random.random())


def normalize_url(url: str) -> str:
    """An engine base URL without a trailing slash or /v1 (both spellings are accepted)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"rollout: engine url {url!r} must start with http:// or https://")
    return url
