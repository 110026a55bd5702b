"""The launcher's per-node record, and the small pieces the supervisor builds on it.

A `NodeRun` outlives the processes of its node: it counts starts and restarts, holds the
current `Proc`, the node's own pid (from its heartbeats; the launcher spawns a watchdog, see
nexrl/launch/remote.py) and the phase the supervisor has it in:

    pending -> starting -> up -> done                 (exit 0)
                  |        |
                  +--------+--> backoff -> starting   (failure, restart policy allows)
                  |        |
                  +--------+--> failed                (failure past the policy: job stops)
    starting/up -> stopped                            (the job shut it down)
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .logs import NodeLog
from .resolve import Instance, Plan
from .spawn import Proc, SpawnSpec

LIVE = ("starting", "up")


@dataclass
class NodeRun:
    """The launcher's view of one node across its restarts."""

    inst: Instance
    log: NodeLog
    proc: Proc | None = None
    #: pending | starting | up | backoff | done | failed | stopped (see the module docstring)
    phase: str = "pending"
    starts: int = 0
    restarts: int = 0
    exit_code: int | None = None
    node_pid: int | None = None      # the node's own pid (from its heartbeat)
    node_state: str = ""             # last lifecycle state the node reported
    deadline: float = 0.0            # ready deadline (starting) or restart time (backoff)
    since: float = 0.0               # monotonic time the phase began
    killed_for: str = ""             # why the launcher is killing the current process
    reported: str = ""               # the fatal error the node itself reported, if any
    http_ok: threading.Event | None = None   # set once its `ready:` URL answered 200

    @property
    def name(self) -> str:
        return self.inst.name

    @property
    def external(self) -> bool:
        return self.inst.entry.external

    @property
    def on_bus(self) -> bool:
        """Whether the node speaks the bus (gets node.drain, is watched by heartbeats)."""
        return self.inst.is_python or self.inst.ready == "bus"

    def as_dict(self) -> dict[str, Any]:
        i = self.inst
        return dict(phase=self.phase, role=i.entry.role, host=i.host.name, endpoint=i.endpoint,
                    gpus=i.gpu_ids, pid=self.proc.pid if self.proc else None,
                    node_pid=self.node_pid, node_state=self.node_state, starts=self.starts,
                    restarts=self.restarts, exit_code=self.exit_code, log=self.log.path,
                    external=self.external)


def join_command(plan: Plan, inst: Instance) -> str:
    """The command a user runs to start (or restart) node `inst` by hand in this job."""
    return (f"nexrl-node {shlex.quote(inst.role_ref)} --placement {shlex.quote(plan.resolved_path)} "
            f"--name {shlex.quote(inst.name)}")


def spawn_spec(plan: Plan, inst: Instance, remote_files: dict[str, str] | None = None) -> SpawnSpec:
    """How to start `inst`: ssh prefix for remote hosts, forwarded env, files to write there."""
    job = plan.placement.job
    env = dict(inst.env)
    ssh: list[str] = []
    if inst.remote:
        ssh = [*(inst.host.ssh_command or job.ssh_command), inst.host.ssh]
        fwd = {k: v for k, v in os.environ.items()
               if any(fnmatch.fnmatchcase(k, pat) for pat in job.forward_env)}
        env = {**fwd, **env}
    return SpawnSpec(name=inst.name, argv=inst.argv, env=env, cwd=inst.workdir,
                     python=inst.python, ssh=ssh,
                     files=(remote_files or {}) if inst.remote else {},
                     term_timeout_s=job.term_timeout_s, tag=plan.run_dir)


def watch_http(url: str, stop: threading.Event) -> threading.Event:
    """An event set once `url` answers 200 (polled every 0.5 s until `stop`)."""
    ok = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        ok.set()
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not up yet: the ready deadline bounds the wait
            stop.wait(0.5)

    threading.Thread(target=poll, name=f"ready {url}", daemon=True).start()
    return ok


def write_json(path: str, data: dict[str, Any]) -> None:
    """Replace `path` atomically (readers never see half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
