"""`nexrl-node ROLE`: run one node in the foreground (a debugger works), alone or in a job.

    nexrl-node pool --placement recipes/countdown/placement.yaml [--name pool] [key=value ...]
    nexrl-node path/to/my_node.py:MyNode node.name=x node.start=now node.bus.events_pub=...

Config is validated before any heavy import (torch is imported, if at all, by the role's own
module when the node is built), so a bad key is reported in well under a second. Keys:
`node.*` (nexrl.config.NodeConfig) and `<role>.*` (the role's Config dataclass).
With --placement, the node's addresses, peers and recipe come from the placement file (the
same directory the supervisor hands to the nodes it spawns).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..config import ConfigError, NodeConfig, merge, to_object
from ..plugins import PluginError, load_object


def resolve_node_class(role: str) -> type:
    from nexrl.node import Node
    from nexrl.nodes import ROLES

    ref = ROLES.get(role, role)
    if ":" not in ref:
        raise PluginError(f"unknown role {role!r}; known roles: {', '.join(sorted(ROLES)) or 'none'}"
                          f" (or name a class as file.py:Class)")
    cls = load_object(ref)
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise PluginError(f"{ref} is not a nexrl.node.Node subclass")
    return cls


def build_configs(cls: type, node_layers: list[Any], role_layers: list[Any],
                  overrides: list[str]) -> tuple[NodeConfig, Any]:
    """(NodeConfig, role config) from layers and `node.x=..` / `<section>.x=..` overrides."""
    section = getattr(cls, "config_section", None) or cls.role
    node_ov = [o[len("node."):] for o in overrides if o.startswith("node.")]
    role_ov = [o[len(section) + 1:] for o in overrides if o.startswith(section + ".")]
    stray = [o for o in overrides if not (o.startswith("node.") or o.startswith(section + "."))]
    if stray:
        raise ConfigError(f"overrides {stray} match neither 'node.' nor '{section}.' "
                          f"(the {cls.role} node's config sections)")
    node_cfg = to_object(merge(NodeConfig, *node_layers, overrides=node_ov))
    role_cfg = None
    if cls.Config is not None:
        role_cfg = to_object(merge(cls.Config, *role_layers, overrides=role_ov))
    elif role_layers or role_ov:
        raise ConfigError(f"the {cls.role} node takes no '{section}' config")
    return node_cfg, role_cfg


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    # HTTP clients log every request at INFO (one line per weight bucket, per drain poll, per
    # rollout sample): too chatty unless the node itself runs at DEBUG
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for noisy in ("httpx", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def set_title(role: str, name: str) -> None:
    try:
        import setproctitle
    except ImportError:  # optional at run time: only `ps` output is affected
        return
    setproctitle.setproctitle(f"nexrl:{role}:{name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nexrl-node", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", help="role name (see nexrl.nodes.ROLES) or file.py:Class")
    ap.add_argument("--placement", help="placement YAML of the job to join")
    ap.add_argument("--name", help="node name (default: from placement, or the role)")
    ap.add_argument("--config", action="append", default=[],
                    help="recipe YAML; its '<role>' section configures the node (repeatable)")
    ap.add_argument("overrides", nargs="*", help="key=value (node.* or <role>.*)")
    args = ap.parse_intermixed_args(argv)
    try:
        cls = resolve_node_class(args.role)
        node_layers: list[Any] = []
        role_layers: list[Any] = []
        section = getattr(cls, "config_section", None) or cls.role
        if args.placement:
            from nexrl.launch.placement import node_layers_from_placement

            n_layers, r_layers = node_layers_from_placement(args.placement, args.role, args.name,
                                                            args.config)
            node_layers += n_layers
            role_layers += r_layers
        else:
            from omegaconf import OmegaConf

            node_layers.append({"role": cls.role, "name": args.name or cls.role})
            for path in args.config:
                recipe = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
                if section in recipe:
                    role_layers.append(recipe[section])
        node_cfg, role_cfg = build_configs(cls, node_layers, role_layers, args.overrides)
    except (ConfigError, PluginError, OSError) as e:
        print(f"nexrl-node: {e}", file=sys.stderr)
        return 2
    setup_logging(node_cfg.log_level, node_cfg.name)
    set_title(node_cfg.role, node_cfg.name)
    os.environ.setdefault("NEXRL_NODE", node_cfg.name)
    node = cls(node_cfg, role_cfg)
    code = node.run()
    if node.hard_exit:  # a stuck thread still holds sockets: do not wait for it at exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
