"""One way to start a node process, on this machine or over ssh, and to end its whole tree.

    local:  launcher --Popen--> python -m nexrl.launch.remote --> node
    ssh:    launcher --Popen--> <ssh_command> <target> 'python -m nexrl.launch.remote' --> node

Both paths run the node under the same watchdog (nexrl/launch/remote.py) and talk to it the
same way, over the watchdog's stdin: a JSON spec first (argv, env, cwd, files), then control
lines ("term", "kill"). Closing stdin — which also happens when the launcher dies or the ssh
connection drops — makes the watchdog end the node's tree. So "SIGTERM" and "SIGKILL" of a
remote node need no second ssh connection, and killing the local ssh process cleans the
remote side.

Every spawned process (the watchdog, or the local ssh client) is the leader of a new session,
so a Ctrl-C at the launcher's terminal reaches the launcher only; the launcher then shuts the
nodes down in order. `Proc.kill` ends everything: "kill" to the watchdog, a short wait, then
SIGKILL of whatever is left of the local process tree (found with psutil).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class SpawnSpec:
    """What to run and where."""

    name: str
    argv: list[str]
    #: Variables added to the target's environment (the local one for local nodes).
    env: dict[str, str]
    #: Working directory of the node on its host.
    cwd: str
    #: Interpreter that runs the watchdog on the node's host.
    python: str
    #: [] for this machine; else the ssh argv prefix including the target, e.g.
    #: ["ssh", "-o", "BatchMode=yes", "user@gpu-03"].
    ssh: list[str] = field(default_factory=list)
    #: Files written on the node's host before it starts (path -> text); for ssh hosts.
    files: dict[str, str] = field(default_factory=dict)
    #: Seconds the watchdog waits after SIGTERM before SIGKILL when its stdin closes.
    term_timeout_s: float = 5.0
    #: Free text shown in `ps` (the run directory), so a job's processes can be found.
    tag: str = ""


def watchdog_argv(spec: SpawnSpec) -> list[str]:
    return [spec.python, "-m", "nexrl.launch.remote", "--name", spec.name, "--tag", spec.tag]


def command_line(spec: SpawnSpec) -> list[str]:
    """The local argv that starts the node (what --dry-run shows besides the node's argv)."""
    wd = watchdog_argv(spec)
    return [*spec.ssh, shlex.join(wd)] if spec.ssh else wd


class Proc:
    """A spawned watchdog (or ssh client running one); see the module docstring."""

    def __init__(self, spec: SpawnSpec, popen: subprocess.Popen):
        self.spec, self.popen = spec, popen
        self.pid = popen.pid
        self.started = time.monotonic()
        self.stdout = popen.stdout

    @property
    def remote(self) -> bool:
        return bool(self.spec.ssh)

    def poll(self) -> int | None:
        """Exit status (128 + signal when killed by one), or None while running."""
        rc = self.popen.poll()
        return None if rc is None else (128 - rc if rc < 0 else rc)

    def wait(self, timeout: float) -> int | None:
        try:
            self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

    def _control(self, line: str) -> None:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the watchdog is gone already; the caller's wait tells what happened

    def terminate(self) -> None:
        """Ask the watchdog to SIGTERM the node's process group (the node then drains)."""
        self._control("term")

    def kill(self, grace_s: float = 3.0) -> None:
        """End the node's whole tree now: the watchdog's "kill", then SIGKILL what is left."""
        if self.poll() is None:
            self._control("kill")
            self.wait(grace_s)
        if self.poll() is None:  # the watchdog did not answer: kill its tree from here
            rest = []
            try:
                rest = psutil.Process(self.pid).children(recursive=True)  # before the root dies
            except psutil.NoSuchProcess:
                pass
            self.popen.kill()  # through Popen, which keeps the exit status (psutil would reap it)
            for p in rest:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(rest, timeout=3)
        try:
            self.popen.wait(timeout=30)  # after SIGKILL: only a process stuck in the kernel stays
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self) -> None:
        """Close our end of stdin (the watchdog then stops the node if it still runs)."""
        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        except OSError:
            pass

    def alive_pids(self) -> list[int]:
        """This process and its local descendants that still exist."""
        try:
            root = psutil.Process(self.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []


def spawn(spec: SpawnSpec) -> Proc:
    """Start `spec` (stdout and stderr come back merged on `Proc.stdout`)."""
    env = None
    if not spec.ssh:
        env = dict(os.environ)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the node's own value comes with the spec
    popen = subprocess.Popen(command_line(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env,
                             cwd=None if spec.ssh else spec.cwd, bufsize=0)
    proc = Proc(spec, popen)
    payload = dict(argv=spec.argv, env=spec.env, cwd=spec.cwd, files=spec.files,
                   term_timeout_s=spec.term_timeout_s, name=spec.name)
    proc._control(json.dumps(payload))
    return proc


def signal_name(status: int) -> str:
    """"exited with code N" or "killed by SIGX" for a Proc exit status."""
    if status > 128:
        try:
            return f"killed by {signal.Signals(status - 128).name}"
        except ValueError:
            pass
    return f"exited with code {status}"
