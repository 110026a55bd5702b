"""From a validated placement to a plan: concrete names, GPUs, ports, commands and env.

Decisions (each a place where a placement leaves something open):
- Names: an entry's `name` (default: its role's short name) for count 1, `<name>-<i>` for
  count > 1; names are unique in the job.
- GPUs: explicit `gpu_ids` are claimed first (outside the host's list or overlapping another
  node: error naming both), then `gpus: n` entries take the lowest free indices in placement
  order. A node with no GPUs gets CUDA_VISIBLE_DEVICES="" so it cannot grab one by accident.
- Ports (`port` for the node's ROUTER, `http_port` for nodes serving HTTP, whose URL goes
  to node.http_url and to peers[name].url): an explicit port p gives instance i port p + i. `auto` on a local host is a free
  port picked now (bound to port 0 and released: a small race, accepted for simplicity);
  `auto` on an ssh host is deterministic, `port_base + k` for the host's k-th auto instance,
  because the launcher cannot probe another machine's ports. Duplicate ports on a host are
  an error. The event proxy lives on `bus.host` (a local host) and binds its address, as
  does the supervisor's request socket, listed in the directory as the peer "supervisor".
- Node classes ("file.py:Class") are looked up next to the placement file first, then in the
  working directory, and recorded as absolute paths so every process finds the same file.
- Recipe: the placement's `recipe:` is relative to the placement file; recipes given on the
  command line are relative to the working directory and replace it. Overrides (`key=value`)
  apply on top; interpolations are resolved before any node takes its section.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nexrl.config import ConfigError

from .placement import HostSpec, NodeSpec, Placement, PlacementError, bus_settings, host_gpus

RESOLVED_NAME = "placement.resolved.yaml"
RECIPE_NAME = "recipe.resolved.yaml"
FREE_RECIPE_KEY = "vars"   # a recipe mapping for shared values that is no node's section
SUPERVISOR = "supervisor"  # the launcher's name in the directory (nexrl.launch.control)


@dataclass
class Instance:
    """One node process of the plan."""

    name: str
    entry: NodeSpec
    index: int                     # instance index within its entry
    host: HostSpec
    gpu_ids: list[int]
    port: int
    endpoint: str                  # tcp://<host address>:<port>; the node binds it
    role_ref: str                  # ROLE argument of nexrl-node (absolute path for file roles)
    python: str                    # interpreter on the node's host
    workdir: str
    http_port: int | None = None   # for nodes that serve HTTP (inference engines)
    url: str = ""                  # http://<host address>:<http_port>, or ""
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # added to the host's environment
    ready: str = "bus"             # bus | process | URL
    ready_timeout_s: float = 300.0

    @property
    def is_python(self) -> bool:
        return not self.entry.command

    @property
    def remote(self) -> bool:
        return bool(self.host.ssh)


@dataclass
class Plan:
    placement: Placement
    run_dir: str
    recipe: dict[str, Any]
    bus_host: HostSpec
    events_pub: str                # proxy frontend address (publishers connect, proxy binds)
    events_sub: str                # proxy backend address
    supervisor: str                # the supervisor's ROUTER address ("" while unknown)
    instances: list[Instance]
    directory: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def resolved_path(self) -> str:
        return os.path.join(self.run_dir, RESOLVED_NAME)

    def by_name(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)


def base_dir(p: Placement) -> Path:
    return Path(p.path).resolve().parent if p.path else Path.cwd()


def role_ref(p: Placement, role: str) -> str:
    """Absolute "file.py:Class" for file roles found next to the placement or in the cwd."""
    where, sep, cls = role.rpartition(":")
    if not sep or not where.endswith(".py"):
        return role
    for cand in (base_dir(p) / where, Path.cwd() / where):
        if cand.exists():
            return f"{cand.resolve()}:{cls}"
    return role  # let the class loader report the missing file with its own message


def load_recipe(p: Placement, recipe_paths: list[str], overrides: list[str],
                run_dir: str = "") -> dict[str, Any]:
    """The resolved recipe: given paths (or the placement's), overrides, interpolations.

    `run_dir` (absolute) is a free value the recipe may use as `${run_dir}` (e.g. for a model
    the job's setup commands build inside the run directory)."""
    paths = list(recipe_paths) or ([str(base_dir(p) / p.recipe)] if p.recipe else [])
    try:
        cfg = OmegaConf.create({"run_dir": run_dir} if run_dir else {})
        for path in paths:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
            except OSError as e:
                raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from e
        for ov in [*p.recipe_overrides, *overrides]:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} must look like key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        out = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "")
        where = f"recipe {', '.join(paths) or '(none)'}" + (f": key {key!r}" if key else "")
        hint = ""
        if not run_dir and "'run_dir'" in str(e):
            hint = (" (${run_dir} is known once nexrl-launch has made the run directory: join a "
                    "running job with <run_dir>/placement.resolved.yaml)")
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}{hint}") from e
    if not isinstance(out, dict):
        raise ConfigError(f"recipe {', '.join(paths)} must be a mapping of sections")
    return out


