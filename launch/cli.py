"""`nexrl-launch`: start a whole NexRL job from a placement file, supervise it, stop it cleanly.

    nexrl-launch placement.yaml [recipe.yaml ...] [key=value ...] [--dry-run] [--run-dir DIR]

Everything is validated before anything starts — the placement, the recipe and every node's
config (each node class is imported and its config built exactly as `nexrl-node` will build
it) — so mistakes come back in about a second with the file, node and key named. Then the
run directory gets:

    placement.resolved.yaml   the placement with names, GPUs and ports concrete (join with it:
                              nexrl-node ROLE --placement <run_dir>/placement.resolved.yaml)
    recipe.resolved.yaml      the recipe after overrides and interpolation
    nodes/<name>.yaml         each node's resolved config (node + role sections)
    logs/<name>.log           each node's output; launch.log the launcher's own messages
    state.json                the live view: job state, per-node phase, pids, restarts

and the supervisor (nexrl.launch.supervisor) runs the job. Exit codes: 0 complete, 1 failed,
2 bad configuration, 130/143 interrupted. `--dry-run` prints the plan and starts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nexrl.config import ConfigError

from .logs import Console
from .noderun import join_command, spawn_spec
from .placement import Placement, PlacementError, load_placement
from .resolve import (FREE_RECIPE_KEY, RECIPE_NAME, Plan, build_directory, instance_layers,
                      load_recipe, node_class, resolve, section_of)
from .spawn import command_line


def validate(plan: Plan) -> dict[str, dict[str, Any]]:
    """Build every node's config (as nexrl-node will); returns name -> resolved config dict."""
    from nexrl.cli.node import build_configs

    build_directory(plan)
    configs: dict[str, dict[str, Any]] = {}
    sections: set[str] = set()
    for inst in plan.instances:
        try:
            if inst.is_python:
                cls = node_class(inst)
                section = section_of(cls)
                node_layers, role_layers = instance_layers(plan, inst)
                node_cfg, role_cfg = build_configs(cls, node_layers, role_layers, [])
                cfg = {"node": dataclasses.asdict(node_cfg)}
                if role_cfg is not None:
                    cfg[section] = OmegaConf.to_container(OmegaConf.structured(role_cfg))
            else:
                section = inst.entry.role
                raw = plan.recipe.get(section)
                cfg = {"node": {"name": inst.name, "role": inst.entry.role, "endpoint": inst.endpoint,
                                "http_url": inst.url,
                                "events_pub": plan.events_pub, "events_sub": plan.events_sub,
                                "run_dir": plan.run_dir, "peers": plan.directory}}
                merged = {**(raw if isinstance(raw, dict) else {}), **inst.entry.config}
                if merged:
                    cfg[section] = merged
        except (ConfigError, ImportError) as e:  # PluginError, or the node module's own imports
            raise ConfigError(f"{plan.placement.path}: node {inst.name} (role {inst.entry.role}): "
                              f"{e}") from e
        sections.add(section)
        configs[inst.name] = cfg
    for key, value in plan.recipe.items():
        if isinstance(value, dict) and key not in sections and key != FREE_RECIPE_KEY:
            raise ConfigError(
                f"recipe section {key!r} matches no node in the placement (node sections: "
                f"{', '.join(sorted(sections))}); put shared values under '{FREE_RECIPE_KEY}:' "
                f"or as top-level scalars")
    return configs


def resolved_placement(plan: Plan) -> dict[str, Any]:
    """The placement with everything concrete (see nexrl.launch.placement)."""
    p: Placement = plan.placement
    job = dataclasses.asdict(p.job)
    job["run_dir"] = plan.run_dir
    nodes = []
    for i in plan.instances:
        n = i.entry
        nodes.append(dict(
            role=i.role_ref, name=i.name, count=1, host=i.host.name, gpus=len(i.gpu_ids),
            gpu_ids=i.gpu_ids, port=i.port, http_port=i.http_port, env=n.env,
            restart=dataclasses.asdict(n.restart),
            command=n.command, external=n.external, completes_job=n.completes_job, ready=n.ready,
            ready_timeout_s=i.ready_timeout_s, config=n.config))
    return dict(recipe=os.path.join(plan.run_dir, RECIPE_NAME), recipe_overrides=[], job=job,
                hosts=[dataclasses.asdict(h) for h in p.hosts],
                bus=dict(host=p.bus.host, events_pub=int(p.bus.events_pub),
                         events_sub=int(p.bus.events_sub), supervisor=int(p.bus.supervisor),
                         settings=p.bus.settings),
                nodes=nodes, directory=plan.directory)


def _yaml(data: Any, header: str = "") -> str:
    return header + OmegaConf.to_yaml(OmegaConf.create(data))


def write_run_dir(plan: Plan, configs: dict[str, dict[str, Any]], header: str) -> dict[str, str]:
    """Write the run directory's files; returns the ones remote hosts need (path -> text)."""
    run = Path(plan.run_dir)
    (run / "nodes").mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(exist_ok=True)
    files = {plan.resolved_path: _yaml(resolved_placement(plan), header),
             str(run / RECIPE_NAME): _yaml(plan.recipe, header)}
    for path, text in files.items():
        Path(path).write_text(text, encoding="utf-8")
    for name, cfg in configs.items():
        (run / "nodes" / f"{name}.yaml").write_text(_yaml(cfg, header), encoding="utf-8")
    return files


