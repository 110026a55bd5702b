"""The watchdog every node runs under, locally or over ssh: `python -m nexrl.launch.remote`.

    launcher --stdin pipe (or ssh channel)--> watchdog --start_new_session--> node (+ its children)
              line 1: JSON spec {argv, env, cwd, files, term_timeout_s, name}
              then control lines: "term" (SIGTERM the node's process group)
                                  "kill" (SIGKILL the node's whole tree)
              EOF: the launcher (or its ssh connection) is gone -> SIGTERM, wait, SIGKILL tree

Why a watchdog: a node must not outlive its job on any exit path, including a launcher killed
with SIGKILL or an ssh connection that drops. Its stdin is the one thing that closes in all of
those cases, so it runs on both sides the same way. The spec travels over stdin (not the
command line) so env values (tokens) never show in `ps` and need no shell quoting.

The node runs in a new session; the watchdog is a child subreaper, so children the node
orphaned (even in sessions of their own) re-parent to it, and when the node exits whatever
is left under the watchdog is killed. The node also gets PR_SET_PDEATHSIG(SIGKILL),
so even a watchdog killed with SIGKILL does not leave the node behind. Exit status: the
node's, or 128 + signal number when a signal ended it (the shell convention).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import psutil


def _say(name: str, text: str) -> None:
    try:
        print(f"[nexrl-watchdog {name}] {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # the launcher (our stderr's reader) is gone; the work below matters, not the line


def _write_files(files: dict[str, str]) -> None:
    """Write files the node needs (resolved placement, recipe) where the launcher has them."""
    for path, text in files.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def set_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux PR_SET_CHILD_SUBREAPER), so
    children a node started in sessions of their own and then orphaned are still found."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill_tree(root: int, sig: int = signal.SIGKILL, include_root: bool = True) -> None:
    """Signal `root` (optionally) and all its descendants, then reap them (bounded wait).

    The tree is listed before anything is signalled: once a parent dies its children are
    re-parented and could no longer be found from the root."""
    try:
        r = psutil.Process(root)
        procs = r.children(recursive=True) + ([r] if include_root else [])
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=3)


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


class Watchdog:
    """Runs one node and ends its tree when told to, or when its stdin closes."""

    def __init__(self, spec: dict[str, Any], name: str):
        self.name = name
        self.term_timeout = float(spec.get("term_timeout_s", 5.0))
        self.terminating: float | None = None   # time of the first SIGTERM sent
        env = dict(os.environ)
        env.update({k: str(v) for k, v in spec.get("env", {}).items()})
        self.child = subprocess.Popen(spec["argv"], env=env, cwd=spec.get("cwd") or None,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_pdeathsig)

    def term(self, reason: str = "") -> None:
        """SIGTERM the node's process group (the node then drains)."""
        if self.terminating is None:
            self.terminating = time.monotonic()
            if reason:
                _say(self.name, f"{reason}; sending SIGTERM to {self.child.pid}")
        try:
            os.killpg(self.child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        """SIGKILL the node and everything under this watchdog; the node is reaped through
        Popen (psutil would reap it too and Popen would then report exit 0)."""
        rest = [p for p in psutil.Process().children(recursive=True) if p.pid != self.child.pid]
        try:
            self.child.kill()
        except ProcessLookupError:
            pass
        for p in rest:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.child.wait(timeout=30)  # after SIGKILL: only a process stuck in the kernel stays
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(rest, timeout=3)

    def control(self, buf: bytes) -> bytes:
        """Act on the complete control lines in `buf`; return the incomplete rest."""
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.strip().decode(errors="replace")
            if cmd == "term":
                self.term()
            elif cmd == "kill":
                self.kill_all()
            elif cmd:
                _say(self.name, f"unknown control line {cmd!r} ignored")
        return buf

    def watch(self, pending: bytes) -> int:
        """Wait for the node's exit while acting on stdin; returns its exit status."""
        try:
            pidfd: int | None = os.pidfd_open(self.child.pid)
        except (AttributeError, OSError):
            pidfd = None  # old kernel: poll the child every 0.2 s instead
        stdin, stdin_open, buf = sys.stdin.fileno(), True, self.control(pending)
        while self.child.poll() is None:
            if self.terminating is not None and time.monotonic() - self.terminating > self.term_timeout:
                _say(self.name, f"{self.child.pid} still running {self.term_timeout:g}s after "
                                f"SIGTERM; SIGKILL")
                self.kill_all()
                break
            fds = ([stdin] if stdin_open else []) + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(fds, [], [], 0.5 if pidfd is not None else 0.2)
            if stdin_open and stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False
                    self.term("launcher connection closed")
                    continue
                buf = self.control(buf + data)
        return _status(self.child.wait())


def run(spec: dict[str, Any], name: str, pending: bytes = b"") -> int:
    """Run the node of `spec` under a watchdog; never returns with the node still alive."""
    set_subreaper()
    _write_files(spec.get("files", {}))
    try:
        wd = Watchdog(spec, name)
    except OSError as e:
        _say(name, f"cannot start {spec['argv'][0]!r}: {e.strerror}")
        return 127
    signal.signal(signal.SIGTERM, lambda *_: wd.term())
    signal.signal(signal.SIGHUP, lambda *_: wd.term("SIGHUP"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides, not a stray Ctrl-C
    try:
        return wd.watch(pending)
    finally:
        if wd.child.poll() is None:  # only after a bug in watch(): never leave the node behind
            wd.kill_all()
        kill_tree(os.getpid(), include_root=False)  # whatever the node left behind (orphans too)


def _first_line(fd: int) -> tuple[bytes, bytes]:
    """(first line, bytes after it) read unbuffered, so later control lines are not lost."""
    buf = b""
    while b"\n" not in buf:
        data = os.read(fd, 65536)
        if not data:
            return b"", b""
        buf += data
    line, rest = buf.split(b"\n", 1)
    return line, rest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nexrl.launch.remote", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="node", help="node name (for messages and ps)")
    ap.add_argument("--tag", default="", help="free text shown in ps (the run directory)")
    args = ap.parse_args(argv)
    line, pending = _first_line(sys.stdin.fileno())
    if not line:
        _say(args.name, "no spec on stdin (launcher gone before start)")
        return 3
    try:
        spec = json.loads(line)
    except json.JSONDecodeError as e:
        _say(args.name, f"bad spec on stdin: {e}")
        return 3
    return run(spec, args.name, pending)


if __name__ == "__main__":
    sys.exit(main())
