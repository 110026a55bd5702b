"""python bench/bus_cpu.py [--n 20000]

Where the bus's time goes: CPU per message of NexRL and of raw pyzmq doing the same exchange
(~1 minute on 2 cores). The companion of bench/bus.py, whose throughput and latency depend on
how busy the machine is; CPU time per message does much less.

    in process   one process, inproc sockets, no I/O thread in the way: client send + node
                 handling (Node._drain_socket, the real dispatch) + client receive, for a
                 pipelined trajectory.put (window 32) and a ping round trip; raw: the same
                 exchanges with the raw code of bench/bus.py. Best of 7, process CPU time.
    over tcp     the processes of bench/bus.py (client here, server a subprocess): CPU time of
                 each thread per message (psutil), main thread and ZeroMQ's I/O thread, for
                 20,000 pipelined trajectories (window 64), raw then NexRL, 3 rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable

import msgpack
import psutil
import zmq

from bus import (BenchNode, pipe_nexrl, pipe_raw, raw_frames, raw_take, servers,
                 trajectory)
from nexrl.bus.reqrep import Client
from nexrl.bus.sockets import make_socket
from nexrl.config import NodeConfig


def best_cpu_us(fn: Callable[[int], None], n: int, reps: int = 7) -> float:
    """Best (lowest) process CPU time per item of fn(n), in microseconds."""
    fn(min(n, 2000))  # warm up
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn(n)
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def in_process(n: int) -> dict[str, float]:
    ctx = zmq.Context()
    node = BenchNode(NodeConfig(name="bench"))
    node.state = "running"
    node._router = make_socket(ctx, zmq.ROUTER, bind="inproc://node")
    client = Client(ctx, "inproc://node", sender="client", timeout=5.0, retries=0)
    dealer = ctx.socket(zmq.DEALER)
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://raw")
    dealer.connect("inproc://raw")
    dealer.rcvtimeo = router.rcvtimeo = 5_000  # a lost message fails the run, never hangs it
    traj_body = {"trajectories": [trajectory(4096)]}
    trajs = traj_body["trajectories"]
    ping_body = {"payload": {"i": 1, "text": "hello"}}
    echo = os.urandom(130)

    def drain() -> None:
        node._drain_socket(node._router, node._on_request_frames, hold_replies=True)

    def nexrl_traj(k: int, window: int = 32) -> None:
        sent = got = 0
        while got < k:
            while sent < k and sent - got < window:
                client.send("trajectory.put", traj_body)
                sent += 1
            drain()
            while got < sent:
                assert client.recv_reply(1.0) is not None
                got += 1

    def raw_traj(k: int, window: int = 32) -> None:
        sent = got = 0
        while got < k:
            while sent < k and sent - got < window:
                dealer.send_multipart(raw_frames(*trajs), copy=False)
                sent += 1
            for _ in range(sent - got):
                parts = router.recv_multipart(copy=False)
                router.send_multipart([parts[0], raw_take(parts)])
            while got < sent:
                msgpack.unpackb(dealer.recv())
                got += 1

    def nexrl_ping(k: int) -> None:
        for _ in range(k):
            client.send("ping", ping_body)
            drain()
            client.recv_reply(1.0)

    def raw_ping(k: int) -> None:
        for _ in range(k):
            dealer.send(echo)
            router.send_multipart(router.recv_multipart(copy=False))
            dealer.recv()

    gc.freeze()
    out = {"trajectory_nexrl_us": best_cpu_us(nexrl_traj, n),
           "trajectory_raw_us": best_cpu_us(raw_traj, n),
           "ping_nexrl_us": best_cpu_us(nexrl_ping, n),
           "ping_raw_us": best_cpu_us(raw_ping, n)}
    client.close(0)
    for s in (dealer, router, node._router):
        s.close(0)
    ctx.term()
    return out


def thread_cpu(p: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in p.threads()}


def per_thread_us(before: dict[int, float], after: dict[int, float], n: int) -> list[float]:
    """CPU per message of the two busiest threads (main and ZeroMQ's I/O thread)."""
    used = sorted(((after[k] - before.get(k, 0.0)) / n * 1e6 for k in after), reverse=True)
    return (used + [0.0, 0.0])[:2]


def over_tcp(n: int) -> dict[str, list]:
    ctx = zmq.Context()
    try:
        with servers() as sv:
            me, raw_p, node_p = (psutil.Process(), psutil.Process(sv.raw_pid),
                                 psutil.Process(sv.node_pid))
            client = Client(ctx, sv.node, sender="bench-client", timeout=30.0, retries=0,
                            linger_ms=0)
            body = {"trajectories": [trajectory(4096)]}
            rows: dict[str, list] = {"raw": [], "nexrl": []}
            for _ in range(3):
                for name, server, run in (
                        ("raw", raw_p, lambda: pipe_raw(ctx, sv.raw, body["trajectories"], n, 64)),
                        ("nexrl", node_p, lambda: pipe_nexrl(client, body, n, 64))):
                    c0, s0 = thread_cpu(me), thread_cpu(server)
                    rate = run()
                    c1, s1 = thread_cpu(me), thread_cpu(server)
                    rows[name].append((rate, per_thread_us(c0, c1, n), per_thread_us(s0, s1, n)))
            client.close()
            return rows
    finally:
        ctx.destroy(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="messages per measurement")
    args = ap.parse_args()
    r = in_process(args.n)
    print("in process (inproc sockets), CPU per message, best of 7:")
    for what in ("trajectory", "ping"):
        nx, raw = r[f"{what}_nexrl_us"], r[f"{what}_raw_us"]
        print(f"  {what:<11} NexRL {nx:6.1f} us   raw {raw:6.1f} us   NexRL - raw {nx - raw:5.1f} us")
    print("over tcp, CPU per trajectory message of each side's main / ZeroMQ I/O thread:")
    for name, runs in over_tcp(args.n).items():
        for rate, client, server in runs:
            print(f"  {name:<6} {rate:8.0f} msg/s   client {client[0]:5.1f} + {client[1]:5.1f} us   "
                  f"server {server[0]:5.1f} + {server[1]:5.1f} us   total "
                  f"{sum(client) + sum(server):5.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