def describe(plan: Plan, recipes: list[str], overrides: list[str]) -> str:
    """The --dry-run text: each process, host, GPUs, command, env."""
    p = plan.placement
    out = [f"plan for {p.path} (dry run: nothing started)",
           f"run dir:     {plan.run_dir}",
           f"recipe:      {', '.join(recipes) or p.recipe or '(none)'}"
           + (f"   overrides: {' '.join(overrides)}" if overrides else ""),
           f"event proxy: on host {plan.bus_host.name}: publish {plan.events_pub}, "
           f"subscribe {plan.events_sub}; supervisor requests at {plan.supervisor}",
           *(f"setup:       {c}" for c in setup_commands(plan)),
           f"nodes ({len(plan.instances)}, in start order):"]
    for i in plan.instances:
        n = i.entry
        where = f"{i.host.name} ({'ssh ' + i.host.ssh if i.remote else 'this machine'})"
        policy = n.restart.policy if n.restart.policy == "never" else (
            f"on-failure (max {n.restart.max_restarts}, backoff {n.restart.backoff_s:g}s)")
        flags = [f for f, on in (("external", n.external), ("completes_job", n.completes_job)) if on]
        out.append(f"  {i.name}: role {n.role}, host {where}, GPUs "
                   f"{','.join(map(str, i.gpu_ids)) or 'none'}, endpoint {i.endpoint}"
                f"{', url ' + i.url if i.url else ''}, ready "
                   f"{i.ready}, restart {policy}{', ' + ', '.join(flags) if flags else ''}")
        if n.external:
            out.append(f"    start by hand: {join_command(plan, i)}")
            continue
        out.append(f"    command: {shlex.join(i.argv)}")
        if i.remote:
            out.append(f"    via:     {shlex.join(command_line(spawn_spec(plan, i)))}")
            out.append(f"    cwd:     {i.workdir} (python {i.python}; forwarded env: "
                       f"{' '.join(p.job.forward_env)})")
        else:
            out.append(f"    cwd:     {i.workdir}")
        out.append(f"    env:     {' '.join(f'{k}={shlex.quote(v)}' for k, v in i.env.items())}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    ap = argparse.ArgumentParser(prog="nexrl-launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("placement", help="placement YAML")
    ap.add_argument("rest", nargs="*", metavar="recipe.yaml | key=value",
                    help="recipe YAML files (replace the placement's recipe) and recipe overrides")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    ap.add_argument("--run-dir", help="run directory (default: job.run_dir or runs/<placement>-<time>)")
    ap.add_argument("--no-color", action="store_true", help="no colour on the console")
    args = ap.parse_intermixed_args(argv)
    recipes = [a for a in args.rest if "=" not in a]
    overrides = [a for a in args.rest if "=" in a]
    return args, recipes, overrides


def setup_commands(plan: Plan) -> list[str]:
    """job.setup with placeholders filled."""
    here = os.path.dirname(os.path.abspath(plan.placement.path))
    return [c.format(run_dir=shlex.quote(plan.run_dir), python=shlex.quote(sys.executable),
                     placement_dir=shlex.quote(here))
            for c in plan.placement.job.setup]


def run_setup(plan: Plan, console: Console) -> bool:
    """Run job.setup before any node starts; output to logs/setup.log. False on failure."""
    log_path = os.path.join(plan.run_dir, "logs", "setup.log")
    timeout = plan.placement.job.setup_timeout_s
    for cmd in setup_commands(plan):
        console.say(f"setup: {cmd}")
        t0 = time.time()
        with open(log_path, "a") as log:
            log.write(f"$ {cmd}\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            tail = "".join(open(log_path, errors="replace").readlines()[-20:])
            why = f"timed out after {timeout:.0f}s" if rc is None else f"exited {rc}"
            console.say(f"setup command {why}: {cmd}\n{tail}(full output: {log_path})")
            return False
        console.say(f"setup: done in {time.time() - t0:.1f}s")
    return True


def main(argv: list[str] | None = None) -> int:
    args, recipes, overrides = parse_args(argv)
    t0 = time.time()
    try:
        p = load_placement(args.placement)
        stem = Path(args.placement).stem
        if stem == "placement":  # recipes/<task>/placement.yaml -> runs/<task>-<time>
            stem = Path(args.placement).resolve().parent.name
        run_dir = args.run_dir or p.job.run_dir or os.path.join(
            "runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        recipe = load_recipe(p, recipes, overrides, os.path.abspath(run_dir))
        plan = resolve(p, recipe, run_dir)
        configs = validate(plan)
    except (PlacementError, ConfigError, ImportError) as e:  # PluginError is an ImportError
        print(f"nexrl-launch: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            print(describe(plan, [os.path.abspath(r) for r in recipes], overrides), flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    header = (f"# Resolved by nexrl-launch at {time.strftime('%Y-%m-%d %H:%M:%S')} from "
              f"{os.path.abspath(args.placement)}; recipe: {', '.join(recipes) or p.recipe or 'none'}; "
              f"overrides: {' '.join(overrides) or 'none'}\n")
    remote_files = write_run_dir(plan, configs, header)
    console = Console(color=False if args.no_color else None)
    console.open_file(os.path.join(plan.run_dir, "launch.log"))
    if not run_setup(plan, console):
        console.close()
        return 1
    from .supervisor import Supervisor

    try:
        sup = Supervisor(plan, console, remote_files)
        console.say(f"{len(plan.instances)} node(s) validated in {time.time() - t0:.2f}s; "
                    f"run dir {plan.run_dir}")
        return sup.run()
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