def bus_addresses(p: Placement) -> tuple[str, str]:
    """(events_pub, events_sub) of a placement whose bus ports are concrete."""
    host = next(h for h in p.hosts if h.name == p.bus.host)
    if p.bus.events_pub == "auto" or p.bus.events_sub == "auto":
        raise PlacementError(
            f"{p.path}: bus ports are 'auto', so they are only known once nexrl-launch has "
            f"resolved them; use the job's <run_dir>/{RESOLVED_NAME} (nexrl-launch prints it)")
    return (f"tcp://{host.address}:{p.bus.events_pub}", f"tcp://{host.address}:{p.bus.events_sub}")


def _free_ports(address: str, n: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                s.bind((address, 0))
            except OSError as e:
                raise PlacementError(f"cannot bind a free port on {address}: {e.strerror} "
                                     f"(is it this machine's address?)") from e
            ports.append(s.getsockname()[1])
        return ports


def _allocate_gpus(p: Placement) -> dict[tuple[int, int], list[int]]:
    """GPU ids per (entry index, instance index); errors name the host and the nodes."""
    out: dict[tuple[int, int], list[int]] = {}
    owner: dict[tuple[str, int], str] = {}
    hosts = {h.name: h for h in p.hosts}
    for ei, n in enumerate(p.nodes):
        if not n.gpu_ids:
            continue
        label = f"{p.path}: nodes[{ei}] (role {n.role})"
        offered = host_gpus(hosts[n.host], p.path)
        per = n.gpus or len(n.gpu_ids) // n.count
        if per == 0 or len(n.gpu_ids) != per * n.count:
            raise PlacementError(f"{label}: gpu_ids {n.gpu_ids} must hold gpus x count = "
                                 f"{n.gpus or '?'} x {n.count} indices")
        for i in range(n.count):
            ids = n.gpu_ids[i * per:(i + 1) * per]
            for g in ids:
                if g not in offered:
                    raise PlacementError(f"{label}: GPU {g} is not offered by host {n.host} "
                                         f"(it offers {offered or 'none'})")
                if (n.host, g) in owner:
                    raise PlacementError(f"{label}: GPU {g} on host {n.host} is already given to "
                                         f"{owner[(n.host, g)]}")
                owner[(n.host, g)] = f"nodes[{ei}] (role {n.role})"
            out[(ei, i)] = ids
    for ei, n in enumerate(p.nodes):
        if n.gpu_ids or not n.gpus:
            continue
        offered = host_gpus(hosts[n.host], p.path)
        for i in range(n.count):
            free = [g for g in offered if (n.host, g) not in owner]
            if len(free) < n.gpus:
                taken = sorted({o for (h, _), o in owner.items() if h == n.host})
                raise PlacementError(
                    f"{p.path}: nodes[{ei}] (role {n.role}) instance {i} needs {n.gpus} GPU(s) on "
                    f"host {n.host}, which offers {len(offered)} ({offered or 'none'}) and has "
                    f"{len(free)} left (taken by: {', '.join(taken) or 'nobody'}); lower gpus/count "
                    f"or give the host more GPUs")
            out[(ei, i)] = free[:n.gpus]
            for g in free[:n.gpus]:
                owner[(n.host, g)] = f"nodes[{ei}] (role {n.role})"
    return out


def _default_name(n: NodeSpec, ref: str) -> str:
    """An entry's name when it gives none: its role, or the role its node class declares."""
    if n.command or ":" not in ref:
        return n.role
    from nexrl.cli.node import resolve_node_class

    return resolve_node_class(ref).role


def _fill(text: str, values: dict[str, Any], label: str) -> str:
    try:
        return text.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        known = ", ".join("{" + k + "}" for k in values)
        raise PlacementError(f"{label}: bad placeholder in {text!r} ({e}); known placeholders: "
                             f"{known} (write {{{{ for a brace)") from e


class _Ports:
    """Port bookkeeping per host: explicit ports are checked, `auto` ones handed out."""

    def __init__(self, pick_free: bool):
        self.pick_free = pick_free
        self.used: dict[tuple[str, int], str] = {}
        self.next_k: dict[str, int] = {}

    def claim(self, host: HostSpec, port: int, owner: str, label: str) -> int:
        if (host.name, port) in self.used:
            raise PlacementError(f"{label}: port {port} on host {host.name} is already used by "
                                 f"{self.used[(host.name, port)]}")
        self.used[(host.name, port)] = owner
        return port

    def get(self, host: HostSpec, spec: Any, i: int, owner: str, label: str, key: str) -> int:
        """Port of instance `i` for a `spec` of an int (port + i) or "auto"."""
        if spec != "auto":
            return self.claim(host, int(spec) + i, owner, label)
        if host.ssh:  # deterministic: the launcher cannot probe another machine's ports
            while (host.name, host.port_base + self.next_k.get(host.name, 0)) in self.used:
                self.next_k[host.name] = self.next_k.get(host.name, 0) + 1
            return self.claim(host, host.port_base + self.next_k.get(host.name, 0), owner, label)
        if not self.pick_free:
            raise PlacementError(
                f"{label}: {key} is 'auto', known only once nexrl-launch has resolved it; use "
                f"the job's <run_dir>/{RESOLVED_NAME}, or give the node a {key}")
        port = _free_ports(host.address, 1)[0]
        while (host.name, port) in self.used:  # the OS may hand out a port twice in a row
            port = _free_ports(host.address, 1)[0]
        return self.claim(host, port, owner, label)


def resolve(p: Placement, recipe: dict[str, Any], run_dir: str, pick_free_ports: bool = True) -> Plan:
    """The plan for placement `p`; `pick_free_ports=False` refuses local `auto` ports."""
    gpus = _allocate_gpus(p)
    bus_host = next(h for h in p.hosts if h.name == p.bus.host)
    ports = _Ports(pick_free_ports)
    for key in ("events_pub", "events_sub", "supervisor"):
        owner = "the supervisor" if key == "supervisor" else "the event proxy"
        if getattr(p.bus, key) != "auto" or pick_free_ports:
            setattr(p.bus, key, ports.get(bus_host, getattr(p.bus, key), 0, owner,
                                          f"{p.path}: bus.{key}", key))
    events_pub, events_sub = bus_addresses(p)
    supervisor = "" if p.bus.supervisor == "auto" else f"tcp://{bus_host.address}:{p.bus.supervisor}"
    names: dict[str, str] = {SUPERVISOR: "the supervisor (a reserved name)"}
    instances: list[Instance] = []
    for ei, n in enumerate(p.nodes):
        label = f"{p.path}: nodes[{ei}] (role {n.role})"
        host = next(h for h in p.hosts if h.name == n.host)
        ref = role_ref(p, n.role) if not n.command else n.role
        stem = n.name or _default_name(n, ref)
        for i in range(n.count):
            name = stem if n.count == 1 else f"{stem}-{i}"
            if name in names:
                raise PlacementError(f"{label}: node name {name!r} is already used by {names[name]}; "
                                     f"give the entries distinct 'name's")
            names[name] = label
            port = ports.get(host, n.port, i, f"node {name}", label, "port")
            http = (ports.get(host, n.http_port, i, f"node {name} (http)", label, "http_port")
                    if n.http_port is not None else None)
            instances.append(Instance(
                name=name, entry=n, index=i, host=host, gpu_ids=gpus.get((ei, i), []), port=port,
                endpoint=f"tcp://{host.address}:{port}", role_ref=ref,
                python=host.python or sys.executable, workdir=host.workdir or os.getcwd(),
                http_port=http, url=f"http://{host.address}:{http}" if http else "",
                ready_timeout_s=n.ready_timeout_s or p.job.ready_timeout_s))
    plan = Plan(p, os.path.abspath(run_dir) if run_dir else "", recipe, bus_host, events_pub,
                events_sub, supervisor, instances, dict(p.directory))
    for inst in instances:
        _commands(plan, inst)
    return plan


def _commands(plan: Plan, inst: Instance) -> None:
    """Fill argv, env and the readiness check of one instance."""
    p, n = plan.placement, inst.entry
    label = f"{p.path}: node {inst.name}"
    values = dict(name=inst.name, port=inst.port, endpoint=inst.endpoint, address=inst.host.address,
                  http_port=inst.http_port or "", url=inst.url, run_dir=plan.run_dir,
                  placement=plan.resolved_path, events_pub=plan.events_pub,
                  events_sub=plan.events_sub, python=inst.python)
    if n.command:
        inst.argv = [_fill(a, values, label) for a in n.command]
    else:
        inst.argv = [inst.python, "-m", "nexrl.cli.node", inst.role_ref, "--placement",
                     plan.resolved_path, "--name", inst.name]
    inst.ready = _fill(n.ready, values, label) if n.ready else ("bus" if inst.is_python else "process")
    if inst.ready not in ("bus", "process") and not inst.ready.startswith(("http://", "https://")):
        raise PlacementError(f"{label}: ready {n.ready!r} gives {inst.ready!r}, not an http(s):// "
                             f"URL (does the node have an http_port?)")
    inst.env = {**p.job.env, **inst.host.env, **n.env}
    inst.env.update(
        CUDA_VISIBLE_DEVICES=",".join(map(str, inst.gpu_ids)), PYTHONUNBUFFERED="1",
        NEXRL_NODE=inst.name, NEXRL_ROLE=n.role, NEXRL_ENDPOINT=inst.endpoint,
        NEXRL_PORT=str(inst.port), NEXRL_URL=inst.url, NEXRL_EVENTS_PUB=plan.events_pub,
        NEXRL_EVENTS_SUB=plan.events_sub, NEXRL_RUN_DIR=plan.run_dir,
        NEXRL_PLACEMENT=plan.resolved_path,
        NEXRL_NODE_CONFIG=os.path.join(plan.run_dir, "nodes", f"{inst.name}.yaml"))


def node_class(inst: Instance) -> type:
    from nexrl.cli.node import resolve_node_class

    return resolve_node_class(inst.role_ref)


def section_of(cls: type) -> str:
    return getattr(cls, "config_section", None) or cls.role


def build_directory(plan: Plan) -> dict[str, dict[str, str]]:
    """name -> {role, endpoint} for every node (imports node classes for their role names)."""
    if not plan.directory:
        directory = {}
        for i in plan.instances:
            try:
                role = node_class(i).role if i.is_python else i.entry.role
            except ImportError as e:  # PluginError, or the node module's own imports
                raise ConfigError(f"{plan.placement.path}: node {i.name} "
                                  f"(role {i.entry.role}): {e}") from e
            directory[i.name] = {"role": role, "endpoint": i.endpoint, "url": i.url}
        if plan.supervisor:
            directory[SUPERVISOR] = {"role": SUPERVISOR, "endpoint": plan.supervisor}
        plan.directory = directory
    return plan.directory


def instance_layers(plan: Plan, inst: Instance) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(NodeConfig layers, role-config layers) of a Python node instance."""
    if not inst.is_python:
        raise ConfigError(f"node {inst.name} is a command: node ({' '.join(inst.entry.command)}); "
                          f"nexrl-node runs Python nodes only")
    cls = node_class(inst)
    p = plan.placement
    peers = {k: {"role": v["role"], "endpoint": v["endpoint"], "url": v.get("url", "")}
             for k, v in build_directory(plan).items()}
    node = dict(role=cls.role, name=inst.name, endpoint=inst.endpoint, http_url=inst.url,
                start="job",
                drain_timeout_s=p.job.drain_timeout_s, log_level=p.job.log_level,
                run_dir=plan.run_dir, peers=peers,
                bus={**bus_settings(p), "events_pub": plan.events_pub, "events_sub": plan.events_sub})
    section = plan.recipe.get(section_of(cls))
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"recipe section {section_of(cls)!r} (node {inst.name}) must be a mapping")
    role_layers = [layer for layer in (section, inst.entry.config) if layer]
    return [node], role_layers


def find_instance(plan: Plan, role: str, name: str | None) -> Instance:
    """The instance nexrl-node should run: by name, or the only one of `role`."""
    ref = role_ref(plan.placement, role)
    listing = ", ".join(f"{i.name} ({i.entry.role})" for i in plan.instances)

    def matches(i: Instance) -> bool:
        return role in (i.entry.role, i.role_ref) or ref == i.role_ref or \
            plan.directory.get(i.name, {}).get("role") == role

    if name:
        inst = next((i for i in plan.instances if i.name == name), None)
        if inst is None:
            raise ConfigError(f"{plan.placement.path}: no node named {name!r}; nodes: {listing}")
        if not matches(inst):
            raise ConfigError(f"{plan.placement.path}: node {name!r} has role {inst.entry.role!r} "
                              f"in the placement, not {role!r}")
        return inst
    found = [i for i in plan.instances if matches(i)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"{plan.placement.path}: no node of role {role!r}; nodes: {listing}")
    raise ConfigError(f"{plan.placement.path}: several nodes have role {role!r} "
                      f"({', '.join(i.name for i in found)}); pass --name")
