"""The NexRL message bus: ZeroMQ sockets, the wire codec and the patterns built on them.

    codec     Message <-> frames (msgpack header + out-of-band array buffers)
    arrays    numpy arrays / torch tensors as ext payloads, inline or out-of-band
    schema    proto/schema.json as checks on every message sent and received
    sockets   production socket settings (HWM, linger, MANDATORY, IMMEDIATE, CURVE)
    reqrep    Client (DEALER): correlation ids, timeouts, retries; ReplyCache (dedupe)
    events    Publisher / Subscriber / EventProxy, sequence numbers, readiness handshake
    lease     LeaseTable: credit-based pull of work with expiry, re-issue, exactly-once acks
    liveness  heartbeats -> who is alive
    loop      the node loop's wake pipe, timers and call queue
    dispatch  the message side of nexrl.node.Node

Importing this package never imports torch.
"""

from .codec import (OOB_THRESHOLD, PROTOCOL_VERSION, DecodeError, EncodeError, Message, decode,
                    encode, new_msg_id)
from .events import BusUnavailable, EventProxy, Publisher, Subscriber, handshake, topic_of
from .lease import Lease, LeaseTable
from .liveness import Liveness, Peer
from .reqrep import Client, RemoteError, ReplyCache, RequestTimeout
from .schema import SchemaError, check_incoming, check_outgoing
from .sockets import CurveConfig, make_keys, make_socket

__all__ = [
    "OOB_THRESHOLD", "PROTOCOL_VERSION", "BusUnavailable", "Client", "CurveConfig", "DecodeError",
    "EncodeError", "EventProxy", "Lease", "LeaseTable", "Liveness", "Message", "Peer",
    "Publisher", "RemoteError", "ReplyCache", "RequestTimeout", "SchemaError", "Subscriber",
    "check_incoming", "check_outgoing", "decode", "encode", "handshake", "make_keys",
    "make_socket", "new_msg_id", "topic_of",
]
