"""HTTP admin client for an inference engine: NexRL's embedded engine or sglang, same calls.

Every call has a timeout (the client's default, or the call's ``timeout=``); every failure
raises ``EngineError`` naming the engine URL, the endpoint and the cause (connection refused,
timeout, HTTP status + body, or ``{"success": false, "message": ...}``).

Endpoints and fields are sglang's (``python/sglang/srt/entrypoints/http_server.py`` and
``managers/io_struct.py``). Differences between sglang versions that matter here:

- ``/update_weights_from_distributed``: releases before ~0.4.2 took ONE tensor
  (``name``, ``dtype``, ``shape``); since then lists ``names``/``dtypes``/``shapes``.
  ``load_format`` ("flattened_bucket") and ``weight_version`` arrived in 2025 (0.5.x);
  ``torch_empty_cache`` is newer still. An older server ignores fields it does not know
  (pydantic dataclass bodies), so an unknown ``load_format`` would be silently treated as
  per-tensor: check the server version before using buckets against sglang.
- ``/pause_generation``: older releases take no body; newer ones accept ``{"mode": "abort" |
  "retract" | "in_place"}`` (the embedded engine implements the modes it documents).
- ``/update_weights_from_disk``: ``weight_version``/``flush_cache``/``abort_all_requests``
  exist only in recent releases; the reply also carries ``num_paused_requests``.
- ``/get_weight_version`` appeared with ``--weight-version`` (0.5.x); older servers 404.
- Replies: weight endpoints answer ``{"success", "message"}`` with HTTP 200 or 400;
  ``/flush_cache`` answers plain text (200 or 400); ``/health`` an empty 200 (503 if not up).

Fields starting with ``nexrl_`` are NexRL extensions that only the embedded engine reads;
callers pass them explicitly (``**extra``) and never to sglang.
"""

from __future__ import annotations

from typing import Any

import httpx


DEFAULT_GROUP_NAME = "weight_update_group"  # sglang's default group_name


class EngineError(RuntimeError):
    """An engine call failed. ``url``, ``endpoint`` and ``cause`` say where and why."""

    def __init__(self, url: str, endpoint: str, cause: str):
        super().__init__(f"engine {url} {endpoint}: {cause}")
        self.url, self.endpoint, self.cause = url, endpoint, cause


class EngineClient:
    """Synchronous admin client for one engine (thread-safe: httpx pools connections)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------
    def _call(self, method: str, endpoint: str, body: dict | None = None,
              timeout: float | None = None, expect_success: bool = True) -> Any:
        """One request; returns the decoded JSON (or text). Raises EngineError on failure."""
        try:
            r = self._http.request(method, endpoint, json=body,
                                   timeout=self.timeout if timeout is None else timeout)
        except httpx.TimeoutException as e:
            waited = self.timeout if timeout is None else timeout
            raise EngineError(self.base_url, endpoint,
                              f"no reply within {waited:.1f}s ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise EngineError(self.base_url, endpoint, f"{type(e).__name__}: {e}") from e
        ctype = r.headers.get("content-type", "")
        data: Any = r.text
        if "json" in ctype:
            try:
                data = r.json()
            except ValueError as e:
                raise EngineError(self.base_url, endpoint,
                                  f"bad JSON reply: {r.text[:200]!r}") from e
        if r.status_code != 200:
            msg = data.get("message", data) if isinstance(data, dict) else data
            raise EngineError(self.base_url, endpoint, f"HTTP {r.status_code}: {str(msg)[:500]}")
        if expect_success and isinstance(data, dict) and data.get("success") is False:
            raise EngineError(self.base_url, endpoint, str(data.get("message", data))[:500])
        return data

    # -- health / state ------------------------------------------------------------------
    def health(self, timeout: float | None = None) -> bool:
        """True if GET /health answers 200; False on 503 or no connection (never raises)."""
        try:
            self._call("GET", "/health", timeout=timeout)
            return True
        except EngineError:
            return False

    def get_weight_version(self) -> str | None:
        return self._call("GET", "/get_weight_version").get("weight_version")

    def get_server_info(self) -> dict:
        """GET /get_server_info: config + counters (embedded: running/waiting rows, steps)."""
        return self._call("GET", "/get_server_info")

    def pause(self, mode: str = "abort") -> Any:
        """POST /pause_generation {"mode"}: stop scheduling (abort | retract | in_place)."""
        return self._call("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> Any:
        return self._call("POST", "/continue_generation", {})

    def flush_cache(self) -> Any:
        return self._call("POST", "/flush_cache", {})

    # -- weights -------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = DEFAULT_GROUP_NAME,
                                  backend: str = "nccl", timeout: float | None = None,
                                  **extra: Any) -> dict:
        """Ask the engine to join the trainer's group (returns once it joined)."""
        body = dict(master_address=master_address, master_port=int(master_port),
                    rank_offset=int(rank_offset), world_size=int(world_size),
                    group_name=group_name, backend=backend, **extra)
        return self._call("POST", "/init_weights_update_group", body, timeout)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]],
                                        group_name: str = DEFAULT_GROUP_NAME,
                                        flush_cache: bool = True,
                                        abort_all_requests: bool = False,
                                        weight_version: str | None = None,
                                        load_format: str | None = None,
                                        timeout: float | None = None, **extra: Any) -> dict:
        """Announce one broadcast (bucket) and wait until the engine received/applied it."""
        body = dict(names=list(names), dtypes=list(dtypes), shapes=[list(s) for s in shapes],
                    group_name=group_name, flush_cache=flush_cache,
                    abort_all_requests=abort_all_requests, weight_version=weight_version,
                    load_format=load_format, **extra)
        return self._call("POST", "/update_weights_from_distributed", body, timeout)

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 abort_all_requests: bool = False,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 timeout: float | None = None) -> dict:
        body = dict(model_path=model_path, load_format=load_format,
                    abort_all_requests=abort_all_requests, weight_version=weight_version,
                    flush_cache=flush_cache)
        return self._call("POST", "/update_weights_from_disk", body, timeout)

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME,
                                     timeout: float | None = None) -> dict:
        return self._call("POST", "/destroy_weights_update_group", {"group_name": group_name},
                          timeout)

    # -- generation (tests, benchmarks, health probes) -----------------------------------
    def complete(self, prompt_ids: list[int], max_tokens: int = 8, temperature: float = 0.0,
                 timeout: float | None = None, **fields: Any) -> dict:
        """POST /v1/completions with token ids (both engines accept an id list as prompt).

        The embedded engine's choices carry ``token_ids``, ``token_logprobs`` and
        ``weight_version``; sglang's carry the standard ``logprobs`` when asked.
        """
        body = dict(prompt=list(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                    **fields)
        return self._call("POST", "/v1/completions", body, timeout, expect_success=False)
