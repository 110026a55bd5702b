"""The placement file: which node runs where, with which GPUs, ports, env and restart policy.

    job:     {run_dir, ready_timeout_s, drain_timeout_s, term_timeout_s, log_level, env,
              forward_env, ssh_command, setup, setup_timeout_s}
    hosts:   [{name, address, ssh, ssh_command, gpus, python, workdir, port_base, env}]
    bus:     {host, events_pub, events_sub, supervisor, settings: {<nexrl.config.BusConfig fields>}}
    recipe:  path of the recipe YAML (relative to this file), or given on the command line
    nodes:   [{role, name, count, host, gpus, gpu_ids, port, http_port, env, restart, command,
               external, completes_job, ready, ready_timeout_s, config}]

Validation is two-step on purpose: each list item (a host, a node) is checked against its
dataclass on its own, so an error names the item (`nodes[2] (role trainer): unknown key
'gpuz' (did you mean 'gpus'?)`) instead of omegaconf's bare key, and shorthands (`restart:
on-failure`, `command: "a b c"`) are expanded before the typed merge. Every error is a
`PlacementError` (a ConfigError) whose text starts with the placement file's name.

The resolved form (written by nexrl-launch to `<run_dir>/placement.resolved.yaml`) is the
same schema with everything concrete: one node entry per instance, explicit `gpu_ids` and
ports, the recipe frozen into `<run_dir>/recipe.resolved.yaml`, and `directory` (every node
name -> {role, endpoint}) filled. `nexrl-node ROLE --placement <that file>` therefore needs no
free-port picking and no imports of other nodes' code to join the job.

This module also holds the two entry points other commands import:
`node_layers_from_placement` (nexrl-node) and `bus_config_from_placement` (nexrl-bus).
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nexrl.config import BusConfig, ConfigError, merge, to_object

DEFAULT_SSH = ["ssh", "-o", "BatchMode=yes"]
RESTART_POLICIES = ("never", "on-failure")


class PlacementError(ConfigError):
    """A bad placement; the text names the file, the item and the key, and what is expected."""


@dataclass
class RestartSpec:
    """What to do when a node's process exits non-zero, goes silent, or disappears."""

    #: "never" (the job stops) or "on-failure" (start it again, up to max_restarts times).
    policy: str = "never"
    #: Restarts allowed over the whole job (on-failure only).
    max_restarts: int = 3
    #: Seconds before the first restart; doubled for each further one.
    backoff_s: float = 1.0
    #: Upper bound of the backoff, seconds.
    backoff_max_s: float = 30.0


