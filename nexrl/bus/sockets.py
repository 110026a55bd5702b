"""ZeroMQ sockets with production settings, and frame send/receive helpers.

Settings every NexRL socket gets (`make_socket`), and what each does when its queue is full:

    socket  HWM (msgs)    when the queue is full          linger   start-up / other
    ------  ------------  ------------------------------  -------  -------------------------------
    ROUTER  hwm send+recv reply send is non-blocking: it   finite   ROUTER_MANDATORY: a reply to a
            (node)        fails, is counted and logged,             gone peer raises (counted), never
                          and stays in the reply cache,             a silent drop
                          so the client's retry gets it
    DEALER  hwm send+recv send waits (poll with the        finite   IMMEDIATE: queue only on a
            (client)      request timeout), then                    completed connection, so "no
                          RequestTimeout                            server" is a send timeout, not a
                                                                    message parked forever; the
                                                                    first send is the handshake
    PUB     hwm send      never blocks: the event is       finite   XPUB_NODROP: a full queue makes
                          dropped and counted                       send fail (EAGAIN) instead of a
                          (Publisher.dropped); per-topic            silent drop, so the drop is
                          seq numbers show the hole                 counted where it happens
    SUB     hwm recv      the proxy drops for this         0        readiness handshake (bus.probe
                          subscriber; seq gaps count it             round trip through the proxy)
                          (Subscriber.gaps)                         before the node relies on events
    XSUB/   hwm           XPUB drops for a slow            0        the event proxy (EventProxy); it
    XPUB                  subscriber (never stalls the              must never block the whole bus
    (proxy)               other subscribers)                        for one slow reader

All sockets use ZMTP heartbeats (HEARTBEAT_IVL 2 s, HEARTBEAT_TIMEOUT 10 s: a dead TCP peer
is noticed within seconds) and TCP keepalive. ZMQ_MAXMSGSIZE is left unlimited on purpose:
libzmq enforces it by dropping the connection (no error reply, queued messages lost), so the
size limit is applied per message by the node instead (`max_message_bytes`, `too_large`).

One consequence of IMMEDIATE worth knowing: when a server goes away, replies that reached a
DEALER but were not read yet are dropped with the connection; a client that must not lose
a reply reads it promptly (Client.request does) and retries on timeout (replies are cached).

With CURVE on (`CurveConfig`), bound sockets are CURVE servers and only clients whose public
key is in `<keys_dir>/authorized` get in (ZAP, pyzmq's ThreadAuthenticator); connecting
sockets use the job's client key pair. Keys are files made by `nexrl-bus keys DIR`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import zmq

#: Default high-water mark (messages) of each queue.
DEFAULT_HWM = 10_000
#: Default milliseconds a closing socket keeps trying to deliver what is queued.
DEFAULT_LINGER_MS = 1_000
#: ZMTP heartbeat period and the silence after which a peer's connection is dropped (ms).
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000

#: Head parts (routing id, topic, header) at least this long are kept as zmq.Frame.
HEAD_COPY_MAX = 8192
#: Plain-int flags (pyzmq's are enums; arithmetic on those is slow on the hot path).
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)


@dataclass
class CurveConfig:
    """CURVE authentication for traffic that leaves the host (off by default: binds are loopback)."""

    #: Turn CURVE on for every socket of this process.
    enabled: bool = False
    #: Folder made by `nexrl-bus keys DIR`: server.key(_secret), client.key(_secret), authorized/.
    keys_dir: str = ""

    def _path(self, *parts: str) -> str:
        return os.path.join(self.keys_dir, *parts)

    def check(self) -> None:
        """Raise FileNotFoundError naming the missing key file (before any socket exists)."""
        if not self.enabled:
            return
        for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                     "authorized"):
            if not os.path.exists(self._path(name)):
                raise FileNotFoundError(f"CURVE is on but {self._path(name)} is missing "
                                        f"(make the keys with `nexrl-bus keys {self.keys_dir or 'DIR'}`)")


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


def stop_authenticators(ctx: zmq.Context | None = None) -> None:
    """Stop the ZAP thread of `ctx` (or of every context) before terminating the context."""
    with _auth_lock:
        for key in [k for k in _authenticators if ctx is None or k == id(ctx)]:
            _authenticators.pop(key).stop()


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
    """A socket of `kind` with the settings in the module docstring, bound or connected.

    Raises zmq.ZMQError naming the address when it cannot bind/connect (e.g. port in use).
    """
    sock = ctx.socket(kind)
    try:
        sock.linger = linger_ms
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        elif kind == zmq.DEALER:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        elif kind == zmq.PUB:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        if curve is not None and curve.enabled:
            if bind is not None:
                _curve_server(ctx, sock, curve)
            else:
                _curve_client(sock, curve)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except zmq.ZMQError as e:
        sock.close(0)
        where = bind if bind is not None else connect
        raise zmq.ZMQError(e.errno, f"cannot {'bind' if bind else 'connect'} {where}: {e.strerror}") from e
    except BaseException:
        sock.close(0)
        raise
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The address a socket really bound (resolves port 0)."""
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else ep


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0, prefix: list | None = None,
                copy_header: bool = False) -> None:
    """Send prefix frames (routing id / topic) then message frames as one message.

    Every part goes with copy=False: pyzmq copies parts below its copy threshold (64 KiB)
    anyway, and sends larger ones (out-of-band array buffers) zero-copy. copy_header=True:
    frame 0 is always copied (a transient header, see codec.encode_fields). With NOBLOCK, a
    full queue raises zmq.Again on the first part, so nothing half-sent is left behind.
    (Flags are plain ints here: or-ing pyzmq's enum flags costs ~0.5 us per message.)
    """
    send = sock.send
    flags = int(flags)
    more = flags | SNDMORE
    if prefix:
        for part in prefix:
            send(part, more, copy=False)
    last = len(frames) - 1
    if last == 0:  # the common case: the header alone
        send(frames[0], flags, copy=copy_header)
        return
    send(frames[0], more, copy=copy_header)
    for i in range(1, last):
        send(frames[i], more, copy=False)
    send(frames[last], flags, copy=False)


def recv_frames(sock: zmq.Socket, n_head: int, flags: int = 0) -> list:
    """Receive one whole message: the first `n_head` parts as bytes (a head part of
    HEAD_COPY_MAX bytes or more stays a zmq.Frame: copying a big inline header buys
    nothing), the rest as zmq.Frame (zero-copy buffers). Returns all parts (possibly fewer
    than n_head from a bad peer).

    Parts are received as frames and asked `.more`, which is cheaper than a RCVMORE
    getsockopt per part.
    """
    recv = sock.recv
    frame = recv(int(flags), copy=False)
    parts: list = [frame.bytes if n_head else frame]
    while frame.more:
        frame = recv(copy=False)
        parts.append(frame.bytes if len(parts) < n_head and len(frame) < HEAD_COPY_MAX else frame)
    return parts
