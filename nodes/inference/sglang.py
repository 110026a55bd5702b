"""sglang as NexRL's inference engine: the launch command + environment from a config block.

NexRL drives sglang through the same ``nexrl.engine_client.EngineClient`` and the same
``nexrl.weight_transfer.WeightSender`` as the embedded engine; this module only builds the
``python -m sglang.launch_server ...`` command line and environment (it never imports
sglang, so it works on a machine that only launches it elsewhere). The launcher spawns and
supervises the process like any other node.

What each NexRL feature maps to on sglang (checked against sglang's ``server_args.py``,
``entrypoints/http_server.py`` and ``managers/io_struct.py``):

=============================  =================================================================
NexRL feature                  sglang
=============================  =================================================================
weight version per sample      ``--weight-version`` (initial), ``weight_version`` on updates;
                               reported by ``GET /get_weight_version`` and in every
                               ``/generate`` reply's ``meta_info.weight_version`` (per
                               response: sglang has no per-token versions; pause the engine
                               across an update to avoid mixed-version completions)
bucketed weight sync           ``/init_weights_update_group`` + ``/update_weights_from_distributed``
                               with ``load_format="flattened_bucket"`` (sglang >= 0.5);
                               ``WeightSender`` must run with ``pipelined=False`` (sglang
                               neither reads ``nexrl_bucket_index`` nor orders concurrent
                               updates) and ``engine_tp=[tp_size]``
staged (all-or-nothing) update NOT available: sglang loads each call's tensors immediately;
                               a failed push leaves it with mixed weights -> re-push or reload
                               from disk (``/update_weights_from_disk``)
disk fallback                  ``/update_weights_from_disk`` {model_path, weight_version}
pause around updates           ``/pause_generation`` {mode: abort|retract|in_place},
                               ``/continue_generation``
token ids in / logprobs out    ``/generate`` {input_ids, sampling_params, return_logprob}
                               -> ``meta_info.output_token_logprobs``; OpenAI
                               ``/v1/completions`` with ``logprobs``
reproducible sampling          ``--random-seed`` + ``--enable-deterministic-inference``
                               (per-request ``sampling_seed`` needs the latter)
colocated trainer (GPU share)  ``--enable-memory-saver`` + ``/release_memory_occupation`` /
                               ``/resume_memory_occupation``
exact logprobs across updates  ``flush_cache=True`` on the last bucket (drops the radix cache);
                               ``--disable-radix-cache`` to never reuse prefixes
tensor parallelism             ``--tp-size``: the engine joins the weight group with
                               ``tp_size`` ranks (rank_offset + tp_rank)
=============================  =================================================================
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

__all__ = ["SGLangConfig", "build_command", "build_env", "base_url"]

_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass(kw_only=True)
class SGLangConfig:
    """One sglang server. Unset optional fields (None) leave sglang's own default."""

    model_path: str
    """HF checkpoint directory (or hub id where the machine has hub access)."""

    host: str = "127.0.0.1"
    """Interface to bind (loopback by default)."""

    port: int = 30000
    """HTTP port."""

    tp_size: int = 1
    """Tensor-parallel GPUs; also the number of weight-group ranks this engine holds."""

    dtype: str = "auto"
    """Model dtype: auto, half/float16, bfloat16, float/float32."""

    weight_version: str = "0"
    """Initial weight version (``--weight-version``)."""

    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV pool (sglang default when None)."""

    context_length: int | None = None
    """Max prompt + completion tokens (None: the model's)."""

    served_model_name: str | None = None
    """Model name reported by the OpenAI endpoints."""

    random_seed: int | None = None
    """Server-wide sampling seed."""

    deterministic: bool = False
    """``--enable-deterministic-inference`` (batch-invariant kernels; slower)."""

    enable_memory_saver: bool = False
    """Allow releasing GPU memory while a colocated trainer runs."""

    disable_radix_cache: bool = False
    """Never reuse cached prefixes."""

    skip_server_warmup: bool = False
    """Skip sglang's warm-up request at start (faster start, first request slower)."""

    base_gpu_id: int | None = None
    """First GPU index sglang uses (inside CUDA_VISIBLE_DEVICES)."""

    cuda_visible_devices: str | None = None
    """Sets CUDA_VISIBLE_DEVICES for the server process (e.g. "1" or "2,3")."""

    nccl_port: int | None = None
    """Port of sglang's own TP NCCL group (distinct per server on one host)."""

    log_level: str = "info"
    """sglang's log level."""

    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint."""

    api_key: str | None = None
    """Require this key on requests (the EngineClient then needs it too)."""

    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that has sglang installed."""

    extra_args: list[str] = field(default_factory=list)
    """Further ``launch_server`` arguments, appended verbatim."""

    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the server (win over the inherited ones)."""

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("sglang config: model_path is required")
        if self.tp_size < 1:
            raise ValueError(f"sglang config: tp_size must be >= 1, got {self.tp_size}")
        if not 0 < self.port < 65536:
            raise ValueError(f"sglang config: port {self.port} is out of range")
        if self.dtype not in _DTYPES:
            raise ValueError(f"sglang config: dtype {self.dtype!r} is not one of {_DTYPES}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("sglang config: mem_fraction_static must be in (0, 1)")


def build_command(cfg: SGLangConfig) -> list[str]:
    """The argv that starts the server (no shell involved)."""
    cmd = [cfg.python, "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--host", cfg.host, "--port", str(cfg.port), "--tp-size", str(cfg.tp_size),
           "--dtype", cfg.dtype, "--weight-version", cfg.weight_version,
           "--log-level", cfg.log_level]
    valued = [("--mem-fraction-static", cfg.mem_fraction_static),
              ("--context-length", cfg.context_length),
              ("--served-model-name", cfg.served_model_name),
              ("--random-seed", cfg.random_seed), ("--base-gpu-id", cfg.base_gpu_id),
              ("--nccl-port", cfg.nccl_port), ("--api-key", cfg.api_key)]
    for flag, value in valued:
        if value is not None:
            cmd += [flag, str(value)]
    switches = [("--enable-deterministic-inference", cfg.deterministic),
                ("--enable-memory-saver", cfg.enable_memory_saver),
                ("--disable-radix-cache", cfg.disable_radix_cache),
                ("--skip-server-warmup", cfg.skip_server_warmup),
                ("--trust-remote-code", cfg.trust_remote_code)]
    cmd += [flag for flag, on in switches if on]
    return cmd + list(cfg.extra_args)


def build_env(cfg: SGLangConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default: this process's) + GPU pinning + ``env``."""
    env = dict(os.environ if base is None else base)
    if cfg.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
    env.update(cfg.env)
    return env


def base_url(cfg: SGLangConfig) -> str:
    """URL the EngineClient / WeightSender use for this server."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"