@dataclass
class HostSpec:
    """A machine nodes run on."""

    #: Name nodes refer to in `host:`.
    name: str = MISSING
    #: Address other machines reach this one at; nodes on this host bind their ROUTER there.
    address: str = "127.0.0.1"
    #: ssh target (e.g. "user@gpu-03"); "" means this machine (processes are started directly).
    ssh: str = ""
    #: Command that runs ssh (argv list); [] = job.ssh_command. The target is appended to it.
    ssh_command: list[str] = field(default_factory=list)
    #: GPUs offered: a count (indices 0..n-1) or a list of indices, e.g. [4, 5, 6, 7].
    gpus: Any = 0
    #: Python executable on this host; "" = the launcher's own interpreter path.
    python: str = ""
    #: Working directory of nodes on this host; "" = the launcher's working directory.
    workdir: str = ""
    #: First port of `port: auto` nodes on an ssh host (base + k for its k-th node).
    port_base: int = 29600
    #: Environment variables for every node on this host.
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class NodeSpec:
    """One entry of `nodes:` (count instances of a role)."""

    #: Role: a key of nexrl.nodes.ROLES, a node class "file.py:Class", or any label for a
    #: `command:` node.
    role: str = MISSING
    #: Instance name; "" = the role's name. With count > 1 instances are "<name>-<i>".
    name: str = ""
    #: Number of instances.
    count: int = 1
    #: Host name (hosts[].name); "" = the only host.
    host: str = ""
    #: GPUs per instance, allocated from the host's free GPUs.
    gpus: int = 0
    #: Explicit GPU indices for all instances, split in order (len = gpus * count).
    gpu_ids: list[int] = field(default_factory=list)
    #: ROUTER port: an int (instance i gets port + i) or "auto".
    port: Any = "auto"
    #: HTTP port for a node that serves HTTP (an inference engine, a command: server): an int
    #: (instance i gets http_port + i) or "auto"; unset = no HTTP. The node gets the URL as
    #: node.http_url, its peers as peers[<name>].url; placeholders {http_port} {url}.
    http_port: Any = None
    #: Environment variables for this node (over job.env and the host's env).
    env: dict[str, str] = field(default_factory=dict)
    #: Restart policy (a mapping, or just the policy name).
    restart: RestartSpec = field(default_factory=RestartSpec)
    #: A node written in another language / an external server: argv list (or one string,
    #: split like a shell). Placeholders: {name} {port} {endpoint} {address} {http_port} {url}
    #: {run_dir} {placement} {events_pub} {events_sub} {python}; env NEXRL_* carries the same.
    command: list[str] = field(default_factory=list)
    #: The user starts this node by hand (nexrl-node ... --placement); the launcher waits.
    external: bool = False
    #: When every completes_job node has exited 0 the job is done (exit 0).
    completes_job: bool = False
    #: Readiness: "bus" (lifecycle/heartbeat ready), "process" (started = ready) or an
    #: http(s) URL answering 200 (placeholders allowed); "" = bus, or process for command:.
    ready: str = ""
    #: Seconds this node may take to become ready; 0 = job.ready_timeout_s.
    ready_timeout_s: float = 0.0
    #: Mapping merged over this node's recipe section (per-entry tweaks).
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class BusSpec:
    """The event proxy (hosted by the supervisor) and bus settings for every node."""

    #: Host whose address the proxy binds; "" = the first local host. Must be a local host.
    host: str = ""
    #: Proxy frontend port (publishers connect): an int or "auto".
    events_pub: Any = "auto"
    #: Proxy backend port (subscribers connect): an int or "auto".
    events_sub: Any = "auto"
    #: Port of the supervisor's request socket (job.stop, ping): an int or "auto". Nodes find
    #: it in their directory as the peer "supervisor".
    supervisor: Any = "auto"
    #: nexrl.config.BusConfig fields given to every node (heartbeat_interval_s, liveness, ...).
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSpec:
    """Job-wide launcher settings."""

    #: Run directory (logs, resolved configs, state); "" = runs/<placement>-<time>.
    run_dir: str = ""
    #: Seconds every node may take to report ready before the launch fails.
    ready_timeout_s: float = 300.0
    #: Seconds a node gets from node.drain to exit during shutdown (also its node.drain_timeout_s).
    drain_timeout_s: float = 20.0
    #: Seconds from SIGTERM to SIGKILL of a node's process tree.
    term_timeout_s: float = 5.0
    #: Python logging level of the nodes.
    log_level: str = "INFO"
    #: Environment variables for every node.
    env: dict[str, str] = field(default_factory=dict)
    #: Local variables (names, or prefixes ending in '*') copied to nodes on ssh hosts.
    forward_env: list[str] = field(default_factory=lambda: ["PYTHONPATH", "NEXRL_*", "HF_*",
                                                           "TOKENIZERS_*", "NCCL_*"])
    #: Command that runs ssh (argv list); the host's ssh target is appended.
    ssh_command: list[str] = field(default_factory=lambda: list(DEFAULT_SSH))
    #: Shell commands run in order on this machine before any node starts (make data, build a
    #: model); placeholders {run_dir}, {python} and {placement_dir} (this file's folder).
    #: Each must exit 0 within setup_timeout_s.
    setup: list[str] = field(default_factory=list)
    #: Seconds each setup command may take.
    setup_timeout_s: float = 600.0


@dataclass
class Placement:
    """A whole placement file (validated)."""

    recipe: str = ""
    recipe_overrides: list[str] = field(default_factory=list)
    job: JobSpec = field(default_factory=JobSpec)
    hosts: list[HostSpec] = field(default_factory=list)
    bus: BusSpec = field(default_factory=BusSpec)
    nodes: list[NodeSpec] = field(default_factory=list)
    #: Filled by the launcher in the resolved placement: name -> {role, endpoint}.
    directory: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Where this placement was read from (not a YAML key).
    path: str = ""


_TOP_KEYS = ("recipe", "recipe_overrides", "job", "hosts", "bus", "nodes", "directory")


def _unknown(where: str, key: Any, known: list[str]) -> PlacementError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return PlacementError(f"{where}: unknown key {key!r}{hint}; expected one of: {', '.join(known)}")


