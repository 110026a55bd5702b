"""Real processes for the bus tests: spawn, read their output, wait for a line, kill the tree.

    p = Proc([sys.executable, "-m", "nexrl.cli.bus", "proxy", ...], "proxy")
    p.wait_for(r"event proxy: publishers connect to (\\S+), subscribers to (\\S+)", 20)
    p.kill_tree()          # SIGKILL of the process and every descendant (psutil), idempotent

Output (stdout and stderr together) is read by a thread into memory, so a chatty process
never blocks on a full pipe and a failing test can print what the process said.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPERS = os.path.join(REPO, "tests", "helpers")


class Proc:
    """A child process whose output is collected line by line."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None):
        self.name, self.args = name, args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, **(env or {})},
                                  start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.p.pid

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching `pattern` (regex), waiting up to `timeout` s."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.name}: no line matching {pattern!r} within "
                                         f"{timeout}s (exit code {self.p.poll()}); output:\n"
                                         f"{chr(10).join(self.lines[-60:])}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float) -> int:
        """Exit code, waiting up to `timeout` s (raises subprocess.TimeoutExpired)."""
        code = self.p.wait(timeout)
        self._reader.join(2.0)
        return code

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def kill_tree(self) -> None:
        """SIGKILL the process and all its descendants; safe to call twice."""
        kill_tree(self.p, wait_s=5.0)
        if self.p.stdout is not None:
            self._reader.join(2.0)
            self.p.stdout.close()


def kill_tree(proc: subprocess.Popen | int, grace_s: float = 0.0, wait_s: float = 5.0) -> None:
    """End `proc` (a Popen, or a bare pid) and every descendant it has now; safe to call twice.

    grace_s > 0: SIGTERM first so nodes can drain, then SIGKILL whatever is alive after grace_s;
    grace_s == 0: SIGKILL at once. wait_s bounds each wait for the processes to go.
    Descendants are listed before anything is signalled (once the root dies they are
    re-parented and could no longer be found). A Popen root is signalled and reaped through
    Popen, which keeps its exit status (psutil would reap it behind Popen's back); a Popen
    root still running wait_s after SIGKILL raises RuntimeError, so a leak is never silent.
    """
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pid = popen.pid if popen is not None else int(proc)
    try:
        root = psutil.Process(pid)
        kids = root.children(recursive=True)
    except psutil.NoSuchProcess:
        root, kids = None, []
    others = kids if popen is not None or root is None else [root, *kids]

    def send(sig: int, procs: list[psutil.Process]) -> None:
        if popen is not None and popen.poll() is None:
            popen.send_signal(sig)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    if grace_s > 0:
        send(signal.SIGTERM, others)
        _, others = psutil.wait_procs(others, timeout=grace_s)
        if popen is not None:
            try:
                popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass  # still running: SIGKILL below
    send(signal.SIGKILL, others)
    psutil.wait_procs(others, timeout=wait_s)
    if popen is not None:
        try:
            popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"kill_tree: pid {pid} still running {wait_s}s after SIGKILL") from None


def free_ports(n: int) -> list[int]:
    """n TCP ports free right now on 127.0.0.1, all distinct (they are held open together
    while picked). Another process may take one before the caller binds it, so prefer
    binding port 0 where the component allows it; this is for addresses that must be fixed
    up front (a peer's endpoint, an engine's HTTP URL)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port() -> int:
    """One TCP port free right now on 127.0.0.1 (see free_ports)."""
    return free_ports(1)[0]


def proxy_args(pub: str = "tcp://127.0.0.1:0", sub: str = "tcp://127.0.0.1:0",
               *extra: str) -> list[str]:
    return [sys.executable, "-m", "nexrl.cli.bus", "proxy", "--pub", pub, "--sub", sub, *extra]


def node_args(ref: str, name: str, pub: str, sub: str, *overrides: str) -> list[str]:
    """`nexrl-node REF --name NAME node.start=now ...` with the bus addresses and port 0."""
    return [sys.executable, "-m", "nexrl.cli.node", ref, "--name", name, "node.start=now",
            "node.endpoint=tcp://127.0.0.1:0", f"node.bus.events_pub={pub}",
            f"node.bus.events_sub={sub}", "node.bus.heartbeat_interval_s=0.2",
            "node.bus.handshake_timeout_s=20", *overrides]


def helper(name: str) -> str:
    """Path of a node class in tests/helpers, e.g. helper("echo_node.py:EchoNode")."""
    return os.path.join(HELPERS, name)


def json_line(proc: Proc, key: str, timeout: float) -> Any:
    """The JSON object a helper process printed as `KEY {...}`."""
    import json

    return json.loads(proc.wait_for(rf"^{re.escape(key)} (\{{.*\}})$", timeout).group(1))
