"""python bench/bus.py [--quick] [--rounds 5] [--json out.json] [--oob-threshold BYTES]

Bus benchmark: the same exchanges through raw pyzmq and through the NexRL bus, in one run
(~1-2 minutes on 2 cores; --quick: a few seconds, a smoke test of the benchmark itself).

Every exchange runs in two separate processes (this one is the client; the server is a
subprocess), over tcp on loopback, first raw then NexRL, alternating for `--rounds` rounds
so that noise from other tenants of a shared machine hits both sides alike:

    row          raw pyzmq                                   NexRL bus
    rtt          DEALER -> ROUTER echo of msgpack-free bytes  Client.request("ping") -> Node ->
                 as long as the NexRL header (blocking recv)  on_ping -> ping.reply (decode, schema
                                                              check, dedupe, encode both ways)
    trajectory   DEALER sends [msgpack(meta), ids, logprobs]  Client.send("trajectory.put") of one
                 (meta packed per message, arrays with        trajectory (4,096 int32 ids + 4,096
                 copy=False), ROUTER wraps the buffers with   float32 logprobs + a small dict) ->
                 frombuffer and answers a msgpack ack packed  BenchNode handler -> small reply,
                 per message, which the DEALER unpacks;       read by Client.recv_reply; the
                 pipelined, window 64                         same window
      prebuilt   the raw DEALER sends the same frames, packed once, and never reads its acks: the
                 floor of raw pyzmq (informational, no target; no real sender can do this)
    64mib        the same with one 64 MiB float32 array,      the same (the array goes out-of-band,
                 window 2                                     zero-copy both ways), window 2
    traj x8      8 trajectories per message (one metadata     trajectory.put with 8 trajectories
                 frame + 16 array frames), window 8           (informational: how batching
                                                              amortises the per-message cost)
    events       PUB -> EventProxy -> SUB, small events        Publisher -> EventProxy -> Subscriber
                 (informational: publishers drop when full)   (schema check, seq numbers)

Targets (from the project brief): rtt p50 <= 1.5x raw; trajectory and 64 MiB
throughput >= 0.8x raw. The event row has no target. Throughput rows print the median
msg/s of each side over the rounds, and as `ratio` the median over rounds of NexRL / raw in
the same round (each round runs raw and NexRL back to back, so a round that caught the
machine busy weighs on both sides of its own ratio); `best rounds` is the best NexRL round
over the best raw round. Figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack
import numpy as np
import zmq

from nexrl.node import Node, Request, handles

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class BenchNode(Node):
    """The NexRL server side: built-in ping for rtt, trajectory.put answered with a small ack."""

    role = "bench"

    @handles("trajectory.put")
    def on_put(self, req: Request) -> dict[str, Any]:
        """trajectory.put{trajectories} -> {accepted, duplicates}; touches every array."""
        n = 0
        for t in req.body["trajectories"]:
            for v in t.values():
                if isinstance(v, np.ndarray):
                    n += v.shape[0]
        return {"accepted": len(req.body["trajectories"]), "duplicates": 0 if n else 1}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_server(endpoint: str) -> None:
    """Raw ROUTER: 2 parts (id, payload) are echoed; more parts are [id, meta, *arrays]:
    the meta is unpacked, each array wrapped with frombuffer, and a small ack packed and
    sent back (how many trajectories were taken: it depends on the message)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.sndhwm = sock.rcvhwm = 10_000
    sock.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 2:
            sock.send_multipart(parts)
            continue
        sock.send_multipart([parts[0], raw_take(parts)])


def raw_take(parts: list) -> bytes:
    """The raw server's work on one trajectory message [id, meta, *arrays]: unpack the meta,
    wrap each array with frombuffer, pack the ack (it depends on the message)."""
    meta = msgpack.unpackb(parts[1].buffer)
    n = 0
    for frame, (dtype, shape) in zip(parts[2:], meta["arrays"]):
        n += np.frombuffer(frame.buffer, dtype=dtype).reshape(shape).shape[0]
    return msgpack.packb({"accepted": len(meta["items"]), "duplicates": 0 if n else 1})


def spawn(args: list[str], wait_for: str, timeout: float = 60.0) -> subprocess.Popen:
    """Start `args`; return once it printed a line containing `wait_for` (RuntimeError with
    its last lines after `timeout` seconds or when it exits). A thread keeps reading its
    output afterwards, so a chatty process never blocks on a full pipe."""
    p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name=f"bench-out-{p.pid}", daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if wait_for in line:
            return p
        seen.append(line)
    p.kill()
    p.wait(10)
    raise RuntimeError(f"bench: {' '.join(args[:3])} did not print {wait_for!r} within "
                       f"{timeout:.0f}s; last output:\n{''.join(seen[-20:])}")