def _typed(schema: type, data: Any, where: str) -> Any:
    """`data` (a mapping) as an instance of dataclass `schema`; errors name `where` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlacementError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    known = [f.name for f in fields(schema) if f.name != "path"]
    for key in data:
        if key not in known:
            raise _unknown(where, key, known)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        first = str(e).splitlines()[0]
        raise PlacementError(f"{where}: {key + ': ' if key else ''}{first}") from e
    except (TypeError, ValueError) as e:
        raise PlacementError(f"{where}: {e}") from e


def _items(raw: Any, key: str, src: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PlacementError(f"{src}: '{key}' must be a list of mappings (one per {key[:-1]}), "
                             f"got {type(raw).__name__}")
    return raw


def _node(raw: Any, i: int, src: str) -> NodeSpec:
    label = f"{src}: nodes[{i}]"
    if isinstance(raw, dict) and isinstance(raw.get("role"), str):
        label += f" (role {raw['role']})"
    if isinstance(raw, dict):
        raw = dict(raw)
        if isinstance(raw.get("restart"), str):
            raw["restart"] = {"policy": raw["restart"]}
        if isinstance(raw.get("command"), str):
            raw["command"] = shlex.split(raw["command"])
    node = _typed(NodeSpec, raw, label)
    if not node.role.strip():
        raise PlacementError(f"{label}: 'role' must not be empty")
    if node.count < 1:
        raise PlacementError(f"{label}: count must be >= 1, got {node.count}")
    if node.gpus < 0:
        raise PlacementError(f"{label}: gpus must be >= 0, got {node.gpus}")
    for key in ("port", "http_port"):
        v = getattr(node, key)
        if v is not None and v != "auto" and (isinstance(v, bool) or not (
                isinstance(v, int) and 0 < v < 65536)):
            raise PlacementError(f"{label}: {key} must be 'auto' or a port number, got {v!r}")
    if node.port is None:
        raise PlacementError(f"{label}: port must be 'auto' or a port number, not null")
    r = node.restart
    if r.policy not in RESTART_POLICIES:
        raise PlacementError(f"{label}: restart.policy {r.policy!r} is not a restart policy; "
                             f"expected one of: {', '.join(RESTART_POLICIES)}")
    if r.max_restarts < 0 or r.backoff_s < 0 or r.backoff_max_s < 0:
        raise PlacementError(f"{label}: restart.max_restarts, backoff_s and backoff_max_s "
                             f"must be >= 0")
    url = node.ready.startswith(("http://", "https://", "{"))  # placeholders: checked once filled
    if node.ready and node.ready not in ("bus", "process") and not url:
        raise PlacementError(f"{label}: ready {node.ready!r} must be 'bus', 'process' or an "
                             f"http(s):// URL")
    if node.external and node.command:
        raise PlacementError(f"{label}: a node is either external (started by hand) or has a "
                             f"command, not both")
    return node


def host_gpus(host: HostSpec, src: str) -> list[int]:
    """The GPU indices a host offers."""
    g = host.gpus
    if isinstance(g, bool) or not (isinstance(g, int) or (isinstance(g, list) and
                                                           all(isinstance(x, int) for x in g))):
        raise PlacementError(f"{src}: hosts ({host.name}).gpus must be a count or a list of GPU "
                             f"indices, got {g!r}")
    ids = list(range(g)) if isinstance(g, int) else list(g)
    if any(x < 0 for x in ids) or len(set(ids)) != len(ids):
        raise PlacementError(f"{src}: hosts ({host.name}).gpus {g!r} has negative or repeated indices")
    return ids


def parse_placement(data: Any, src: str) -> Placement:
    """Validate a placement given as plain data (from YAML); `src` names it in errors."""
    if not isinstance(data, dict):
        raise PlacementError(f"{src}: a placement is a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(src, key, list(_TOP_KEYS))
    p = Placement(path=src)
    p.recipe = str(data.get("recipe") or "")
    ov = data.get("recipe_overrides") or []
    if not (isinstance(ov, list) and all(isinstance(o, str) and "=" in o for o in ov)):
        raise PlacementError(f"{src}: recipe_overrides must be a list of 'key=value' strings")
    p.recipe_overrides = list(ov)
    p.job = _typed(JobSpec, data.get("job"), f"{src}: job")
    p.bus = _typed(BusSpec, data.get("bus"), f"{src}: bus")
    p.hosts = [_typed(HostSpec, h, f"{src}: hosts[{i}]") for i, h in
               enumerate(_items(data.get("hosts"), "hosts", src))]
    p.nodes = [_node(n, i, src) for i, n in enumerate(_items(data.get("nodes"), "nodes", src))]
    p.directory = dict(data.get("directory") or {})
    if not p.hosts:
        p.hosts = [HostSpec(name="local")]
    if not p.nodes:
        raise PlacementError(f"{src}: 'nodes' is empty; list at least one node (role, host, ...)")
    names = [h.name for h in p.hosts]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PlacementError(f"{src}: host names must be unique; repeated: {', '.join(sorted(dup))}")
    for h in p.hosts:
        host_gpus(h, src)
    for i, n in enumerate(p.nodes):
        if not n.host:
            if len(p.hosts) > 1:
                raise PlacementError(f"{src}: nodes[{i}] (role {n.role}): 'host' is required when "
                                     f"the placement has several hosts ({', '.join(names)})")
            n.host = p.hosts[0].name
        elif n.host not in names:
            raise PlacementError(f"{src}: nodes[{i}] (role {n.role}): unknown host {n.host!r}; "
                                 f"hosts are: {', '.join(names)}")
    for key in ("events_pub", "events_sub", "supervisor"):
        v = getattr(p.bus, key)
        if v != "auto" and (isinstance(v, bool) or not (isinstance(v, int) and 0 < v < 65536)):
            raise PlacementError(f"{src}: bus.{key} must be 'auto' or a port number, got {v!r}")
    if p.bus.host and p.bus.host not in names:
        raise PlacementError(f"{src}: bus.host {p.bus.host!r} is not a host; hosts are: "
                             f"{', '.join(names)}")
    bus_host = p.bus.host or next((h.name for h in p.hosts if not h.ssh), "")
    if not bus_host or next(h for h in p.hosts if h.name == bus_host).ssh:
        raise PlacementError(f"{src}: bus.host must be a local host (no ssh): the launcher hosts "
                             f"the event proxy; add a host without 'ssh'")
    p.bus.host = bus_host
    bus_settings(p)  # validate now
    return p


def load_placement(path: str | Path) -> Placement:
    """Read and validate a placement YAML file (interpolations such as ${oc.env:X} resolved)."""
    src = str(path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OSError as e:
        raise PlacementError(f"cannot read placement file {src}: {e.strerror}") from e
    except OmegaConfBaseException as e:
        raise PlacementError(f"{src}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # yaml.YAMLError (a parse error): name the file and the position
        if type(e).__module__.startswith("yaml"):
            raise PlacementError(f"{src}: not valid YAML: {e}") from e
        raise
    return parse_placement(data, src)


def bus_settings(p: Placement) -> dict[str, Any]:
    """bus.settings validated against nexrl.config.BusConfig (addresses excluded)."""
    s = dict(p.bus.settings)
    for key in ("events_pub", "events_sub"):
        if key in s:
            raise PlacementError(f"{p.path}: bus.settings.{key}: set the proxy ports with "
                                 f"bus.{key} (a port or auto), not in settings")
    try:
        to_object(merge(BusConfig, s, sources=[f"{p.path}: bus.settings"]))
    except ConfigError as e:
        raise PlacementError(str(e)) from e
    return s


def bus_config_from_placement(path: str | Path) -> BusConfig:
    """The BusConfig (proxy addresses + settings) a tool or node uses to join this job."""
    from .resolve import bus_addresses

    p = load_placement(path)
    pub, sub = bus_addresses(p)
    return to_object(merge(BusConfig, bus_settings(p), {"events_pub": pub, "events_sub": sub}))


def node_layers_from_placement(placement_path: str | Path, role: str, name: str | None,
                               recipe_paths: list[str] | tuple[str, ...] = ()
                               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(NodeConfig layers, role-config layers) for node `name` (or the one node of `role`).

    Used by `nexrl-node ROLE --placement FILE`: the same computation the launcher does for the
    nodes it spawns. `recipe_paths` (from --config) replace the placement's recipe. If the
    placement gives this node GPUs and CUDA_VISIBLE_DEVICES is unset, it is set here (before
    the node imports torch), so a node started by hand sees the GPUs the placement gave it.
    """
    from .resolve import find_instance, instance_layers, load_recipe, resolve

    p = load_placement(placement_path)
    recipe = load_recipe(p, list(recipe_paths), [])
    plan = resolve(p, recipe, run_dir=p.job.run_dir or "", pick_free_ports=False)
    inst = find_instance(plan, role, name)
    if inst.gpu_ids and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, inst.gpu_ids))
        print(f"nexrl-node: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
              f"(from the placement)", file=sys.stderr)
    return instance_layers(plan, inst)
