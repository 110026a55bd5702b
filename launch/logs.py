"""Logs of a job: one file per node under `<run_dir>/logs/`, one prefixed console stream.

    node stdout+stderr --pipe--> pump thread --+--> <run_dir>/logs/<name>.log  (append, flushed)
                                               +--> console: "<name padded> | <line>"

Each node's output is read by a thread of its own (a blocking readline per pipe is the
simplest correct way to never interleave half lines); the console is shared under a lock.
Colour (one per node) only when the console is a terminal and NO_COLOR is unset. A restarted
node appends to the same file after a marker line, so one file tells a node's whole story;
`tail()` gives the last lines for failure messages.

The launcher's own messages go through `Console.say` with the prefix "launch" (and into
`<run_dir>/launch.log`). `format_progress` turns a `metrics` event (kind train) into the
one-line job progress (step, reward, throughput); the supervisor prints it when the job has
no tracker node (the tracker prints a richer line of its own).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import IO, Any

_COLOURS = (36, 33, 35, 32, 34, 91, 96, 93, 95, 92, 94)


class Console:
    """The shared console stream (and the launcher's own log file)."""

    def __init__(self, stream: IO[str] | None = None, color: bool | None = None):
        self.stream = stream or sys.stdout
        if color is None:
            color = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.color = color
        self.width = 6
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def open_file(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def line(self, prefix: str, text: str, colour: int | None = None) -> None:
        head = prefix.ljust(self.width)
        if self.color and colour is not None:
            head = f"\x1b[{colour}m{head}\x1b[0m"
        with self._lock:
            try:
                self.stream.write(f"{head} | {text}\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # console gone (pipe closed): the files still get everything

    def say(self, text: str) -> None:
        """A launcher message: console, and launch.log with a timestamp."""
        for line in text.splitlines() or [""]:
            self.line("launch", line, 1 if self.color else None)
        if self._file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with self._lock:
                self._file.write("".join(f"{stamp} {ln}\n" for ln in text.splitlines()))
                self._file.flush()


class NodeLog:
    """One node's log file and its console prefix."""

    def __init__(self, console: Console, name: str, path: str, index: int):
        self.console, self.name, self.path = console, name, path
        self.colour = _COLOURS[index % len(_COLOURS)]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(path, "ab")
        self._lock = threading.Lock()
        self._recent: deque[str] = deque(maxlen=200)
        self._threads: list[threading.Thread] = []

    def mark(self, text: str) -> None:
        """A launcher note in the node's file (e.g. a restart) and on the console."""
        self._write(f"=== nexrl-launch: {text} ===")
        self.console.line(self.name, f"=== {text} ===", self.colour)

    def _write(self, text: str) -> None:
        with self._lock:
            self._recent.append(text)
            self._file.write(text.encode("utf-8", "replace") + b"\n")
            self._file.flush()

    def attach(self, pipe: IO[bytes]) -> None:
        """Pump `pipe` (the node's stdout+stderr) until EOF, on a thread of its own."""
        t = threading.Thread(target=self._pump, args=(pipe,), name=f"log-{self.name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                self._write(text)
                self.console.line(self.name, text, self.colour)
        except (OSError, ValueError):
            pass  # pipe closed under us at shutdown
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def tail(self, n: int = 20) -> str:
        with self._lock:
            lines = list(self._recent)[-n:]
        return "\n".join(lines)

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the pump threads to reach EOF, so the file has every line."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._file.close()


def format_progress(body: dict[str, Any]) -> str | None:
    """The job progress line from a `metrics` event body {step, kind, values}: step, reward,
    throughput of `kind: train` metrics (None for other kinds or when nothing is known)."""
    values = body.get("values")
    if body.get("kind") != "train" or not isinstance(values, dict):
        return None
    parts = [f"step {body.get('step')}"]
    for key, label, fmt in (("train/reward_mean", "reward", "{:.4f}"),
                            ("throughput/tokens_per_s", "throughput", "{:.0f} tok/s")):
        v = values.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{label} {fmt.format(v)}")
    return "progress: " + "  ".join(parts)
