"""Wire codec: a `Message` <-> the ZeroMQ frames that carry it.

The contract lives in proto/README.md and proto/schema.json; this module is its Python
implementation. A message is one header frame plus zero or more buffer frames:

    frame 0      msgpack map (the envelope), keys in this order:
                 version, type, msg_id, reply_to, sender, seq, ts, body
    frame 1..n   raw little-endian bytes of arrays too large to inline (out-of-band)

Arrays anywhere inside `body` travel as msgpack ext types (1 numpy array, 2 torch tensor),
inline or as their own frame: nexrl/bus/arrays.py. Encoding is per thread with reused msgpack
Packers; importing this module never imports torch.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .arrays import (EXT_NDARRAY, EXT_TENSOR, OOB_THRESHOLD, WIRE_DTYPES, DecodeError,
                     EncodeError, decode_array, encode_ndarray, encode_tensor, frame_buffer,
                     torch_tensor_type)

__all__ = ["EXT_NDARRAY", "EXT_TENSOR", "OOB_THRESHOLD", "PROTOCOL_MAJOR", "PROTOCOL_VERSION",
           "WIRE_DTYPES", "DecodeError", "EncodeError", "Message", "decode", "encode",
           "encode_fields", "new_msg_id", "reset_id_prefix", "stamp"]

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


@dataclass(slots=True)
class Message:
    """One envelope. Field meanings are in proto/schema.json (`envelope`)."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    sender: str = ""
    msg_id: str = ""
    reply_to: str | None = None
    seq: int = 0
    ts: float = 0.0
    version: str = PROTOCOL_VERSION


_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_msg_id() -> str:
    """A process-unique, cheap message id: 8 random hex chars + '-' + a hex counter."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


def reset_id_prefix() -> None:
    """Call in a forked child so parent and child never hand out the same ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(4).hex()
    _ID_COUNTER = itertools.count(1)


# --------------------------------------------------------------------------- encoding


class _Encoder(threading.local):
    """Per-thread encoding state. One msgpack Packer is built per thread and reused (a new
    Packer per message, as msgpack.packb makes, costs about a third of a small encode); its
    `default` hook reads the current message's state (`cur`: out-of-band list, threshold,
    type, torch.Tensor) from here. A nested encode on the same thread (a signal handler
    that publishes while `default` runs) gets a fresh Packer and puts `cur` back after."""

    def __init__(self) -> None:
        self.cur: tuple | None = None
        self.packer = msgpack.Packer(default=self.default, use_bin_type=True, autoreset=True)
        self.scratch = self.new_scratch()  # transient headers (encode_fields(transient=True))

    def new_scratch(self) -> msgpack.Packer:
        return msgpack.Packer(default=self.default, use_bin_type=True, autoreset=False)

    def default(self, obj: Any) -> Any:
        oob, oob_threshold, mtype, tensor_type = self.cur
        if isinstance(obj, np.ndarray):
            return encode_ndarray(obj, oob, oob_threshold)
        if isinstance(obj, np.generic):
            return obj.item()
        if tensor_type is not None and isinstance(obj, tensor_type):
            return encode_tensor(obj, oob, oob_threshold)
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise EncodeError(f"a value of type {type(obj).__name__} cannot travel on the wire "
                          f"in a {mtype!r} message")


_ENCODER = _Encoder()


def encode(msg: Message, oob_threshold: int = OOB_THRESHOLD) -> list:
    """Frames for `msg`: [header bytes, *out-of-band buffers (memoryviews)]."""
    return encode_fields(msg.type, msg.body, msg.sender, msg.msg_id, msg.reply_to, msg.seq,
                         msg.ts, oob_threshold, msg.version)


def encode_fields(mtype: str, body: dict[str, Any], sender: str, msg_id: str,
                  reply_to: str | None, seq: int, ts: float,
                  oob_threshold: int = OOB_THRESHOLD, version: str = PROTOCOL_VERSION,
                  transient: bool = False) -> list:
    """`encode` from the envelope's fields (the send paths: no Message is built first).

    transient=True: frame 0 is a view of this thread's scratch buffer instead of a bytes
    object of its own (one copy of the header less), good until the next transient encode on
    this thread: for a sender that copies it into the socket at once and keeps nothing.
    """
    enc = _ENCODER
    outer = enc.cur
    oob: list = []
    enc.cur = (oob, oob_threshold, mtype, torch_tensor_type())
    header = {
        "version": version,
        "type": mtype,
        "msg_id": msg_id,
        "reply_to": reply_to,
        "sender": sender,
        "seq": seq,
        "ts": ts,
        "body": body,
    }
    try:
        if outer is not None:  # a nested encode (see _Encoder): a Packer of its own
            head: Any = msgpack.Packer(default=enc.default, use_bin_type=True,
                                       autoreset=True).pack(header)
        elif transient:
            scratch = enc.scratch
            try:
                scratch.reset()
            except BufferError:  # the previous view is still held somewhere: a new buffer
                scratch = enc.scratch = enc.new_scratch()
            try:
                scratch.pack(header)
            except BaseException:
                scratch.reset()
                raise
            head = scratch.getbuffer()
        else:
            head = enc.packer.pack(header)  # (a Packer resets itself when this raises)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode {mtype!r}: {e}") from e
    finally:
        enc.cur = outer
    return [head, *oob] if oob else [head]


