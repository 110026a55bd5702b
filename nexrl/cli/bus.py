"""`nexrl-bus`: look at a running job's bus (like `ros2 topic echo` / `ros2 node list`).

    nexrl-bus echo [TOPIC ...]        live events, decoded (prefix match; default: all)
    nexrl-bus nodes                   live nodes: role, name, host, pid, state, heartbeat age
    nexrl-bus call NODE_ENDPOINT TYPE [key=value ...]   send one request, print the reply
    nexrl-bus proxy                   run an event proxy by hand (the supervisor hosts one)
    nexrl-bus keys DIR                make CURVE key files for a job

Addresses: --placement FILE (the job's placement), or --pub/--sub, or the environment
variables NEXRL_EVENTS_PUB / NEXRL_EVENTS_SUB; defaults are the placement defaults.
CURVE: --curve-keys DIR (or NEXRL_CURVE_KEYS) when the job runs with CURVE on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from ..config import BusConfig


def _bus_from_args(args: argparse.Namespace) -> BusConfig:
    bus = BusConfig()
    if getattr(args, "placement", None):
        from nexrl.launch.placement import bus_config_from_placement

        bus = bus_config_from_placement(args.placement)
    bus.events_pub = args.pub or os.environ.get("NEXRL_EVENTS_PUB") or bus.events_pub
    bus.events_sub = args.sub or os.environ.get("NEXRL_EVENTS_SUB") or bus.events_sub
    _curve_from_args(args, bus)
    return bus


def _curve_from_args(args: argparse.Namespace, bus: BusConfig) -> None:
    keys = getattr(args, "curve_keys", None) or os.environ.get("NEXRL_CURVE_KEYS")
    if keys:
        bus.curve.enabled, bus.curve.keys_dir = True, keys
    bus.curve.check()


def _stop_on_sigterm() -> None:
    """SIGTERM ends a tool like Ctrl-C does (clean exit, sockets closed)."""
    def raise_interrupt(*_: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, raise_interrupt)


def _short(v: Any) -> Any:
    """Printable form of a body value: arrays become dtype[shape] summaries."""
    if isinstance(v, np.ndarray) or type(v).__name__ == "Tensor":
        return f"<{getattr(v, 'dtype', '?')}{list(v.shape)}>"
    if isinstance(v, dict):
        return {k: _short(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_short(x) for x in v[:16]] + (["..."] if len(v) > 16 else [])
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return v


def cmd_echo(args: argparse.Namespace) -> int:
    import zmq

    from ..bus.events import Subscriber

    bus = _bus_from_args(args)
    _stop_on_sigterm()
    ctx = zmq.Context()
    sub = Subscriber(ctx, bus.events_sub, tuple(args.topics) or ("",), curve=bus.curve)
    deadline = time.monotonic() + args.duration if args.duration else None
    count = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            got = sub.recv(0.2)
            if got is None:
                continue
            topic, msg = got
            if topic.startswith("bus.probe") and not args.topics:
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(msg.ts)) + f".{int(msg.ts * 1000) % 1000:03d}"
            print(f"{stamp} {msg.sender:<16} {topic:<20} #{msg.seq} "
                  f"{json.dumps(_short(msg.body), default=str)}", flush=True)
            count += 1
            if args.count and count >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if sub.gaps:
            print(f"# {sub.gaps} event(s) missed (sequence gaps)", file=sys.stderr)
        if sub.malformed:
            print(f"# {sub.malformed} malformed event(s) ignored; last: {sub.last_error}",
                  file=sys.stderr)
        sub.close()
        ctx.destroy(0)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    import zmq

    from ..bus.events import Subscriber
    from ..bus.liveness import Liveness

    bus = _bus_from_args(args)
    ctx = zmq.Context()
    sub = Subscriber(ctx, bus.events_sub, ("node.heartbeat", "node.lifecycle"), curve=bus.curve)
    live = Liveness(bus.liveness)
    deadline = time.monotonic() + args.wait
    try:
        while time.monotonic() < deadline:
            got = sub.recv(0.1)
            if got is not None and got[1].type == "node.heartbeat":
                live.beat(got[1].body["name"], got[1].body)
    finally:
        sub.close()
        ctx.destroy(0)
    if not live.peers:
        print(f"no heartbeats on {bus.events_sub} within {args.wait:.1f}s (is a job running?)",
              file=sys.stderr)
        return 1
    rows = [("ROLE", "NAME", "HOST", "PID", "STATE", "HEARTBEAT", "ENDPOINT")]
    for p in sorted(live.peers.values(), key=lambda p: (p.info.get("role", ""), p.name)):
        i = p.info
        alive = "" if live.is_alive(p.name) else " (silent)"
        rows.append((i.get("role", "?"), p.name, i.get("host", "?"), str(i.get("pid", "?")),
                     i.get("state", "?") + alive, f"{p.age():.1f}s ago", i.get("endpoint", "")))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    import zmq

    from ..bus.reqrep import Client, RemoteError, RequestTimeout
    from ..bus.schema import SchemaError

    body = {}
    for kv in args.fields:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"nexrl-bus call: field {kv!r} must look like key=value", file=sys.stderr)
            return 2
        body[k] = _parse_value(v)
    bus = BusConfig()
    _curve_from_args(args, bus)
    ctx = zmq.Context()
    client = Client(ctx, args.endpoint, sender=f"nexrl-bus-{os.getpid()}", timeout=args.timeout,
                    retries=0, linger_ms=0, curve=bus.curve)
    try:
        reply = client.request(args.type, body)
        print(json.dumps({"type": reply.type, "sender": reply.sender, "body": _short(reply.body)},
                         default=str, indent=2))
        return 0
    except (RemoteError, RequestTimeout, SchemaError) as e:
        print(f"nexrl-bus call: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
        ctx.destroy(0)


def cmd_proxy(args: argparse.Namespace) -> int:
    import zmq

    from ..bus.events import EventProxy

    bus = _bus_from_args(args)
    ctx = zmq.Context()
    proxy = EventProxy(ctx, bus.events_pub, bus.events_sub, curve=bus.curve).start()
    print(f"event proxy: publishers connect to {proxy.frontend}, subscribers to {proxy.backend}",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    proxy.stop()
    _stop_zap()
    ctx.destroy(0)
    return 0


def _stop_zap() -> None:
    from ..bus.sockets import stop_authenticators

    stop_authenticators()


def cmd_keys(args: argparse.Namespace) -> int:
    from ..bus.sockets import make_keys

    make_keys(args.dir)
    print(f"CURVE keys written to {args.dir} (server.key*, client.key*, authorized/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nexrl-bus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def addr(p: argparse.ArgumentParser) -> None:
        p.add_argument("--placement", help="the job's placement YAML")
        p.add_argument("--pub", help="event proxy frontend (XSUB) address")
        p.add_argument("--sub", help="event proxy backend (XPUB) address")
        curve(p)

    def curve(p: argparse.ArgumentParser) -> None:
        p.add_argument("--curve-keys", metavar="DIR",
                       help="CURVE key folder (nexrl-bus keys DIR) when the job uses CURVE")

    p = sub.add_parser("echo", help="print live events")
    addr(p)
    p.add_argument("topics", nargs="*", help="topic prefixes (default: all)")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    p.set_defaults(fn=cmd_echo)
    p = sub.add_parser("nodes", help="list live nodes")
    addr(p)
    p.add_argument("--wait", type=float, default=2.5, help="seconds to listen for heartbeats")
    p.set_defaults(fn=cmd_nodes)
    p = sub.add_parser("call", help="send one request to a node")
    p.add_argument("endpoint", help="the node's ROUTER address (see `nexrl-bus nodes`)")
    p.add_argument("type", help="request type, e.g. ping or node.status")
    p.add_argument("fields", nargs="*", help="body fields as key=value (values parsed as JSON)")
    p.add_argument("--timeout", type=float, default=5.0)
    curve(p)
    p.set_defaults(fn=cmd_call)
    p = sub.add_parser("proxy", help="run an event proxy")
    addr(p)
    p.set_defaults(fn=cmd_proxy)
    p = sub.add_parser("keys", help="make CURVE keys")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_keys)
    args = ap.parse_args(argv)
    import zmq

    try:
        return args.fn(args)
    except (OSError, ValueError, zmq.ZMQError) as e:  # bad address, missing keys, port in use
        print(f"nexrl-bus {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
