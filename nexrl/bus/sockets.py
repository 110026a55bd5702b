"""ZeroMQ sockets with production settings, and frame send/receive helpers.

Settings every NexRL socket gets (see `make_socket`):

    socket   HWM (send/recv)   when full            linger   other
    ROUTER   hwm               send raises (never   finite   ROUTER_MANDATORY: replying to a
                               drops silently)               gone peer raises instead of dropping
    DEALER   hwm               send waits (poll     finite   IMMEDIATE: queue only on completed
                               with timeout)                 connections, so "no peer" is a timeout
    PUB      hwm               event dropped and    finite   per-topic seq numbers make drops visible
                               counted
    SUB      hwm               (publisher drops)    finite   readiness handshake: bus.probe
    XSUB/XPUB  hwm             (proxy)              finite   the event proxy (events.EventProxy)

All sockets use ZMTP heartbeats (a dead TCP peer is noticed in seconds) and TCP keepalive.
With CURVE on (`CurveConfig`), bound sockets are CURVE servers and only clients whose public
key is in `authorized_dir` get in (ZAP, pyzmq's ThreadAuthenticator); connecting sockets use
the job's client key pair. Keys are files made by `nexrl-bus keys DIR`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import zmq

from .codec import OOB_THRESHOLD

DEFAULT_HWM = 10_000
DEFAULT_LINGER_MS = 1_000


@dataclass
class CurveConfig:
    """CURVE authentication for traffic that leaves the host (off by default: binds are loopback)."""

    #: Turn CURVE on for every socket of this process.
    enabled: bool = False
    #: Folder made by `nexrl-bus keys DIR`: server.key(_secret), client.key(_secret), authorized/.
    keys_dir: str = ""

    def _path(self, *parts: str) -> str:
        return os.path.join(self.keys_dir, *parts)


_auth_lock = threading.Lock()
_authenticators: dict[int, Any] = {}


def _curve_server(ctx: zmq.Context, sock: zmq.Socket, curve: CurveConfig) -> None:
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:  # one ZAP handler per context
        if id(ctx) not in _authenticators:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=curve._path("authorized"))
            _authenticators[id(ctx)] = auth
    public, secret = zmq.auth.load_certificate(curve._path("server.key_secret"))
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True


def _curve_client(sock: zmq.Socket, curve: CurveConfig) -> None:
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(curve._path("server.key"))
    public, secret = zmq.auth.load_certificate(curve._path("client.key_secret"))
    sock.curve_serverkey = server_public
    sock.curve_publickey, sock.curve_secretkey = public, secret


def stop_authenticators() -> None:
    """Stop the ZAP threads this process started (call before terminating the context)."""
    with _auth_lock:
        for auth in _authenticators.values():
            auth.stop()
        _authenticators.clear()


def make_keys(keys_dir: str) -> None:
    """Create a job's CURVE key files: server pair, client pair, client public key authorized."""
    import shutil

    import zmq.auth

    os.makedirs(os.path.join(keys_dir, "authorized"), exist_ok=True)
    zmq.auth.create_certificates(keys_dir, "server")
    zmq.auth.create_certificates(keys_dir, "client")
    shutil.copy(os.path.join(keys_dir, "client.key"), os.path.join(keys_dir, "authorized", "client.key"))


def make_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
                hwm: int = DEFAULT_HWM, linger_ms: int = DEFAULT_LINGER_MS,
                curve: CurveConfig | None = None) -> zmq.Socket:
    """A socket of `kind` with the settings in the module docstring, bound or connected."""
    sock = ctx.socket(kind)
    sock.linger = linger_ms
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2_000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None and curve.enabled:
        if bind is not None:
            _curve_server(ctx, sock, curve)
        else:
            _curve_client(sock, curve)
    try:
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except zmq.ZMQError as e:
        sock.close(0)
        where = bind if bind is not None else connect
        raise zmq.ZMQError(e.errno, f"cannot {'bind' if bind else 'connect'} {where}: {e.strerror}") from e
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The address a socket really bound (resolves port 0)."""
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else ep


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0, prefix: list | None = None) -> None:
    """Send prefix frames (routing id / topic) then message frames; large buffers zero-copy."""
    parts = (prefix or []) + frames
    last = len(parts) - 1
    for i, part in enumerate(parts):
        more = zmq.SNDMORE if i < last else 0
        copy = len(part) < OOB_THRESHOLD if not isinstance(part, memoryview) else part.nbytes < OOB_THRESHOLD
        sock.send(part, flags | more, copy=copy)


def recv_frames(sock: zmq.Socket, n_head: int, flags: int = 0) -> list:
    """Receive one whole message: the first `n_head` parts as bytes, the rest as zmq.Frame
    (zero-copy buffers). Returns all parts (possibly fewer than n_head from a bad peer)."""
    parts: list = []
    while True:
        if len(parts) < n_head:
            parts.append(sock.recv(flags))
        else:
            parts.append(sock.recv(flags, copy=False))
        if not sock.getsockopt(zmq.RCVMORE):
            return parts
        flags = 0  # the rest of a multipart message is already here
