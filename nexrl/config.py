"""Configuration: omegaconf structured configs, layered, with unknown keys refused.

Layers, lowest first: the dataclass defaults of a node's config < the recipe YAML <
`key=value` overrides from the command line. Each layer is merged onto a structured
config built from the dataclass, so a key the dataclass does not declare is an error
naming the key and where it came from (never silently ignored), and a value of the wrong
type is an error naming the field and the expected type. After merging, configs are
plain dataclass instances: no omegaconf objects travel further into the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .bus.sockets import CurveConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the text names the key, the source and what is expected."""


@dataclass
class BusConfig:
    """How a node reaches the bus. The supervisor fills the addresses from the placement."""

    #: Event proxy frontend (XSUB): every node's PUB connects here.
    events_pub: str = "tcp://127.0.0.1:5555"
    #: Event proxy backend (XPUB): every node's SUB connects here.
    events_sub: str = "tcp://127.0.0.1:5556"
    #: High-water mark (messages) of each socket's send and receive queues.
    hwm: int = 10_000
    #: Milliseconds a closing socket may keep trying to deliver queued messages.
    linger_ms: int = 1_000
    #: Largest message (all frames) a node accepts; larger ones get a too_large error.
    max_message_bytes: int = 1 << 30
    #: Seconds between heartbeats.
    heartbeat_interval_s: float = 1.0
    #: Missed heartbeats after which a node counts as dead.
    liveness: int = 3
    #: Default seconds a request waits for its reply (per attempt).
    request_timeout_s: float = 10.0
    #: Default number of resends of a request that timed out.
    request_retries: int = 2
    #: Seconds a starting node waits for the event proxy to answer its readiness probe.
    handshake_timeout_s: float = 30.0
    #: CURVE authentication (for traffic that leaves the host).
    curve: CurveConfig = field(default_factory=CurveConfig)


@dataclass
class PeerConfig:
    """Where another node of the job listens."""

    #: The peer's role (e.g. "pool").
    role: str = MISSING
    #: The peer's ROUTER address.
    endpoint: str = MISSING
    #: Base URL of the peer's HTTP server, for nodes that serve HTTP (inference engines).
    url: str = ""


@dataclass
class NodeConfig:
    """Runtime settings every node has (the `node` block); the role's own block is separate."""

    #: Role, e.g. "pool" (a key of nexrl.nodes.ROLES, or a custom "file.py:Class").
    role: str = MISSING
    #: Node name, unique in the job, e.g. "rollout-0".
    name: str = MISSING
    #: Where this node's ROUTER binds (requests to it go here). Port 0 picks a free port.
    endpoint: str = "tcp://127.0.0.1:0"
    #: This node's HTTP base URL, for nodes that serve HTTP (inference engines): the supervisor
    #: fills it from the placement, and peers see the same value as `peers[name].url`.
    http_url: str = ""
    #: "job": start work when the supervisor publishes job.state=running; "now": at once.
    start: str = "job"
    #: Seconds a stopping node gives its work to finish before it exits anyway.
    drain_timeout_s: float = 30.0
    #: Python logging level.
    log_level: str = "INFO"
    #: The job's run directory (logs, checkpoints, metrics); "" when run alone.
    run_dir: str = ""
    #: Every node of the job, by name (the supervisor's directory).
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    #: Bus addresses and socket settings.
    bus: BusConfig = field(default_factory=BusConfig)

    def __post_init__(self) -> None:
        if self.start not in ("job", "now"):
            raise ConfigError(f"node.start must be 'job' or 'now', not {self.start!r}")


def _describe(e: OmegaConfBaseException, source: str) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    where = f" (from {source})" if source else ""
    if key:
        return f"config key {key!r}{where}: {msg}"
    return f"config{where}: {msg}"


def merge(schema: type[T] | Any, *layers: Any, overrides: list[str] | tuple[str, ...] = (),
          sources: list[str] | None = None) -> DictConfig:
    """Structured config of `schema` with `layers` (dicts, DictConfigs or YAML paths) and
    `key=value` overrides merged on top; raises ConfigError naming the offending key."""
    try:
        cfg = OmegaConf.structured(schema) if not isinstance(schema, DictConfig) else schema
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, "defaults")) from e
    for i, layer in enumerate(layers):
        source = (sources[i] if sources and i < len(sources) else
                  str(layer) if isinstance(layer, (str, Path)) else "")
        try:
            if isinstance(layer, (str, Path)):
                layer = OmegaConf.load(layer)
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, source)) from e
        except OSError as e:
            raise ConfigError(f"cannot read config file {layer}: {e.strerror}") from e
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise ConfigError(_describe(e, f"override {ov!r}")) from e
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """Resolve interpolations, check required values, return plain dataclass instances."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, "")) from e
    except ValueError as e:  # raised by a dataclass __post_init__
        raise ConfigError(str(e)) from e


def build(schema: type[T], *layers: Any, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """`merge` then `to_object`: a validated dataclass instance of `schema`."""
    return to_object(merge(schema, *layers, overrides=overrides))
