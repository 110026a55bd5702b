"""1,000,000 requests through the bus with none lost and memory bounded.

    python -m pytest tests/test_bus_load.py -q                 # 1,000,000 (~35-60 s on 2 cores)
    python -m pytest tests/test_bus_load.py -q -k 100k         # the quick variant

One client process (tests/helpers/load_client.py) pipelines `ping` requests with a credit
window of 500 to an echo node process; every id must be answered exactly once with its own
payload. The RSS of both processes is sampled with psutil every 0.2 s.

The memory bound, and why: once warm (after the first 10 % of the run) nothing may grow with
the number of messages. What legitimately occupies memory is bounded by construction: the
node's reply cache keeps at most 10,000 replies of ~150 B (~3 MiB with the dict and key
overhead, reached after 10,000 requests), the ZMQ queues hold at most the window (500
messages of ~150 B each way), and the client's table of outstanding ids holds at most the
window. So RSS may rise by allocator noise only: the test allows 24 MiB of growth after
warm-up (a leak of even 32 bytes per message would add 29 MiB over the remaining 900,000)
and 256 MiB in absolute terms.
"""

from __future__ import annotations

import sys
import threading

import psutil
import pytest

from helpers.procs import Proc, helper, json_line

ECHO = helper("echo_node.py:EchoNode")
WINDOW = 500
GROWTH_MIB = 24
ABSOLUTE_MIB = 256


class RssSampler:
    """RSS (MiB) of some processes, sampled on a thread until stopped."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.samples[name].append(proc.memory_info().rss / 2 ** 20)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self._every)

    def mark(self) -> dict[str, int]:
        return {name: len(s) for name, s in self.samples.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("n", [1_000_000, 100_000], ids=["1M", "100k"])
def test_a_million_requests_none_lost_memory_bounded(spawn_node, n: int) -> None:
    node = spawn_node(ECHO, "sink")
    client = Proc([sys.executable, helper("load_client.py"), node.endpoint, str(n), str(WINDOW)],
                  "load-client")
    sampler = None
    try:
        client.wait_for(r"^READY", 30)
        sampler = RssSampler({"node": node.proc.pid, "client": client.pid})
        json_line(client, "PROGRESS", 120)  # first 10 %: caches and queues are warm now
        warm = sampler.mark()
        result = json_line(client, "RESULT", 240)
        sampler.stop()
        assert client.wait(30) == 0, client.output()
    finally:
        if sampler is not None:
            sampler.stop()
        client.kill_tree()
    assert result["ok"] and result["answered"] == n, result
    assert result["duplicates"] == 0 and result["missing"] == 0 and result["foreign"] == 0
    report = {}
    for name, samples in sampler.samples.items():
        base, later = samples[:warm[name]], samples[warm[name]:]
        assert base and later, (name, len(samples))
        growth = max(later) - base[-1]
        report[name] = (round(base[-1], 1), round(max(later), 1))
        assert growth < GROWTH_MIB, f"{name} RSS grew {growth:.1f} MiB after warm-up: {report}"
        assert max(samples) < ABSOLUTE_MIB, f"{name} RSS {max(samples):.0f} MiB: {report}"
    stats = node.status()["stats"]
    assert stats["handled"] >= n and stats["reply_cache_entries"] <= 10_000
    assert stats["malformed"] == 0 and stats["reply_failures"] == 0
    print(f"{n} requests in {result['seconds']:.1f} s ({result['per_s']:.0f}/s); "
          f"RSS MiB (warm, max): {report}")
    assert result["seconds"] < 120, result
