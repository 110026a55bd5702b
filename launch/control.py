"""The supervisor's own request socket: how nodes talk to the launcher.

    node (DEALER) --job.stop{reason, failed}--> [ROUTER  supervisor]  -> the job stops in order
                  <--job.stop.reply{state}---
    anyone        --ping{payload?}----------->                        <- ping.reply{payload?, state}

The launcher is in every node's directory as the peer "supervisor" (role "supervisor"), so a
node asks `self.client("supervisor").request("job.stop", ...)` — the tracker does this under
its `stop` error policy. A repeated job.stop (a client retry) is answered again and changes
nothing: stopping is idempotent. Malformed or unknown requests get an `error` reply naming
the problem, never an exception in the launcher.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from nexrl.bus import codec, schema
from nexrl.bus.codec import Message
from nexrl.bus.sockets import CurveConfig, make_socket, recv_frames, send_frames

from .resolve import SUPERVISOR as NAME


class ControlSocket:
    """ROUTER bound at `endpoint`; `handle_ready()` answers what is queued (non-blocking).

    `on_stop(sender, reason, failed)` is called for job.stop; `state()` gives the job state.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, on_stop: Callable[[str, str, bool], None],
                 state: Callable[[], str], curve: CurveConfig | None = None):
        self.sock = make_socket(ctx, zmq.ROUTER, bind=endpoint, linger_ms=1_000, curve=curve)
        self.on_stop, self.state = on_stop, state
        self.errors: list[str] = []   # refused requests, for the launcher to report

    def handle_ready(self) -> None:
        for _ in range(1000):
            try:
                parts = recv_frames(self.sock, 2, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(parts)

    def _handle(self, parts: list) -> None:
        peer = parts[0]
        try:
            msg = codec.decode(parts[1:])
        except codec.DecodeError as e:
            self._error(peer, None, e.code, str(e), None)
            return
        try:
            schema.check_incoming(msg.type, msg.body)
        except schema.SchemaError as e:
            self._error(peer, msg.msg_id, e.code, str(e), msg.type)
            return
        if msg.type == "job.stop":
            self.on_stop(msg.sender, str(msg.body["reason"]), bool(msg.body["failed"]))
            self._reply(peer, msg, "job.stop.reply", {"state": self.state()})
        elif msg.type == "ping":
            body: dict[str, Any] = {"state": self.state()}
            if "payload" in msg.body:
                body["payload"] = msg.body["payload"]
            self._reply(peer, msg, "ping.reply", body)
        else:
            self._error(peer, msg.msg_id, "unknown_type",
                        f"the supervisor handles job.stop and ping, not {msg.type}", msg.type)

    def _reply(self, peer: bytes, req: Message, mtype: str, body: dict[str, Any]) -> None:
        schema.check_outgoing(mtype, body)
        self._send(peer, Message(mtype, body, sender=NAME, msg_id=codec.new_msg_id(),
                                 reply_to=req.msg_id, ts=time.time()))

    def _error(self, peer: bytes, reply_to: str | None, code: str, text: str,
               request_type: str | None) -> None:
        self.errors.append(f"[{code}] {text}")
        self._send(peer, Message("error", dict(code=code, message=text, node=NAME,
                                               request_type=request_type),
                                 sender=NAME, msg_id=codec.new_msg_id(), reply_to=reply_to,
                                 ts=time.time()))

    def _send(self, peer: bytes, msg: Message) -> None:
        try:
            send_frames(self.sock, codec.encode(msg), zmq.NOBLOCK, prefix=[peer])
        except zmq.ZMQError as e:  # the requester is gone (ROUTER_MANDATORY) or its queue is full
            self.errors.append(f"cannot answer {msg.reply_to}: {e}")

    def close(self) -> None:
        self.sock.close(linger=200)
