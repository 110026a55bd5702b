"""The embedded inference engine: an OpenAI-compatible HTTP server on torch + transformers.

NexRL's default engine wherever sglang is not installed, and the one every test uses. It
serves the same endpoints and request fields that NexRL's rollout workers and weight-sync use
against sglang, so one client drives both:

- ``engine.py``   the model, the continuous-batching scheduler thread, pause/resume and the
                  weight-update interface (``Engine.apply_weights``) that the distributed
                  weight transfer (``weights.py``) plugs into;
- ``kv.py``       batch KV-cache surgery (rows join and leave between decode steps);
- ``sampling.py`` per-row temperature / top-k / top-p sampling and logprobs;
- ``openai_api.py`` request validation and OpenAI-shaped responses;
- ``server.py``   the aiohttp app (OpenAI + sglang admin endpoints) and ``run_server``.

This module only defines the config, so a launcher can validate it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InferenceConfig"]

SHUTDOWN_MODES = ("abort", "finish")


@dataclass(kw_only=True)
class InferenceConfig:
    """Configuration of one embedded inference engine + its HTTP server."""

    model_path: str
    """Local directory holding an HF checkpoint (config, weights, tokenizer); loaded with
    ``from_pretrained``. No hub access: it must exist on disk."""

    tokenizer_path: str | None = None
    """Directory of the tokenizer if it is not next to the weights (None: ``model_path``)."""

    served_model_name: str | None = None
    """Name reported by ``/v1/models`` and in responses (None: ``model_path``). Requests may
    send any ``model`` value; it is echoed back, not checked (as sglang does)."""

    device: str = "cpu"
    """``cpu`` or ``cuda`` / ``cuda:<index>``."""

    dtype: str = "auto"
    """``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``, ``bfloat16`` or ``float16``."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default (see ARCHITECTURE: default binds are loopback)."""

    port: int = 0
    """TCP port; 0 picks a free one, reported through ``run_server``'s ``ready_cb``."""

    weight_version: str = "0"
    """Initial weight version string, reported on every choice until the first update."""

    max_batch_size: int = 64
    """Most sequences (one per choice, so a request with n=4 counts 4) decoded together."""

    max_queue_size: int = 4096
    """Most sequences waiting for a batch slot; beyond it requests get HTTP 503."""

    max_model_len: int | None = None
    """Longest prompt + completion in tokens (None: the model's ``max_position_embeddings``).
    A prompt of ``max_model_len`` tokens or more is a 400; generation stops there with
    finish_reason ``length``."""

    max_prefill_tokens: int = 8192
    """Padded tokens prefilled in one forward pass when several sequences join at once; bounds
    the prefill's activation memory. A single longer prompt is still prefilled alone."""

    num_threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""

    request_timeout_s: float = 1800.0
    """Longest an HTTP generation request may take (queueing included) before it is aborted
    and answered with HTTP 504."""

    shutdown_mode: str = "abort"
    """On stop: ``abort`` in-flight requests (they return finish_reason ``abort``) or ``finish``
    them (bounded by ``shutdown_timeout_s``, then aborted)."""

    shutdown_timeout_s: float = 30.0
    """Longest the server waits for in-flight work when stopping."""

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("inference config: model_path is required")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"inference config: dtype {self.dtype!r} is not one of "
                             "auto, float32, bfloat16, float16")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"inference config: device {self.device!r} is not cpu or cuda[:i]")
        if self.shutdown_mode not in SHUTDOWN_MODES:
            raise ValueError(f"inference config: shutdown_mode {self.shutdown_mode!r} is not "
                             f"one of {SHUTDOWN_MODES}")
        for name in ("max_batch_size", "max_queue_size", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"inference config: {name} must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"inference config: port {self.port} is out of range")
        if self.request_timeout_s <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError("inference config: timeouts must be positive")