@dataclass
class Servers:
    """Addresses of the processes `servers()` started."""

    pub: str            # event proxy: publishers connect here
    sub: str            # event proxy: subscribers connect here
    node: str           # the BenchNode's ROUTER
    raw: str            # the raw pyzmq ROUTER (raw_server)
    procs: list[subprocess.Popen]

    @property
    def raw_pid(self) -> int:
        return self.procs[1].pid

    @property
    def node_pid(self) -> int:
        return self.procs[2].pid


@contextmanager
def servers() -> Iterator[Servers]:
    """The event proxy, the raw server and a BenchNode (`nexrl-node`), as subprocesses on
    free loopback ports; stopped on the way out (SIGTERM, SIGKILL after 10 s)."""
    here = os.path.abspath(__file__)
    pub, sub, node, raw = (f"tcp://127.0.0.1:{free_port()}" for _ in range(4))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn([sys.executable, "-m", "nexrl.cli.bus", "proxy", "--pub", pub,
                            "--sub", sub], "event proxy:"))
        procs.append(spawn([sys.executable, here, "--raw-server", raw], "ready"))
        procs.append(spawn([sys.executable, "-m", "nexrl.cli.node", f"{here}:BenchNode",
                            "--name", "bench", "node.start=now", f"node.endpoint={node}",
                            f"node.bus.events_pub={pub}", f"node.bus.events_sub={sub}"],
                           "bus is live"))
        yield Servers(pub, sub, node, raw, procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


# --------------------------------------------------------------------------- payloads


def trajectory(n: int, big: bool = False) -> dict[str, Any]:
    if big:
        return {"traj_id": "g0/0", "group_id": "g0", "response_logprobs":
                np.random.default_rng(0).standard_normal(n, dtype=np.float32)}
    return {"traj_id": "g0/0", "item_id": "train/0", "group_id": "g0", "sample_index": 0,
            "mode": "train", "weight_version": 3, "reward": 1.0, "finish_reason": "stop",
            "response_ids": np.arange(n, dtype=np.int32),
            "response_logprobs": np.linspace(-3, 0, n, dtype=np.float32)}


def raw_frames(*trajs: dict[str, Any]) -> list:
    """[msgpack(metadata of every trajectory + array specs), *array buffers]."""
    arrays = [v for t in trajs for v in t.values() if isinstance(v, np.ndarray)]
    meta = {"items": [{k: v for k, v in t.items() if not isinstance(v, np.ndarray)} for t in trajs],
            "arrays": [(a.dtype.str, list(a.shape)) for a in arrays]}
    return [msgpack.packb(meta), *arrays]


# --------------------------------------------------------------------------- exchanges


def raw_dealer(ctx: zmq.Context, ep: str) -> zmq.Socket:
    """The raw client's socket; a reply that takes over 30 s raises zmq.Again (the bench fails
    instead of hanging when the raw server is gone)."""
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 30_000
    s.connect(ep)
    return s


def rtt_raw(ctx: zmq.Context, ep: str, payload: bytes, n: int) -> list[float]:
    s = raw_dealer(ctx, ep)
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        s.send(payload)
        s.recv()
        if i >= 50:  # the first ones warm the connection and the caches
            out.append(time.perf_counter() - t)
    s.close()
    return out


def rtt_nexrl(client: Any, n: int) -> list[float]:
    body = {"payload": {"i": 1, "text": "hello"}}
    out = []
    for i in range(n + 50):
        t = time.perf_counter()
        client.request("ping", body)
        if i >= 50:
            out.append(time.perf_counter() - t)
    return out


def pipe_raw(ctx: zmq.Context, ep: str, trajs: list, n: int, window: int,
             prebuilt: bool = False) -> float:
    """Each message's metadata frame is packed as it is sent (a real sender has a new
    trajectory every time) and each ack is unpacked; `prebuilt`: the same frames, packed
    once, are sent every time and acks are not read (the lower bound of raw pyzmq)."""
    s = raw_dealer(ctx, ep)
    frames = raw_frames(*trajs)
    s.send_multipart(frames, copy=False)  # warm up the connection
    s.recv()
    t = time.perf_counter()
    sent = got = 0
    while got < n:
        while sent < n and sent - got < window:
            s.send_multipart(frames if prebuilt else raw_frames(*trajs), copy=False)
            sent += 1
        ack = s.recv()
        if not prebuilt:
            msgpack.unpackb(ack)
        got += 1
    dt = time.perf_counter() - t
    s.close()
    return n / dt


def pipe_nexrl(client: Any, body: dict[str, Any], n: int, window: int) -> float:
    client.request("trajectory.put", body)  # warm up
    t = time.perf_counter()
    sent = got = 0
    while got < n:
        while sent < n and sent - got < window:
            client.send("trajectory.put", body)
            sent += 1
        reply = client.recv_reply(30.0)
        if reply is None:
            raise RuntimeError("bench: no reply within 30 s")
        got += 1
    return n / (time.perf_counter() - t)


def events_raw(ctx: zmq.Context, pub_ep: str, sub_ep: str, n: int) -> float:
    from nexrl.bus import codec
    from nexrl.bus.codec import Message

    header = codec.encode(codec.stamp(Message("metrics", {"step": 1, "kind": "train",
                                                          "values": {"loss": 0.5}}), "raw", 1))[0]
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 100_000
    sub.linger = 0
    sub.connect(sub_ep)
    sub.subscribe(b"metrics")
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = 10_000
    pub.linger = 0
    pub.connect(pub_ep)
    deadline = time.monotonic() + 30.0
    while True:  # handshake: wait until an event comes back
        pub.send_multipart([b"metrics", header])
        if sub.poll(100):
            while sub.poll(50):
                sub.recv_multipart()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: no event came back through the proxy at {pub_ep} in 30 s")
    t = time.perf_counter()
    for _ in range(n):
        pub.send_multipart([b"metrics", header], zmq.NOBLOCK)
    got = 0
    while sub.poll(300):
        sub.recv_multipart()
        got += 1
    dt = time.perf_counter() - t - 0.3
    pub.close()
    sub.close()
    return got / dt


def events_nexrl(ctx: zmq.Context, pub_ep: str, sub_ep: str, n: int) -> float:
    from nexrl.bus.events import Publisher, Subscriber, handshake

    pub = Publisher(ctx, pub_ep, sender="bench", hwm=10_000, linger_ms=0)
    sub = Subscriber(ctx, sub_ep, ("metrics",))
    handshake(pub, sub, 10.0)
    body = {"step": 1, "kind": "train", "values": {"loss": 0.5}}
    t = time.perf_counter()
    for _ in range(n):
        pub.publish("metrics", body)
    got = 0
    while sub.recv(0.3) is not None:
        got += 1
    dt = time.perf_counter() - t - 0.3
    pub.close()
    sub.close()
    return got / dt


# --------------------------------------------------------------------------- main


def paired_median(nexrl: list[float], raw: list[float]) -> float:
    """Median over rounds of NexRL / raw measured back to back in the same round: a round
    that caught the machine busy (or idle) weighs on both sides of its own ratio only."""
    return statistics.median(n / r for n, r in zip(nexrl, raw))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts")
    ap.add_argument("--rounds", type=int, default=5, help="alternating raw/NexRL rounds per row")
    ap.add_argument("--json", help="write the figures here as JSON")
    ap.add_argument("--oob-threshold", type=int, default=None,
                    help="NexRL client: arrays of this many bytes or more go out of band "
                         "(default: the codec's, 64 KiB)")
    ap.add_argument("--raw-server", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw_server:
        raw_server(args.raw_server)
        return 0
    q = args.quick
    n_rtt, n_traj, n_big, n_ev = (500, 2000, 6, 20_000) if q else (4000, 20_000, 40, 200_000)
    rounds = 1 if q else args.rounds
    ctx = zmq.Context()
    try:
        with servers() as sv:
            res = run_rows(ctx, sv, args, rounds, n_rtt, n_traj, n_big, n_ev)
    finally:
        ctx.destroy(0)
    print_rows(res, rounds)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


def run_rows(ctx: zmq.Context, sv: Servers, args: argparse.Namespace, rounds: int, n_rtt: int,
             n_traj: int, n_big: int, n_ev: int) -> dict[str, Any]:
    """Every row of the benchmark against the servers in `sv`; the figures as a dict."""
    from nexrl.bus import codec
    from nexrl.bus.reqrep import Client

    pub_ep, sub_ep, node_ep, raw_ep = sv.pub, sv.sub, sv.node, sv.raw
    client = Client(ctx, node_ep, sender="bench-client", timeout=30.0, retries=0, linger_ms=0)
    if args.oob_threshold is not None:
        client.oob_threshold = args.oob_threshold
    client.request("ping", {})
    ping_len = len(codec.encode_fields("ping", {"payload": {"i": 1, "text": "hello"}},
                                       "bench-client", codec.new_msg_id(), None, 1,
                                       time.time())[0])
    payload = os.urandom(ping_len)
    traj_body = {"trajectories": [trajectory(4096)]}
    big_body = {"trajectories": [trajectory(16 << 20, big=True)]}
    res: dict[str, dict[str, Any]] = {}

    raw_l: list[float] = []
    nex_l: list[float] = []
    chunk = 500  # alternate raw / NexRL in chunks: both see the same machine state
    for _ in range(rounds * max(1, n_rtt // chunk)):
        raw_l += rtt_raw(ctx, raw_ep, payload, chunk)
        nex_l += rtt_nexrl(client, chunk)
    res["rtt"] = dict(raw_p50_us=pct(raw_l, .5) * 1e6, raw_p99_us=pct(raw_l, .99) * 1e6,
                      nexrl_p50_us=pct(nex_l, .5) * 1e6, nexrl_p99_us=pct(nex_l, .99) * 1e6)
    res["rtt"]["ratio_p50"] = res["rtt"]["nexrl_p50_us"] / res["rtt"]["raw_p50_us"]
    res["rtt"]["ratio_p99"] = res["rtt"]["nexrl_p99_us"] / res["rtt"]["raw_p99_us"]

    batch_body = {"trajectories": [trajectory(4096) for _ in range(8)]}
    rows = (("trajectory", traj_body, n_traj, 64), ("64mib", big_body, n_big, 2),
            ("traj x8", batch_body, n_traj // 8, 8))
    for row, body, n, window in rows:
        trajs = body["trajectories"]
        raw_r, nex_r, pre_r = [], [], []
        for _ in range(rounds):
            raw_r.append(pipe_raw(ctx, raw_ep, trajs, n, window))
            nex_r.append(pipe_nexrl(client, body, n, window))
            if row == "trajectory":
                pre_r.append(pipe_raw(ctx, raw_ep, trajs, n, window, prebuilt=True))
        nbytes = sum(a.nbytes for a in raw_frames(*trajs)[1:])
        med_raw, med_nex = statistics.median(raw_r), statistics.median(nex_r)
        res[row] = dict(raw_msg_s=med_raw, nexrl_msg_s=med_nex,
                        raw_mb_s=med_raw * nbytes / 1e6, nexrl_mb_s=med_nex * nbytes / 1e6,
                        raw_rounds=raw_r, nexrl_rounds=nex_r,
                        ratio=paired_median(nex_r, raw_r),
                        ratio_best=max(nex_r) / max(raw_r))
        if pre_r:
            res[row].update(raw_prebuilt_msg_s=statistics.median(pre_r),
                            raw_prebuilt_rounds=pre_r, ratio_prebuilt=paired_median(nex_r, pre_r))
    raw_e, nex_e = [], []
    for _ in range(rounds):
        raw_e.append(events_raw(ctx, pub_ep, sub_ep, n_ev))
        nex_e.append(events_nexrl(ctx, pub_ep, sub_ep, n_ev))
    res["events"] = dict(raw_ev_s=statistics.median(raw_e), nexrl_ev_s=statistics.median(nex_e),
                         ratio=paired_median(nex_e, raw_e))
    client.close()
    return res


def print_rows(res: dict[str, Any], rounds: int) -> None:
    """The table (and the load average, which goes into `res` too)."""
    r = res["rtt"]
    load = os.getloadavg()
    print(f"# machine load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"rounds: {rounds}")
    res["loadavg"] = list(load)
    print(f"{'row':<12} {'raw':>16} {'NexRL':>16} {'ratio':>7}  target")
    print(f"{'rtt p50':<12} {r['raw_p50_us']:>13.1f} us {r['nexrl_p50_us']:>13.1f} us "
          f"{r['ratio_p50']:>6.2f}x  <= 1.5x {'ok' if r['ratio_p50'] <= 1.5 else 'MISSED'}")
    print(f"{'rtt p99':<12} {r['raw_p99_us']:>13.1f} us {r['nexrl_p99_us']:>13.1f} us "
          f"{r['ratio_p99']:>6.2f}x  (none)")
    for row in ("trajectory", "64mib", "traj x8"):
        x = res[row]
        target = (f">= 0.8x {'ok' if x['ratio'] >= 0.8 else 'MISSED'}" if row != "traj x8"
                  else "(none)")
        print(f"{row:<12} {x['raw_msg_s']:>9.0f} msg/s {x['nexrl_msg_s']:>9.0f} msg/s "
              f"{x['ratio']:>6.2f}x  {target}"
              f"   ({x['raw_mb_s']:.0f} vs {x['nexrl_mb_s']:.0f} MB/s; best rounds "
              f"{x['ratio_best']:.2f}x)")
        if "raw_prebuilt_msg_s" in x:
            print(f"{'  prebuilt':<12} {x['raw_prebuilt_msg_s']:>9.0f} msg/s {'':>15} "
                  f"{x['ratio_prebuilt']:>6.2f}x  (none: raw sends the same packed frames "
                  f"every time and does not read its acks)")
    e = res["events"]
    print(f"{'events':<12} {e['raw_ev_s']:>9.0f} ev/s  {e['nexrl_ev_s']:>9.0f} ev/s  "
          f"{e['ratio']:>6.2f}x  (none)")


if __name__ == "__main__":
    sys.exit(main())