def stamp(msg: Message, sender: str, seq: int) -> Message:
    """Fill the envelope fields a sender owns (id, sender, seq, timestamp) if empty."""
    if not msg.msg_id:
        msg.msg_id = new_msg_id()
    msg.sender = sender
    msg.seq = seq
    msg.ts = time.time()
    return msg


# --------------------------------------------------------------------------- decoding


_NO_OOB_FRAMES = [b""]  # stands for a one-frame message: no out-of-band frame to refer to


def _ext_hook_one_frame(code: int, payload: bytes) -> Any:
    if code == EXT_NDARRAY or code == EXT_TENSOR:
        return decode_array(code, payload, _NO_OOB_FRAMES)
    raise DecodeError(f"unknown msgpack ext type {code} (known: 1 ndarray, 2 tensor)")


def decode(frames: list, max_bytes: int | None = None) -> Message:
    """Parse frames (bytes or zmq.Frame) into a Message; raises DecodeError saying why not.

    Checks only the envelope; the body is checked against the schema by `schema.check`.
    (Hot path: exact type tests, since msgpack yields exact builtins, and the common
    version string short-cuts the version parse.)
    """
    if not frames:
        raise DecodeError("empty message (no frames)")
    first = frames[0]
    head_buf = first if type(first) is bytes else frame_buffer(first)
    if max_bytes is not None:
        # bytes, zmq.Frame and 1-D byte memoryviews all have len() == their size in bytes
        total = len(head_buf) if len(frames) == 1 else sum(map(len, frames))
        if total > max_bytes:
            raise DecodeError(f"message of {total} bytes exceeds the limit of {max_bytes}",
                              "too_large")

    if len(frames) == 1:
        ext_hook = _ext_hook_one_frame  # the common case: no closure over the frames
    else:
        def ext_hook(code: int, payload: bytes) -> Any:
            if code == EXT_NDARRAY or code == EXT_TENSOR:
                return decode_array(code, payload, frames)
            raise DecodeError(f"unknown msgpack ext type {code} (known: 1 ndarray, 2 tensor)")

    try:
        head = msgpack.unpackb(head_buf, raw=False, ext_hook=ext_hook, strict_map_key=True)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise DecodeError(f"header frame is not valid msgpack: {type(e).__name__}: {e}") from e
    if type(head) is not dict:
        raise DecodeError(f"header must be a map, got {type(head).__name__}")
    get = head.get
    version = get("version")
    if version != PROTOCOL_VERSION:
        if type(version) is not str:
            raise DecodeError("envelope field 'version' is missing or not a string")
        if _VERSION_RE.fullmatch(version) is None:
            raise DecodeError(f"envelope field 'version' must be 'MAJOR.MINOR', not {version!r}")
        if version.split(".", 1)[0] != str(PROTOCOL_MAJOR):
            raise DecodeError(f"protocol version {version!r} is incompatible with "
                              f"{PROTOCOL_VERSION}", "bad_version")
    mtype, msg_id, reply_to = get("type"), get("msg_id"), get("reply_to")
    sender, seq, ts, body = get("sender"), get("seq"), get("ts"), get("body")
    if type(mtype) is not str or not mtype:
        raise DecodeError("envelope field 'type' is missing or not a non-empty string")
    if type(msg_id) is not str:
        raise DecodeError(f"envelope field 'msg_id' of {mtype!r} must be a string")
    if reply_to is not None and type(reply_to) is not str:
        raise DecodeError(f"envelope field 'reply_to' of {mtype!r} must be a string or nil")
    if type(sender) is not str:
        raise DecodeError(f"envelope field 'sender' of {mtype!r} must be a string")
    if type(seq) is not int or seq < 0:
        raise DecodeError(f"envelope field 'seq' of {mtype!r} must be a non-negative integer")
    tst = type(ts)
    if tst is not float:
        if tst is not int:
            raise DecodeError(f"envelope field 'ts' of {mtype!r} must be a number")
        ts = float(ts)
    if type(body) is not dict:
        raise DecodeError(f"envelope field 'body' of {mtype!r} must be a map")
    for k in body:
        if type(k) is not str:  # msgpack lets bin keys through; the wire does not
            raise DecodeError(f"body of {mtype!r} has a key that is not a string")
    return Message(mtype, body, sender, msg_id, reply_to, seq, ts, version)
